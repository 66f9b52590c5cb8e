"""``qd_detr.cli.exit_process``, the end of every command-line tool: the exit code is kept, and what was
still waiting for the garbage collector is finalized before the heap is frozen (the finalizer of an
object in a reference cycle still runs)."""
import gc
import textwrap

from conftest import run_python
from qd_detr.cli import run_main

SCRIPT = textwrap.dedent("""
    import sys
    from qd_detr.cli import exit_process

    class Holder:  # a reference cycle: only the garbage collector frees it (and runs its finalizer)
        def __init__(self, path):
            self.path, self.me = path, self

        def __del__(self):
            with open(self.path, "w") as fh:
                fh.write("finalized\\n")

    h = Holder(sys.argv[1])
    del h
    exit_process(int(sys.argv[2]))
""")


def test_exit_code_kept_and_cyclic_garbage_finalized(tmp_path):
    for code in (0, 3):
        path = tmp_path / f"out_{code}.txt"
        proc = run_python("-c", SCRIPT, path, code, timeout=120)
        assert proc.returncode == code, proc.stderr
        assert path.read_text() == "finalized\n"


def test_run_main_leaves_the_collector_alone():
    before = gc.get_freeze_count()
    assert run_main(lambda argv: 0, []) == 0
    assert gc.get_freeze_count() == before
