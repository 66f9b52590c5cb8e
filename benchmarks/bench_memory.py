#!/usr/bin/env python3
"""Benchmark: peak memory of fresh processes, full gate analysis vs plain inference vs the predecessor's tracking.

    python benchmarks/bench_memory.py                   # 1,550 and 6,200 queries
    python benchmarks/bench_memory.py --quick           # smoke run: 256 and 1,024 queries
    python benchmarks/bench_memory.py --memory_full     # every process at both sizes

Elementwise gating, a random-weight checkpoint at the original default size and synthetic data
(``common.BenchData``) with a main JSONL (``--n_queries``, default 1,550: 3 queries per video) and one
``--memory_scale`` times larger (default 4: 6,200 queries, 12 per video). Measured: VmHWM, the peak resident
set of a fresh process read from /proc/self/status at its exit (``common.run_child``), of
``python run_gate_analysis.py`` at both sizes, and of ``python -m qd_detr.inference`` and plain inference
with ``common.PredecessorTracker`` attached (this script with ``--child predecessor``) at the main size
(both sizes with ``--memory_full``).

Target: the full pipeline's peak at the larger size <= 1.10 x at the main size.
"""
import argparse
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import torch  # noqa: E402
from common import TARGET_GATING, TARGETS, PredecessorTracker, fmt_bytes, load_note, log  # noqa: E402

GATING = TARGET_GATING


def add_arguments(p):
    p.add_argument("--memory_scale", type=int, default=4, help="the larger JSONL is this x bigger (default 4)")
    p.add_argument("--memory_full", action="store_true",
                   help="also run plain inference and the predecessor at the larger size")
    return p


