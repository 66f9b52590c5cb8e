"""Work the main job runs beside the model: an ordered worker thread for the per-batch gate
bookkeeping, and forked processes that draw the figures while the tables are computed (``FigurePool``,
``PlotJob``)."""
import contextlib
import ctypes
import functools
import gc
import multiprocessing
import os
import pickle
import queue
import signal
import sys
import threading
import traceback

__all__ = ["OrderedWorker", "FigurePool", "FigureTask", "PlotJob", "plot_workers", "as_paths", "release_freed_memory"]


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


def _die_with_parent():
    """Linux: a figure process is killed when the analysis process dies (even by SIGKILL), so a killed run
    leaves no process drawing into the folder that ``--resume`` rewrites."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def as_paths(value):
    """The written paths a figure function returned (one path, a list of paths, or None) as a list."""
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        return [os.fspath(value)]
    return [os.fspath(v) for v in value]


def _warm_up():
    """Import the figure modules and render one text (loads the font), so the first task does not pay it."""
    import io

    from . import plots, plots_causal, plots_compare, plots_ground_truth, plots_performance  # noqa: F401
    from .figures import plt
    fig = plt.figure(figsize=(1, 1))
    fig.text(0.5, 0.5, "warm-up 0.1", fontsize=9)
    fig.savefig(io.BytesIO(), format="png")
    plt.close(fig)


@contextlib.contextmanager
def _collect_after():
    """No cyclic garbage collection while a figure is drawn, one collection after it. A figure makes tens of
    thousands of objects that live until it is closed, so the automatic collections (dozens per figure) walk
    the same live objects again and again; the one collection frees the closed figure's cycles."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
        gc.collect()


def _worker(tasks, results, warm_lock):
    """A figure process: take tasks (task id, pickled (fn, args, kwargs)) until None, put (id, status, payload).
    ``warm_lock``: warm up first, one process at a time (the caller keeps a core), or None (warmed before the
    fork)."""
    _die_with_parent()
    # the parent stops its figure processes itself: Ctrl-C (sent to the whole process group) is ignored here,
    # and SIGTERM ends the process (not the parent's handler inherited by the fork, which raises
    # KeyboardInterrupt: caught by the task loop, the process would wait for the next task forever)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    gc.freeze()  # the inherited heap is never collected here: collections only walk the figures' objects
    if warm_lock is not None:
        with warm_lock, contextlib.suppress(Exception):  # a broken import shows in the first task that needs it
            _warm_up()
        gc.freeze()  # nor are the modules the warm-up imported
    while True:
        item = tasks.get()
        if item is None:
            return
        task_id, blob = item
        try:
            fn, args, kwargs = pickle.loads(blob)
            with _collect_after():
                paths = as_paths(fn(*args, **kwargs))
            results.put((task_id, "ok", paths))
        except BaseException:
            results.put((task_id, "error", traceback.format_exc()))


def plot_workers():
    """Number of figure processes: ``AVIGATE_PLOT_WORKERS`` if set, else the usable cores (at most 4); 0 when
    figures are drawn in the calling process (``AVIGATE_PLOT_PROCESS=0``, or not on Linux)."""
    if not sys.platform.startswith("linux") or os.environ.get("AVIGATE_PLOT_PROCESS", "1") == "0":
        return 0
    if os.environ.get("AVIGATE_PLOT_WORKERS", "").strip():
        return max(1, int(os.environ["AVIGATE_PLOT_WORKERS"]))
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


class FigureTask:
    """One submitted figure function; ``result()`` waits for it and returns the paths it wrote."""

    def __init__(self, pool, task_id):
        self._pool, self.id = pool, task_id

    def result(self):
        return self._pool.wait(self.id)


