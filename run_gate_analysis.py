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

Gate logs of the research code (no model; gate_analysis.gate_log_run):
    --gate_log FILE --data_path JSONL [--predictions PRED.jsonl]   analyse a log of inference.py --gate_log
    --export_gate_log FILE [--from_run DIR]                        write our gates in that log's schema
"""
import argparse
import datetime
import os
import sys

from qd_detr.cli import (
    analysis_args,
    data_args,
    exit_process,
    model_args,
    positive_int,
    prepare_output_dir,
    remove_if_empty,
    resume_command,
    run_main,
    stop_on_sigterm,
)
from qd_detr.errors import ConfigError


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], parents=[model_args(), data_args(), analysis_args()],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run in --output_dir from its last completed batch "
                        "(same arguments; the final results equal an uninterrupted run)")
    p.add_argument("--legacy_model", action="store_true",
                   help="load through legacy_model_adapter (verifies that outputs are unchanged and "
                        "records the proof in run.json); numbers are identical either way")
    p.add_argument("--original_predictions", default=None, metavar="FILE",
                   help="the original run's prediction file to reproduce (with --legacy_model: default found beside "
                        "the checkpoint); its queries are re-run with the original batching, verdict in run.json")
    p.add_argument("--report_only", default=None, metavar="DIR",
                   help="rebuild report.html and summary.txt of a complete output folder from its run.json and CSVs "
                        "(nothing is re-run)")
    p.add_argument("--demo", action="store_true",
                   help="run on the built-in demo checkpoint and data (generated on first use)")
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
    g = p.add_argument_group("gate logs of the research code (inference.py --gate_log)")
    g.add_argument("--gate_log", default=None, metavar="FILE",
                   help="analyse a gate log of the research code's capture without a model (needs --data_path for "
                        "vids and labels): gate store, statistics, plots, ground truth, report")
    g.add_argument("--predictions", default=None, metavar="FILE",
                   help="with --gate_log: the logged run's predictions (e.g. hl_val_submission.jsonl), for the "
                        "metrics and the performance link")
    g.add_argument("--export_gate_log", default=None, metavar="FILE",
                   help="write the run's gates as a gate log in the research code's schema (after a run, or with "
                        "--from_run DIR from an existing output folder)")
    g.add_argument("--from_run", default=None, metavar="DIR",
                   help="with --export_gate_log: the output folder whose gates to export (nothing is run)")
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = get_args_parser().parse_args(argv)
    if args.gate_log or args.from_run or args.predictions:  # gate logs of the research code: no model
        from gate_analysis.gate_log_run import gate_log_main
        return gate_log_main(args, get_args_parser())
    export_to = None
    if args.export_gate_log:
        from gate_analysis.gate_log_run import prepare_export
        export_to = prepare_export(args)
    if args.demo:
        from gate_analysis.demo import demo_arguments
        for key, value in demo_arguments(progress=not args.quiet).items():
            if getattr(args, key, None) in (None, False):
                setattr(args, key, value)
    if args.report_only:
        from gate_analysis.rebuild import rebuild_report
        rebuild_report(args.report_only, log=(lambda msg: None) if args.quiet else print)
        return 0
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
    created = not os.path.exists(args.output_dir)
    args.output_dir = prepare_output_dir(args.output_dir, overwrite=args.overwrite or args.resume)

    from gate_analysis.pipeline import AnalysisConfig, run_analysis
    cfg = AnalysisConfig(vars(args))
    try:
        with stop_on_sigterm():
            run_analysis(cfg, progress=not args.quiet)
    except KeyboardInterrupt:
        remove_if_empty(args.output_dir, created)
        print(f"interrupted; to continue, run:\n  {resume_command(argv, args.output_dir)}", file=sys.stderr)
        return 130
    except BaseException:
        remove_if_empty(args.output_dir, created)  # a run that failed before writing anything leaves no folder
        raise
    if export_to is not None:
        from gate_analysis.gate_log import export_gate_log
        export_gate_log(args.output_dir, export_to, progress=not args.quiet)
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
    exit_process(run_main(main))
