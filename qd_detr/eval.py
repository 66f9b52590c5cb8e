"""Official QVHighlights metrics (moment retrieval + highlight detection), reimplemented with numpy.

Numbers equal the original ``standalone_eval/eval.py`` (including sklearn 0.24 ``precision_recall_curve``
semantics), but everything runs in this process and a length bucket without GT windows is left out
instead of crashing.

    python -m qd_detr.eval --submission_path preds.jsonl --gt_path gt.jsonl --save_path metrics.json
"""
import argparse
import contextlib
import json
import os
import sys
import time

import numpy as np

from .errors import ConfigError, DataError
from .io import read_json_lines, write_json

__all__ = ["IOU_THRESHOLDS", "LENGTH_BUCKETS", "HL_LEVELS", "eval_submission", "per_query_metrics",
           "metrics_path_for", "write_metrics", "main"]

IOU_THRESHOLDS = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
LENGTH_BUCKETS = {"short": (0, 10), "middle": (10, 30), "long": (30, 150)}  # window length in (lo, hi] s
HL_LEVELS = {"Fair": 2, "Good": 3, "VeryGood": 4}  # a clip is positive when its score is >= the level
MAX_PRED_WINDOWS = 10
CLIP_SECONDS = 2
_THR = np.array(IOU_THRESHOLDS)[:, None]  # (T, 1)


# ---------------------------------------------------------------- input checks and conversion
def _numbers(rec, field, source, ndim, min_cols=0, allow_empty=False):
    """``rec[field]`` as a float array: 1-D, or 2-D with at least ``min_cols`` columns; DataError otherwise."""
    where = f"{source}: qid {rec['qid']!r}"
    if field not in rec:
        raise DataError(f"{where}: missing field '{field}'")
    try:
        arr = np.asarray(rec[field], dtype=float)
    except (TypeError, ValueError):
        raise DataError(f"{where}: '{field}' must hold numbers in a regular {ndim}-D list") from None
    if arr.size == 0 and allow_empty:
        return np.zeros((0, min_cols)) if ndim == 2 else arr
    if arr.size == 0 or arr.ndim != ndim or (ndim == 2 and arr.shape[1] < min_cols):
        shape = "a non-empty list" if ndim == 1 else f"a non-empty list of rows with >= {min_cols} numbers"
        raise DataError(f"{where}: '{field}' must be {shape}")
    return arr


def _clip_labels(rec, source):
    """(n_clips, 3) annotator scores over the whole video (n_clips = int(duration / 2)); others are 0."""
    where = f"{source}: qid {rec['qid']!r}"
    duration, ids = rec.get("duration"), rec.get("relevant_clip_ids")
    if isinstance(duration, bool) or not isinstance(duration, (int, float)) or not duration >= 0:
        raise DataError(f"{where}: 'duration' must be a non-negative number of seconds")
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise DataError(f"{where}: 'relevant_clip_ids' must be a list of integers")
    n_clips = int(duration / CLIP_SECONDS)
    scores = _numbers(rec, "saliency_scores", source, 2, 3, allow_empty=True)
    if len(scores) != len(ids) or scores.shape[1] != 3:
        raise DataError(f"{where}: 'saliency_scores' needs one [a1, a2, a3] row per relevant clip "
                        f"({len(ids)} clip ids, {len(scores)} rows)")
    if ids and (min(ids) < 0 or max(ids) >= n_clips):
        raise DataError(f"{where}: relevant_clip_ids must lie in [0, {n_clips}) for duration {duration:g} s")
    labels = np.zeros((n_clips, 3))
    labels[np.asarray(ids, dtype=np.int64)] = scores
    return labels


def _index(records, source):
    """{qid: record}; qids must be unique ints or strings."""
    if not isinstance(records, list) or not records:
        raise DataError(f"{source}: no records")
    out = {}
    for i, rec in enumerate(records, 1):
        qid = rec.get("qid") if isinstance(rec, dict) else None
        if isinstance(qid, bool) or not isinstance(qid, (int, str)):
            raise DataError(f"{source}: record {i} has no valid 'qid' (int or str)")
        if qid in out:
            raise DataError(f"{source}: qid {qid!r} appears more than once")
        out[qid] = rec
    return out


