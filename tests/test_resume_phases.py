"""--resume continues a run stopped in any step (Ctrl-C in process, SIGKILL of the process) to an output folder
byte-identical to an uninterrupted run's; the interrupt message names the command that continues it."""
import filecmp
import json
import os
import shlex
import signal
import subprocess
import sys

import pytest

from conftest import ROOT, SCRIPT_ENV, demo_data_args, run_gate_analysis_main, small_checkpoint

# Files that record when and where a run happened (times, the output folder): compared by presence only.
PROVENANCE = {"run.json", "summary.txt", "report.html"}


def _argv(ckpt, paths, out, *extra):
    return ["--model_path", str(ckpt), *demo_data_args(paths), "--output_dir", str(out), "--max_samples", "6",
            "--batch_size", "2", "--ablate", "zero", "audio_zero", "--contributions", "--device", "cpu", "--quiet",
            *extra]


def _files(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


def assert_same_folder(a, b):
    """Every file of ``a`` is in ``b`` and the other way round; all but the provenance files byte-identical."""
    assert _files(a) == _files(b)
    differ = [f for f in _files(a) if f not in PROVENANCE and not filecmp.cmp(a / f, b / f, shallow=False)]
    assert differ == []
    assert json.loads((b / "run.json").read_text())["status"] == "complete"


@pytest.fixture(scope="module")
def setup(demo_data, tmp_path_factory):
    """(checkpoint, demo paths, {plots: uninterrupted output folder}) (the reference runs)."""
    _, paths = demo_data
    root = tmp_path_factory.mktemp("resume_phases")
    ckpt = small_checkpoint(root / "model.ckpt", "custom", "clipwise", seed=5)[0]
    full = {}
    for plots in (False, True):
        full[plots] = root / f"full_plots{int(plots)}"
        assert run_gate_analysis_main(*_argv(ckpt, paths, full[plots], *([] if plots else ["--no_plots"]))) == 0
    return ckpt, paths, full


def _stop_on_call(monkeypatch, owner, name, n=1):
    """Make ``owner.name`` raise KeyboardInterrupt at its ``n``-th call (1-based), as a Ctrl-C there would."""
    real = getattr(owner, name)
    calls = [0]

    def stop(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(owner, name, stop)


def _forward_pass():
    import gate_analysis.pipeline as m
    return m, "iterate_batches", 1  # the generator is created once: stop when the pass starts


def _gate_store():
    from gate_analysis.sink import GateSink
    return GateSink, "close", 1


def _statistics():
    import gate_analysis.stats_csv as m
    return m, "write_csv", 3  # two CSVs written, the third cut


def _ablation():
    import gate_analysis.ablation as m
    return m, "run_intervention", 2  # the first intervention done


def _contributions():
    from gate_analysis.contributions import ContributionWriter
    return ContributionWriter, "finish", 1


def _ground_truth():
    from gate_analysis.ground_truth import GroundTruthAccumulator
    return GroundTruthAccumulator, "write", 1


def _report():
    import gate_analysis.report as m
    return m, "write_report", 1


def _summary():
    import gate_analysis.pipeline as m
    return m, "write_summary", 1


def _plots():
    from gate_analysis.background import PlotJob
    return PlotJob, "result", 1  # while the figures are drawn


PHASES = {"forward pass": (_forward_pass, False), "gate store": (_gate_store, False),
          "statistics": (_statistics, False), "ablation": (_ablation, False), "contributions": (_contributions, False),
          "ground truth": (_ground_truth, False), "report": (_report, False), "summary": (_summary, False),
          "plots": (_plots, True)}


@pytest.mark.parametrize("phase", list(PHASES))
def test_ctrl_c_in_any_step_resumes_to_identical_outputs(setup, phase, tmp_path, monkeypatch, capsys):
    ckpt, paths, full = setup
    where, plots = PHASES[phase]
    out = tmp_path / "run"
    argv = _argv(ckpt, paths, out, *([] if plots else ["--no_plots"]))
    with monkeypatch.context() as patch:
        _stop_on_call(patch, *where())
        assert run_gate_analysis_main(*argv) == 130
    err = capsys.readouterr().err
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "interrupted"
    command = err.strip().splitlines()[-1].strip()
    assert command.startswith("python run_gate_analysis.py ") and command.endswith("--resume")
    resume_argv = shlex.split(command)[2:]
    assert run_gate_analysis_main(*resume_argv) == 0
    assert_same_folder(full[plots], out)


def test_sigint_message_names_the_resume_command(setup, tmp_path):
    """The command printed after Ctrl-C (SIGINT of the process) continues the run when pasted into a shell."""
    ckpt, paths, full = setup
    out = tmp_path / "run"
    code = ("import os, signal, sys; import gate_analysis.ablation as a; real = a.run_intervention\n"
            "def stop(*x, **k): os.kill(os.getpid(), signal.SIGINT); return real(*x, **k)\n"
            "a.run_intervention = stop\n"
            "import run_gate_analysis; from qd_detr.cli import run_main\n"
            "sys.exit(run_main(run_gate_analysis.main, sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, *_argv(ckpt, paths, out, "--no_plots")], cwd=ROOT,
                          env=SCRIPT_ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 130 and "Traceback" not in proc.stderr
    command = proc.stderr.strip().splitlines()[-1].strip()
    done = subprocess.run(command, shell=True, cwd=ROOT, env=SCRIPT_ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert_same_folder(full[False], out)


@pytest.mark.parametrize("target", ["forward pass", "ablation", "plots"])
def test_sigkill_in_a_step_resumes_to_identical_outputs(setup, target, tmp_path):
    """A kill leaves run.json "running" and half-written temporary files; --resume still finishes the run."""
    ckpt, paths, full = setup
    out = tmp_path / "run"
    hook = {"forward pass": "import gate_analysis.store as m; owner = m.GateStoreWriter; name = 'flush'; n = 2",
            "ablation": "import gate_analysis.ablation as m; owner = m; name = 'run_intervention'; n = 2",
            "plots": "import gate_analysis.background as m; owner = m.PlotJob; name = 'result'; n = 1"}[target]
    code = (f"import os, signal, sys\n{hook}\nreal = getattr(owner, name); calls = [0]\n"
            "def kill(*a, **k):\n    calls[0] += 1\n    if calls[0] == n:\n"
            "        open(os.path.join(sys.argv[sys.argv.index('--output_dir') + 1], '.tmp-1-1-cut.csv'), 'w').close()\n"
            "        os.kill(os.getpid(), signal.SIGKILL)\n    return real(*a, **k)\n"
            "setattr(owner, name, kill)\n"
            "import run_gate_analysis; from qd_detr.cli import run_main\n"
            "sys.exit(run_main(run_gate_analysis.main, sys.argv[1:]))")
    plots = target == "plots"
    argv = _argv(ckpt, paths, out, *([] if plots else ["--no_plots"]))
    proc = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, env=SCRIPT_ENV, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL
    assert json.loads((out / "run.json").read_text())["status"] == "running"
    assert run_gate_analysis_main(*argv, "--resume") == 0
    assert_same_folder(full[plots], out)


def test_resume_of_a_run_that_wrote_nothing_simply_starts(setup, tmp_path):
    ckpt, paths, full = setup
    out = tmp_path / "run"
    out.mkdir()
    assert run_gate_analysis_main(*_argv(ckpt, paths, out, "--no_plots"), "--resume") == 0
    assert_same_folder(full[False], out)


def test_a_run_that_fails_before_writing_leaves_no_folder(setup, tmp_path, capsys):
    ckpt, paths, _ = setup
    out = tmp_path / "never"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"qid": 1, "query": "x", "vid": "nope_1_2", "duration": 150}\n')
    argv = _argv(ckpt, paths, out, "--no_plots")
    argv[argv.index("--data_path") + 1] = str(bad)
    assert run_gate_analysis_main(*argv) == 2
    assert not out.exists()
    assert "error:" in capsys.readouterr().err


def test_every_csv_of_a_run_is_documented_in_readme(setup):
    """Each CSV of a full run (ablation, contributions, ground truth, performance) has exactly the columns that
    README documents, and README's section is the one generated from the code."""
    from gate_analysis.csv_docs import ALL_CSV_COLUMNS, csv_section
    assert csv_section() in (ROOT / "README.md").read_text()
    _, _, full = setup
    written = sorted(p for p in full[False].iterdir() if p.suffix == ".csv")
    assert len(written) >= 10
    for path in written:
        header = path.read_text().splitlines()[0].split(",")
        assert header == list(ALL_CSV_COLUMNS[path.name]), path.name
