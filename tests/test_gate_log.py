"""Gate logs of the research code (``inference.py --gate_log``): import without a model, export, round trips,
refusals, and agreement with the original capture on the shared fixtures."""
import json
import re
import shlex

import numpy as np
import pandas as pd
import pytest

from conftest import (
    FIXTURE_DATA,
    FIXTURES,
    ROOT,
    demo_data_args,
    fixture_feature_args,
    requires_fixtures,
    run_gate_analysis_main,
    small_checkpoint,
)
from gate_analysis.gate_log import GateLogReader, export_gate_log, log_record, write_gate_log
from gate_analysis.store import load_gate_run
from qd_detr.errors import DataError
from qd_detr.io import file_sha256

VAL = FIXTURE_DATA / "highlight_val_release.jsonl"
STAT_COLUMNS = ["qid", "vid", "layer", "gate", "name", "n_clips", "count", "mean", "std", "min", "p5", "p25", "median",
                "p75", "p95", "max"]


def run_json(out):
    return json.loads((out / "run.json").read_text())


def csv_files(out):
    return sorted(p.name for p in out.glob("gate_*.csv"))


# -- synthetic logs ----------------------------------------------------------------------------------
def write_data(path, n_videos=3, per_video=2, n_clips=6):
    """A labelled JSONL: qids 100.., each video's queries consecutive; returns the records."""
    records = []
    for v in range(n_videos):
        for j in range(per_video):
            records.append({"qid": 100 + len(records), "query": f"q{len(records)}", "vid": f"vid{v}",
                            "duration": 2.0 * n_clips, "relevant_windows": [[0.0, 4.0 + 2 * j]],
                            "relevant_clip_ids": list(range(2 + j)), "saliency_scores": [[1, 2, 3]] * (2 + j)})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def synthetic_log(path, records, gating_type="clipwise", n_clips=6, layers=2, dim=4, seed=0):
    """A gate log in the original schema with random gates (every query of a video gets its video's gates)."""
    rng = np.random.default_rng(seed)
    per_vid = {}
    for r in records:
        if r["vid"] not in per_vid:
            shape = {"clipwise": (n_clips,), "elementwise": (n_clips, dim)}.get(gating_type, (1,))
            per_vid[r["vid"]] = {(l, k): np.tanh(rng.normal(size=shape)).astype(np.float32)
                                 for l in range(layers) for k in ("mha", "ffn")}
    write_gate_log(path, (log_record(r["qid"], r["vid"], gating_type, per_vid[r["vid"]], range(layers), ("mha", "ffn"))
                          for r in records))
    return path


@pytest.fixture
def small_log(tmp_path):
    records = write_data(tmp_path / "data.jsonl")
    return synthetic_log(tmp_path / "log.jsonl", records), tmp_path / "data.jsonl", records


def edit_line(path, index, edit):
    """Replace record ``index`` of the log by ``edit(obj)`` (lines joined as the original writes them)."""
    lines = path.read_text().split("\n")
    lines[index] = json.dumps(edit(json.loads(lines[index])))
    path.write_text("\n".join(lines))


def refused(capsys, *argv):
    """run_gate_analysis.py in process must fail as bad input: its one stderr line."""
    code = run_gate_analysis_main(*argv, "--quiet", "--no_plots")
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# -- import ------------------------------------------------------------------------------------------
def test_import_writes_store_statistics_ground_truth_and_source(small_log, tmp_path, capsys):
    log, data, records = small_log
    out = tmp_path / "out"
    assert run_gate_analysis_main("--gate_log", log, "--data_path", data, "--output_dir", out, "--quiet",
                                  "--no_plots") == 0
    run = load_gate_run(out)
    assert run.qids == [r["qid"] for r in records] and run.gating_type == "clipwise"
    first = json.loads(log.read_text().split("\n")[0])
    assert np.array_equal(run.gate(100, 1, "ffn"), np.asarray(first["layer_gates"][1]["gate_ffn"], np.float32)[:, 0])
    assert run.gate_range(0, "mha").formula.startswith("not declared")
    assert {"gate_stats_per_query.csv", "gate_stats_per_layer.csv", "gate_rankings.csv", "gate_ground_truth.csv",
            "gate_ground_truth_overall.csv"} <= set(csv_files(out))
    assert not (out / "gate_performance.csv").exists() and not (out / "predictions.jsonl").exists()
    manifest = run_json(out)
    src = manifest["source"]
    assert manifest["status"] == "complete" and src["model_ran"] is False and src["sha256"] == file_sha256(log)
    assert src["gate_ranges_declared"] is False and "batching" not in manifest["arguments"]
    notes = " ".join(src["not_recorded"])
    assert "gate_beta" in notes and "tanh [-1, 1]" in notes and "predictions" in notes
    summary = (out / "summary.txt").read_text()
    assert "no model ran" in summary and "not in the gate log: gate_beta" in summary
    assert manifest["query_dependence"]["videos_with_query_dependent_gates"] == 0
    assert (out / "report.html").is_file()


