"""Proof against the original run's own predictions (gate_analysis.reproduction): the comparison on
constructed cases, file discovery, bad input, test_legacy_model.py and run_gate_analysis.py on a
project-built model, and the original research checkpoints (REPRODUCES with their own file, DIFFERS
with another fixture's file)."""
import json
import shutil

import numpy as np
import pytest

import test_legacy_model as compat_cli  # the top-level script (pytest collects only tests/)
from conftest import (
    FIXTURE_DATA,
    FIXTURES,
    demo_data_args,
    fixture_feature_args,
    legacy_report,
    run_gate_analysis_main,
    small_checkpoint,
)
from gate_analysis.reproduction import (
    NOISE_BOUNDS,
    compare_metrics,
    compare_predictions,
    compare_query,
    find_original_predictions,
    format_reproduction,
    prediction_file_candidates,
)

F32, TF32 = NOISE_BOUNDS["float32"], NOISE_BOUNDS["tf32"]


# ------------------------------------------------------------------------------------------------
# the comparison on constructed cases
# ------------------------------------------------------------------------------------------------

def _case(orig_rows, raw_rows, orig_sal=(1.0, 2.0), rerun_sal=None, duration=150.0):
    """(original line, re-run line, raw) with the re-run line built from ``raw_rows`` as the original code
    post-processes: stable sort by score, 4 decimals, 2 s snapping."""
    from qd_detr.postprocess import finalize_windows
    raw_rows = np.asarray(raw_rows, dtype=float)
    rows = sorted(raw_rows.tolist(), key=lambda r: r[2], reverse=True)
    rows = finalize_windows([[float(f"{v:.4f}") for v in r] for r in rows])
    sal = list(orig_sal if rerun_sal is None else rerun_sal)
    raw = {"prob": raw_rows[:, 2], "windows": raw_rows[:, :2], "saliency": np.asarray(sal)}
    original = {"qid": 1, "vid": "v", "pred_relevant_windows": orig_rows, "pred_saliency_scores": list(orig_sal)}
    rerun = {"qid": 1, "vid": "v", "pred_relevant_windows": rows, "pred_saliency_scores": sal}
    return original, rerun, raw, duration


def test_identical_lines_are_identical():
    q = compare_query(*_case([[0.0, 10.0, 0.5], [20.0, 30.0, 0.4]], [[0.0, 10.0, 0.5], [20.0, 30.0, 0.4]]), F32)
    assert q["status"] == "identical" and q["problem"] is None


def test_order_swap_among_near_tied_scores_passes():
    # the original ranked (0, 10) first; the re-run's scores are tied within noise and rank (20, 30) first
    case = _case([[0.0, 10.0, 0.5001], [20.0, 30.0, 0.5000]], [[0.0, 10.0, 0.500048], [20.0, 30.0, 0.500052]])
    assert case[1]["pred_relevant_windows"][0][:2] == [20.0, 30.0]  # the order really swapped
    q = compare_query(*case, F32)
    assert q["status"] == "within_noise" and q["reordered_windows"] == 2 and q["unmatched_windows"] == 0


def test_order_swap_beyond_a_tie_fails_at_float32():
    # both scores round to 0.5001, but the re-run's 8e-5 gap is no float32 tie: a real change of order
    case = _case([[0.0, 10.0, 0.5001], [20.0, 30.0, 0.5000]], [[0.0, 10.0, 0.50006], [20.0, 30.0, 0.50014]])
    q = compare_query(*case, F32)
    assert q["status"] == "differs" and "window order" in q["problem"]
    assert compare_query(*case, TF32)["status"] == "within_noise"  # a tie at the TF32 level


def test_a_different_window_fails():
    q = compare_query(*_case([[0.0, 10.0, 0.5], [20.0, 30.0, 0.4]], [[0.0, 12.3, 0.5], [20.0, 30.0, 0.4]]), TF32)
    assert q["status"] == "differs" and q["unmatched_windows"] == 1 and "[0.0, 10.0, 0.5]" in q["problem"]
    assert q["max_end_diff_s"] == 2.0


def test_a_snapping_flip_passes_only_next_to_a_boundary():
    # original end 12 (its raw end was just above 11); the re-run's raw end 10.9999 snaps to 10
    near = compare_query(*_case([[0.0, 12.0, 0.5]], [[0.0, 10.9999, 0.5]]), F32)
    assert near["status"] == "within_noise" and near["snap_flips"] == 1
    far = compare_query(*_case([[0.0, 12.0, 0.5]], [[0.0, 10.5, 0.5]]), F32)
    assert far["status"] == "differs"