def _convert(qids, preds, gts, do_mr, do_hl, sub_name, gt_name):
    """Per qid: (pred windows (K,3), gt windows (G,2), pred saliency (n,), gt clip labels (n_clips,3))."""
    data = {}
    for q in qids:
        data[q] = (_numbers(preds[q], "pred_relevant_windows", sub_name, 2, 3) if do_mr else None,
                   _numbers(gts[q], "relevant_windows", gt_name, 2, 2)[:, :2] if do_mr else None,
                   _numbers(preds[q], "pred_saliency_scores", sub_name, 1) if do_hl else None,
                   _clip_labels(gts[q], gt_name) if do_hl else None)
    return data


def _prepare(submission, ground_truth, match_number, sub_name="submission", gt_name="ground truth"):
    """Check and convert the records: (qids in submission order, per-qid arrays, do_mr, do_hl)."""
    preds, gts = _index(submission, sub_name), _index(ground_truth, gt_name)
    first = submission[0]
    do_mr, do_hl = "pred_relevant_windows" in first, "pred_saliency_scores" in first
    if not (do_mr or do_hl):
        raise DataError(f"{sub_name}: records hold neither 'pred_relevant_windows' nor 'pred_saliency_scores'")
    if match_number and preds.keys() != gts.keys():
        def some(keys):
            keys = sorted(keys, key=lambda q: (isinstance(q, str), q))
            return f"{len(keys)} (e.g. {', '.join(map(str, keys[:5]))})" if keys else "0"
        raise DataError(f"qids of {sub_name} and {gt_name} differ: {some(preds.keys() - gts.keys())} only in "
                        f"the submission, {some(gts.keys() - preds.keys())} only in the ground truth")
    qids = [q for q in preds if q in gts]
    if not qids:
        raise DataError(f"{sub_name} and {gt_name} share no qid")
    return qids, _convert(qids, preds, gts, do_mr, do_hl, sub_name, gt_name), do_mr, do_hl


