"""An interrupted analysis is marked incomplete, and --resume finishes it with identical results."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, SCRIPT_ENV, analysis_config, demo_data_args, interrupted_after, run_python, small_checkpoint
from gate_analysis import pipeline
from gate_analysis.pipeline import run_analysis
from gate_analysis_utils import load_gate_run
from qd_detr import inference


def _config(ckpt, paths, out, **kw):
    return analysis_config(ckpt, paths, out, batch_size=2, batching="query", no_plots=True, **kw)


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
    return small_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.ckpt", "custom", "clipwise", seed=5)[0]


def test_interrupted_run_resumes_to_identical_results(demo_data, checkpoint, tmp_path, monkeypatch):
    _, paths = demo_data
    full, broken = tmp_path / "full", tmp_path / "broken"
    full.mkdir(), broken.mkdir()
    run_analysis(_config(checkpoint, paths, full), progress=False, log=lambda m: None)

    real = inference.iterate_batches
    monkeypatch.setattr(pipeline, "iterate_batches", interrupted_after(real, 2))
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
    _, paths = demo_data
    out = tmp_path / "done"
    out.mkdir()
    run_analysis(_config(checkpoint, paths, out), progress=False, log=lambda m: None)
    proc = run_python("run_gate_analysis.py", "--model_path", checkpoint, *demo_data_args(paths), "--output_dir", out,
                      "--resume")
    assert proc.returncode == 2 and "already complete" in proc.stderr and "Traceback" not in proc.stderr


def test_ctrl_c_marks_the_run_interrupted_and_resume_completes_it(demo_data, checkpoint, tmp_path):
    _, paths = demo_data
    out = tmp_path / "sigint"
    argv = ["run_gate_analysis.py", "--model_path", str(checkpoint), *demo_data_args(paths), "--output_dir", str(out),
            "--batch_size", "1", "--no_plots", "--quiet", "--device", "cpu"]
    proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=SCRIPT_ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "gates" / "shard_00001.npz").exists() and proc.poll() is None:
        time.sleep(0.05)
    if proc.poll() is not None:
        pytest.skip("the run finished before it could be interrupted")
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in stderr
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    proc = run_python(*argv, "--resume")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["queries"] == len(paths["qids"]["val"])
