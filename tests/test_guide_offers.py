"""legacy_model_guide.py offers what the user needs next (issue 14, finding 9): the checkpoint inside a folder,
the feature folders the checkpoint's options resolve to (and, when they do not exist, the paths tried), and the
causal analyses (--ablate, with its cost of one extra inference pass per intervention, and --contributions).

The guide runs in process with scripted answers (``run_guide(read=..., write=...)``)."""
import os
import shlex

import pytest

import legacy_model_guide as guide_cli  # the top-level script (pytest collects only tests/)
from conftest import run_gate_analysis_main, save_checkpoint, small_model
from gate_analysis.guide import ABLATE_HELP, checkpoints_in, run_guide
from qd_detr.errors import ConfigError


class Script:
    """Scripted answers for the guide's questions; records every prompt and written line."""

    def __init__(self, answers):
        self.answers, self.lines = list(answers), []

    def read(self, prompt):
        self.lines.append(prompt)
        if not self.answers:
            raise EOFError
        return self.answers.pop(0)

    def write(self, text):
        self.lines.append(text)

    @property
    def text(self):
        return "\n".join(self.lines)


def _guide(argv, answers):
    """The guide on ``argv`` (flags) with ``answers``: (exit code, Script, the printed command's argv or None)."""
    args = guide_cli.get_args_parser().parse_args(argv)
    script = Script(answers)
    code = run_guide(args, guide_cli.SCRIPT, read=script.read, write=script.write, analyse=guide_cli.analyse)
    lines = [line for line in script.lines if line.startswith("python ") and "run_gate_analysis.py" in line]
    return code, script, shlex.split(lines[-1])[2:] if lines else None


def _value(argv, flag, n=1):
    i = argv.index(flag)
    return argv[i + 1] if n == 1 else argv[i + 1:i + 1 + n]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, demo_data):
    """A training run's folder: model_best.ckpt whose options name the demo data (video and text folders found,
    the audio folder saved as ../features/pann_features, which does not exist from here)."""
    _, paths = demo_data
    tmp = tmp_path_factory.mktemp("guide_offers")
    model, opt = small_model("custom", "clipwise", seed=51)
    opt.eval_path, opt.v_feat_dirs, opt.t_feat_dir = paths["jsonl"]["val"], paths["v_feat_dirs"], paths["t_feat_dir"]
    opt.a_feat_dir = "../features/pann_features"
    run = tmp / "results" / "run"
    run.mkdir(parents=True)
    save_checkpoint(run / "model_best.ckpt", model, opt)
    return run, paths


# ------------------------------------------------------------------------------------------------
# a folder for the checkpoint
# ------------------------------------------------------------------------------------------------

def test_folder_with_one_checkpoint_is_offered(run_dir, tmp_path):
    run, paths = run_dir
    code, s, argv = _guide(["--no_run", "--no_plots"], [str(run), "", "", "", "", paths["a_feat_dir"], "", "", "",
                                                        str(tmp_path / "out")])
    assert code == 0, s.text
    assert f"  {run} is a folder; use the checkpoint in it, {run / 'model_best.ckpt'}? [Y/n]: " in s.lines
    assert _value(argv, "--model_path") == str(run / "model_best.ckpt")


def test_folder_with_several_checkpoints_lists_them(run_dir, tmp_path):
    run, paths = run_dir
    folder = tmp_path / "two"
    folder.mkdir()
    for name in ("model_latest.ckpt", "model_best.ckpt", "notes.txt"):
        os.symlink(run / "model_best.ckpt", folder / name)
    assert checkpoints_in(folder) == [str(folder / "model_best.ckpt"), str(folder / "model_latest.ckpt")]
    code, s, argv = _guide(["--no_run", "--no_plots", "--model_path", str(folder), "--a_feat_dir", paths["a_feat_dir"]],
                           ["7", "model_latest.ckpt", "", "", "", "", "", "", str(tmp_path / "out")])
    assert code == 0, s.text
    assert f"  {folder} is a folder with 2 checkpoints:" in s.lines
    assert "    1. model_best.ckpt" in s.lines and "    2. model_latest.ckpt" in s.lines
    assert "  answer a number from 1 to 2 or one of the names; please try again" in s.lines
    assert _value(argv, "--model_path") == str(folder / "model_latest.ckpt")


