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


def _sleep_then_write(path, seconds):
    """A figure task that takes ``seconds`` and writes ``path`` (module level: the pool pickles it)."""
    import time
    time.sleep(seconds)
    with open(path, "w") as fh:
        fh.write("drawn")
    return path


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="figure processes are forked on Linux only")
def test_figure_pool_runs_tasks_in_parallel_and_returns_their_paths(tmp_path):
    import time

    from gate_analysis.background import FigurePool
    pool = FigurePool(workers=2)
    start = time.perf_counter()
    tasks = [pool.submit(_sleep_then_write, str(tmp_path / f"{i}.png"), 1.0) for i in range(2)]
    assert [t.result() for t in tasks] == [[str(tmp_path / "0.png")], [str(tmp_path / "1.png")]]
    assert time.perf_counter() - start < 1.9  # two 1 s tasks side by side, not one after the other
    pool.close()
    with pytest.raises(RuntimeError, match="drawing the plots failed"):
        broken = FigurePool(workers=1)
        try:
            broken.submit(_sleep_then_write, str(tmp_path / "no_such_dir" / "x.png"), 0.0).result()
        finally:
            broken.cancel()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="figure processes are forked on Linux only")
def test_figure_pool_cancel_stops_busy_processes_even_under_the_sigterm_handler(tmp_path):
    """Ctrl-C / SIGTERM of a run cancels the pool: busy processes end at once, also when the pool was made
    while ``stop_on_sigterm`` (the command lines' SIGTERM -> KeyboardInterrupt handler) was active, which
    the forked processes inherit; nothing they were drawing is written afterwards."""
    import time

    from gate_analysis.background import FigurePool
    from qd_detr.cli import stop_on_sigterm
    with stop_on_sigterm():
        pool = FigurePool(workers=2)
        procs = pool.processes
        for i in range(4):
            pool.submit(_sleep_then_write, str(tmp_path / f"{i}.png"), 5.0)
        time.sleep(0.5)
        start = time.perf_counter()
        pool.cancel()
    assert time.perf_counter() - start < 3.0
    assert all(not p.is_alive() for p in procs)
    time.sleep(0.2)
    assert not list(tmp_path.iterdir())


class _Node:
    pass


_LAST_CYCLE = []


def _make_cycle_and_report(path):
    """A figure-like task: reports whether the cycle made by the previous task in this process is gone and
    whether automatic collection is on while it runs, then leaves a cycle of its own."""
    import gc
    import weakref
    previous_freed = all(ref() is None for ref in _LAST_CYCLE)
    node = _Node()
    node.self = node  # a reference cycle: only the cyclic collector frees it
    _LAST_CYCLE[:] = [weakref.ref(node)]
    del node
    with open(path, "w") as fh:
        fh.write(f"{gc.isenabled()} {previous_freed}")
    return path


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="figure processes are forked on Linux only")
def test_figure_processes_collect_once_after_each_task_not_during_it(tmp_path):
    from gate_analysis.background import FigurePool
    pool = FigurePool(workers=1)
    try:
        paths = [pool.submit(_make_cycle_and_report, str(tmp_path / f"{i}.txt")).result()[0] for i in range(3)]
    finally:
        pool.close()
    # no automatic collection inside a task; the cycle a task left is freed before the next task starts
    assert [open(p).read() for p in paths] == ["False True"] * 3