def add_child_arguments(p):
    """The hidden flags of the child-process mode (plain inference with the predecessor's tracking)."""
    p.add_argument("--child", choices=("predecessor",), default=None, help=argparse.SUPPRESS)
    p.add_argument("--model_path", help=argparse.SUPPRESS)
    p.add_argument("--data_path", help=argparse.SUPPRESS)
    p.add_argument("--v_feat_dirs", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--t_feat_dir", help=argparse.SUPPRESS)
    p.add_argument("--a_feat_dir", help=argparse.SUPPRESS)
    return p


def child_predecessor(args):
    """Child process: plain inference from disk with the predecessor's tracking attached; prints a JSON line."""
    from qd_detr.checkpoint import load_checkpoint
    from qd_detr.dataset import read_jsonl
    from qd_detr.inference import build_dataset, iterate_batches, make_batches
    dirs = {"v_feat_dirs": args.v_feat_dirs, "t_feat_dir": args.t_feat_dir, "a_feat_dir": args.a_feat_dir}
    model, opt, _ = load_checkpoint(args.model_path, device="cpu", batching="query")
    dataset = build_dataset(opt, read_jsonl(args.data_path), dirs)
    batches = make_batches(dataset, "query", args.batch_size, opt)
    tracker = PredecessorTracker(model.fusion).attach()

    def before(metas, _):
        tracker.current_sample_id = metas[0]["qid"]
    n = 0
    for metas, _, _ in iterate_batches(model, dataset, batches, torch.device("cpu"), progress=False,
                                       before_forward=before):
        n += len(metas)
    print(json.dumps({"queries": n, "kept_bytes": tracker.nbytes(), "details": len(tracker.query_gate_details)}))
    return 0


def bench_memory(cases, batch_size, scratch, full):
    """{process: {n_queries: {"seconds", "peak_bytes", ...}}} for ``cases`` ({n_queries: Case})."""
    small = min(cases)
    results = {}
    for n, case in sorted(cases.items()):
        out_dir = os.path.join(scratch, f"mem_{n}")
        cmds = {"full pipeline": ("script", os.path.join(common.ROOT, "run_gate_analysis.py"),
                                  common.pipeline_argv(case, batch_size, out_dir))}
        if full or n == small:
            cmds["plain inference"] = ("module", "qd_detr.inference", [
                "--model_path", case.ckpt, "--data_path", case.data_path, *common.feature_args(case.dirs),
                "--output_path", os.path.join(scratch, f"pred_{n}.jsonl"), "--device", "cpu",
                "--batch_size", str(batch_size), "--quiet", "--overwrite"])
            cmds["predecessor"] = ("script", os.path.abspath(__file__), [
                "--child", "predecessor", "--model_path", case.ckpt, "--data_path", case.data_path,
                *common.feature_args(case.dirs), "--batch_size", str(batch_size)])
        for kind, (how, target, child_args) in cmds.items():
            log_path = os.path.join(scratch, f"child_{kind.replace(' ', '_')}_{n}.log")
            seconds, peak, code = common.run_child(how, target, child_args, log_path)
            with open(log_path, errors="replace") as fh:
                tail = fh.read()[-3000:]
            if code != 0:
                raise RuntimeError(f"child {kind} ({n} queries) failed with exit code {code}:\n{tail}")
            if peak < 0:
                raise RuntimeError(f"child {kind} ({n} queries) did not report its peak memory:\n{tail}")
            extra = {}
            if kind == "full pipeline":
                extra["gate_bytes"] = common.dir_bytes(os.path.join(out_dir, "gates"))
                shutil.rmtree(out_dir, ignore_errors=True)
            if kind == "predecessor":
                extra.update(json.loads(tail.strip().splitlines()[-1]))
            results.setdefault(kind, {})[n] = {"seconds": seconds, "peak_bytes": peak, **extra}
            log(f"    {kind:<16} {n:>6} queries: {seconds:7.1f} s, peak RSS {peak / 2**20:7,.0f} MiB  {load_note()}")
    return results


def sizes(args, settings):
    return settings["n_queries"], settings["n_queries"] * args.memory_scale


def run(args, data, scratch, results):
    """Peak memory at both sizes; fills ``results["memory"]``."""
    s = results["settings"]
    small, big = sizes(args, s)
    s.update(n_queries_memory=[small, big], memory_gating=GATING)
    log(f"== peak memory of fresh processes ({GATING} gating; VmHWM at exit), {small} and {big} queries")
    cases = {n: data.case(GATING, n) for n in (small, big)}
    log(f"  {data.describe()}")
    results["memory"] = bench_memory(cases, s["batch_size"], scratch, args.memory_full)


def report(results):
    s = results["settings"]
    small, big = s["n_queries_memory"]
    log("")
    log(f"Peak memory (VmHWM of a fresh process, {s['memory_gating']} gating), {small} vs {big} queries")
    rows = []
    for kind, r in results["memory"].items():
        a, b = r.get(small), r.get(big)
        note = ""
        if "gate_bytes" in a:
            note = f"gates/ on disk {fmt_bytes(a['gate_bytes'])}" + (f" / {fmt_bytes(b['gate_bytes'])}" if b else "")
        if "kept_bytes" in a:
            note = f"gate arrays kept {fmt_bytes(a['kept_bytes'])}" + (f" / {fmt_bytes(b['kept_bytes'])}" if b else "")
        rows.append([kind, f"{a['peak_bytes'] / 2**20:,.0f}", f"{b['peak_bytes'] / 2**20:,.0f}" if b else "-",
                     f"{b['peak_bytes'] / a['peak_bytes']:.3f}" if b else "-", f"{a['seconds']:.0f}",
                     f"{b['seconds']:.0f}" if b else "-", note])
    common.print_table(["process", f"MiB @{small}", f"MiB @{big}", "ratio", f"s @{small}", f"s @{big}", "notes"], rows)


def targets(results):
    """[(name, value, target)] of the memory target."""
    if "memory" not in results:
        return []
    small, big = results["settings"]["n_queries_memory"]
    r = results["memory"]["full pipeline"]
    return [(f"pipeline peak memory {big} / {small} queries", r[big]["peak_bytes"] / r[small]["peak_bytes"],
             TARGETS["memory"])]


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], parents=[common.base_arguments()],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_child_arguments(add_arguments(p))


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.child == "predecessor":
        common.set_threads(args.threads)
        return child_predecessor(args)
    with common.bench_run(args, "bench_memory_") as (data, scratch, results):
        run(args, data, scratch, results)
        report(results)
        log("")
        log(f"Target ({GATING} gating):")
        results["targets"] = common.check_targets(targets(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
