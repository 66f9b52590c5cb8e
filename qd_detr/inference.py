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
"""
import argparse
import contextlib
import os
import sys

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from .checkpoint import load_checkpoint
from .cli import architecture_options, data_args, model_args, prepare_output_file, run_main
from .config import fusion_layout
from .dataset import (
    QVHighlightsDataset,
    collate,
    has_labels,
    length_grouped_batches,
    model_kwargs,
    move_to_device,
    read_jsonl,
    sequential_batches,
)
from .errors import ConfigError, DataError
from .eval import eval_submission
from .postprocess import ambiguous_rows, submission_lines, write_json, write_jsonl

__all__ = ["resolve_feature_dirs", "build_dataset", "make_batches", "iterate_batches", "predict",
           "evaluate", "metrics_path_for", "main"]

DEFAULT_QUERY_BATCH = 32


def _find_dir(path, base_dirs, what):
    candidates = [path] if os.path.isabs(path) else [path] + [os.path.join(b, path) for b in base_dirs]
    for cand in candidates:
        if os.path.isdir(cand):
            return os.path.normpath(cand)
    raise DataError(f"{path}: {what} folder not found (tried {', '.join(os.path.normpath(c) for c in candidates)}); "
                    f"pass it explicitly")


def resolve_feature_dirs(opt, model_path, v_feat_dirs=None, t_feat_dir=None, a_feat_dir=None):
    """Feature folders: the given ones, else those saved in the checkpoint's options (relative paths
    are tried from the current folder, then from the checkpoint's folder and its parent)."""
    ckpt_dir = os.path.dirname(os.path.abspath(model_path))
    bases = [ckpt_dir, os.path.dirname(ckpt_dir)]
    v = v_feat_dirs or getattr(opt, "v_feat_dirs", None)
    t = t_feat_dir or getattr(opt, "t_feat_dir", None)
    if not v or not t:
        raise ConfigError(f"{model_path}: the checkpoint does not name its feature folders; pass "
                          "--v_feat_dirs and --t_feat_dir")
    dirs = {"v_feat_dirs": [_find_dir(d, bases if not v_feat_dirs else [], "video feature") for d in v],
            "t_feat_dir": _find_dir(t, bases if not t_feat_dir else [], "text feature"), "a_feat_dir": None}
    if fusion_layout(opt) != "video_only":
        a = a_feat_dir or opt.a_feat_dir
        dirs["a_feat_dir"] = _find_dir(a, bases if not a_feat_dir else [], "audio feature")
    elif a_feat_dir:
        print(f"note: the model uses no audio; --a_feat_dir {a_feat_dir} is ignored", file=sys.stderr)
    return dirs


def build_dataset(opt, records, dirs, skip_missing=False, load_labels=False):
    """A dataset that prepares features exactly as the checkpoint's training did."""
    audio = dirs.get("a_feat_dir") is not None
    return QVHighlightsDataset(
        records, dirs["v_feat_dirs"], dirs["t_feat_dir"], dirs.get("a_feat_dir"),
        max_q_l=opt.max_q_l, max_v_l=opt.max_v_l, ctx_mode=opt.ctx_mode, clip_len=opt.clip_length,
        normalize_v=not opt.no_norm_vfeat, normalize_t=not opt.no_norm_tfeat, load_labels=load_labels,
        v_feat_dim=opt.v_feat_dim, t_feat_dim=opt.t_feat_dim, a_feat_dim=opt.a_feat_dim if audio else None,
        skip_missing=skip_missing)


def make_batches(dataset, batching, batch_size=None, opt=None):
    """Index batches: file order in chunks of eval_bsz (original), or length-grouped (query)."""
    if batching == "original":
        return sequential_batches(len(dataset), batch_size or int(getattr(opt, "eval_bsz", 100) or 100))
    return length_grouped_batches(dataset.ctx_lengths(), batch_size or DEFAULT_QUERY_BATCH)


def _forward(model, inputs, compute_neg):
    with torch.no_grad():
        return model(**inputs, compute_neg=compute_neg)


def iterate_batches(model, dataset, batches, device, num_workers=0, progress=True, desc="inference",
                    before_forward=None, compute_neg=False, exact=None, suspend=contextlib.nullcontext, stats=None):
    """Yield ``(metas, inputs, outputs)`` per batch, under ``torch.no_grad``.

    ``before_forward(metas, inputs)`` runs right before each batch forward (e.g. to name gate records).
    ``exact`` (default: on for per-query batching): rows whose predictions are not decided within
    batching noise (``postprocess.ambiguous_rows``) get their ``pred_logits``, ``pred_spans`` and
    ``saliency_scores`` recomputed with the query alone, inside ``suspend()`` (e.g. pausing gate
    capture); ``stats["exact_reruns"]`` counts them.
    """
    if exact is None:
        exact = getattr(model, "batching", "query") == "query"
    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=num_workers)
    bar = tqdm(loader, total=len(batches), desc=desc, disable=not progress, file=sys.stderr, unit="batch")
    for indices, (metas, inputs) in zip(batches, bar):
        inputs = move_to_device(model_kwargs(inputs), device)
        if before_forward is not None:
            before_forward(metas, inputs)
        outputs = _forward(model, inputs, compute_neg)
        rows = ambiguous_rows(metas, outputs) if exact and len(indices) > 1 else []
        with suspend():
            for j in rows:
                single = move_to_device(model_kwargs(collate([dataset[indices[j]]])[1]), device)
                alone = _forward(model, single, False)
                n = int(single["src_vid_mask"].sum())
                for key in ("pred_logits", "pred_spans"):
                    outputs[key][j] = alone[key][0]
                outputs["saliency_scores"][j, :n] = alone["saliency_scores"][0, :n]
        if stats is not None:
            stats["exact_reruns"] = stats.get("exact_reruns", 0) + len(rows)
        yield metas, inputs, outputs


def predict(model, dataset, batches, device, **kwargs):
    """Submission lines in dataset order."""
    by_qid = {}
    for metas, inputs, outputs in iterate_batches(model, dataset, batches, device, **kwargs):
        for line in submission_lines(metas, outputs, inputs["src_vid_mask"]):
            by_qid[line["qid"]] = line
    return [by_qid[r["qid"]] for r in dataset.records if r["qid"] in by_qid]


def evaluate(lines, records):
    """Official metrics when every record has labels, else None (e.g. the test split)."""
    if not records or not all(has_labels(r) for r in records):
        return None
    predicted = {line["qid"] for line in lines}
    return eval_submission(lines, [r for r in records if r["qid"] in predicted], verbose=False, match_number=True)


def metrics_path_for(pred_path):
    root = pred_path[:-len(".jsonl")] if pred_path.endswith(".jsonl") else pred_path
    return root + "_metrics.json"


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
    sys.exit(run_main(main))