class FigurePool:
    """Processes that draw figures while the caller goes on (Linux: forked when the pool is made, each
    importing the figure modules at once). ``submit(fn, *args, **kwargs)`` queues a figure function (a
    module-level function; its arguments are pickled); the first free process runs it. Without
    processes (``plot_workers() == 0``) ``submit`` runs the function at once in the caller.

    A failed task raises RuntimeError("drawing the plots failed: ...") from ``wait``; ``cancel()`` stops
    the processes (queued tasks are dropped), ``close()`` ends them after the queued tasks.
    ``warm_here``: import pyplot and load the fonts here before forking (the processes inherit them: less
    work in all, for a pool that is needed at once); else each process does it when it starts (for a pool
    made early, while the caller still computes)."""

    def __init__(self, workers=None, warm_here=False):
        n = plot_workers() if workers is None else int(workers)
        self._done, self._next, self._procs = {}, 0, []
        if n <= 0:
            return
        if warm_here:
            _warm_up()
        ctx = multiprocessing.get_context("fork")
        self._tasks, self._results = ctx.Queue(), ctx.Queue()
        warm_lock = None if warm_here else ctx.Lock()
        for i in range(n):
            p = ctx.Process(target=_worker, args=(self._tasks, self._results, warm_lock), daemon=True,
                            name=f"gate-analysis-figures-{i}")
            p.start()
            self._procs.append(p)

    @property
    def workers(self):
        """Number of figure processes (0: tasks run in the caller)."""
        return len(self._procs)

    @property
    def processes(self):
        """The figure processes (``multiprocessing.Process``; none once the pool is closed or cancelled)."""
        return list(self._procs)

    def submit(self, fn, *args, **kwargs):
        task_id, self._next = self._next, self._next + 1
        if not self._procs:
            self._done[task_id] = ("ok", as_paths(fn(*args, **kwargs)))
        else:
            # pickled here, so an argument that cannot be sent fails in the caller, not in the queue's thread
            self._tasks.put((task_id, pickle.dumps((fn, args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)))
        return FigureTask(self, task_id)

    def wait(self, task_id):
        """The paths task ``task_id`` wrote (waiting for it); RuntimeError when it failed."""
        while task_id not in self._done:
            try:
                done_id, status, payload = self._results.get(timeout=0.5)
            except queue.Empty:
                dead = [p for p in self._procs if p.exitcode is not None]
                if dead:
                    self.cancel()
                    raise RuntimeError(f"drawing the plots failed: a figure process ended without a result "
                                       f"(exit code {dead[0].exitcode})") from None
                continue
            self._done[done_id] = (status, payload)
        status, payload = self._done[task_id]
        if status != "ok":
            raise RuntimeError(f"drawing the plots failed:\n{payload}")
        return payload

    def close(self):
        """End the processes once the queued tasks are done."""
        if self._procs:
            for _ in self._procs:
                self._tasks.put(None)
            for p in self._procs:
                p.join()
            self._shutdown()

    def cancel(self):
        """Stop the processes now (unfinished tasks are dropped)."""
        if self._procs:
            for p in self._procs:
                p.kill()
            for p in self._procs:
                p.join()
            self._shutdown()

    def _shutdown(self):
        self._procs = []
        for q in (self._tasks, self._results):
            q.cancel_join_thread()
            q.close()


def _gate_run_task(output_dir, fn):
    """``fn(gate_run)`` for the gate store of ``output_dir`` (opened in the process that draws)."""
    from .store import load_gate_run
    run = load_gate_run(output_dir)
    try:
        return fn(run)
    finally:
        run.close()


class PlotJob:
    """The figures of a finished run, drawn in a ``FigurePool`` (Linux: forked processes, so the figures
    are drawn while the caller computes metrics and tables; set AVIGATE_PLOT_PROCESS=0 to draw inline, and
    AVIGATE_PLOT_WORKERS to choose the number of processes): every figure of ``plots.plot_all`` for the
    closed gate store in ``out`` with the statistics ``acc``, then ``more(gate_run)`` (more figures; returns
    their paths), then the figures given to ``submit`` later. ``result()`` waits and returns the written
    paths in that order; ``cancel()`` stops an unfinished job. ``pool``: a ``FigurePool`` made earlier (e.g.
    before the model ran, so its processes are ready), which the job then owns: ``result()`` closes it,
    ``cancel()`` stops it; default: a new one."""

    def __init__(self, acc, out, compare=None, more=None, pool=None, top_n=None):
        from .plots import plot_tasks, task_priority
        self._tasks, self._error, self._paths = [], None, None
        out = os.fspath(out)
        try:
            kwargs = {} if top_n is None else {"top_n": top_n}
            tasks = plot_tasks(acc, out, out, compare_qids=compare, **kwargs)
        except Exception:  # e.g. no gate store there: reported by result(), as a failure of the drawing
            self._error = traceback.format_exc()
            tasks = []
        self._pool = pool if pool is not None else FigurePool(workers=None if tasks else 0, warm_here=True)
        if self._error is not None:
            return
        # started largest first, so the processes finish together (``more``, the ground-truth examples, is
        # usually the largest figure); returned in plot_all's order, then more's
        order = sorted(range(len(tasks)), key=lambda i: (task_priority(tasks[i][0]), i))
        if more is not None:
            tasks.append((_gate_run_task, (out, more), {}))
            order.insert(0, len(tasks) - 1)
        self._tasks = [None] * len(tasks)
        for i in order:
            fn, args, kwargs = tasks[i]
            self._tasks[i] = self._submit(fn, args, kwargs)
        if self._error is not None:
            self._tasks = []

    def _submit(self, fn, args, kwargs):
        if self._error is None:
            try:
                return self._pool.submit(fn, *args, **kwargs)
            except Exception:
                if not self._pool.workers:
                    raise  # drawn in the caller: its own exception
                self._error = traceback.format_exc()
        return None

    def submit(self, fn, *args, **kwargs):
        """Draw ``fn(*args, **kwargs)`` (a module-level figure function returning its path or paths) with the
        job's figures; its paths are returned by ``result()`` after those submitted before."""
        task = self._submit(fn, args, kwargs)
        if task is not None:
            self._tasks.append(task)

    def result(self):
        if self._paths is None:
            try:
                if self._error is not None:
                    raise RuntimeError(f"drawing the plots failed:\n{self._error}")
                self._paths = [p for task in self._tasks for p in task.result()]
            except BaseException:
                self.cancel()
                raise
            self._pool.close()
        return self._paths

    def cancel(self):
        self._pool.cancel()
