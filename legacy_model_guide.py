#!/usr/bin/env python3
"""Step-by-step guide: analyse the fusion gates of a checkpoint you already trained.

    python legacy_model_guide.py                       # asks for everything, with defaults
    python legacy_model_guide.py --model_path CKPT     # flags pre-answer the questions
    python legacy_model_guide.py --non-interactive --model_path CKPT --data_path JSONL --output_dir OUT

Asks for the checkpoint, the data and feature folders (the checkpoint's saved ones are offered as
defaults), the gating type only when the checkpoint does not state it, and what to analyse; checks
each answer at once. Then runs the compatibility check and run_gate_analysis.py --legacy_model, and
prints the equivalent non-interactive command. Answers may be piped on stdin. Flags have the names
of run_gate_analysis.py. EOF or Ctrl-C stops it with one line and a non-zero exit code.
"""
import argparse
import os
import sys

from qd_detr.cli import data_args, model_args, positive_int
from qd_detr.errors import ConfigError, ToolkitError

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "run_gate_analysis.py")


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], parents=[model_args(), data_args()],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default=None, help="output folder of the analysis")
    p.add_argument("--overwrite", action="store_true", help="replace the results in an existing output folder")
    p.add_argument("--max_samples", type=int, default=None, help="analyse only the first N queries")
    p.add_argument("--compare_samples", nargs="*", type=int, default=None, metavar="QID",
                   help="queries to compare in plots/sample_comparison.png")
    p.add_argument("--top_n", type=positive_int, default=10, help="queries per top/bottom ranking (default: 10)")
    p.add_argument("--no_plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress bar during the analysis")
    p.add_argument("--non-interactive", dest="non_interactive", action="store_true",
                   help="ask nothing: take every answer from the flags (or the checkpoint's defaults)")
    p.add_argument("--no_run", action="store_true",
                   help="only validate the answers and print the command; run neither check nor analysis")
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    from gate_analysis.legacy import exit_code_for, run_guide
    try:
        if args.max_samples is not None and args.max_samples <= 0:
            raise ConfigError(f"--max_samples must be a positive number of queries, got {args.max_samples}")
        return run_guide(args, SCRIPT)
    except ToolkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exit_code_for(exc)
    except EOFError:
        print("\nerror: input ended before the guide finished; nothing was run or written", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; the guide stopped and left no partial results", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