# ---------------------------------------------------------------- moment retrieval
def _iou_matrix(a, b):
    """IoU (N, M) of windows a (N,2) and b (M,2); 0 where the union is empty."""
    inter = np.clip(np.minimum(a[:, None, 1], b[None, :, 1]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    union = (a[:, 1] - a[:, 0])[:, None] + (b[:, 1] - b[:, 0])[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _voc_ap(precision, recall):
    """VOC 2011 interpolated AP: area under the monotone envelope of the precision-recall points."""
    p = np.concatenate(([0.0], precision, [0.0]))
    r = np.concatenate(([0.0], recall, [1.0]))
    p = np.maximum.accumulate(p[::-1])[::-1]
    steps = np.nonzero(r[1:] != r[:-1])[0] + 1
    return np.sum((r[steps] - r[steps - 1]) * p[steps])


def _detection_ap(pred, gt):
    """ActivityNet AP of one query at each IoU threshold, (T,).

    The first MAX_PRED_WINDOWS predictions are ranked by score (stable); each one in turn takes the
    still-free GT window with the highest IoU >= threshold (true positive) or is a false positive.
    """
    pred = pred[:MAX_PRED_WINDOWS]
    pred = pred[np.argsort(-pred[:, 2], kind="stable")]
    iou = _iou_matrix(pred[:, :2], gt)  # (K, G)
    taken = np.zeros((len(IOU_THRESHOLDS), len(gt)), dtype=bool)
    tp = np.zeros((len(IOU_THRESHOLDS), len(pred)))
    for k in range(len(pred)):
        rank = np.argsort(iou[k])[::-1]  # default argsort, reversed: the reference's tie order
        free = (iou[k, rank][None, :] >= _THR) & ~taken[:, rank]  # (T, G)
        hit = free.any(1)
        tp[hit, k] = 1
        taken[hit, rank[free.argmax(1)[hit]]] = True
    tp_sum, fp_sum = np.cumsum(tp, 1), np.cumsum(1 - tp, 1)
    recall, precision = tp_sum / float(len(gt)), tp_sum / (tp_sum + fp_sum)
    ap, seen = np.zeros(len(IOU_THRESHOLDS)), {}
    for t in np.nonzero(tp.any(1))[0]:  # no true positive: AP is exactly 0
        key = tp[t].tobytes()  # equal hit patterns give equal APs
        if key not in seen:
            seen[key] = _voc_ap(precision[t], recall[t])
        ap[t] = seen[key]
    return ap


def _top1_iou(pred, gt):
    """IoU of the first listed prediction with its best-IoU GT window (union = hull, as the reference)."""
    p, g = pred[0, :2], gt[np.argmax(_iou_matrix(pred[:1, :2], gt)[0])]
    inter = max(0.0, min(p[1], g[1]) - max(p[0], g[0]))
    union = max(p[1], g[1]) - min(p[0], g[0])
    return float(inter / union) if union != 0 else 0.0


def _pct(x):
    return float(f"{100 * x:.2f}")


def _eval_mr(qids, data, bucket):
    lo, hi = LENGTH_BUCKETS.get(bucket, (None, None))
    aps, ious = [], []
    for q in qids:
        pred, gt = data[q][0], data[q][1]
        if lo is not None:
            length = gt[:, 1] - gt[:, 0]
            gt = gt[(lo < length) & (length <= hi)]
            if not len(gt):
                continue
        aps.append(_detection_ap(pred, gt))
        ious.append(_top1_iou(pred, gt))
    if not aps:
        return None, 0
    ap_thr = np.array(aps).mean(0)
    ious = np.array(ious)
    mean_ap = {str(t): _pct(v) for t, v in zip(IOU_THRESHOLDS, ap_thr)}
    mean_ap["average"] = _pct(np.mean(ap_thr))
    r1 = {str(t): _pct(np.mean(ious >= t)) for t in IOU_THRESHOLDS}
    return {"MR-mAP": mean_ap, "MR-R1": r1}, len(aps)


# ---------------------------------------------------------------- highlight detection
def _descending(y_score):
    return np.argsort(y_score, kind="mergesort")[::-1]  # as sklearn: stable ascending, reversed


def _pr_curve(y_true, y_score, order=None):
    """sklearn 0.24 precision_recall_curve: (precision, recall) from the lowest threshold reaching full
    recall up to the highest, then the point (1, 0). ``order``: ``_descending(y_score)`` if known."""
    order = _descending(y_score) if order is None else order
    score, pos = y_score[order], y_true[order] == 1
    ends = np.append(np.nonzero(np.diff(score))[0], len(score) - 1)  # last index of each distinct score
    tps = np.cumsum(pos, dtype=np.float64)[ends]
    fps = 1 + ends - tps
    precision, recall = tps / (tps + fps), tps / tps[-1]
    keep = slice(tps.searchsorted(tps[-1]), None, -1)
    return np.append(precision[keep], 1.0), np.append(recall[keep], 0.0)


def _saliency_ap(y_true, y_score, order=None):
    """Interpolated AP of one annotator's binary labels (the reference's get_ap); 0 or 1 if all labels agree."""
    if len(y_true) == 0:
        return 0.0
    if np.all(y_true == y_true[0]):
        return 0.0 if y_true[0] == 0 else 1.0
    precision, recall = _pr_curve(y_true, y_score, order)
    precision = np.maximum.accumulate(precision)
    changed = np.nonzero(np.diff(recall.astype(np.float32)))[0]
    return np.mean(precision[changed])


def _hl_query(pred, labels, level):
    """(hit (3,), ap (3,)) of one query: labels at the argmax clip, and AP per annotator."""
    binary = (labels >= level).astype(float)
    top = int(np.argmax(pred))
    hit = binary[top] if top < len(binary) else np.zeros(3)
    score = np.zeros(len(binary))
    score[:min(len(pred), len(binary))] = pred[:len(binary)]  # truncate or pad with 0 to n_clips
    order = _descending(score)
    return hit, np.array([_saliency_ap(binary[:, w], score, order) for w in range(3)])


def _eval_hl(qids, data):
    out = {}
    for name, level in HL_LEVELS.items():
        rows = [_hl_query(data[q][2], data[q][3], level) for q in qids]
        hits, aps = np.array([r[0] for r in rows]), np.array([r[1] for r in rows])
        out[f"HL-min-{name}"] = {"HL-mAP": _pct(np.mean(aps)), "HL-Hit1": _pct(np.mean(np.max(hits, 1)))}
    return out


# ---------------------------------------------------------------- public API
def _evaluate(qids, data, do_mr, do_hl, verbose):
    full, brief = {}, {}
    if do_mr:
        for bucket in ("short", "middle", "long", "full"):
            start = time.time()
            metrics, n = _eval_mr(qids, data, bucket)
            if verbose:
                print(f"[eval] MR {bucket}: {n}/{len(qids)} queries, {time.time() - start:.2f} s")
            if metrics is not None:
                full[bucket] = metrics
                brief[f"MR-{bucket}-mAP"] = metrics["MR-mAP"]["average"]
        if "full" in full:
            brief.update({"MR-full-mAP@0.5": full["full"]["MR-mAP"]["0.5"],
                          "MR-full-mAP@0.75": full["full"]["MR-mAP"]["0.75"],
                          "MR-full-R1@0.5": full["full"]["MR-R1"]["0.5"],
                          "MR-full-R1@0.7": full["full"]["MR-R1"]["0.7"]})
        brief = dict(sorted(brief.items()))
    if do_hl:
        start = time.time()
        hl = _eval_hl(qids, data)
        if verbose:
            print(f"[eval] HL: {len(qids)} queries, {time.time() - start:.2f} s")
        full.update(hl)
        brief.update({f"{k}-{sub.split('-')[1]}": v for k, m in hl.items() for sub, v in m.items()})
    return {"brief": brief, **dict(sorted(full.items()))}


def eval_submission(submission, ground_truth, verbose=False, match_number=True):
    """Official QVHighlights metrics (percent, 2 decimals) of JSONL records, in the original key layout.

    ``{"brief": {...}, "HL-min-Fair": {"HL-mAP", "HL-Hit1"}, ..., "full"/"long"/"middle"/"short":
    {"MR-mAP": {"0.5" ... "0.95", "average"}, "MR-R1": {"0.5" ... "0.95"}}}``. MR metrics are computed
    when the first submission record has ``pred_relevant_windows``, HL when it has ``pred_saliency_scores``.
    A length bucket (short/middle/long) without any GT window is omitted from both the full metrics and
    ``brief`` (the original crashes). With ``match_number`` the qid sets must be equal (else DataError);
    without it only the shared qids are evaluated. Degenerate windows (empty union) get IoU 0.
    """
    qids, data, do_mr, do_hl = _prepare(submission, ground_truth, match_number)
    return _evaluate(qids, data, do_mr, do_hl, verbose)


def _length_bucket(gt):
    longest = float(np.max(gt[:, 1] - gt[:, 0]))
    return next((name for name, (lo, hi) in LENGTH_BUCKETS.items() if lo < longest <= hi), None)


def per_query_metrics(submission, ground_truth):
    """One dict per query that is labelled in ``ground_truth`` and predicted in ``submission`` (GT order).

    GT records without ``relevant_windows`` (e.g. the test split) are skipped, and so are GT qids without
    a prediction. Keys (None when the submission lacks the MR or HL field):

    - ``top1_iou``: IoU of the first listed (= top-scored) window with its best-IoU GT window, as in
      the official R1; ``r1_05``/``r1_07``: 1 if ``top1_iou`` >= 0.5/0.7 else 0.
    - ``mr_ap``, ``mr_ap_05``, ``mr_ap_075``: the official per-query ActivityNet AP of the top-10 windows
      against all GT windows, averaged over IoU 0.5:0.05:0.95 / at 0.5 / at 0.75, percent, not rounded.
      Averaged over the queries, ``mr_ap`` gives the official MR-full-mAP (before its rounding).
    - ``hl_hit1_verygood``: 100 if some annotator scored the saliency-argmax clip >= 4, else 0;
      ``hl_ap_verygood``: mean over the 3 annotators of the official interpolated AP, percent.
    - ``length_bucket``: short/middle/long bucket of the query's longest GT window (None if outside (0, 150]).
    """
    preds, gts = _index(submission, "submission"), _index(ground_truth, "ground truth")
    do_mr = "pred_relevant_windows" in submission[0]
    do_hl = "pred_saliency_scores" in submission[0]
    qids = [q for q, g in gts.items() if q in preds and g.get("relevant_windows")]
    data = _convert(qids, preds, gts, do_mr, do_hl, "submission", "ground truth")
    rows = []
    for q in qids:
        pred, _, sal, labels = data[q]
        gt = _numbers(gts[q], "relevant_windows", "ground truth", 2, 2)[:, :2]
        row = {"qid": q, "top1_iou": None, "r1_05": None, "r1_07": None, "mr_ap": None, "mr_ap_05": None,
               "mr_ap_075": None, "hl_hit1_verygood": None, "hl_ap_verygood": None,
               "length_bucket": _length_bucket(gt)}
        if do_mr:
            iou, ap = _top1_iou(pred, gt), _detection_ap(pred, gt)
            row.update(top1_iou=iou, r1_05=int(iou >= 0.5), r1_07=int(iou >= 0.7), mr_ap=float(100 * np.mean(ap)),
                       mr_ap_05=float(100 * ap[0]), mr_ap_075=float(100 * ap[IOU_THRESHOLDS.index(0.75)]))
        if do_hl:
            hit, ap = _hl_query(sal, labels, HL_LEVELS["VeryGood"])
            row.update(hl_hit1_verygood=float(100 * np.max(hit)), hl_ap_verygood=float(100 * np.mean(ap)))
        rows.append(row)
    return rows


# ---------------------------------------------------------------- command line
def _output_path(path):
    """Absolute ``path`` after checking that it can become a file (checked before the evaluation runs)."""
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    if os.path.isdir(path):
        raise ConfigError(f"{path}: is a folder, expected an output file path")
    if not os.path.isdir(folder):
        raise ConfigError(f"{path}: output folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{path}: output folder {folder} is not writable")
    return path


def metrics_path_for(pred_path):
    """The metrics file written beside a predictions file: ``PRED.jsonl`` -> ``PRED_metrics.json``."""
    root = pred_path[:-len(".jsonl")] if pred_path.endswith(".jsonl") else pred_path
    return root + "_metrics.json"


def write_metrics(obj, path):
    """``qd_detr.io.write_json`` with a failure to write as a ConfigError naming ``path``."""
    try:
        write_json(path, obj)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write ({exc.strerror or exc})") from None


def main(argv=None):
    """``python -m qd_detr.eval``: evaluate a submission file, save the metrics JSON, print ``brief``.

    The brief metrics go to stdout; progress lines (unless ``--not_verbose``) go to stderr.
    """
    parser = argparse.ArgumentParser(prog="python -m qd_detr.eval",
                                     description="Official QVHighlights moment retrieval / highlight metrics")
    parser.add_argument("--submission_path", required=True, help="predictions JSONL (hl_val_submission.jsonl)")
    parser.add_argument("--gt_path", required=True, help="ground-truth JSONL (highlight_val_release.jsonl)")
    parser.add_argument("--save_path", required=True, help="metrics JSON to write (replaced atomically)")
    parser.add_argument("--not_verbose", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    save_path = _output_path(args.save_path)
    submission, gt = read_json_lines(args.submission_path), read_json_lines(args.gt_path)
    prepared = _prepare(submission, gt, True, args.submission_path, args.gt_path)
    with contextlib.redirect_stdout(sys.stderr):
        results = _evaluate(*prepared, verbose=not args.not_verbose)
    write_metrics(results, save_path)
    try:
        print(json.dumps(results["brief"], indent=4), flush=True)
    except BrokenPipeError:  # e.g. piped into head: the metrics file is already written
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    from .cli import exit_process, run_main
    exit_process(run_main(main))
