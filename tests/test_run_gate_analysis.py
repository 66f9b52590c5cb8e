"""run_gate_analysis.py end to end: on project-generated data and on the original checkpoints."""
import json

import numpy as np
import pandas as pd
import pytest

from conftest import (
    FIXTURES,
    demo_data_args,
    demo_dataset,
    gates_one_by_one,
    requires_fixtures,
    run_fixture_analysis,
    run_python,
    small_checkpoint,
)
from gate_analysis.stats_csv import CSV_COLUMNS
from gate_analysis_utils import load_gate_run
from qd_detr.dataset import read_jsonl


def run_cli(*args):
    proc = run_python("run_gate_analysis.py", *args, "--quiet")
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def elementwise_run(demo_data, tmp_path_factory):
    _, paths = demo_data
    ckpt, model, opt = small_checkpoint(tmp_path_factory.mktemp("run") / "model.ckpt", "custom", "elementwise", seed=3)
    out = ckpt.parent / "out"
    rc, stdout, stderr = run_cli("--model_path", ckpt, *demo_data_args(paths), "--output_dir", out, "--batch_size", 4,
                                 "--device", "cpu")
    assert rc == 0, stderr
    return model, opt, paths, out, stdout


def test_outputs_are_complete_and_documented(elementwise_run):
    model, opt, paths, out, stdout = elementwise_run
    manifest = json.loads((out / "run.json").read_text())
    n = len(read_jsonl(paths["jsonl"]["val"]))
    assert manifest["status"] == "complete"
    assert manifest["counts"]["queries"] == n and manifest["counts"]["gate_arrays"] == n * 2 * 2
    assert len(manifest["checkpoint"]["sha256"]) == 64 and manifest["batching"]["policy"] == "query"
    for name, columns in CSV_COLUMNS.items():
        df = pd.read_csv(out / name)
        assert list(df.columns) == list(columns), name
    per_query = pd.read_csv(out / "gate_stats_per_query.csv")
    assert len(per_query) == n * 2 * 2 and per_query["max"].le(1).all() and per_query["min"].ge(-1).all()
    assert (out / "predictions.jsonl").exists() and (out / "predictions_metrics.json").exists()
    plots = sorted(p.name for p in (out / "plots").iterdir())
    for expected in ("layer_distributions.png", "query_layer_heatmap.png", "dim_profile.png", "layer_evolution.png",
                     "sample_comparison.png", "query_clip_heatmap_layers.0.gate_mha.png"):
        assert expected in plots
    assert "layers.0.gate_mha" in stdout and "outputs in" in stdout


def test_streamed_ground_truth_equals_the_stored_gates(elementwise_run, tmp_path):
    """The pipeline computes the ground-truth tables while it infers; recomputing them from the stored
    gates writes byte-identical CSVs."""
    from gate_analysis.ground_truth import CSV_COLUMNS as GT_COLUMNS
    from gate_analysis.ground_truth import write_ground_truth
    model, opt, paths, out, stdout = elementwise_run
    records = read_jsonl(paths["jsonl"]["val"])
    per_query, _, written = write_ground_truth(records, tmp_path, gate_run=load_gate_run(out))
    assert len(per_query) == len(records) * 2 * 2
    for name in GT_COLUMNS:
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes(), name


def test_stored_gates_equal_a_direct_forward_per_query(elementwise_run):
    """Every stored gate equals the model's gate for that query alone, padding excluded."""
    model, opt, paths, out, _ = elementwise_run
    run = load_gate_run(out)
    dataset = demo_dataset(opt, paths)
    assert sorted(run.qids) == sorted(r["qid"] for r in dataset.records)
    got = gates_one_by_one(model, dataset)
    assert sorted(got) == sorted(run.qids)
    for qid, record in got.items():
        for (layer, kind), want in record.gates.items():
            stored = run.gate(qid, layer, kind)
            assert stored.shape == want.shape == (record.n_clips, 256)
            np.testing.assert_allclose(stored, want, atol=1e-5, rtol=0)


def test_existing_output_folder_needs_overwrite(elementwise_run, demo_data):
    _, paths = demo_data
    model, opt, _, out, _ = elementwise_run
    ckpt = out.parent / "model.ckpt"
    rc, _, stderr = run_cli("--model_path", ckpt, *demo_data_args(paths), "--output_dir", out)
    assert rc == 2 and "--overwrite" in stderr and "Traceback" not in stderr
    assert json.loads((out / "run.json").read_text())["status"] == "complete"  # earlier results untouched


def test_conflicting_gating_type_is_an_error_naming_both(elementwise_run, demo_data, tmp_path):
    _, paths = demo_data
    ckpt = elementwise_run[3].parent / "model.ckpt"
    rc, _, stderr = run_cli("--model_path", ckpt, *demo_data_args(paths), "--output_dir", tmp_path / "o",
                            "--gating_type", "clipwise")
    assert rc == 2 and "clipwise" in stderr and "elementwise" in stderr and "Traceback" not in stderr


def test_model_without_fusion_exits_with_a_clear_message(demo_data, tmp_path):
    _, paths = demo_data
    ckpt, _, _ = small_checkpoint(tmp_path / "plain.ckpt", "video_only")
    rc, _, stderr = run_cli("--model_path", ckpt, *demo_data_args(paths, audio=False), "--output_dir", tmp_path / "o")
    assert rc != 0 and "no audio-visual fusion module" in stderr and "Traceback" not in stderr


@requires_fixtures
def test_fixture_gates_equal_reference_through_the_cli(tmp_path):
    name = "ckpt_custom_global"
    out = tmp_path / "out"
    run_fixture_analysis(name, out)
    ref = np.load(FIXTURES / name / "reference_outputs_bs1.npz")
    run = load_gate_run(out)
    worst = 0.0
    for qid in ref["__qids__"]:
        for layer in (0, 1):
            for kind in ("mha", "ffn"):
                want = ref[f"{qid}/layer{layer}/gate_{kind}"].reshape(-1)
                got = run.gate(int(qid), layer, kind)
                assert got.shape == (1,)
                worst = max(worst, float(np.abs(got - want).max()))
    assert worst <= 1e-5
    metrics = json.loads((out / "predictions_metrics.json").read_text())
    assert set(metrics["brief"]) >= {"MR-full-mAP", "HL-min-VeryGood-mAP"}
