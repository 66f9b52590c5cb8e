#!/usr/bin/env python3
"""Analyse the audio-visual fusion gates of a trained QD-DETR checkpoint on a QVHighlights-style dataset.

    python run_gate_analysis.py --model_path results/run/model_best.ckpt \
        --data_path data/highlight_val_release.jsonl --output_dir gate_runs/val
    python run_gate_analysis.py --demo            # built-in demo model and data

Writes predictions (+ metrics when the JSONL has labels), raw gates (gates/), gate statistics
(gate_*.csv), plots (plots/*.png), summary.txt, run.json and report.html into --output_dir. See README.md.

Beyond gate values (each optional; ground truth and the performance link run whenever the JSONL has labels):
    --ablate zero mean audio_zero audio_swap --ablate_layers all 0 1 --ablate_gates both mha
        one re-run per intervention: gates clamped to 0 / +1 / -1 / the dataset mean in the layers of
        each --ablate_layers item ('all' or an index) and the gates of each --ablate_gates item
        (named e.g. zero@all:both, mean@1:mha), or audio zeroed / swapped with another video's
        -> ablation.csv (per query), ablation_overall.csv, ablation/*.jsonl
    --contributions       per-clip ||gate * branch|| / ||residual|| -> gate_contributions.csv
    --failure_cases N     N worst queries by top-1 IoU vs N matched successes -> gate_failure_*.csv
    --subset FILE [--subset_mode split]   restrict to (or split by) a qid list (text or JSONL)
    --compare_runs DIR ...                compare with earlier output folders (alone: no model needed)
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
    p.add_argument("--original_predictions", default=None, metavar="FILE",
                   help="the original run's prediction file to reproduce (with --legacy_model: default found beside "
                        "the checkpoint); its queries are re-run with the original batching, verdict in run.json")
    p.add_argument("--max_samples", type=int, default=None, help="analyse only the first N queries of the JSONL")
    p.add_argument("--compare_samples", nargs="*", type=int, default=None, metavar="QID",
                   help="queries to compare in plots/sample_comparison.png (no ids: the top and bottom queries)")
    p.add_argument("--top_n", type=positive_int, default=10, help="queries per top/bottom ranking (default: 10)")
    p.add_argument("--no_plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--demo", action="store_true",
                   help="run on the built-in demo checkpoint and data (generated on first use)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("beyond gate values")
    g.add_argument("--ablate", nargs="+", default=None, metavar="INTERVENTION",
                   choices=("zero", "one", "minus_one", "mean", "audio_zero", "audio_swap"),
                   help="re-run inference per intervention: gates clamped to zero (branch off), one (+1), minus_one "
                        "(-1) or mean (the dataset mean of that gate); audio_zero (audio features 0) or audio_swap "
                        "(another video's audio); writes ablation.csv, ablation_overall.csv and plots")
    g.add_argument("--ablate_layers", nargs="+", default=["all"], metavar="LAYERS",
                   help="layers of the gate clamps: one intervention per item, 'all' or a layer index "
                        "(default: all)")
    g.add_argument("--ablate_gates", nargs="+", default=["both"], choices=("mha", "ffn", "beta", "both", "all"),
                   help="gates the clamps replace: one intervention per item; both = mha and ffn (default: "
                        "zero@all:both switches audio off entirely), beta = the v2 FiLM shift, all = every gate "
                        "of the model (v2 FiLM: zero@all:all switches audio off; zero on ffn means weight 1)")
    g.add_argument("--ablate_seed", type=int, default=0, help="seed of the audio_swap pairing of videos (default: 0)")
    g.add_argument("--contributions", action="store_true",
                   help="record per-clip effective contributions ||gate * branch|| / ||residual|| during the main "
                        "pass (gate_contributions.csv)")
    g.add_argument("--failure_cases", type=positive_int, default=None, metavar="N",
                   help="compare the gates of the N worst queries (top-1 IoU) with N successful queries matched on "
                        "video duration and window length")
    g.add_argument("--subset", default=None, metavar="FILE",
                   help="query ids (text: one per line; or JSONL with a qid field) to restrict the run to, or to "
                        "split statistics by (--subset_mode split)")
    g.add_argument("--subset_mode", choices=("restrict", "split"), default="restrict",
                   help="restrict (default): analyse only the listed queries; split: analyse all and compare the "
                        "listed queries with the others (gate_subset_comparison.csv)")
    g.add_argument("--compare_runs", nargs="+", default=None, metavar="DIR",
                   help="earlier output folders to compare per-layer and per-query gates with (with a model: this "
                        "run is added last; without --model_path/--data_path: comparison only)")
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.demo:
        from gate_analysis.demo import demo_arguments
        for key, value in demo_arguments().items():
            if getattr(args, key, None) in (None, False):
                setattr(args, key, value)
    if args.compare_runs and not (args.model_path or args.data_path):
        return _compare_only(args)
    if not args.model_path or not args.data_path:
        raise ConfigError("--model_path and --data_path are required (or use --demo)")
    if args.subset_mode == "split" and not args.subset:
        raise ConfigError("--subset_mode split needs --subset FILE")
    if not args.ablate and (args.ablate_layers != ["all"] or args.ablate_gates != ["both"]):
        raise ConfigError("--ablate_layers / --ablate_gates have no effect without --ablate")
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


def _compare_only(args):
    """--compare_runs without a model: compare earlier output folders into --output_dir."""
    if args.output_dir is None:
        args.output_dir = os.path.join("gate_analysis_results", f"compare_{datetime.datetime.now():%Y%m%d_%H%M%S}")
    out = prepare_output_dir(args.output_dir, overwrite=args.overwrite)
    if any(os.path.abspath(d) == out for d in args.compare_runs):
        raise ConfigError(f"{out}: the output folder cannot also be one of the --compare_runs folders")
    from gate_analysis.compare import run_compare_job
    run_compare_job(args.compare_runs, out, plots=not args.no_plots)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