def test_existing_folder_needs_overwrite(small_log, tmp_path, capsys):
    log, data, _ = small_log
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    err = refused(capsys, "--gate_log", log, "--data_path", data, "--output_dir", out)
    assert "--overwrite" in err
    assert run_gate_analysis_main("--gate_log", log, "--data_path", data, "--output_dir", out, "--quiet", "--no_plots",
                                  "--overwrite") == 0
    assert run_json(out)["status"] == "complete" and (out / "keep.txt").exists()


def test_truncated_last_line_is_refused_before_any_output(small_log, tmp_path, capsys):
    log, data, records = small_log
    text = log.read_text()
    log.write_text(text[:-25])  # the capture stopped inside the last record
    out = tmp_path / "out"
    err = refused(capsys, "--gate_log", log, "--data_path", data, "--output_dir", out)
    assert str(log) in err and f"line {len(records)}" in err and "truncated" in err
    assert not out.exists()
    log.write_text(text + "\n")  # a final newline is fine too
    assert len(list(GateLogReader(log))) == len(records)


@pytest.mark.parametrize("edit, words", [
    (lambda o: {**o, "layer_gates": o["layer_gates"][:1]}, ["fusion layers", "1", "2"]),
    (lambda o: {**o, "layer_gates": [{**g, "gate_mha": [[0.1, 0.2]] * 6} for g in o["layer_gates"]]},
     ["gate_mha", "T x 1"]),
    (lambda o: {**o, "layer_gates": [{**g, "gate_ffn": g["gate_ffn"][:4]} for g in o["layer_gates"]]},
     ["covers 4 clips", "6"]),
    (lambda o: {**o, "gating_type": "framewise"}, ["unknown gating_type", "framewise"]),
    (lambda o: {**o, "gating_type": "elementwise"}, ["gating_type elementwise", "clipwise"]),
    (lambda o: {**o, "layer_gates": [{**g, "gate_xyz": [[0.0]]} for g in o["layer_gates"]]}, ["gate_xyz"]),
    (lambda o: {k: v for k, v in o.items() if k != "vid"}, ["missing key", "vid"]),
    (lambda o: {**o, "qid": 100}, ["duplicate qid 100", "line 1"]),
])
def test_inconsistent_records_are_refused_naming_file_and_line(small_log, tmp_path, capsys, edit, words):
    log, data, _ = small_log
    edit_line(log, 2, edit)
    err = refused(capsys, "--gate_log", log, "--data_path", data, "--output_dir", tmp_path / "out")
    assert f"{log}: line 3:" in err and all(w in err for w in words), err
    assert not (tmp_path / "out").exists()  # nothing half-written is left


