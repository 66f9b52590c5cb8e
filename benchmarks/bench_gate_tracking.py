#!/usr/bin/env python3
"""Benchmark: what gate tracking and the full gate analysis cost, at QVHighlights scale (CPU); runs the three
benchmarks on one set of generated data and prints their tables and targets together.

    python benchmarks/bench_gate_tracking.py                 # default run (25-50 min on 2 cores)
    python benchmarks/bench_gate_tracking.py --quick         # smoke run (a few minutes)
    python benchmarks/bench_gate_tracking.py --gating_types elementwise --repeats 5 --batch_size 32

1. ``bench_tracking.py``: in memory, per ``--gating_types``: plain, tracking, tracking+stats, predecessor.
2. ``bench_pipeline.py``: from disk, per ``--pipeline_gating_types`` (default elementwise; none to skip):
   plain inference vs the full ``run_gate_analysis.py`` job, with its step breakdown.
3. ``bench_memory.py``: peak memory of fresh processes at ``--n_queries`` and ``--memory_scale`` x more.

Each script runs alone too (see their docstrings and benchmarks/README.md); the flags here are theirs.
Targets (elementwise gating, batch 32): tracking / plain <= 1.05, full pipeline / plain <= 1.30,
pipeline peak memory at 6,200 queries <= 1.10 x at 1,550 queries.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_memory  # noqa: E402
import bench_pipeline  # noqa: E402
import bench_tracking  # noqa: E402
import common  # noqa: E402
from common import TARGET_GATING, log  # noqa: E402

PARTS = {"inmemory": bench_tracking, "pipeline": bench_pipeline, "memory": bench_memory}


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                parents=[common.base_arguments(), common.timing_arguments()],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_tracking.add_arguments(p)
    bench_pipeline.add_arguments(p, flag_names=("--pipeline_gating_types",))
    bench_memory.add_arguments(p)
    p.add_argument("--skip", nargs="*", default=[], choices=tuple(PARTS), help="parts to skip")
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    parts = [name for name in PARTS if name not in args.skip]
    if not args.pipeline_gating_types and "pipeline" in parts:
        parts.remove("pipeline")
    with common.bench_run(args, "bench_gate_tracking_") as (data, scratch, results):
        for name in parts:
            PARTS[name].run(args, data, scratch, results)
        s, env = results["settings"], results["environment"]
        log("")
        log("=" * 110)
        log(f"RESULTS ({s['n_queries']} queries x {s['clips']} clips, batch {s['batch_size']}; torch {env['torch']}, "
            f"{env['torch_threads']} threads, {env['cpu_count']} CPUs)")
        checks = []
        for name in parts:
            PARTS[name].report(results)
            checks += PARTS[name].targets(results)
        log("")
        log(f"Targets ({TARGET_GATING} gating):")
        results["targets"] = common.check_targets(checks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
