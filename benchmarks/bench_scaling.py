#!/usr/bin/env python3
"""Benchmark: what the gate analysis costs on top of plain inference, per gating type and data size, in
whole fresh processes (imports, checkpoint loading and writing included).

    python benchmarks/bench_scaling.py                  # 5 gating types x 16 / 512 / 1,550 queries, 3 repetitions
    python benchmarks/bench_scaling.py --quick          # clipwise and elementwise x 16 / 128 queries, 1 repetition
    python benchmarks/bench_scaling.py --gating_types clipwise --sizes 16 50 --repeats 5

Per gating type (``global``, ``clipwise``, ``elementwise``, ``v2_clipwise_film``: v2 sigmoid MHA gate and
FiLM FFN gate with its beta shift, ``global_diagstrip_ssm``: the diagstrip-ssm branch's SSM gate) a
random-weight checkpoint at the original default size and the synthetic QVHighlights-layout data of
``common.BenchData`` (3 queries per video), and per size four commands, alternated within a repetition
(order reversed every other one), medians over repetitions:

    plain       python -m qd_detr.inference                     (predictions + metrics)
    tracking    the same with every fusion gate recorded        (this script, --child tracking)
    full        python run_gate_analysis.py                     (everything: store, statistics, figures, report)
    no_plots    python run_gate_analysis.py --no_plots

Printed: seconds of plain inference, the other commands as ratios to it and their extra seconds, and per
command the fixed cost: the intercept of a least-squares line through (queries, seconds) over the sizes,
minus plain inference's (what a run costs on top of inference whatever its size). Targets (issue 16): at
<= 50 queries, full <= plain + 3 s and --no_plots <= plain + 1 s; at 1,550 queries full <= 1.15 x plain.
The full run takes about 2.5 hours on 2 cores (48 min with --repeats 1; most of it at 1,550 queries);
--quick a few minutes.
"""
import argparse
import json
import os
import shutil
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from common import fmt_bytes, load_note, log  # noqa: E402

GATING_TYPES = ("global", "clipwise", "elementwise", "v2_clipwise_film", "global_diagstrip_ssm")
QUICK_GATING_TYPES = ("clipwise", "elementwise")
SIZES, QUICK_SIZES = (16, 512, 1550), (16, 128)
MODES = ("plain", "tracking", "full", "no_plots")
#: Options added to ``common.bench_options`` per benchmark gating type (the fixtures' values).
VARIANTS = {
    "v2_clipwise_film": dict(gating_type="clipwise", mha_gate_temp=2.0, mha_gate_bias_init=1.0, mha_gate_scale_init=1.0,
                             ffn_gate_alpha_init=0.3, ffn_gate_film=True, ffn_gate_beta_init=0.3),
    "global_diagstrip_ssm": dict(gating_type="global_diagstrip_ssm", ssm_band_width=8, ssm_enc_channels=64,
                                 ssm_dilations=[1, 2, 4], ssm_diag_subtract=0.1, ssm_use_video_branch=1),
}
SMALL_TARGETS = {"full": 3.0, "no_plots": 1.0}   # extra seconds over plain inference at <= SMALL queries
SMALL, LARGE, LARGE_TARGET = 50, 1550, 1.15


def checkpoint(data, name):
    """Path of the benchmark checkpoint of ``name`` (a gating type of ``common`` or a key of ``VARIANTS``)."""
    if name not in VARIANTS:
        return data.checkpoint(name)
    if name not in data.ckpts:
        import torch

        from qd_detr.model import build_model
        torch.manual_seed(0)
        opt = common.bench_options("clipwise", data.dirs)
        for key, value in VARIANTS[name].items():
            setattr(opt, key, value)
        model = build_model(opt).eval()
        path = os.path.join(os.path.dirname(data.root), f"model_{name}.ckpt")
        torch.save({"model": model.state_dict(), "epoch": 0, "opt": opt}, path)
        data.ckpts[name], data.params[name] = path, sum(p.numel() for p in model.parameters())
    return data.ckpts[name]


