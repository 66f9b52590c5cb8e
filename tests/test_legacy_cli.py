"""test_legacy_model.py (compatibility report, exit codes) and run_gate_analysis.py --legacy_model."""
import filecmp
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import test_legacy_model as compat_cli  # the top-level script (pytest collects only tests/)
from conftest import (
    FIXTURE_DATA,
    FIXTURES,
    demo_data_args,
    fixture_feature_args,
    legacy_report,
    requires_fixtures,
    run_gate_analysis_main,
    run_python,
    save_checkpoint,
    small_checkpoint,
)


def _script(argv):
    return run_python("test_legacy_model.py", *argv, timeout=300)


@pytest.fixture
def small_ckpt(tmp_path):
    return small_checkpoint(tmp_path / "model.ckpt", "custom", "clipwise", seed=21)


# ------------------------------------------------------------------------------------------------
# the original research checkpoints
# ------------------------------------------------------------------------------------------------

FIXTURE_EXPECT = {
    "ckpt_custom_global": ("custom", "global", 11_340_077, 250, 2, [[1]] * 3),
    "ckpt_custom_clipwise": ("custom", "clipwise", 8_976_173, 250, 2, [[12], [7], [3]]),
    "ckpt_avigate_legacy": ("avigate", "global", 7_385_891, 206, 1, [[1]] * 3),
}


@requires_fixtures
@pytest.mark.parametrize("name", sorted(FIXTURE_EXPECT))
def test_fixture_checkpoints_are_compatible(capsys, name):
    layout, gating, params, tensors, layers, shapes = FIXTURE_EXPECT[name]
    code, rep, err = legacy_report(capsys, ["--model_path", str(FIXTURES / name / "model.ckpt")])
    assert code == 0 and rep["compatible"] and err == ""
    got = (rep["layout"], rep["gating_type"], rep["n_parameters"], rep["fusion_layers"])
    assert got == (layout, gating, params, layers)
    assert rep["checkpoint"]["format"] == "training checkpoint" and rep["checkpoint"]["epoch"] == 29
    assert rep["checkpoint"]["options_source"] == "checkpoint['opt']"
    assert rep["key_match"] == {"matched": tensors, "missing": 0, "unexpected": 0, "mis_shaped": 0}
    assert rep["keys"]["unmatched"] == [] and sum(rep["keys"]["groups"].values()) == tensors
    assert rep["weights"]["identical"] == tensors
    assert rep["equivalence"]["passed"] and rep["equivalence"]["max_abs_diff"] == 0.0
    assert len(rep["gates"]["layers"]) == 2 * layers
    assert all(g["recorded_shapes"] == shapes for g in rep["gates"]["layers"])


@requires_fixtures
def test_fixture_without_fusion_is_incompatible_with_the_reason(capsys):
    code, rep, err = legacy_report(capsys, ["--model_path", str(FIXTURES / "ckpt_main_plain" / "model.ckpt")])
    assert code == 1 and rep["status"] == "incompatible" and not rep["compatible"]
    assert "has no fusion module, so no gates" in rep["reason"]
    assert rep["n_parameters"] == 3_507_490 and rep["key_match"]["matched"] == 117
    assert err.startswith("incompatible: ") and len(err.strip().splitlines()) == 1


@requires_fixtures
def test_fixture_real_batch_gates_equal_the_original_code(capsys):
    code, rep, _ = legacy_report(capsys, [
        "--model_path", str(FIXTURES / "ckpt_custom_clipwise" / "model.ckpt"), "--batch_size", "2",
        "--data_path", str(FIXTURE_DATA / "highlight_val_release.jsonl"), *fixture_feature_args()])
    assert code == 0
    batch = rep["real_batch"]
    assert batch["qids"] == [5000, 5001] and batch["passed"] and batch["max_abs_diff_tracking_on_vs_off"] == 0.0
    ref = np.load(FIXTURES / "ckpt_custom_clipwise" / "reference_outputs_bs1.npz")
    for qid, clips in zip(batch["qids"], batch["video_clips"]):
        for layer in (0, 1):
            for kind in ("mha", "ffn"):
                got = batch["gates"][str(qid)][f"layers.{layer}.gate_{kind}"]
                want = ref[f"{qid}/layer{layer}/gate_{kind}"].reshape(-1)
                assert got["shape"] == [clips] == [len(want)]
                assert abs(got["mean"] - float(want.mean())) < 1e-5
                assert abs(got["max"] - float(want.max())) < 1e-5


