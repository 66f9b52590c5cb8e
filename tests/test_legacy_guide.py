"""legacy_model_guide.py: driven through a pseudo-terminal, a pipe and flags (--non-interactive)."""
import filecmp
import io
import json
import shlex
import sys

import pexpect
import pytest

import legacy_model_guide as guide  # the top-level script (pytest collects only tests/)
from conftest import (
    ROOT,
    SCRIPT_ENV,
    run_gate_analysis_main,
    run_python,
    save_checkpoint,
    small_checkpoint,
    small_model,
)

GUIDE = ROOT / "legacy_model_guide.py"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_data):
    """A checkpoint whose options name the data like the original training does (audio folder not found)."""
    _, paths = demo_data
    tmp = tmp_path_factory.mktemp("guide")
    model, opt = small_model("custom", "clipwise", seed=31)
    opt.eval_path, opt.v_feat_dirs, opt.t_feat_dir = paths["jsonl"]["val"], paths["v_feat_dirs"], paths["t_feat_dir"]
    opt.a_feat_dir = "../features/pann_features"
    (tmp / "run").mkdir()
    return save_checkpoint(tmp / "run" / "model_best.ckpt", model, opt), paths


def _command_argv(text):
    line = [ln for ln in text.strip().splitlines() if "run_gate_analysis.py" in ln][-1].strip()
    argv = shlex.split(line)
    assert argv[0] == "python" and argv[1].endswith("run_gate_analysis.py")
    return argv[2:]


def _value(argv, flag, n=1):
    i = argv.index(flag)
    return argv[i + 1] if n == 1 else argv[i + 1:i + 1 + n]


def test_guide_in_a_terminal_checks_then_analyses_and_prints_the_command(trained, tmp_path):
    ckpt, paths = trained
    out = tmp_path / "analysis"
    child = pexpect.spawn(sys.executable, [str(GUIDE), "--no_plots", "--quiet", "--device", "cpu"], cwd=str(tmp_path),
                          env=SCRIPT_ENV, encoding="utf-8", timeout=300, dimensions=(60, 500))
    log = io.StringIO()
    child.logfile_read = log
    try:
        child.expect_exact("Checkpoint file: ")
        child.sendline(str(tmp_path / "missing.ckpt"))
        child.expect_exact("checkpoint file not found; please try again")
        child.expect_exact("Checkpoint file: ")
        child.sendline(str(ckpt))
        child.expect_exact(f"Annotation file (JSONL) [{paths['jsonl']['val']}]: ")  # saved in the checkpoint
        child.sendline("")
        child.expect_exact("12 queries")
        child.expect_exact(f"[{' '.join(paths['v_feat_dirs'])}]: ")
        child.sendline("")
        child.expect_exact(f"Text feature folder [{paths['t_feat_dir']}]: ")
        child.sendline("")
        child.expect_exact("Audio feature folder: ")  # the saved ../features/pann_features does not exist
        child.sendline(str(tmp_path / "nowhere"))
        child.expect_exact("audio feature folder not found; please try again")
        child.expect_exact("Audio feature folder: ")
        child.sendline(paths["a_feat_dir"])
        child.expect_exact("gating type: clipwise (from checkpoint['opt'])")
        child.expect_exact("How many queries to analyse (all = 12) [all]: ")
        child.sendline("many")
        child.expect_exact("expected a positive number, got 'many'; please try again")
        child.expect_exact("[all]: ")
        child.sendline("5")
        child.expect_exact("one extra inference pass over the analysed queries per intervention")
        child.expect_exact("none = skip) [none]: ")  # the causal analyses are offered
        child.sendline("")
        child.expect_exact("(--contributions: measured during the main pass, no extra pass; "
                           "gate_contributions.csv)? [y/N]: ")
        child.sendline("")
        child.expect_exact("Output folder [")
        child.sendline(str(out))
        child.expect_exact("Run the compatibility check and the analysis now? [Y/n]: ")
        child.sendline("")
        child.expect_exact("COMPATIBLE: gates can be analysed")
        child.expect_exact("Gate analysis of 5 queries")
        child.expect_exact("Equivalent non-interactive command:")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    transcript = log.getvalue()
    assert child.exitstatus == 0, transcript[-3000:]
    assert "Traceback" not in transcript
    argv = _command_argv(transcript.split("Equivalent non-interactive command:")[-1])
    assert _value(argv, "--output_dir") == str(out) and _value(argv, "--max_samples") == "5"
    assert _value(argv, "--a_feat_dir") == paths["a_feat_dir"] and "--legacy_model" in argv
    assert "--gating_type" not in argv  # the checkpoint states it
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete" and run["counts"]["queries"] == 5
    assert run["checkpoint"]["load_report"]["legacy_adapter"]["equivalence"]["passed"]

    # the printed command is the analysis: run again elsewhere, same files
    again = tmp_path / "again"
    argv[argv.index("--output_dir") + 1] = str(again)
    assert run_gate_analysis_main(*argv) == 0
    files = [p.relative_to(out) for p in out.rglob("*") if p.is_file() and p.name not in ("run.json", "summary.txt", "report.html")]
    assert any(str(f).startswith("gates") for f in files)
    assert all(filecmp.cmp(out / f, again / f, shallow=False) for f in files)


