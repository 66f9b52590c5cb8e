"""gate_analysis.background.OrderedWorker: the background thread that does the per-batch gate bookkeeping."""
import os
import sys
import threading

import pytest

from gate_analysis.background import OrderedWorker


def test_calls_run_in_submission_order_off_the_calling_thread():
    seen, threads = [], set()

    def call(i):
        seen.append(i)
        threads.add(threading.get_ident())

    worker = OrderedWorker(max_pending=2)
    for i in range(50):
        worker.submit(call, i)
    worker.close()
    assert seen == list(range(50))
    assert threads and threading.get_ident() not in threads


def test_an_error_is_raised_in_the_caller_and_later_calls_do_not_run():
    seen = []
    worker = OrderedWorker()

    def fail():
        raise ValueError("bad gate")

    worker.submit(seen.append, 1)
    worker.submit(fail)
    with pytest.raises(ValueError, match="bad gate"):
        for i in range(100):  # the error surfaces at a later submit (or at close)
            worker.submit(seen.append, 2)
        worker.close()
    worker.close(cancel=True)
    assert seen == [1]  # calls queued after the failing one never ran


def test_cancel_drops_calls_not_started():
    gate, seen = threading.Event(), []
    worker = OrderedWorker(max_pending=5)
    worker.submit(gate.wait)
    for i in range(5):
        worker.submit(seen.append, i)
    threading.Timer(0.2, gate.set).start()
    worker.close(cancel=True)
    assert seen == []


def test_plot_job_in_a_process_draws_the_same_pngs_as_inline(demo_data, tmp_path, monkeypatch):
    """The forked plotting process writes byte-identical figures; its failures reach the caller."""
    import shutil

    from conftest import analysis_config, small_checkpoint
    from gate_analysis.background import PlotJob
    from gate_analysis.pipeline import run_analysis
    from gate_analysis.stats import GateStatsAccumulator
    from gate_analysis.store import load_gate_run

    _, paths = demo_data
    ckpt, _, _ = small_checkpoint(tmp_path / "model.ckpt", "custom", "clipwise", seed=4)
    out = tmp_path / "run"
    out.mkdir()
    run_analysis(analysis_config(ckpt, paths, out), progress=False, log=lambda *a: None)
    acc = GateStatsAccumulator.from_gate_run(load_gate_run(out))
    shutil.copytree(out, tmp_path / "inline")
    shutil.rmtree(tmp_path / "inline" / "plots")
    monkeypatch.setenv("AVIGATE_PLOT_PROCESS", "0")
    written = PlotJob(acc, tmp_path / "inline").result()
    assert written and all(p.startswith(str(tmp_path / "inline")) for p in written)
    for p in written:
        name = os.path.relpath(p, tmp_path / "inline")
        assert (out / name).read_bytes() == (tmp_path / "inline" / name).read_bytes(), name
    if sys.platform.startswith("linux"):  # the forked process is used on Linux only
        monkeypatch.setenv("AVIGATE_PLOT_PROCESS", "1")
        job = PlotJob(acc, tmp_path / "no_such_run")  # the process fails: no gate store there
        with pytest.raises(RuntimeError, match="drawing the plots failed"):
            job.result()