# ------------------------------------------------------------------------------------------------
# exit codes and one-line errors
# ------------------------------------------------------------------------------------------------

def test_script_reports_a_compatible_checkpoint_as_json(small_ckpt):
    path, _, _ = small_ckpt
    res = _script(["--model_path", str(path), "--json", "--device", "cpu"])
    assert res.returncode == 0, res.stderr
    rep = json.loads(res.stdout)
    assert rep["compatible"] and rep["gating_type"] == "clipwise" and rep["equivalence"]["passed"]
    assert "Traceback" not in res.stderr


def test_missing_file_exits_2_with_one_line(capsys, tmp_path):
    code = compat_cli.main(["--model_path", str(tmp_path / "nope.ckpt")])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.splitlines() == [f"error: {tmp_path / 'nope.ckpt'}: checkpoint file not found"]


def test_tampered_checkpoint_exits_1_naming_the_key(capsys, small_ckpt, tmp_path):
    path, model, opt = small_ckpt
    sd = dict(model.state_dict())
    del sd["fusion.fusion_layers.0.gating_function.mlp_ffn.2.bias"]
    save_checkpoint(tmp_path / "t.ckpt", sd, opt)
    code = compat_cli.main(["--model_path", str(tmp_path / "t.ckpt"), "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 1 and len(err.splitlines()) == 1
    assert "missing key(s): fusion.fusion_layers.0.gating_function.mlp_ffn.2.bias" in err
    assert "INCOMPATIBLE (at stage load)" in out


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all\n", "truncated"])
def test_unreadable_input_exits_2(capsys, tmp_path, small_ckpt, content):
    path = tmp_path / "bad.ckpt"
    if content == "truncated":
        path.write_bytes(Path(small_ckpt[0]).read_bytes()[:5000])
    else:
        path.write_bytes(content)
    code, rep, err = legacy_report(capsys, ["--model_path", str(path)])
    assert code == 2 and rep["stage"] == "read" and not rep["compatible"]
    assert err.startswith("error: ") and str(path) in err
    assert "not a readable PyTorch checkpoint" in err or "empty (0 bytes)" in err
    assert len(err.strip().splitlines()) == 1


def test_gating_type_conflict_and_missing_gating_type_exit_2(capsys, small_ckpt, tmp_path):
    path, model, opt = small_ckpt
    code, rep, err = legacy_report(capsys, ["--model_path", str(path), "--gating_type", "global"])
    assert code == 2 and "--gating_type global conflicts with the checkpoint's gating_type clipwise" in err
    torch.save(model.state_dict(), tmp_path / "bare.ckpt")
    code, rep, err = legacy_report(capsys, ["--model_path", str(tmp_path / "bare.ckpt")])
    assert code == 2 and "cannot tell them apart" in rep["reason"]
    assert rep["checkpoint"]["stated_gating_type"] is None
    assert "identical weight names and shapes" in rep["checkpoint"]["gating_type_source"]


def test_bare_state_dict_loads_with_architecture_flags(capsys, small_ckpt, tmp_path):
    """What weight shapes cannot tell comes from flags; flags that contradict saved options are errors."""
    path, model, opt = small_ckpt
    bare = tmp_path / "bare.ckpt"
    torch.save(model.state_dict(), bare)
    code, rep, err = legacy_report(capsys, ["--model_path", str(bare), "--gating_type", "clipwise"])
    assert code == 2 and "--nheads" in rep["reason"] and "--fusion_n_heads" in rep["reason"]
    code, rep, err = legacy_report(capsys, ["--model_path", str(bare), "--gating_type", "clipwise",
                                      "--nheads", str(opt.nheads), "--fusion_n_heads", str(opt.fusion_n_heads)])
    assert code == 0 and rep["compatible"] and rep["gating_type_source"] == "given", err
    assert rep["fusion_n_heads"] == opt.fusion_n_heads
    wrong = opt.nheads * 2
    code, rep, err = legacy_report(capsys, ["--model_path", str(path), "--nheads", str(wrong)])
    assert code == 2 and f"nheads={wrong} was given but the checkpoint's options say nheads={opt.nheads}" in err


def test_text_report_lists_every_section(capsys, small_ckpt):
    code = compat_cli.main(["--model_path", str(small_ckpt[0]), "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0
    for label in ("format", "options", "layout", "keys", "strict load", "gating", "weights", "probe", "gates",
                  "COMPATIBLE"):
        assert f"\n  {label}" in out or f"\n{label}" in out, label


# ------------------------------------------------------------------------------------------------
# run_gate_analysis.py --legacy_model never changes a number
# ------------------------------------------------------------------------------------------------

def _analysis(out_dir, ckpt, paths, extra):
    assert run_gate_analysis_main("--model_path", ckpt, *demo_data_args(paths), "--output_dir", out_dir,
                                  "--device", "cpu", "--quiet", "--no_plots", *extra) == 0
    return json.loads((out_dir / "run.json").read_text())


@pytest.fixture(scope="module")
def legacy_and_plain_runs(tmp_path_factory, demo_data):
    _, paths = demo_data
    tmp = tmp_path_factory.mktemp("legacy_flag")
    ckpt, _, _ = small_checkpoint(tmp / "model.ckpt", "custom", "global", seed=22)
    plain = _analysis(tmp / "plain", ckpt, paths, [])
    legacy = _analysis(tmp / "legacy", ckpt, paths, ["--legacy_model"])
    return tmp, plain, legacy


def test_legacy_flag_changes_no_output_file(legacy_and_plain_runs):
    tmp, plain, legacy = legacy_and_plain_runs
    files = sorted(str(p.relative_to(tmp / "plain")) for p in (tmp / "plain").rglob("*") if p.is_file())
    assert sorted(str(p.relative_to(tmp / "legacy")) for p in (tmp / "legacy").rglob("*") if p.is_file()) == files
    assert {"predictions.jsonl", "gate_stats_per_query.csv"} <= set(files) and any(f.startswith("gates") for f in files)
    for name in files:
        if name not in ("run.json", "summary.txt", "report.html"):  # these embed paths and times
            assert filecmp.cmp(tmp / "plain" / name, tmp / "legacy" / name, shallow=False), name
    for key in ("model", "counts", "metrics_brief", "batching", "has_labels"):
        assert plain[key] == legacy[key], key
    assert plain["checkpoint"]["sha256"] == legacy["checkpoint"]["sha256"]
    plain_lines = (tmp / "plain" / "summary.txt").read_text().replace(str(tmp / "plain"), "OUT").splitlines()
    legacy_lines = (tmp / "legacy" / "summary.txt").read_text().replace(str(tmp / "legacy"), "OUT").splitlines()
    assert [line for line in legacy_lines if line in plain_lines] == plain_lines


def test_legacy_flag_records_the_proof_in_run_json(legacy_and_plain_runs):
    _, plain, legacy = legacy_and_plain_runs
    assert "legacy_adapter" not in plain["checkpoint"]["load_report"]
    report = legacy["checkpoint"]["load_report"]
    adapter = report["legacy_adapter"]
    assert adapter["equivalence"]["passed"] and adapter["equivalence"]["max_abs_diff"] == 0.0
    assert adapter["weights"]["identical"] == report["n_tensors"]
    assert adapter["gating_type"] == "global" and adapter["gating_type_source"] == "checkpoint['opt']"
    for key in ("layout", "gating_type", "n_parameters", "keys", "fusion_layers"):
        assert plain["checkpoint"]["load_report"][key] == report[key], key


def test_legacy_flag_puts_the_proof_in_the_summary(legacy_and_plain_runs):
    tmp, _, legacy = legacy_and_plain_runs
    summary = (tmp / "legacy" / "summary.txt").read_text()
    assert legacy["checkpoint"]["load_report"]["legacy_adapter"]["summary"] in summary


def test_bare_state_dict_analysis_with_flags_equals_the_full_checkpoint(legacy_and_plain_runs, demo_data):
    """A bare state dict plus --gating_type/--nheads/--fusion_n_heads gives the full checkpoint's results."""
    tmp, _, _ = legacy_and_plain_runs
    full = torch.load(tmp / "model.ckpt", weights_only=False)
    torch.save(full["model"], tmp / "bare.ckpt")
    opt, paths = full["opt"], demo_data[1]
    flags = ["--gating_type", "global", "--nheads", str(opt.nheads), "--fusion_n_heads", str(opt.fusion_n_heads)]
    for name, extra in (("bare", flags), ("bare_legacy", flags + ["--legacy_model"])):
        _analysis(tmp / name, tmp / "bare.ckpt", paths, extra)
        for f in ("predictions.jsonl", "gate_stats_per_query.csv"):
            assert filecmp.cmp(tmp / "plain" / f, tmp / name / f, shallow=False), (name, f)