def test_a_score_beyond_one_rounding_step_fails():
    assert compare_query(*_case([[0.0, 10.0, 0.5001]], [[0.0, 10.0, 0.50002]]), F32)["status"] == "within_noise"
    q = compare_query(*_case([[0.0, 10.0, 0.5003]], [[0.0, 10.0, 0.50002]]), F32)
    assert q["status"] == "differs" and abs(q["max_score_diff"] - 3e-4) < 1e-9


def test_saliency_beyond_the_bound_fails():
    step = float(np.spacing(np.float16(2.0)))  # 0.00195
    one_step = compare_query(*_case([[0.0, 10.0, 0.5]], [[0.0, 10.0, 0.5]], (1.0, 2.0), (1.0, 2.0 + step)), F32)
    assert one_step["status"] == "within_noise" and one_step["max_saliency_steps"] == 1.0
    beyond = compare_query(*_case([[0.0, 10.0, 0.5]], [[0.0, 10.0, 0.5]], (1.0, 2.0), (1.0, 2.01)), F32)
    assert beyond["status"] == "differs" and "saliency clip 1" in beyond["problem"]
    shorter = compare_query(*_case([[0.0, 10.0, 0.5]], [[0.0, 10.0, 0.5]], (1.0, 2.0), (1.0,)), F32)
    assert shorter["status"] == "differs" and "2 clips in the file, 1 in the re-run" in shorter["problem"]


def test_compare_predictions_lists_the_worst_queries_first():
    good = _case([[0.0, 10.0, 0.5]], [[0.0, 10.0, 0.5]])
    bad = _case([[0.0, 10.0, 0.5]], [[40.0, 60.0, 0.2]])
    lines_o = [dict(good[0], qid=1), dict(bad[0], qid=2)]
    lines_r = [dict(good[1], qid=1), dict(bad[1], qid=2)]
    raw = {1: good[2], 2: bad[2]}
    res = compare_predictions(lines_o, lines_r, raw, [{"qid": 1, "duration": 150}, {"qid": 2, "duration": 150}], TF32)
    assert not res["passed"] and res["identical"] == 1 and res["differs"] == 1
    assert [q["qid"] for q in res["worst"]] == [2] and res["max_end_diff_s"] == 50.0


def test_metric_allowance_is_the_share_of_queries_changed_within_noise():
    records = [{"qid": q, "relevant_windows": [[0, 8]] if q < 2 else [[0, 40]]} for q in range(4)]
    ref = {"MR-full-mAP": 10.0, "MR-short-mAP": 20.0}
    res = compare_metrics(ref, {"MR-full-mAP": 40.0, "MR-short-mAP": 20.0}, {0}, records)
    assert not res["passed"] and res["beyond"] == ["MR-full-mAP"]          # allowed 0.01 + 100 / 4
    rows = {r["metric"]: r for r in res["metrics"]}
    assert rows["MR-full-mAP"]["allowed"] == 25.01 and rows["MR-short-mAP"]["allowed"] == 50.01
    assert compare_metrics(ref, {"MR-full-mAP": 55.0, "MR-short-mAP": 20.0}, {0, 2}, records)["passed"]
    assert not compare_metrics(ref, {"MR-full-mAP": 10.02, "MR-short-mAP": 20.0}, set(), records)["passed"]


# ------------------------------------------------------------------------------------------------
# discovery
# ------------------------------------------------------------------------------------------------

