#!/usr/bin/env python3
"""Check that gate analysis works on this machine (not a pytest file).

    python test_gate_analysis.py --quick           # small models of every gating type on generated data (< 30 s)
    python test_gate_analysis.py --comprehensive   # the pytest suite plus every command-line tool end to end

Prints one PASS/FAIL line per check and exits 0 only when every check holds.
"""
import argparse
import time

from qd_detr.cli import exit_process, prepare_output_dir, run_main


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="generated data, every gating type (default)")
    mode.add_argument("--comprehensive", action="store_true", help="pytest suite and every CLI end to end")
    p.add_argument("--output_dir", default=None, help="keep the outputs here (default: a temporary folder)")
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.output_dir is not None:
        args.output_dir = prepare_output_dir(args.output_dir, overwrite=True)
    from gate_analysis.selftest import comprehensive_check, format_table, quick_check
    t0 = time.time()
    rows = (comprehensive_check if args.comprehensive else quick_check)(args.output_dir)
    print(format_table(rows))
    print(f"({time.time() - t0:.1f} s)")
    return 0 if rows and all(ok for _, ok, _ in rows) else 1


if __name__ == "__main__":
    exit_process(run_main(main))
