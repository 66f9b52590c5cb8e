#!/usr/bin/env python3
"""Benchmark: the full gate analysis from disk against plain inference, with the pipeline's step breakdown (CPU).

    python benchmarks/bench_pipeline.py                 # 1,550 queries, elementwise gating
    python benchmarks/bench_pipeline.py --quick         # smoke run: 256 queries, 1 repetition
    python benchmarks/bench_pipeline.py --gating_types global elementwise --no_plots --repeats 2

Per gating type (``--gating_types``, default elementwise), on the same JSONL, feature folders and
random-weight checkpoint (``common.BenchData``): plain inference (``load_checkpoint`` + ``build_dataset``
+ ``make_batches`` + ``qd_detr.inference.predict``) versus the full ``run_gate_analysis.py`` job
(``gate_analysis.pipeline.run_analysis`` configured as its ``main`` does: loading, inference with gate
capture streamed to the gate store and the statistics, predictions, metrics, CSVs, plots, report,
run.json); with ``--no_plots`` also the job without plots. Whole runs alternated after one warm-up,
medians; once more plain inference without the exact re-runs of ambiguous rows. The pipeline's time is
broken down by its steps (``run_analysis(..., timings=)``; the gate store and statistics run on a worker
thread inside ``capture_gates``, the main figures in a process from ``start_plots`` to ``run_analyses``).

Target (elementwise gating, batch 32): full pipeline / plain <= 1.30; a miss is profiled (cProfile)
unless ``--no_profile``.
"""
import argparse
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from common import GATING_TYPES, TARGET_GATING, TARGETS, fmt_bytes, load_note, log  # noqa: E402

FULL, NO_PLOTS, PLAIN, NO_EXACT = ("full pipeline", "full pipeline, --no_plots", "plain predict",
                                   "plain predict, no exact re-runs")
INFERENCE_STEPS = ("load_model", "build_batches", "capture_gates")  # what plain inference also does


def add_arguments(p, flag_names=("--gating_types", "--pipeline_gating_types")):
    """This benchmark's flags; ``flag_names``: the names of the gating-type flag (``bench_gate_tracking.py``
    only takes ``--pipeline_gating_types``)."""
    p.add_argument(*flag_names, dest="pipeline_gating_types", nargs="*", choices=GATING_TYPES,
                   default=[TARGET_GATING], help="gating types of the from-disk comparison (default: elementwise)")
    p.add_argument("--no_plots", action="store_true", help="also time the full pipeline with --no_plots")
    return p


def run(args, data, scratch, results):
    """The from-disk comparison for every gating type; fills ``results["pipeline"]``."""
    s = results["settings"]
    s["pipeline_gating_types"] = args.pipeline_gating_types
    n, bs = s["n_queries"], s["batch_size"]
    n_warm = min(n, 2 * bs)
    no_plots = (False, True) if args.no_plots else (False,)
    log("== from disk: plain inference (load + dataset + predict) vs the full run_gate_analysis.py job")
    cases = {gt: data.case(gt, n) for gt in args.pipeline_gating_types}
    data.jsonl(n_warm)
    log(f"  {data.describe()}")
    results["pipeline"] = {}
    for gt, case in cases.items():
        log(f"  -- {gt}")
        seconds = common.warm_up(data.case(gt, n_warm), bs, scratch)  # imports, allocator; page cache
        log(f"    warm-up on {n_warm} queries {seconds:.1f} s")
        reps = s["repeats"] if gt == TARGET_GATING else s["other_repeats"]
        r = common.time_plain_and_pipeline(case, bs, reps, scratch, no_plots=no_plots)
        seconds, info = common.timed(common.plain_inference, case, bs, exact=False)
        log(f"    once      {NO_EXACT:<31} {seconds:7.1f} s  {load_note()}")
        r[NO_EXACT] = {"times": [seconds], "median": seconds, **info}
        results["pipeline"][gt] = r
    r = results["pipeline"].get(TARGET_GATING)
    if r and not args.no_profile and r[FULL]["median"] / r[PLAIN]["median"] > TARGETS["pipeline"]:
        out = os.path.join(scratch, "profile_pipeline")
        total, text = common.profile_call(lambda: common.full_pipeline(cases[TARGET_GATING], bs, out), top=30)
        shutil.rmtree(out, ignore_errors=True)
        results["profile_pipeline"] = text
        log(f"  the full pipeline missed its target: cProfile of one run ({total:.1f} s under the profiler)\n{text}")