def test_checkpoint_specific_names_come_first(tmp_path):
    class Opt:
        dset_name, eval_split_name = "hl", "val"
    assert prediction_file_candidates("run/model_best.ckpt", Opt)[:2] == ["best_hl_val_preds.jsonl",
                                                                          "best_*_preds.jsonl"]
    assert prediction_file_candidates("run/model_latest.ckpt", Opt)[0] == "latest_hl_val_preds.jsonl"
    assert prediction_file_candidates("run/model.ckpt", Opt)[0] == "hl_val_submission.jsonl"
    for name in ("best_hl_val_preds.jsonl", "latest_hl_val_preds.jsonl", "hl_val_submission.jsonl",
                 "hl_val_submission_nms_thd_0.7.jsonl"):
        (tmp_path / name).write_text("{}\n")
    assert find_original_predictions(tmp_path / "model_best.ckpt", Opt)[0] == str(tmp_path / "best_hl_val_preds.jsonl")
    assert find_original_predictions(tmp_path / "model_latest.ckpt", Opt)[0] == str(
        tmp_path / "latest_hl_val_preds.jsonl")
    path, looked, note = find_original_predictions(tmp_path / "model.ckpt", Opt)
    assert path == str(tmp_path / "hl_val_submission.jsonl") and note is None
    (tmp_path / "hl_val_submission.jsonl").unlink()
    (tmp_path / "best_hl_val_preds.jsonl").unlink()
    assert find_original_predictions(tmp_path / "model_best.ckpt", Opt)[0] is None  # NMS output is never used


# ------------------------------------------------------------------------------------------------
# a project-built model: the whole path without the shared fixtures
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_run(tmp_path_factory, demo_data):
    """A small checkpoint with its own original-batching predictions beside it (as the original inference)."""
    from qd_detr import inference
    root, paths = demo_data
    tmp = tmp_path_factory.mktemp("reproduction")
    ckpt, _, _ = small_checkpoint(tmp / "model.ckpt", "custom", "global", seed=31)
    data = demo_data_args(paths)
    assert inference.main(["--model_path", str(ckpt), *data, "--output_path", str(tmp / "hl_val_submission.jsonl"),
                           "--batching", "original", "--device", "cpu", "--quiet"]) == 0
    return tmp, ckpt, data


