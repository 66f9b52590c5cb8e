"""run_gate_analysis.py with every extended analysis, end to end, and its self-contained report.html."""
import base64
import json
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from conftest import demo_data_args, run_gate_analysis_main, small_checkpoint
from gate_analysis import ablation, compare, ground_truth, performance
from gate_analysis.report import build_report
from qd_detr.dataset import read_jsonl

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _run(*argv):
    return run_gate_analysis_main(*argv, "--quiet", "--device", "cpu")


@pytest.fixture(scope="module")
def full_run(demo_data, tmp_path_factory):
    _, paths = demo_data
    tmp = tmp_path_factory.mktemp("report")
    ckpt, _, _ = small_checkpoint(tmp / "model.ckpt", "custom", "clipwise", seed=7)
    qids = [r["qid"] for r in read_jsonl(paths["jsonl"]["val"])]
    subset = tmp / "audio_queries.txt"
    subset.write_text("# audio-related\n" + "\n".join(map(str, qids[:5])) + "\n")
    out = tmp / "out"
    common = ["--model_path", ckpt, *demo_data_args(paths), "--batch_size", 4]
    rc = _run(*common, "--output_dir", out, "--ablate", "zero", "mean", "audio_zero", "audio_swap",
              "--ablate_layers", "all", "1", "--contributions", "--failure_cases", 2,
              "--subset", subset, "--subset_mode", "split")
    assert rc == 0
    return out, common, qids, tmp


def test_every_extended_output_is_written_with_documented_columns(full_run):
    out, _, qids, _ = full_run
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "complete" and manifest["files"]["report"] == "report.html"
    a = manifest["analyses"]
    assert a["ablation"]["interventions"] == ["zero@all:both", "zero@1:both", "mean@all:both", "mean@1:both",
                                              "audio_zero", "audio_swap"]
    assert a["ablation"]["reference"] == "zero@all:both" and a["subset"]["n_in_data"] == 5
    assert a["failure_cases"]["requested"] == 2
    written = 0
    for module in (ablation, ground_truth, performance):
        for name, columns in module.CSV_COLUMNS.items():
            df = pd.read_csv(out / name)
            assert list(df.columns) == list(columns), name
            written += 1
    assert written == 11 and not any(out.glob("*.partial.csv"))
    abl = pd.read_csv(out / "ablation.csv")
    assert len(abl) == 6 * len(qids) and set(abl["qid"]) == set(qids)
    contrib = pd.read_csv(out / "gate_contributions.csv")
    index = pd.read_csv(out / "gates" / "index.csv")
    assert len(contrib) == index["n_clips"].sum() * 2 * 2 and (contrib["contribution"] >= 0).all()
    assert (out / "ablation" / "audio_swap.jsonl").exists()
    plots = {p.name for p in (out / "plots").iterdir()}
    for module in (ablation, ground_truth, performance):
        missing = set(module.PLOT_FILES.values()) - plots
        assert not missing, missing
    summary = (out / "summary.txt").read_text()
    assert "ablation zero@all:both: MR-full-mAP" in summary and "report:" in summary


def test_report_is_self_contained(full_run):
    out, _, _, _ = full_run
    html = (out / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and "<link" not in html.lower()
    assert not any(re.search(r"\bsrc\s*=", tag) for tag in re.findall(r"<script\b[^>]*>", html, re.I))  # inline only
    refs = re.findall(r"""(?:src|href)\s*=\s*['"]([^'"]*)['"]""", html)
    assert refs and all(r.startswith("data:image/png;base64,") or r.startswith("#") for r in refs)
    images = [r for r in refs if r.startswith("data:")]
    assert len(images) == len(list((out / "plots").glob("*.png")))
    for uri in images:
        assert base64.b64decode(uri.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    for title in ("Model and data provenance", "Metrics", "Gate statistics per layer", "Effective contributions",
                  "Interventions (ablation)", "Gates vs ground truth", "Gates vs performance", "Failure cases",
                  "Subset split"):
        assert f">{title}" in html, title
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["checkpoint"]["sha256"] in html and "zero@all:both" in html
    assert "http://" not in html and "https://" not in html


def test_compare_with_earlier_run_and_option_errors(full_run, capsys):
    out, common, qids, tmp = full_run
    out2 = tmp / "out2"
    assert _run(*common, "--output_dir", out2, "--compare_runs", out, "--no_plots") == 0
    runs = pd.read_csv(out2 / "gate_compare_runs.csv")
    assert runs["run_label"].tolist() == ["out", "out2"] and runs["MR-full-mAP"].notna().all()
    q = pd.read_csv(out2 / "gate_compare_queries.csv")
    # one row per video (named by its first query), same model: same gates
    first = pd.read_csv(out / "gate_stats_per_video.csv")["qid"]
    assert set(q["qid"]) == set(first) and set(first) <= set(qids) and np.allclose(q["diff_vs_first"], 0, atol=1e-6)
    assert list(q.columns) == list(compare.CSV_COLUMNS["gate_compare_queries.csv"])
    assert not (out2 / "ablation.csv").exists() and (out2 / "report.html").exists()
    capsys.readouterr()
    for argv, message in (((*common, "--output_dir", tmp / "e1", "--ablate", "zero", "--ablate_layers", "5"),
                           "layer 5 does not exist"),
                          ((*common, "--output_dir", tmp / "e2", "--ablate_layers", "0"), "without --ablate"),
                          ((*common, "--output_dir", tmp / "e3", "--subset_mode", "split"), "needs --subset")):
        assert _run(*argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert not (tmp / "e1" / "run.json").exists()  # rejected before the main pass


@pytest.mark.skipif(not any(shutil.which(b) for b in BROWSERS), reason="no headless browser (chromium) installed")
def test_report_renders_in_a_headless_browser(full_run, tmp_path):
    import matplotlib.image as mpimg
    out, _, _, _ = full_run
    browser = next(shutil.which(b) for b in BROWSERS if shutil.which(b))
    shot = tmp_path / "report.png"
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
           f"--screenshot={shot}", "--window-size=1200,2000", (out / "report.html").as_uri()]
    subprocess.run(cmd, capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 10_000
    img = mpimg.imread(shot)
    assert img.shape[:2] == (2000, 1200)
    rgb = img[..., :3].reshape(-1, 3)
    assert rgb.std() > 0.05 and (rgb.mean(axis=1) < 0.5).mean() > 0.005  # text and tables, not a blank page
    assert len(np.unique((rgb * 255).astype(np.uint8), axis=0)) > 50


def test_build_report_without_run_json(tmp_path):
    (tmp_path / "gate_stats_per_layer.csv").write_text("layer,gate,name,weighting,n_queries,n_videos,mean,std\n"
                                                       "0,mha,layers.0.gate_mha,video,3,2,0.25,0.1\n")
    html = build_report(tmp_path)
    assert "layers.0.gate_mha" in html and "unknown" in html and "Interventions" not in html
