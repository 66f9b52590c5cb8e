"""An interrupted analysis is marked incomplete, and --resume finishes it with identical results."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, demo_feature_args, save_checkpoint, small_model
from gate_analysis import pipeline
from gate_analysis.pipeline import AnalysisConfig, run_analysis
from gate_analysis_utils import load_gate_run
from qd_detr import inference


def _config(ckpt, paths, out, **kw):
    return AnalysisConfig(model_path=str(ckpt), data_path=paths["jsonl"]["val"], output_dir=str(out), device="cpu",
                          v_feat_dirs=paths["v_feat_dirs"], t_feat_dir=paths["t_feat_dir"],
                          a_feat_dir=paths["a_feat_dir"], batch_size=2, batching="query", no_plots=True, **kw)


def _same_outputs(a, b):
    names = sorted(n for n in os.listdir(a) if n.endswith((".csv", ".jsonl")) or n == "predictions_metrics.json")
    assert names == sorted(n for n in os.listdir(b) if n.endswith((".csv", ".jsonl")) or n == "predictions_metrics.json")
    for name in names:
        assert open(os.path.join(a, name)).read() == open(os.path.join(b, name)).read(), name
    ra, rb = load_gate_run(a), load_gate_run(b)
    assert ra.qids == rb.qids
    for q in ra.qids:
        for layer in ra.layers:
            for kind in ra.kinds:
                assert np.array_equal(ra.gate(q, layer, kind), rb.gate(q, layer, kind))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model, opt = small_model("custom", "clipwise", seed=5)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.ckpt", model, opt)


def test_interrupted_run_resumes_to_identical_results(demo_data, checkpoint, tmp_path, monkeypatch):
    _, paths = demo_data
    full, broken = tmp_path / "full", tmp_path / "broken"
    full.mkdir(), broken.mkdir()
    run_analysis(_config(checkpoint, paths, full), progress=False, log=lambda m: None)

    real = inference.iterate_batches

    def interrupted(*args, **kwargs):
        for i, item in enumerate(real(*args, **kwargs)):
            if i == 2:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(pipeline, "iterate_batches", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_analysis(_config(checkpoint, paths, broken), progress=False, log=lambda m: None)
    manifest = json.loads((broken / "run.json").read_text())
    assert manifest["status"] == "interrupted" and manifest["progress"]["queries_done"] == 4
    assert not (broken / "predictions.jsonl").exists()
    with pytest.raises(ValueError, match="incomplete"):
        load_gate_run(broken)

    monkeypatch.setattr(pipeline, "iterate_batches", real)
    run_analysis(_config(checkpoint, paths, broken, resume=True), progress=False, log=lambda m: None)
    manifest = json.loads((broken / "run.json").read_text())
    assert manifest["status"] == "complete" and manifest["resumed_from"]["queries_done"] == 4
    _same_outputs(full, broken)


def test_resume_refuses_a_complete_or_different_run(demo_data, checkpoint, tmp_path):
    root, paths = demo_data
    out = tmp_path / "done"
    out.mkdir()
    run_analysis(_config(checkpoint, paths, out), progress=False, log=lambda m: None)
    cmd = [sys.executable, "run_gate_analysis.py", "--model_path", str(checkpoint), "--data_path",
           paths["jsonl"]["val"], "--output_dir", str(out), "--resume", *demo_feature_args(root)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "already complete" in proc.stderr and "Traceback" not in proc.stderr


def test_ctrl_c_marks_the_run_interrupted_and_resume_completes_it(demo_data, checkpoint, tmp_path):
    root, paths = demo_data
    out = tmp_path / "sigint"
    cmd = [sys.executable, "run_gate_analysis.py", "--model_path", str(checkpoint), "--data_path",
           paths["jsonl"]["val"], "--output_dir", str(out), "--batch_size", "1", "--no_plots", "--quiet",
           "--device", "cpu", *demo_feature_args(root)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "gates" / "shard_00001.npz").exists() and proc.poll() is None:
        time.sleep(0.05)
    if proc.poll() is not None:
        pytest.skip("the run finished before it could be interrupted")
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in stderr
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    proc = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["queries"] == len(paths["qids"]["val"])