def report(results):
    n = results["settings"]["n_queries"]
    log("")
    log("From disk: plain inference (load + dataset + predict) vs the full run_gate_analysis.py job (median s)")
    rows = []
    for gt, r in results["pipeline"].items():
        base = r[PLAIN]["median"]
        for mode in (NO_EXACT, PLAIN, FULL, NO_PLOTS):
            if mode not in r:
                continue
            m = r[mode]
            note = f"exact re-runs {m['exact_reruns']}"
            if "output_bytes" in m:
                note += f"; output {fmt_bytes(m['output_bytes'])} (gates/ {fmt_bytes(m['gate_bytes'])})"
            rows.append([gt, mode, f"{m['median']:.1f}", f"{m['median'] / base:.3f}", f"{m['median'] / n * 1e3:.1f}",
                         " ".join(f"{t:.1f}" for t in m["times"]), note])
    common.print_table(["gating", "run", "median s", "x plain", "ms/query", "all runs (s)", "notes"], rows)
    for gt, r in results["pipeline"].items():
        plain, pipe, no_exact = r[PLAIN]["median"], r[FULL]["median"], r[NO_EXACT]["median"]
        log(f"   {gt}: pipeline - plain = {pipe - plain:.1f} s ({100 * (pipe - plain) / plain:.1f}% of plain predict, "
            f"{100 * (pipe - plain) / no_exact:.1f}% of plain predict without exact re-runs); the exact re-runs of "
            f"{r[PLAIN]['exact_reruns']} queries cost {plain - no_exact:.1f} s in both")
    for gt, r in results["pipeline"].items():
        base = r[PLAIN]["median"]
        for mode in (FULL, NO_PLOTS):
            if mode not in r:
                continue
            steps = r[mode]["steps"]
            log(f"   {gt}, {mode}: steps of run_analysis (wall s, median over runs; % of plain predict)")
            rows = [["", name, f"{sec:.2f}", f"{100 * sec / base:.1f}%"] for name, sec in steps.items()]
            inference = sum(steps.get(k, 0.0) for k in INFERENCE_STEPS)
            rows.append(["", " + ".join(INFERENCE_STEPS), f"{inference:.2f}", f"{100 * inference / base:.1f}%"])
            rows.append(["", "  minus plain predict (what capture adds)", f"{inference - base:.2f}",
                         f"{100 * (inference - base) / base:.1f}%"])
            rest = sum(steps.values()) - inference
            rows.append(["", "all other steps", f"{rest:.2f}", f"{100 * rest / base:.1f}%"])
            common.print_table(["", "step", "s", "% plain"], rows)


def targets(results):
    """[(name, value, target)] of the pipeline target (when the target gating type ran)."""
    r = results.get("pipeline", {}).get(TARGET_GATING)
    if not r:
        return []
    return [("full pipeline / plain predict", r[FULL]["median"] / r[PLAIN]["median"], TARGETS["pipeline"])]


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                parents=[common.base_arguments(), common.timing_arguments()],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_arguments(p)


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if not args.pipeline_gating_types:
        get_args_parser().error("--gating_types needs at least one gating type")
    with common.bench_run(args, "bench_pipeline_") as (data, scratch, results):
        t0 = time.perf_counter()
        run(args, data, scratch, results)
        report(results)
        log("")
        log(f"Target ({TARGET_GATING} gating; pipeline part {(time.perf_counter() - t0) / 60:.1f} min):")
        results["targets"] = common.check_targets(targets(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
