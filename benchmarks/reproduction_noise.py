#!/usr/bin/env python3
"""Measure what rounding noise does to a re-run of the original predictions (the basis of
``gate_analysis.reproduction.NOISE_BOUNDS``).

    OMP_NUM_THREADS=1 python benchmarks/reproduction_noise.py [--fixtures ../shared/fixtures] [--seeds 5] [--json F]

For every fixture checkpoint with gates that loads, the val queries are re-run with the original
batching (``gate_analysis.reproduction.rerun_original_batching``) in float32 (the baseline, equal to
the fixture's ``hl_val_submission.jsonl``) and under each noise model:

- ``float64``: model and inputs in float64 (how far float32 is from exact arithmetic);
- ``input 1e-6``: every input feature times ``1 + 1e-6 * N(0, 1)`` (one run per seed);
- ``weight 1e-6``: every weight times ``1 + 1e-6 * N(0, 1)`` (one run per seed);
- ``weight R (sensitivity)``: weights perturbed by larger R (``--sensitivity``, one seed each): how small
  a change of the model the comparison still detects (one AdamW step at lr 1e-4 moves a weight of
  size 0.05 by about 2e-3 relative);
- ``tf32``: every weight and the inputs of every Linear and MultiheadAttention module rounded to
  TF32 (10-bit mantissa), the precision of GPU matmuls in torch < 1.12 on Ampere or newer GPUs.

Printed per fixture and model: raw differences before rounding (foreground probability, window ends
as a fraction of the duration, saliency relative to max(1, |s|)), what they do to the submission
lines (queries changed, 2 s snapping flips, windows at another rank, largest score difference,
saliency difference in float16 steps, largest metric delta) and whether the comparison passes at each
bound level. Then every fixture's own file and every other fixture's file are compared with each
re-run (they must REPRODUCE and DIFFER respectively). Plain Python, not a test.
"""
import argparse
import contextlib
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402

from gate_analysis.reproduction import (  # noqa: E402
    NOISE_BOUNDS,
    compare_metrics,
    compare_predictions,
    read_original_predictions,
    rerun_original_batching,
)
from qd_detr.checkpoint import load_checkpoint  # noqa: E402
from qd_detr.dataset import read_jsonl  # noqa: E402
from qd_detr.errors import ToolkitError  # noqa: E402
from qd_detr.inference import build_dataset, evaluate  # noqa: E402

INPUT_KEYS = ("src_txt", "src_vid", "src_aud")


def _round_tf32(x):
    """Round float32 values to TF32 (10 explicit mantissa bits), round half to even."""
    if not torch.is_floating_point(x):
        return x
    i = x.float().contiguous().view(torch.int32)
    i = (i + 0x0FFF + ((i >> 13) & 1)) & ~0x1FFF
    return i.view(torch.float32).to(x.dtype)


@contextlib.contextmanager
def _tf32(model):
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(_round_tf32(p))

    def hook(module, args, kwargs):
        n = 3 if isinstance(module, torch.nn.MultiheadAttention) else 1
        args = tuple(_round_tf32(a) if i < n and torch.is_tensor(a) else a for i, a in enumerate(args))
        kwargs = {k: _round_tf32(v) if k in ("query", "key", "value", "input") and torch.is_tensor(v) else v
                  for k, v in kwargs.items()}
        return args, kwargs

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in model.modules()
               if isinstance(m, (torch.nn.Linear, torch.nn.MultiheadAttention))]
    try:
        yield None
    finally:
        for h in handles:
            h.remove()
        model.load_state_dict(saved)


@contextlib.contextmanager
def _float64(model):
    model.double()

    def cast(metas, inputs):  # masks too: the older fusion adds its float masks to attention logits
        for k, v in inputs.items():
            if torch.is_tensor(v) and torch.is_floating_point(v):
                inputs[k] = v.double()
    try:
        yield cast
    finally:
        model.float()