def test_a_stopped_import_leaves_no_half_written_folder(small_log, tmp_path, monkeypatch, capsys):
    from gate_analysis.sink import GateSink
    log, data, _ = small_log
    add, calls = GateSink.add, []

    def stop_on_third(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C (or SIGTERM) in the middle of the log
        return add(self, *args, **kwargs)
    monkeypatch.setattr(GateSink, "add", stop_on_third)
    out = tmp_path / "out"
    assert run_gate_analysis_main("--gate_log", log, "--data_path", data, "--output_dir", out, "--quiet") == 130
    assert not out.exists() and "interrupted" in capsys.readouterr().err


def test_qids_missing_from_the_data_are_refused_or_skipped(small_log, tmp_path, capsys):
    log, data, records = small_log
    edit_line(log, 1, lambda o: {**o, "qid": 999})
    err = refused(capsys, "--gate_log", log, "--data_path", data, "--output_dir", tmp_path / "a")
    assert "qid 999" in err and "line 2" in err and "--skip_missing" in err
    out = tmp_path / "b"
    assert run_gate_analysis_main("--gate_log", log, "--data_path", data, "--output_dir", out, "--skip_missing",
                                  "--quiet", "--no_plots") == 0
    src = run_json(out)["source"]
    assert src["skipped_missing_from_data"] == [999] and src["n_analysed"] == len(records) - 1
    assert "skipped 1 logged queries" in (out / "summary.txt").read_text()
    assert 999 not in load_gate_run(out).qids


def test_vid_conflict_and_model_options_are_refused(small_log, tmp_path, capsys):
    log, data, _ = small_log
    err = refused(capsys, "--gate_log", log, "--data_path", data, "--output_dir", tmp_path / "a", "--batching",
                  "original", "--ablate", "zero")
    assert "--batching" in err and "--ablate" in err and "no effect" in err
    assert "--predictions goes with --gate_log" in refused(capsys, "--predictions", log, "--output_dir", tmp_path / "b")
    assert "--export_gate_log" in refused(capsys, "--from_run", tmp_path, "--output_dir", tmp_path / "c")
    edit_line(log, 0, lambda o: {**o, "vid": "other"})
    err = refused(capsys, "--gate_log", log, "--data_path", data, "--output_dir", tmp_path / "d")
    assert "line 1" in err and "'other'" in err and "'vid0'" in err


def test_reader_streams_elementwise_and_global(tmp_path):
    records = write_data(tmp_path / "data.jsonl")
    log = synthetic_log(tmp_path / "e.jsonl", records, "elementwise", dim=5)
    reader = GateLogReader(log)
    entries = list(reader)
    assert reader.layout.hidden_dim == 5 and entries[0].gates[(1, "mha")].shape == (6, 5) and entries[0].n_clips == 6
    log = synthetic_log(tmp_path / "g.jsonl", records, "global_diagstrip_ssm")
    entries = list(GateLogReader(log))
    assert entries[0].gates[(0, "ffn")].shape == (1,) and entries[0].n_clips is None
    edit_line(log, 3, lambda o: {**o, "layer_gates": [{**g, "gate_mha": [[0.5], [0.5]]} for g in o["layer_gates"]]})
    with pytest.raises(DataError, match=r"line 4: .*\[\[g\]\]"):
        list(GateLogReader(log))


# -- round trip with a model run ----------------------------------------------------------------------
@pytest.mark.parametrize("gating_type", ["clipwise", "elementwise", "global"])
def test_export_then_import_gives_identical_csvs(demo_data, tmp_path, gating_type, capsys):
    _, paths = demo_data
    ckpt, _, _ = small_checkpoint(tmp_path / "model.ckpt", "custom", gating_type, seed=1)
    out, log, back = tmp_path / "run", tmp_path / "gate_log.jsonl", tmp_path / "back"
    assert run_gate_analysis_main("--model_path", ckpt, *demo_data_args(paths), "--output_dir", out, "--device", "cpu",
                                  "--batch_size", 4, "--no_plots", "--quiet", "--export_gate_log", log) == 0
    first = json.loads(log.read_text().split("\n")[0])
    assert list(first)[:4] == ["qid", "vid", "layer_gates", "gating_type"] and first["gating_type"] == gating_type
    assert ("n_clips" in first) == (gating_type == "global") and not log.read_text().endswith("\n")
    assert run_gate_analysis_main("--gate_log", log, "--data_path", paths["jsonl"]["val"], "--predictions",
                                  out / "predictions.jsonl", "--output_dir", back, "--no_plots", "--quiet") == 0
    names = csv_files(out)
    assert names == csv_files(back) and "gate_performance.csv" in names and "gate_ground_truth.csv" in names
    for name in names:
        assert (out / name).read_bytes() == (back / name).read_bytes(), name
    assert (out / "predictions_metrics.json").read_text() == (back / "predictions_metrics.json").read_text()
    again = tmp_path / "again.jsonl"
    assert run_gate_analysis_main("--from_run", back, "--export_gate_log", again, "--quiet") == 0
    assert again.read_bytes() == log.read_bytes()


def test_export_needs_a_complete_store_and_a_free_path(tmp_path, small_log, capsys):
    with pytest.raises(DataError, match="cannot export a gate log"):
        export_gate_log(tmp_path, tmp_path / "x.jsonl")
    log, data, _ = small_log
    out = tmp_path / "out"
    assert run_gate_analysis_main("--gate_log", log, "--data_path", data, "--output_dir", out, "--quiet",
                                  "--no_plots") == 0
    err = refused(capsys, "--from_run", out, "--export_gate_log", log)
    assert str(log) in err and "--overwrite" in err


# -- the original capture on the shared fixtures -------------------------------------------------------
@pytest.fixture(scope="module", params=["ckpt_v2_clipwise_film", "ckpt_ssm_diagstrip"])
def fixture_runs(request, tmp_path_factory):
    """(name, a --batching original run of the fixture's model, the import of its gate log + predictions)."""
    name = request.param
    base = tmp_path_factory.mktemp(name)
    model_out, log_out = base / "model", base / "log"
    assert run_gate_analysis_main("--model_path", FIXTURES / name / "model.ckpt", "--data_path", VAL,
                                  *fixture_feature_args(), "--output_dir", model_out, "--device", "cpu",
                                  "--batching", "original", "--no_plots", "--quiet") == 0
    assert run_gate_analysis_main("--gate_log", FIXTURES / name / "gate_log_val.jsonl", "--data_path", VAL,
                                  "--predictions", FIXTURES / name / "hl_val_submission.jsonl",
                                  "--output_dir", log_out, "--no_plots", "--quiet") == 0
    return name, model_out, log_out


@requires_fixtures
def test_fixture_log_equals_an_original_batching_run(fixture_runs):
    name, model_out, log_out = fixture_runs
    ours, logged = load_gate_run(model_out), load_gate_run(log_out)
    assert logged.qids == ours.qids and logged.n_clips == ours.n_clips and logged.gating_type == ours.gating_type
    worst = max(float(np.abs(ours.gate(q, l, k) - logged.gate(q, l, k)).max())
                for q in ours.qids for l in ours.layers for k in ("mha", "ffn"))
    assert worst <= 1e-6
    a, b = (pd.read_csv(d / "gate_stats_per_query.csv") for d in (model_out, log_out))
    a = a[a["gate"].isin(["mha", "ffn"])].reset_index(drop=True)
    pd.testing.assert_frame_equal(a[STAT_COLUMNS], b[STAT_COLUMNS])
    metrics = json.loads((FIXTURES / name / "hl_val_submission_metrics.json").read_text())["brief"]
    assert json.loads((log_out / "predictions_metrics.json").read_text())["brief"] == metrics
    notes = " ".join(run_json(log_out)["source"]["not_recorded"])
    assert ("gate_beta" in notes) and "n_clips" not in notes  # n_clips came from the predictions
    assert "beta" in ours.kinds if name == "ckpt_v2_clipwise_film" else "beta" not in ours.kinds


@requires_fixtures
@pytest.mark.parametrize("name", ["ckpt_v2_clipwise_film", "ckpt_ssm_diagstrip"])
def test_fixture_log_exports_back_byte_for_byte(name, tmp_path, capsys):
    log = FIXTURES / name / "gate_log_val.jsonl"
    out = tmp_path / "out"
    assert run_gate_analysis_main("--gate_log", log, "--data_path", VAL, "--output_dir", out, "--no_plots",
                                  "--quiet", "--export_gate_log", tmp_path / "back.jsonl") == 0
    assert (tmp_path / "back.jsonl").read_bytes() == log.read_bytes()
    if name == "ckpt_ssm_diagstrip":  # per-query gates without predictions: valid clips unknown, and said so
        assert set(load_gate_run(out).n_clips.values()) == {-1}
        assert "n_clips" in " ".join(run_json(out)["source"]["not_recorded"])


def readme_command():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Importing the research code's gate logs", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return shlex.split(block.replace("\\\n", " "))


@requires_fixtures
def test_readme_example_runs_as_written(tmp_path, monkeypatch, capsys):
    argv = readme_command()
    assert argv[:2] == ["python", "run_gate_analysis.py"] and "--gate_log" in argv
    out = tmp_path / "from_log"
    argv[argv.index("--output_dir") + 1] = str(out)
    monkeypatch.chdir(ROOT)  # its relative paths are from the project root; in process: no second interpreter
    assert run_gate_analysis_main(*argv[2:], "--quiet") == 0, capsys.readouterr().err
    manifest = run_json(out)
    assert manifest["status"] == "complete" and manifest["source"]["model_ran"] is False
    assert (out / "gate_performance.csv").is_file() and (out / "predictions_metrics.json").is_file()
    plots = {p.name for p in (out / "plots").glob("*.png")}
    assert {"layer_distributions.png", "query_clip_heatmap_layers.0.gate_mha.png", "performance_scatter.png",
            "ground_truth_examples.png"} <= plots
    report = (out / "report.html").read_text()
    assert "gate log import" in report and "ground_truth" in report