def test_guide_reads_piped_answers_and_asks_again_on_bad_ones(trained, tmp_path):
    ckpt, paths = trained
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    answers = [str(ckpt), "", "", "", paths["a_feat_dir"], "0", "3", "13 999", "13 14", "", "", str(busy), "n",
               str(tmp_path / "fresh")]  # "", "": no --ablate, no --contributions
    res = run_python(GUIDE, "--no_run", "--device", "cpu", input="\n".join(answers) + "\n", cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    assert "expected a number between 1 and 12; please try again" in res.stdout
    assert "qid(s) [999] are not among the analysed queries; please try again" in res.stdout
    assert "choose another output folder; please try again" in res.stdout
    argv = _command_argv(res.stdout)
    assert _value(argv, "--compare_samples", 2) == ["13", "14"] and _value(argv, "--max_samples") == "3"
    assert _value(argv, "--output_dir") == str(tmp_path / "fresh") and "--overwrite" not in argv
    assert _value(argv, "--v_feat_dirs", 2) == paths["v_feat_dirs"]
    assert not (tmp_path / "fresh").exists() and (busy / "keep.txt").read_text() == "mine"


def test_guide_end_of_input_stops_with_one_line(capsys, monkeypatch, trained, tmp_path):
    ckpt, _ = trained
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{ckpt}\n\n"))  # input() reads it like a pipe, then EOF
    assert guide.main([]) == 2
    out, err = capsys.readouterr()
    assert "Annotation file (JSONL)" in out
    assert err.strip().splitlines() == ["error: input ended before the guide finished; nothing was run or written"]
    assert list(tmp_path.iterdir()) == []


def test_guide_ctrl_c_stops_with_one_line(trained, tmp_path):
    ckpt, _ = trained
    child = pexpect.spawn(sys.executable, [str(GUIDE)], cwd=str(tmp_path), env=SCRIPT_ENV, encoding="utf-8",
                          timeout=300)
    log = io.StringIO()
    child.logfile_read = log
    try:
        child.expect_exact("Checkpoint file: ")
        child.sendline(str(ckpt))
        child.expect_exact("Annotation file (JSONL)")
        child.sendintr()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 130
    assert "interrupted; the guide stopped and left no partial results" in log.getvalue()
    assert "Traceback" not in log.getvalue() and list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------
# --non-interactive (in process)
# ------------------------------------------------------------------------------------------------

def test_non_interactive_takes_flags_and_the_checkpoint_defaults(capsys, trained, tmp_path):
    ckpt, paths = trained
    code = guide.main(["--non-interactive", "--no_run", "--model_path", str(ckpt), "--a_feat_dir", paths["a_feat_dir"],
                       "--max_samples", "4", "--output_dir", str(tmp_path / "o"), "--batching", "original",
                       "--gating_type", "clipwise"])
    out, err = capsys.readouterr()
    assert code == 0 and err == ""
    argv = _command_argv(out)
    assert _value(argv, "--data_path") == paths["jsonl"]["val"] and _value(argv, "--t_feat_dir") == paths["t_feat_dir"]
    assert _value(argv, "--batching") == "original" and _value(argv, "--max_samples") == "4"
    assert not (tmp_path / "o").exists()


def test_non_interactive_missing_or_bad_answers_are_one_error_line(capsys, trained, tmp_path):
    ckpt, paths = trained
    assert guide.main(["--non-interactive", "--model_path", str(ckpt)]) == 2
    assert capsys.readouterr().err.splitlines() == ["error: --a_feat_dir is required with --non-interactive"]
    assert guide.main(["--non-interactive", "--model_path", str(ckpt), "--gating_type", "global"]) == 2
    assert "--gating_type global conflicts with the checkpoint's gating_type clipwise" in capsys.readouterr().err
    assert guide.main(["--non-interactive", "--model_path", str(ckpt), "--data_path", str(tmp_path / "x.jsonl")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "x.jsonl" in err


def test_non_interactive_model_without_fusion_exits_1(capsys, tmp_path):
    ckpt, _, _ = small_checkpoint(tmp_path / "plain.ckpt", "video_only", seed=2)
    assert guide.main(["--non-interactive", "--model_path", str(ckpt)]) == 1
    assert "has no fusion module, so no gates" in capsys.readouterr().err


def test_saved_relative_paths_are_found_from_the_training_repo_root(tmp_path):
    from gate_analysis.guide import saved_path
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "val.jsonl").write_text("")
    ckpt = tmp_path / "results" / "run" / "model_best.ckpt"
    assert saved_path("data/val.jsonl", ckpt) == str(tmp_path / "data" / "val.jsonl")
    assert saved_path("../features/x", ckpt) is None
