"""Work the main job runs beside the model: an ordered worker thread for the per-batch gate
bookkeeping, and a forked process that draws the plots while the tables are computed."""
import contextlib
import ctypes
import functools
import multiprocessing
import os
import queue
import signal
import sys
import threading
import traceback

__all__ = ["OrderedWorker", "PlotJob", "release_freed_memory"]


def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):  # not glibc
        return None


_MALLOC_TRIM = _malloc_trim() if sys.platform.startswith("linux") else None


def release_freed_memory():
    """Give freed heap memory back to the OS (glibc ``malloc_trim``; a no-op elsewhere). Freed gate
    arrays of a batch otherwise stay in the process's heap arenas, fragmented by long-lived objects."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class OrderedWorker:
    """Runs submitted calls one at a time, in order, on a background thread (numpy and file writes
    release the GIL, so this overlaps the model's next forward pass). At most ``max_pending`` calls
    wait; a call's exception is re-raised in the submitting thread (next ``submit`` or ``close``)."""

    def __init__(self, max_pending=2):
        self._queue = queue.Queue(max_pending)
        self._error = None
        self._cancelled = False
        self._thread = threading.Thread(target=self._run, name="gate-analysis-worker", daemon=True)
        self._thread.start()

    def _run(self):
        while True:
            call = self._queue.get()
            if call is None:
                return
            if self._error is None and not self._cancelled:
                try:
                    call()
                except BaseException as exc:  # re-raised in the submitting thread
                    self._error = exc

    def _check(self):
        if self._error is not None:
            error, self._error = self._error, None
            self._cancelled = True
            raise error

    def submit(self, fn, *args):
        self._check()
        self._queue.put(functools.partial(fn, *args))

    def close(self, cancel=False):
        """Wait for the submitted calls (``cancel``: drop those not started) and stop the thread."""
        if cancel:
            self._cancelled = True
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if not cancel:
            self._check()


def _draw(acc, out, compare, more):
    from .sink import plot_gate_store
    return plot_gate_store(acc, out, compare_qids=compare, more=more)


def _die_with_parent():
    """Linux: the plotting process is killed when the analysis process dies (even by SIGKILL), so a killed run
    leaves no process drawing into the folder that ``--resume`` rewrites."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _plot_process(conn, acc, out, compare, more):
    _die_with_parent()
    try:
        conn.send(("ok", _draw(acc, out, compare, more)))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


class PlotJob:
    """``sink.plot_gate_store`` for a finished run: ``plots.plot_all``, then ``more(gate_run)`` (more figures;
    returns their paths).
    On Linux it runs in a forked process, so the figures are drawn while the caller computes metrics and
    tables (set AVIGATE_PLOT_PROCESS=0 to draw inline). ``result()`` waits and returns the written
    paths; ``cancel()`` stops an unfinished job."""

    def __init__(self, acc, out, compare=None, more=None):
        self._proc = self._paths = None
        if sys.platform.startswith("linux") and os.environ.get("AVIGATE_PLOT_PROCESS", "1") != "0":
            ctx = multiprocessing.get_context("fork")
            self._conn, child = ctx.Pipe(duplex=False)
            self._proc = ctx.Process(target=_plot_process, args=(child, acc, out, compare, more), daemon=True,
                                     name="gate-analysis-plots")
            self._proc.start()
            child.close()
        else:
            self._paths = _draw(acc, out, compare, more)

    def result(self):
        if self._proc is None:
            return self._paths
        try:
            status, payload = self._conn.recv()
        except EOFError:
            status, payload = "error", f"the plotting process ended without a result (exit code {self._proc.exitcode})"
        self._proc.join()
        self._proc = None
        self._conn.close()
        if status != "ok":
            raise RuntimeError(f"drawing the plots failed:\n{payload}")
        self._paths = payload
        return payload

    def cancel(self):
        if self._proc is not None:
            self._proc.terminate()
            self._proc.join()
            self._proc = None
            self._conn.close()
