#!/usr/bin/env python3
"""Compatibility report for a trained QD-DETR + AVIGATE checkpoint: can its gates be analysed unchanged?

    python test_legacy_model.py --model_path results/run/model_best.ckpt
    python test_legacy_model.py --model_path CKPT --data_path data/highlight_val_release.jsonl --json

Reports the checkpoint's format and saved options (each marked used or not used by the model), fusion
layout, gating type (and where it comes from), key matches, parameter count, the weight and
output-equivalence proof on a ragged probe batch and the gates captured per layer with their shapes;
with --data_path, one real batch through the model (the data part). When the original run's
predictions are beside the checkpoint (best_/latest_*_preds.jsonl, *_submission.jsonl; or
--original_predictions FILE) and the data and features are available, their queries are re-run with
the original batching and compared: REPRODUCES or DIFFERS (incompatible). Ends with the
run_gate_analysis.py command for this checkpoint, with the data and feature folders it needs.

The whole report is printed whenever the checkpoint can be read (--json: the same report as one JSON
object); a problem with the data or the prediction file is named in its own part of the report.
Exit code: 0 compatible, 1 incompatible (reason on stderr), 2 unreadable or bad input (one line on
stderr): the checkpoint or the options, or a compatible checkpoint whose data or prediction file
could not be used (the report says "compatible": true and names the problem part).
(Not a pytest file: pytest collects only tests/.)
"""
import argparse
import sys

from gate_analysis.compat import check_compatibility, format_report, report_json
from qd_detr.cli import add_feature_args, architecture_options, exit_process, model_args, positive_int

__all__ = ["get_args_parser", "main"]


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], parents=[model_args(model_path_required=True)])
    g = p.add_argument_group("data", "optional: one real batch through the model, and the re-run of the original "
                                     "run's predictions")
    add_feature_args(g)
    g.add_argument("--batch_size", type=positive_int, default=4, help="queries in the real batch (default: 4)")
    g.add_argument("--original_predictions", default=None, metavar="FILE",
                   help="the original run's prediction file to reproduce (default: found beside the checkpoint)")
    g.add_argument("--skip_reproduction", action="store_true",
                   help="do not re-run the original run's predictions")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    data = {"data_path": args.data_path, "v_feat_dirs": args.v_feat_dirs, "t_feat_dir": args.t_feat_dir,
            "a_feat_dir": args.a_feat_dir}  # the real batch runs only with data_path
    reproduction = None if args.skip_reproduction else {"original_predictions": args.original_predictions}
    try:
        report, code = check_compatibility(args.model_path, gating_type=args.gating_type,
                                           trust_pickle=args.trust_checkpoint, device=args.device, data=data,
                                           batch_size=args.batch_size, options=architecture_options(args),
                                           reproduction=reproduction)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(report_json(report))
    elif "checkpoint" in report:  # read: the whole report; the reason goes to stderr only
        print("\n".join(format_report(report, reason=False)))
    sys.stdout.flush()
    if code:
        print(f"{'incompatible' if code == 1 else 'error'}: {report['reason']}", file=sys.stderr)
    return code


if __name__ == "__main__":
    exit_process(main())