def test_folder_in_non_interactive_mode_names_the_checkpoint_inside(capsys, run_dir, tmp_path):
    run, _ = run_dir
    assert guide_cli.main(["--non-interactive", "--model_path", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"error: {run}: is a folder, not a checkpoint file; the checkpoint in it: "
                                f"--model_path {run / 'model_best.ckpt'}"]
    (tmp_path / "empty").mkdir()
    assert guide_cli.main(["--non-interactive", "--model_path", str(tmp_path / "empty")]) == 2
    assert "is a folder with no checkpoint file (*.ckpt, *.pth) in it" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# feature folder defaults
# ------------------------------------------------------------------------------------------------

def test_feature_folder_defaults_and_the_paths_tried(run_dir, tmp_path):
    run, paths = run_dir
    code, s, argv = _guide(["--no_run", "--no_plots", "--model_path", str(run / "model_best.ckpt")],
                           ["", "", "", paths["a_feat_dir"], "", "", "", str(tmp_path / "out")])
    assert code == 0, s.text
    assert f"Video feature folders (space-separated, training order) [{shlex.join(paths['v_feat_dirs'])}]: " in s.lines
    assert f"Text feature folder [{paths['t_feat_dir']}]: " in s.lines
    tried = ["../features/pann_features", str(run.parent / "features" / "pann_features"),
             str(run.parent.parent / "features" / "pann_features"),
             str(run.parent.parent.parent / "features" / "pann_features")]
    note = (f"  the checkpoint's a_feat_dir not found from here: ../features/pann_features (tried {', '.join(tried)}); "
            "give the path")
    i = s.lines.index(note)
    assert s.lines[i + 1] == "Audio feature folder: "  # no default: the saved one does not exist
    assert _value(argv, "--a_feat_dir") == paths["a_feat_dir"]
    assert _value(argv, "--v_feat_dirs", 2) == paths["v_feat_dirs"]


def test_non_interactive_missing_default_says_what_was_tried(capsys, run_dir):
    run, _ = run_dir
    assert guide_cli.main(["--non-interactive", "--model_path", str(run / "model_best.ckpt")]) == 2
    out, err = capsys.readouterr()
    assert err.splitlines() == ["error: --a_feat_dir is required with --non-interactive"]
    assert "  the checkpoint's a_feat_dir not found from here: ../features/pann_features (tried " in out


# ------------------------------------------------------------------------------------------------
# the causal analyses
# ------------------------------------------------------------------------------------------------

def test_causal_analyses_are_offered_with_their_cost(run_dir, tmp_path):
    run, paths = run_dir
    out = tmp_path / "out"
    code, s, argv = _guide(["--no_run", "--no_plots", "--model_path", str(run / "model_best.ckpt"),
                            "--a_feat_dir", paths["a_feat_dir"], "--ablate_layers", "all", "1"],
                           ["", "", "", "3", "zero loud", "zero audio_zero", "y", str(out)])
    assert code == 0, s.text
    for line in ABLATE_HELP:
        assert line in s.lines
    assert "one extra inference pass over the analysed queries per intervention" in " ".join(ABLATE_HELP)
    assert any("--ablate: unknown intervention 'loud'" in line and line.endswith("please try again") for line in s.lines)
    assert "  3 interventions (zero@all:both, zero@1:both, audio_zero): 3 extra inference passes over the analysed " \
           "queries" in s.lines
    assert any(line.startswith("Record per-clip contributions") for line in s.lines)
    assert _value(argv, "--ablate", 2) == ["zero", "audio_zero"] and _value(argv, "--ablate_layers", 2) == ["all", "1"]
    assert "--contributions" in argv and "--ablate_gates" not in argv

    # the printed command runs and writes what was offered
    assert run_gate_analysis_main(*argv, "--device", "cpu", "--quiet") == 0
    assert (out / "ablation.csv").is_file() and (out / "gate_contributions.csv").is_file()
    overall = (out / "ablation_overall.csv").read_text()
    assert all(name in overall for name in ("zero@all:both", "zero@1:both", "audio_zero"))


def test_causal_analyses_check_the_model_and_default_to_none(run_dir, tmp_path):
    run, paths = run_dir
    base = ["--no_run", "--no_plots", "--model_path", str(run / "model_best.ckpt"), "--a_feat_dir", paths["a_feat_dir"],
            "--output_dir", str(tmp_path / "o")]
    code, s, argv = _guide([*base, "--ablate_layers", "5"], ["", "", "", "", "mean", "none", ""])
    assert code == 0, s.text
    assert any("layer 5 does not exist; the model has 2 fusion layers" in line for line in s.lines)
    assert "--ablate" not in argv and "--contributions" not in argv and "--ablate_layers" not in argv
    code, s, argv = _guide([*base, "--non-interactive", "--ablate", "mean", "--contributions"], [])
    assert code == 0 and _value(argv, "--ablate") == "mean" and "--contributions" in argv
    assert not any(line in s.lines for line in ABLATE_HELP)  # given by flags: nothing asked
    assert not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match="--ablate_gates beta: the model has no beta gate"):
        _guide([*base, "--non-interactive", "--ablate", "zero", "--ablate_gates", "beta"], [])