@contextlib.contextmanager
def _inputs(seed, rel):
    gen = torch.Generator().manual_seed(seed)

    def perturb(metas, inputs):
        for k in INPUT_KEYS:
            if k in inputs:
                inputs[k] = inputs[k] * (1 + rel * torch.randn(inputs[k].shape, generator=gen))
    yield perturb


@contextlib.contextmanager
def _weights(model, seed, rel):
    gen = torch.Generator().manual_seed(seed)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + rel * torch.randn(p.shape, generator=gen))
    try:
        yield None
    finally:
        model.load_state_dict(saved)


def _raw_diffs(base, other, records):
    dur = {r["qid"]: float(r["duration"]) for r in records}
    prob = max(float(np.abs(base[q]["prob"] - other[q]["prob"]).max()) for q in base)
    span = max(float(np.abs(base[q]["windows"] - other[q]["windows"]).max()) / dur[q] for q in base)
    sal = max(float((np.abs(base[q]["saliency"] - other[q]["saliency"])
                     / np.maximum(1.0, np.abs(base[q]["saliency"]))).max()) for q in base)
    return {"prob": prob, "span": span, "saliency": sal}


def _effects(base_lines, lines, raw, records, base_metrics):
    strict = compare_predictions(base_lines, lines, raw, records, NOISE_BOUNDS["tf32"])
    changed = strict.pop("_changed")  # within noise: the queries whose metric share is allowed to move
    res = {"queries_changed": strict["n_queries"] - strict["identical"], "snap_flips": strict["snap_flips"],
           "reordered_windows": strict["reordered_windows"], "max_score_diff": strict["max_score_diff"],
           "max_saliency_steps": strict["max_saliency_steps"]}
    metrics = evaluate(lines, records)
    res["max_metric_delta"] = compare_metrics(base_metrics, metrics["brief"], changed, records)["max_abs_delta"]
    for level, bounds in NOISE_BOUNDS.items():
        cmp = compare_predictions(base_lines, lines, raw, records, bounds)
        cmp_m = compare_metrics(base_metrics, metrics["brief"], cmp.pop("_changed"), records)
        res[f"passes_{level}"] = bool(cmp["passed"] and cmp_m["passed"])
    return res


def measure(fixtures, names, seeds, rel, sensitivity):
    data = os.path.join(fixtures, "data")
    dirs = common.fixture_dirs(data)
    all_records = {r["qid"]: r for r in read_jsonl(os.path.join(data, "highlight_val_release.jsonl"))}
    files = {n: read_original_predictions(os.path.join(fixtures, n, "hl_val_submission.jsonl")) for n in names}
    results = {}
    for name in names:
        try:
            model, opt, _ = load_checkpoint(os.path.join(fixtures, name, "model.ckpt"), device="cpu")
        except ToolkitError as exc:
            print(f"{name}: skipped ({str(exc)[:100]})")
            continue
        if model.fusion is None:
            print(f"{name}: skipped (no fusion module)")
            continue
        model.eval()
        records = [all_records[line["qid"]] for line in files[name]]
        dataset = build_dataset(opt, records, dirs)
        t0 = time.time()
        base_lines, base_raw = rerun_original_batching(model, opt, dataset)
        base_metrics = evaluate(base_lines, records)["brief"]
        own = compare_predictions(files[name], base_lines, base_raw, records, NOISE_BOUNDS["float32"])
        runs = [("float64", lambda: _float64(model))]
        runs += [(f"input {rel:g} seed {s}", lambda s=s: _inputs(s, rel)) for s in range(seeds)]
        runs += [(f"weight {rel:g} seed {s}", lambda s=s: _weights(model, s, rel)) for s in range(seeds)]
        runs += [("tf32", lambda: _tf32(model))]
        runs += [(f"weight {r:g} (sensitivity)", lambda r=r: _weights(model, 0, r)) for r in sensitivity]
        rows = []
        for label, make in runs:
            with make() as before:
                lines, raw = rerun_original_batching(model, opt, dataset, before_forward=before)
            row = {"noise": label, **_raw_diffs(base_raw, raw, records),
                   **_effects(base_lines, lines, raw, records, base_metrics)}
            rows.append(row)
        others = {}
        for other in names:
            if other == name:
                continue
            worst = None
            for level, bounds in NOISE_BOUNDS.items():
                cmp = compare_predictions(files[other], base_lines, base_raw, records, bounds)
                cmp.pop("_changed")
                worst = cmp
            others[other] = {"differs": worst["differs"], "n": worst["n_queries"],
                             "max_score_diff": worst["max_score_diff"], "max_end_diff_s": worst["max_end_diff_s"],
                             "max_saliency_diff": worst["max_saliency_diff"]}
        results[name] = {"own_file": {"identical": own["identical"], "within_noise": own["within_noise"],
                                      "differs": own["differs"]}, "runs": rows, "other_files": others,
                         "seconds": round(time.time() - t0, 1)}
        _print(name, results[name])
    return results