def commands(mode, ckpt, data_path, dirs, batch_size, out):
    """(kind, target, argv) of ``common.run_child`` for one command of ``MODES``."""
    common_args = ["--model_path", ckpt, "--data_path", data_path, *common.feature_args(dirs), "--device", "cpu",
                   "--batch_size", str(batch_size), "--quiet"]
    if mode == "plain":
        return "module", "qd_detr.inference", common_args + ["--output_path", os.path.join(out, "preds.jsonl")]
    if mode == "tracking":
        return "script", os.path.abspath(__file__), ["--child", "tracking", *common_args,
                                                     "--output_path", os.path.join(out, "preds.jsonl")]
    return "script", os.path.join(common.ROOT, "run_gate_analysis.py"), common_args + [
        "--output_dir", os.path.join(out, "run"), *(["--no_plots"] if mode == "no_plots" else [])]


def child_tracking(args):
    """Child process: what ``python -m qd_detr.inference`` does, with a ``qd_detr.gates.GateRecorder`` on every
    fusion gate (the records of each batch counted, then dropped)."""
    from qd_detr.checkpoint import load_checkpoint
    from qd_detr.dataset import read_jsonl
    from qd_detr.eval import metrics_path_for
    from qd_detr.inference import build_dataset, evaluate, make_batches, predict
    from qd_detr.io import write_json, write_jsonl
    dirs = {"v_feat_dirs": args.v_feat_dirs, "t_feat_dir": args.t_feat_dir, "a_feat_dir": args.a_feat_dir}
    model, opt, _ = load_checkpoint(args.model_path, device="cpu", batching="query")
    dataset = build_dataset(opt, read_jsonl(args.data_path), dirs)
    batches = make_batches(dataset, "query", args.batch_size, opt)
    counted = [0]
    lines = predict(model, dataset, batches, next(model.parameters()).device, progress=False,
                    sink=lambda records: counted.__setitem__(0, counted[0] + len(records)))
    write_jsonl(args.output_path, lines)
    metrics = evaluate(lines, dataset.records)
    if metrics is not None:
        write_json(metrics_path_for(args.output_path), metrics)
    print(json.dumps({"queries": len(lines), "gate_records": counted[0]}))
    return 0


def measure(data, scratch, gating_types, sizes, repeats, batch_size):
    """{gating type: {size: {mode: {"times": [s], "median": s}}}}; every command must exit 0."""
    out = {}
    for gt in gating_types:
        ckpt = checkpoint(data, gt)
        out[gt] = {}
        for n in sizes:
            data_path = data.jsonl(n)
            log(f"== {gt}, {n} queries")
            times = {m: [] for m in MODES}
            for r in range(repeats):
                for mode in (MODES if r % 2 == 0 else MODES[::-1]):
                    work = os.path.join(scratch, f"{gt}_{n}_{mode}")
                    os.makedirs(work, exist_ok=True)
                    kind, target, argv = commands(mode, ckpt, data_path, data.dirs, batch_size, work)
                    seconds, peak, code = common.run_child(kind, target, argv, os.path.join(scratch, "child.log"))
                    if code != 0:
                        with open(os.path.join(scratch, "child.log")) as fh:
                            tail = fh.read()[-2000:]
                        raise SystemExit(f"{mode} ({gt}, {n} queries) exited with {code}:\n{tail}")
                    shutil.rmtree(work, ignore_errors=True)
                    times[mode].append(seconds)
                    log(f"    rep {r + 1}/{repeats} {mode:<9} {seconds:7.2f} s  peak {fmt_bytes(peak)}  {load_note()}")
            out[gt][n] = {m: {"times": t, "median": statistics.median(t)} for m, t in times.items()}
    return out


def fixed_costs(by_size):
    """{mode: intercept of the least-squares line of median seconds over queries, minus plain's} (None with one
    size)."""
    sizes = sorted(by_size)
    if len(sizes) < 2:
        return {m: None for m in MODES}
    xs = [float(n) for n in sizes]
    mx = sum(xs) / len(xs)

    def intercept(mode):
        ys = [by_size[n][mode]["median"] for n in sizes]
        my = sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        return my - slope * mx

    base = intercept("plain")
    return {m: intercept(m) - base for m in MODES}


