"""Predictions (official submission format) and metrics for a checkpoint on a JSONL dataset.

    python -m qd_detr.inference --model_path CKPT --data_path JSONL --output_path PRED.jsonl \
        [--v_feat_dirs D ...] [--t_feat_dir D] [--a_feat_dir D] [--batch_size N] \
        [--batching query|original] [--device cpu|cuda|auto]

Writes PRED.jsonl and, when the JSONL has labels, PRED_metrics.json beside it.
Batching semantics (``--batching``):
- ``query`` (default): queries of similar length are batched together for speed, and every query's
  outputs equal running it alone (see ``QDDETR.set_batching``);
- ``original``: the original inference exactly: batches of the checkpoint's ``eval_bsz`` in file
  order, padded to the batch maximum, its batch-dependent quirks included.

The loop itself is ``qd_detr.engine``; the names other code imports from here (``build_dataset``,
``make_batches``, ``iterate_batches``, ``predict``, ``evaluate``, ``resolve_feature_dirs``,
``metrics_path_for``) are re-exported from their homes.
"""
import argparse
import sys

from .annotations import read_jsonl
from .batching import make_batches
from .checkpoint import load_checkpoint
from .cli import architecture_options, data_args, exit_process, model_args, prepare_output_file, run_main
from .dataset import build_dataset
from .engine import evaluate, iterate_batches, predict
from .errors import ConfigError, DataError
from .eval import metrics_path_for
from .features import resolve_feature_dirs
from .io import write_json, write_jsonl

__all__ = ["get_args_parser", "main",
           # re-exported from qd_detr.dataset, .batching, .engine, .features and .eval (their homes)
           "build_dataset", "make_batches", "iterate_batches", "predict", "evaluate", "resolve_feature_dirs",
           "metrics_path_for"]


def get_args_parser():
    p = argparse.ArgumentParser(description="QD-DETR predictions in the official QVHighlights format",
                                parents=[model_args(), data_args()])
    p.add_argument("--output_path", required=True, help="predictions JSONL to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if not args.model_path or not args.data_path:
        raise ConfigError("--model_path and --data_path are required")
    out_path = prepare_output_file(args.output_path, args.overwrite)
    prepare_output_file(metrics_path_for(out_path), args.overwrite)  # written beside it when the data has labels
    records = read_jsonl(args.data_path)
    model, opt, report = load_checkpoint(args.model_path, device=args.device, trust_pickle=args.trust_checkpoint,
                                         gating_type=args.gating_type, batching=args.batching,
                                         options=architecture_options(args))
    dirs = resolve_feature_dirs(opt, args.model_path, args.v_feat_dirs, args.t_feat_dir, args.a_feat_dir)
    dataset = build_dataset(opt, records, dirs, skip_missing=args.skip_missing)
    if len(dataset) == 0:
        raise DataError(f"{args.data_path}: no query left to run (all skipped for missing features)")
    batches = make_batches(dataset, args.batching, args.batch_size, opt)
    device = next(model.parameters()).device
    lines = predict(model, dataset, batches, device, num_workers=args.num_workers, progress=not args.quiet)
    metrics = evaluate(lines, dataset.records)
    write_jsonl(out_path, lines)
    print(f"wrote {len(lines)} predictions to {out_path}")
    if getattr(dataset, "skipped", None):
        print(f"skipped {len(dataset.skipped)} queries with missing features (first: qid {dataset.skipped[0][0]}, "
              f"{dataset.skipped[0][1]})", file=sys.stderr)
    if metrics is not None:
        write_json(metrics_path_for(out_path), metrics)
        print(f"wrote metrics to {metrics_path_for(out_path)}")
        for key, value in metrics.get("brief", {}).items():
            print(f"  {key}: {value}")
    return 0


if __name__ == "__main__":
    exit_process(run_main(main))