def _print(name, res):
    print(f"\n== {name} ({res['seconds']} s): own file vs float32 re-run: {res['own_file']}")
    print(f"{'noise':<28} {'d prob':>9} {'d span/dur':>10} {'d sal rel':>9} | {'changed':>7} {'flips':>5} "
          f"{'rerank':>6} {'d score':>8} {'sal steps':>9} {'d metric':>8} | f32  tf32")
    for r in res["runs"]:
        print(f"{r['noise']:<28} {r['prob']:9.2e} {r['span']:10.2e} {r['saliency']:9.2e} | {r['queries_changed']:7d} "
              f"{r['snap_flips']:5d} {r['reordered_windows']:6d} {r['max_score_diff']:8.1e} "
              f"{r['max_saliency_steps']:9.2f} {r['max_metric_delta']:8.2f} | {str(r['passes_float32']):5} "
              f"{str(r['passes_tf32']):5}")
    for other, o in res["other_files"].items():
        print(f"  {other}'s file vs this re-run (tf32 bounds): {o['differs']}/{o['n']} queries differ, max score diff "
              f"{o['max_score_diff']:.3g}, max end diff {o['max_end_diff_s']:.3g} s, max saliency diff "
              f"{o['max_saliency_diff']:.3g}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fixtures", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "fixtures"))
    p.add_argument("--only", nargs="+", default=None, help="fixture folder names (default: every ckpt_*)")
    p.add_argument("--seeds", type=int, default=5, help="seeds per perturbation (default: 5)")
    p.add_argument("--rel", type=float, default=1e-6, help="relative perturbation (default: 1e-6)")
    p.add_argument("--sensitivity", type=float, nargs="*", default=[1e-4, 1e-3, 1e-2],
                   help="relative weight perturbations that stand for another checkpoint (one seed each)")
    p.add_argument("--json", default=None, help="also write the results as JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    fixtures = os.path.abspath(args.fixtures)
    names = args.only or sorted(n for n in os.listdir(fixtures) if n.startswith("ckpt_")
                                and os.path.isfile(os.path.join(fixtures, n, "hl_val_submission.jsonl")))
    results = measure(fixtures, names, args.seeds, args.rel, args.sensitivity)
    noise_rows = [r for res in results.values() for r in res["runs"]
                  if r["noise"] != "tf32" and "sensitivity" not in r["noise"]]
    summary = {k: max(r[k] for r in noise_rows)
               for k in ("prob", "span", "saliency")}
    summary_tf32 = {k: max(r[k] for res in results.values() for r in res["runs"] if r["noise"] == "tf32")
                    for k in ("prob", "span", "saliency")}
    print(f"\nlargest raw differences, float64 / 1e-6 perturbations: {summary}")
    print(f"largest raw differences, TF32 emulation: {summary_tf32}")
    print("bounds in use: " + "; ".join(f"{k}: prob {b.prob:g}, span {b.span:g}, saliency {b.saliency:g}"
                                          for k, b in NOISE_BOUNDS.items()))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"results": results, "largest": summary, "largest_tf32": summary_tf32}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