def test_small_model_reproduces_its_own_predictions(capsys, small_run):
    tmp, ckpt, data = small_run
    code, rep, err = legacy_report(capsys, ["--model_path", str(ckpt), *data])
    r = rep["reproduction"]
    assert code == 0 and err == "" and r["status"] == "reproduces" and r["verdict"] == "REPRODUCES"
    assert r["predictions"]["identical"] == r["n_queries"] > 0 and r["noise_level"] == "float32"
    assert r["metrics"]["passed"] and r["metrics"]["compared_with"] == "metrics file"
    assert r["metrics"]["file_matches_its_predictions"]
    assert compat_cli.main(["--model_path", str(ckpt), *data, "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert all(line in text.splitlines() for line in format_reproduction(r))  # text and JSON agree
    assert "  reproduction REPRODUCES: " in text


def test_edited_prediction_differs_and_exits_1(capsys, small_run, tmp_path):
    tmp, ckpt, data = small_run
    lines = [json.loads(x) for x in (tmp / "hl_val_submission.jsonl").read_text().splitlines()]
    w = lines[1]["pred_relevant_windows"][0]
    w[0], w[1] = w[0] + 10, w[1] + 10  # one window of one query moved by 10 s
    bad = tmp_path / "edited.jsonl"
    bad.write_text("".join(json.dumps(x) + "\n" for x in lines))
    code, rep, err = legacy_report(capsys, ["--model_path", str(ckpt), *data, "--original_predictions", str(bad)])
    r = rep["reproduction"]
    assert code == 1 and r["status"] == "differs" and r["source"] == "given" and not rep["compatible"]
    assert r["predictions"]["differs"] == 1 and r["predictions"]["worst"][0]["qid"] == lines[1]["qid"]
    assert err.startswith("incompatible: DIFFERS") and len(err.strip().splitlines()) == 1
    assert "probably trained with code this toolkit does not know" in err


def test_no_prediction_file_is_said_and_is_no_failure(capsys, tmp_path):
    ckpt, _, _ = small_checkpoint(tmp_path / "model_best.ckpt", "custom", "clipwise", seed=32)
    code, rep, err = legacy_report(capsys, ["--model_path", str(ckpt)])
    r = rep["reproduction"]
    assert code == 0 and rep["compatible"] and err == "" and r["status"] == "not_found"
    assert r["looked_for"][0] == "best_hl_val_preds.jsonl" and "hl_val_submission.jsonl" in r["looked_for"]
    assert "no prediction file" in r["message"] and "best_hl_val_preds.jsonl" in r["message"]
    compat_cli.main(["--model_path", str(ckpt), "--device", "cpu"])
    assert "  reproduction not checked: no prediction file" in capsys.readouterr().out


def _bad_file(tmp_path, small_run, content):
    lines = (small_run[0] / "hl_val_submission.jsonl").read_text().splitlines()
    path = tmp_path / "bad.jsonl"
    path.write_text(content(lines))
    return path


@pytest.mark.parametrize("content, message", [
    (lambda lines: lines[0] + "\n{not json\n", "malformed JSON"),
    (lambda lines: json.dumps({**json.loads(lines[0]), "qid": 987654}) + "\n", "1 of 1 qids are not in"),
    (lambda lines: json.dumps({**json.loads(lines[0]), "pred_relevant_windows": [[1, 2]]}) + "\n",
     "'pred_relevant_windows' must be"),
    (lambda lines: "", "prediction file is empty"),
], ids=["malformed_json", "unknown_qid", "bad_windows", "empty"])
def test_bad_prediction_file_is_one_line_exit_2(capsys, tmp_path, small_run, content, message):
    _, ckpt, data = small_run
    path = _bad_file(tmp_path, small_run, content)
    code = compat_cli.main(["--model_path", str(ckpt), *data, "--device", "cpu", "--original_predictions", str(path)])
    out, err = capsys.readouterr()
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ") and str(path) in err and message in err and "Traceback" not in err


def test_malformed_metrics_file_is_bad_input(capsys, tmp_path, small_run):
    _, ckpt, data = small_run
    shutil.copy(small_run[0] / "hl_val_submission.jsonl", tmp_path / "p.jsonl")
    (tmp_path / "p_metrics.json").write_text("[1, 2]")
    code = compat_cli.main(["--model_path", str(ckpt), *data, "--device", "cpu",
                            "--original_predictions", str(tmp_path / "p.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and "p_metrics.json: not a metrics file" in err and len(err.strip().splitlines()) == 1


def test_pipeline_records_the_verdict(small_run, tmp_path):
    _, ckpt, data = small_run
    out = tmp_path / "out"
    assert run_gate_analysis_main("--model_path", ckpt, *data, "--output_dir", out, "--device", "cpu", "--quiet",
                                  "--no_plots", "--legacy_model") == 0
    r = json.loads((out / "run.json").read_text())["reproduction"]
    assert r["status"] == "reproduces" and r["predictions"]["identical"] == r["n_queries"]
    assert f"  reproduction {r['message']}" in (out / "summary.txt").read_text().splitlines()
    page = (out / "report.html").read_text()
    assert "Reproduction of the original predictions" in page and "REPRODUCES: the re-run" in page


def test_pipeline_rejects_a_bad_prediction_file_before_the_run(capsys, small_run, tmp_path):
    _, ckpt, data = small_run
    path = _bad_file(tmp_path, small_run, lambda lines: "[1, 2]\n")
    assert run_gate_analysis_main("--model_path", ckpt, *data, "--output_dir", tmp_path / "out", "--device", "cpu",
                                  "--quiet", "--no_plots", "--legacy_model", "--original_predictions", path) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "run.json").exists()


# ------------------------------------------------------------------------------------------------
# the original research checkpoints
# ------------------------------------------------------------------------------------------------

def _gate_fixtures():
    """Fixture folders whose model has fusion gates (audio and a fusion module in their opt.json)."""
    if not FIXTURE_DATA.is_dir():
        return ["fixtures-absent"]
    names = []
    for d in sorted(FIXTURES.glob("ckpt_*")):
        opt = json.loads((d / "opt.json").read_text())
        if opt.get("a_feat_dir") and (opt.get("use_avigate") or opt.get("use_avigate_custom")):
            names.append(d.name)
    return names


NEWER_LAYOUTS = ("ckpt_v2_clipwise_film", "ckpt_ssm_diagstrip")


def _fixture_report(capsys, ckpt, extra=()):
    code, rep, err = legacy_report(capsys, ["--model_path", str(ckpt), *fixture_feature_args(), *extra])
    return code, rep, err


@pytest.mark.parametrize("name", _gate_fixtures())
def test_fixture_reproduces_its_own_predictions(capsys, name):
    if not FIXTURE_DATA.is_dir():
        pytest.skip("../shared/fixtures not present (only in CI and dev checkouts)")
    code, rep, err = _fixture_report(capsys, FIXTURES / name / "model.ckpt")
    if name in NEWER_LAYOUTS and code != 0 and "not support" in (rep.get("reason") or ""):
        pytest.skip(f"{name}: its layout is not implemented yet ({rep['reason'][:120]})")
    r = rep["reproduction"]
    assert code == 0 and err == "" and r["status"] == "reproduces", r.get("message")
    assert r["source"] == "found beside the checkpoint"
    assert r["predictions_path"] == str(FIXTURES / name / "hl_val_submission.jsonl")
    assert r["data_path"] == str(FIXTURE_DATA / "highlight_val_release.jsonl")  # the checkpoint's eval_path
    assert r["n_queries"] == 16 and r["batching"] == {"policy": "original", "batch_size": 100, "n_batches": 1}
    assert r["predictions"]["identical"] + r["predictions"]["within_noise"] == 16
    assert r["metrics"]["passed"] and r["metrics"]["compared_with"] == "metrics file"
    assert r["metrics"]["file_matches_its_predictions"]


DIFFERS_PAIRS = [("ckpt_custom_global", "ckpt_custom_clipwise"), ("ckpt_avigate_legacy", "ckpt_custom_global")]


@pytest.mark.parametrize("name, other", DIFFERS_PAIRS)
def test_fixture_with_another_fixtures_file_differs(capsys, tmp_path, name, other):
    if not FIXTURE_DATA.is_dir():
        pytest.skip("../shared/fixtures not present (only in CI and dev checkouts)")
    for f in ("model.ckpt", "opt.json"):
        shutil.copy(FIXTURES / name / f, tmp_path / f)
    for f in ("hl_val_submission.jsonl", "hl_val_submission_metrics.json"):
        shutil.copy(FIXTURES / other / f, tmp_path / f)
    data = ["--data_path", str(FIXTURE_DATA / "highlight_val_release.jsonl")]
    code, rep, err = _fixture_report(capsys, tmp_path / "model.ckpt", data)
    r = rep["reproduction"]
    assert code == 1 and r["status"] == "differs" and r["verdict"] == "DIFFERS" and rep["stage"] == "reproduce"
    assert r["predictions"]["differs"] == 16 and r["bounds"]["name"] == "tf32"  # beyond even the loosest bounds
    assert not r["metrics"]["passed"] and r["metrics"]["beyond"]
    assert err.startswith("incompatible: DIFFERS") and "does not know" in err
    compat_cli.main(["--model_path", str(tmp_path / "model.ckpt"), *fixture_feature_args(), *data, "--device", "cpu"])
    out = capsys.readouterr().out
    assert f"  reproduction {r['message']}" in out.splitlines() and "INCOMPATIBLE (at stage reproduce)" in out
    assert all(line in out.splitlines() for line in format_reproduction(r))


def test_metrics_file_that_disagrees_with_its_predictions_is_noted(capsys, small_run, tmp_path):
    tmp, ckpt, data = small_run
    shutil.copy(tmp / "hl_val_submission.jsonl", tmp_path / "p.jsonl")
    metrics = json.loads((tmp / "hl_val_submission_metrics.json").read_text())
    metrics["brief"]["MR-full-mAP"] += 5
    (tmp_path / "p_metrics.json").write_text(json.dumps(metrics))
    code, rep, _ = legacy_report(capsys, ["--model_path", str(ckpt), *data, "--original_predictions",
                                    str(tmp_path / "p.jsonl")])
    m = rep["reproduction"]["metrics"]
    assert code == 0 and rep["reproduction"]["status"] == "reproduces"  # the predictions themselves reproduce
    assert m["file_matches_its_predictions"] is False and m["compared_with"] == "recomputed from the file"
    assert any("does not match the metrics of its own predictions" in line
               for line in format_reproduction(rep["reproduction"]))


def test_found_file_without_data_is_not_checked_but_a_given_one_is_an_error(capsys, small_run):
    tmp, ckpt, _ = small_run  # the small checkpoint's options name no eval_path
    code, rep, err = legacy_report(capsys, ["--model_path", str(ckpt)])
    r = rep["reproduction"]
    assert code == 0 and err == "" and r["status"] == "not_checked" and "no data file is known" in r["message"]
    code = compat_cli.main(["--model_path", str(ckpt), "--device", "cpu", "--original_predictions",
                            str(tmp / "hl_val_submission.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and "cannot re-run its queries" in err and len(err.strip().splitlines()) == 1
