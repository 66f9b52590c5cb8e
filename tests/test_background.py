"""gate_analysis.background.OrderedWorker: the background thread that does the per-batch gate bookkeeping."""
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
