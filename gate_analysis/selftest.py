"""Self-checks behind ``test_gate_analysis.py``: a quick demo-and-verify run and a full system test.

``quick_check``: for each fusion layout/gating type, builds a small model with project code, writes a
checkpoint and generated QVHighlights-style data, runs the whole analysis pipeline and verifies its
outputs (files present, gate values inside their declared ranges, counts equal queries x layers x
gate kinds, stored gates readable). ``comprehensive_check``: the pytest suite plus end-to-end runs of
every command-line tool.
Each check is a (name, passed, detail) row.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

import pandas as pd
import torch

from .outputs import PLOTS_DIR, PREDICTIONS_FILE, RUN_FILE, STATS_CSV_FILES, SUMMARY_FILE

__all__ = ["quick_check", "comprehensive_check", "format_table", "QUICK_VARIANTS"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_DIMS = dict(slowfast_dim=24, clip_dim=16, text_dim=16, audio_dim=12)
QUICK_VARIANTS = (("custom", "global"), ("custom", "clipwise"), ("custom", "elementwise"), ("avigate", "global"))


def _small_checkpoint(path, layout, gating_type, dims, seed=0):
    from qd_detr.config import make_options
    from qd_detr.model import build_model
    opt = make_options(v_feat_dim=dims["v_feat_dim"], t_feat_dim=dims["t_feat_dim"], a_feat_dim=dims["a_feat_dim"],
                       a_feat_dir="pann_features", enc_layers=1, dec_layers=1, dim_feedforward=64, fusion_layers=2,
                       fusion_n_heads=4, nheads=4, use_avigate_custom=layout == "custom",
                       use_avigate=layout == "avigate", gating_type=gating_type)
    torch.manual_seed(seed)
    model = build_model(opt)
    torch.save({"model": model.state_dict(), "epoch": 0, "opt": opt}, path)
    return path


def _verify_run(out, n_queries, n_layers, plots=True):
    """Rows of checks on one output folder."""
    from gate_analysis.stats_csv import CSV_COLUMNS
    from gate_analysis.store import load_gate_run
    rows = []
    manifest = json.load(open(os.path.join(out, RUN_FILE)))
    rows.append(("run.json complete", manifest.get("status") == "complete", manifest.get("status")))
    missing = [f for f in [PREDICTIONS_FILE, SUMMARY_FILE, *CSV_COLUMNS] if not os.path.exists(os.path.join(out, f))]
    rows.append(("output files present", not missing, f"missing {missing}" if missing else f"{len(CSV_COLUMNS) + 2} files"))
    if plots:
        pngs = os.listdir(os.path.join(out, PLOTS_DIR)) if os.path.isdir(os.path.join(out, PLOTS_DIR)) else []
        rows.append(("plots written", len(pngs) >= 4, f"{len(pngs)} PNG files"))
    per_query = pd.read_csv(os.path.join(out, STATS_CSV_FILES["per_query"]))
    run = load_gate_run(out)
    n_kinds = len(run.kinds)
    expected = n_queries * n_layers * n_kinds
    rows.append((f"per-query rows = queries x layers x {n_kinds}", len(per_query) == expected,
                 f"{len(per_query)} == {expected}"))
    values, outside = [], []
    for layer in run.layers:
        for kind in run.kinds:
            rng = run.gate_range(layer, kind)
            v = [run.gate(q, layer, kind) for q in run.qids]
            values += v
            lo, hi = min(float(a.min()) for a in v), max(float(a.max()) for a in v)
            if lo < rng.low or hi > rng.high:
                outside.append(f"layers.{layer}.gate_{kind} [{lo:+.4f}, {hi:+.4f}] not in [{rng.low:g}, {rng.high:g}]")
    rows.append(("gate values inside their declared ranges", not outside, "; ".join(outside) or
                 f"{len(run.gate_ranges)} gates checked"))
    rows.append((f"raw gate arrays = queries x layers x {n_kinds}", len(values) == expected, f"{len(values)} arrays"))
    return rows


def quick_check(output_dir=None, log=print):
    """Run the pipeline on generated data for every variant; returns the check rows."""
    from gate_analysis.pipeline import AnalysisConfig, run_analysis
    from qd_detr.demo_data import make_demo_dataset
    base = output_dir or tempfile.mkdtemp(prefix="gate-quick-")
    torch.set_num_threads(1)  # tiny models: one thread avoids OpenMP overhead (10x slower under contention)
    data = make_demo_dataset(os.path.join(base, "data"), n_videos=5, queries_per_video=2, seed=0, **SMALL_DIMS)
    n_queries = len(data["qids"]["val"])
    rows = []
    for layout, gating in QUICK_VARIANTS:
        tag = f"{layout}-{gating}"
        plots = gating == "elementwise"  # the richest set of figures; plotting dominates the run time
        t0 = time.time()
        ckpt = _small_checkpoint(os.path.join(base, f"{tag}.ckpt"), layout, gating, data["dims"])
        out = os.path.join(base, tag)
        os.makedirs(out, exist_ok=True)
        cfg = AnalysisConfig(model_path=ckpt, data_path=data["jsonl"]["val"], output_dir=out, device="cpu",
                             v_feat_dirs=data["v_feat_dirs"], t_feat_dir=data["t_feat_dir"],
                             a_feat_dir=data["a_feat_dir"], batch_size=4, batching="query", top_n=3,
                             no_plots=not plots)
        try:
            run_analysis(cfg, progress=False, log=lambda msg: None)
            n_layers = 1 if layout == "avigate" else 2
            rows += [(f"{tag}: {name}", ok, detail) for name, ok, detail in _verify_run(out, n_queries, n_layers, plots)]
        except Exception as exc:  # report the failure as a row; the table decides the exit code
            rows.append((f"{tag}: pipeline ran", False, f"{type(exc).__name__}: {exc}"))
        log(f"  {tag}: analysed in {time.time() - t0:.1f} s -> {out}")
    return rows


def _run(cmd, **kwargs):
    """(exit code, detail): the last stdout line on success, else the last stderr line (the error)."""
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, **kwargs)
    first, second = (proc.stdout, proc.stderr) if proc.returncode == 0 else (proc.stderr, proc.stdout)
    tail = (first.strip() or second.strip()).splitlines()[-1:] or [""]
    return proc.returncode, tail[0][:160]


def comprehensive_check(output_dir=None, log=print):
    """The pytest suite, then each command-line tool end to end; returns the check rows."""
    base = output_dir or tempfile.mkdtemp(prefix="gate-full-")
    rows = []
    log("running the pytest suite...")
    rc, tail = _run([sys.executable, "-m", "pytest", "-q", "-x"])
    rows.append(("pytest suite", rc == 0, tail))
    from qd_detr.demo_data import make_demo_dataset
    data = make_demo_dataset(os.path.join(base, "data"), n_videos=4, queries_per_video=2, seed=1, **SMALL_DIMS)
    feats = ["--v_feat_dirs", *data["v_feat_dirs"], "--t_feat_dir", data["t_feat_dir"], "--a_feat_dir", data["a_feat_dir"]]
    for layout, gating in QUICK_VARIANTS:
        tag = f"{layout}-{gating}"
        ckpt = _small_checkpoint(os.path.join(base, f"{tag}.ckpt"), layout, gating, data["dims"])
        for legacy in ([], ["--legacy_model"]):
            out = os.path.join(base, tag + ("-legacy" if legacy else ""))
            log(f"run_gate_analysis.py {tag} {' '.join(legacy)}")
            rc, tail = _run([sys.executable, "run_gate_analysis.py", "--model_path", ckpt, "--data_path",
                             data["jsonl"]["val"], "--output_dir", out, "--device", "cpu", "--quiet", *feats, *legacy])
            rows.append((f"run_gate_analysis.py {tag}{' --legacy_model' if legacy else ''}", rc == 0, tail))
        rc, tail = _run([sys.executable, "test_legacy_model.py", "--model_path", ckpt])
        rows.append((f"test_legacy_model.py {tag}", rc == 0, tail))
    ckpt = os.path.join(base, "custom-clipwise.ckpt")
    out = os.path.join(base, "guide")
    rc, tail = _run([sys.executable, "legacy_model_guide.py", "--non-interactive", "--model_path", ckpt,
                     "--data_path", data["jsonl"]["val"], "--output_dir", out, *feats], stdin=subprocess.DEVNULL)
    rows.append(("legacy_model_guide.py --non-interactive", rc == 0 and os.path.exists(os.path.join(out, RUN_FILE)), tail))
    pred = os.path.join(base, "preds.jsonl")
    rc, tail = _run([sys.executable, "-m", "qd_detr.inference", "--model_path", ckpt, "--data_path",
                     data["jsonl"]["val"], "--output_path", pred, "--quiet", *feats])
    rows.append(("python -m qd_detr.inference", rc == 0 and os.path.exists(pred), tail))
    rc, tail = _run([sys.executable, "-m", "qd_detr.eval", "--submission_path", pred, "--gt_path",
                     data["jsonl"]["val"], "--save_path", os.path.join(base, "metrics.json")])
    rows.append(("python -m qd_detr.eval", rc == 0, tail))
    return rows


def format_table(rows):
    width = max(len(name) for name, _, _ in rows)
    lines = [f"{'PASS' if ok else 'FAIL'}  {name:<{width}}  {detail}" for name, ok, detail in rows]
    passed = sum(ok for _, ok, _ in rows)
    lines.append(f"{passed} passed, {len(rows) - passed} failed")
    return "\n".join(lines)
