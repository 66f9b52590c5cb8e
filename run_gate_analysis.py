#!/usr/bin/env python3
"""Analyse the audio-visual fusion gates of a trained QD-DETR checkpoint on a QVHighlights-style dataset.

    python run_gate_analysis.py --model_path results/run/model_best.ckpt \
        --data_path data/highlight_val_release.jsonl --output_dir gate_runs/val
    python run_gate_analysis.py --demo            # built-in demo model and data

Writes predictions (+ metrics when the JSONL has labels), raw gates (gates/), gate statistics
(gate_*.csv), plots (plots/*.png), summary.txt and run.json into --output_dir. See README.md.
"""
import argparse
import datetime
import os
import sys

from qd_detr.cli import data_args, model_args, positive_int, prepare_output_dir, run_main
from qd_detr.errors import ConfigError


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], parents=[model_args(), data_args()],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default=None,
                   help="output folder (default: gate_analysis_results/<checkpoint>_<time>)")
    p.add_argument("--overwrite", action="store_true", help="replace the results in an existing output folder")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run in --output_dir from its last completed batch "
                        "(same arguments; the final results equal an uninterrupted run)")
    p.add_argument("--legacy_model", action="store_true",
                   help="load through legacy_model_adapter (verifies that outputs are unchanged and "
                        "records the proof in run.json); numbers are identical either way")
    p.add_argument("--max_samples", type=int, default=None, help="analyse only the first N queries of the JSONL")
    p.add_argument("--compare_samples", nargs="*", type=int, default=None, metavar="QID",
                   help="queries to compare in plots/sample_comparison.png (no ids: the top and bottom queries)")
    p.add_argument("--top_n", type=positive_int, default=10, help="queries per top/bottom ranking (default: 10)")
    p.add_argument("--no_plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--demo", action="store_true",
                   help="run on the built-in demo checkpoint and data (generated on first use)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.demo:
        from gate_analysis.demo import demo_arguments
        for key, value in demo_arguments().items():
            if getattr(args, key, None) in (None, False):
                setattr(args, key, value)
    if not args.model_path or not args.data_path:
        raise ConfigError("--model_path and --data_path are required (or use --demo)")
    if args.max_samples is not None and args.max_samples <= 0:
        raise ConfigError(f"--max_samples must be a positive number of queries, got {args.max_samples}")
    if args.output_dir is None:
        stem = os.path.splitext(os.path.basename(args.model_path))[0]
        args.output_dir = os.path.join("gate_analysis_results",
                                       f"{stem}_{datetime.datetime.now():%Y%m%d_%H%M%S}")
    if args.resume and args.overwrite:
        raise ConfigError("--resume and --overwrite contradict each other: choose one")
    args.output_dir = prepare_output_dir(args.output_dir, overwrite=args.overwrite or args.resume)

    from gate_analysis.pipeline import AnalysisConfig, run_analysis
    cfg = AnalysisConfig(vars(args))
    run_analysis(cfg, progress=not args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
