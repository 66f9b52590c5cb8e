#!/usr/bin/env python3
"""Step-by-step guide: analyse the fusion gates of a checkpoint you already trained.

    python legacy_model_guide.py                       # asks for everything, with defaults
    python legacy_model_guide.py --model_path CKPT     # flags pre-answer the questions
    python legacy_model_guide.py --non-interactive --model_path CKPT --data_path JSONL --output_dir OUT

Asks for the checkpoint (given a folder, it offers the checkpoint files in it), the data and feature
folders (the checkpoint's saved ones, as found from here, are offered as defaults; saved ones that are
not found are named with the paths tried), the gating type only when the checkpoint does not state it,
and what to analyse, including the causal analyses (--ablate: one extra inference pass per
intervention; --contributions: measured during the main pass); checks each answer at once. Then runs
the compatibility check and run_gate_analysis.py --legacy_model (in this process), and prints the
equivalent non-interactive command. Answers may be piped on stdin. Flags have the names of
run_gate_analysis.py. EOF or Ctrl-C stops it with one line and a non-zero exit code.
"""
import argparse
import os
import sys

import run_gate_analysis
from gate_analysis.interventions import AUDIO_INTERVENTIONS, GATE_SELECTIONS, GATE_VALUES
from qd_detr.cli import analysis_args, data_args, exit_process, model_args, run_main
from qd_detr.errors import ConfigError, ToolkitError

__all__ = ["get_args_parser", "analyse", "main", "SCRIPT"]

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "run_gate_analysis.py")


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                parents=[model_args(), data_args(), analysis_args()],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--non-interactive", dest="non_interactive", action="store_true",
                   help="ask nothing: take every answer from the flags (or the checkpoint's defaults)")
    p.add_argument("--no_run", action="store_true",
                   help="only validate the answers and print the command; run neither check nor analysis")
    g = p.add_argument_group("causal analyses", "as in run_gate_analysis.py; asked for when not given")
    g.add_argument("--ablate", nargs="+", default=None, metavar="INTERVENTION",
                   choices=(*GATE_VALUES, *AUDIO_INTERVENTIONS),
                   help="re-run inference per intervention (one extra inference pass each): gates clamped to "
                        "zero, one, minus_one or mean, or audio_zero / audio_swap")
    g.add_argument("--ablate_layers", nargs="+", default=["all"], metavar="LAYERS",
                   help="layers of the gate clamps: one intervention per item, 'all' or a layer index (default: all)")
    g.add_argument("--ablate_gates", nargs="+", default=["both"], choices=tuple(GATE_SELECTIONS),
                   help="gates the clamps replace: one intervention per item (default: both = mha and ffn)")
    g.add_argument("--ablate_seed", type=int, default=0, help="seed of the audio_swap pairing of videos (default: 0)")
    g.add_argument("--contributions", action="store_true",
                   help="record per-clip contributions ||gate * branch|| / ||residual|| during the main pass")
    return p


def analyse(argv):
    """run_gate_analysis.py with ``argv``, in this process, under its error policy; returns the exit code."""
    return run_main(run_gate_analysis.main, argv)


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    from gate_analysis.compat import exit_code_for
    from gate_analysis.guide import run_guide
    try:
        if args.max_samples is not None and args.max_samples <= 0:
            raise ConfigError(f"--max_samples must be a positive number of queries, got {args.max_samples}")
        return run_guide(args, SCRIPT, analyse=analyse)
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
    exit_process(main())