def report(results):
    """The table: per gating type and size, plain seconds, ratios and extra seconds; then the fixed costs and
    the targets that the sizes cover."""
    rows, checks = [], []
    for gt, by_size in results.items():
        fixed = fixed_costs(by_size)
        for n in sorted(by_size):
            m = {k: v["median"] for k, v in by_size[n].items()}
            p = m["plain"]
            rows.append([gt, f"{n:,}", f"{p:.2f}"] + [f"{m[k] / p:.3f} ({m[k] - p:+.2f} s)" for k in MODES[1:]])
            for mode, limit in SMALL_TARGETS.items():
                if n <= SMALL:
                    checks.append((f"{gt} {n}: {mode} - plain (s)", m[mode] - p, limit))
            if n >= LARGE:
                checks.append((f"{gt} {n}: full / plain", m["full"] / p, LARGE_TARGET))
        rows.append([gt, "fixed cost", "-"] + ["-" if fixed[k] is None else f"{fixed[k]:+.2f} s" for k in MODES[1:]])
    log("\n== results (median seconds of plain inference; others: ratio to it, and extra seconds)")
    common.print_table(["gating type", "queries", "plain s", "tracking", "full analysis", "--no_plots"], rows)
    if checks:
        log("\n== targets")
        return common.check_targets(checks)
    return []


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help=f"{' and '.join(QUICK_GATING_TYPES)} at {' / '.join(map(str, QUICK_SIZES))} queries, 1 repetition")
    p.add_argument("--gating_types", nargs="+", choices=GATING_TYPES, default=None,
                   help=f"default: all five ({', '.join(GATING_TYPES)}); --quick: {', '.join(QUICK_GATING_TYPES)}")
    p.add_argument("--sizes", nargs="+", type=int, default=None,
                   help=f"queries per JSONL (default {' '.join(map(str, SIZES))}; --quick {' '.join(map(str, QUICK_SIZES))})")
    p.add_argument("--repeats", type=int, default=None, help="repetitions of each command (default 3; --quick 1)")
    p.add_argument("--batch_size", type=int, default=32, help="queries per forward (default 32)")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the commands (default 1)")
    p.add_argument("--workdir", default=None, help="folder for the generated data (default: a new temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the generated data")
    p.add_argument("--json", default=None, help="also write all results to this JSON file")
    g = p.add_argument_group("child process (internal)")
    g.add_argument("--child", choices=("tracking",), default=None, help=argparse.SUPPRESS)
    for flag in ("--model_path", "--data_path", "--t_feat_dir", "--a_feat_dir", "--output_path", "--device"):
        g.add_argument(flag, help=argparse.SUPPRESS)
    g.add_argument("--v_feat_dirs", nargs="+", help=argparse.SUPPRESS)
    g.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.child:
        return child_tracking(args)
    gating_types = args.gating_types or (QUICK_GATING_TYPES if args.quick else GATING_TYPES)
    sizes = sorted(set(args.sizes or (QUICK_SIZES if args.quick else SIZES)))
    repeats = args.repeats or (1 if args.quick else 3)
    run_settings = {"gating_types": list(gating_types), "sizes": sizes, "repeats": repeats,
                    "batch_size": args.batch_size, "threads": args.threads, "clips": common.N_CLIPS, "dims": common.DIMS}

    def describe():
        return (f"  gating types {', '.join(gating_types)}; sizes {', '.join(map(str, sizes))} queries "
                f"({common.videos_for(max(sizes))} videos x {common.N_CLIPS} clips); {repeats} repetition(s); "
                f"batch {args.batch_size}; OMP_NUM_THREADS={args.threads}  {load_note()}")
    with common.bench_session(args, "bench_scaling_", run_settings, common.videos_for(max(sizes)),
                              describe) as (data, scratch, results):
        results["runs"] = measure(data, scratch, gating_types, sizes, repeats, args.batch_size)
        results["targets"] = report(results["runs"])
        log(f"\ndata: {data.describe()}")
    return 0


if __name__ == "__main__":
    # ends as the timed tools do (qd_detr.cli.exit_process), so the tracking child's shutdown costs what plain
    # inference's does
    from qd_detr.cli import exit_process
    exit_process(main())
