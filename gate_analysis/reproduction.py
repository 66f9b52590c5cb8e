"""Proof against the original run's own predictions: re-run its queries and compare, within measured noise.

A checkpoint folder written by the original ``train.py`` holds the predictions that run computed:
``{best,latest}_{dset_name}_{eval_split_name}_preds.jsonl`` beside ``model_{best,latest}.ckpt``
(``_unsorted`` with ``--no_sort_results``) and, from its inference, ``hl_{eval_split_name}_submission.jsonl``;
each with ``<stem>_metrics.json`` beside it. This module re-runs those queries exactly as the original
inference did (``model.set_batching("original")``, batches of the run's ``eval_bsz`` in file order,
through ``qd_detr.inference``) and compares per query and on the metrics:

- windows as sets of ``[start, end, score]`` rows: scores within ``NoiseBounds.prob`` plus one
  4-decimal rounding step; end points equal, or one 2 s snapping step apart where the re-run's
  unsnapped value lies within ``NoiseBounds.span * duration`` of a snapping boundary; the rank order
  may differ only among rows whose re-run scores are tied within ``2 * NoiseBounds.prob``;
- saliency (float16 in the file): within ``NoiseBounds.saliency`` (relative to ``max(1, |s|)``) plus
  one float16 step;
- metrics (``qd_detr.eval``, compared with the file's ``_metrics.json`` when present): within 0.01
  (their 2-decimal rounding) plus, per query whose re-run differs within noise, that query's share
  of the metric's mean (100 / number of queries averaged).

The verdict is REPRODUCES (every query within the float32 bounds, or else within the TF32 bounds:
a run on an Ampere or newer GPU with torch < 1.12, whose matmuls defaulted to TF32) or DIFFERS.
The bounds come from measurements on the shared fixtures (``benchmarks/reproduction_noise.py``,
README "Reproduction of the original predictions"). Another epoch's or checkpoint's file differs by
orders of magnitude more and fails.
"""
import glob
import json
import os
import re
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from qd_detr.annotations import has_labels, read_jsonl
from qd_detr.batching import make_batches
from qd_detr.dataset import build_dataset
from qd_detr.engine import evaluate, iterate_batches
from qd_detr.errors import ConfigError, DataError
from qd_detr.eval import LENGTH_BUCKETS, metrics_path_for
from qd_detr.features import resolve_feature_dirs
from qd_detr.postprocess import submission_lines
from qd_detr.span_utils import span_cxw_to_xx

from .reproduction_report import WORST_SHOWN, format_reproduction, reproduction_html, verdict_message

__all__ = ["NoiseBounds", "NOISE_BOUNDS", "SCORE_STEP", "SNAP_STEP", "METRIC_ROUNDING", "prediction_file_candidates",
           "find_original_predictions", "read_original_predictions", "read_original_metrics",
           "rerun_original_batching", "compare_query", "compare_predictions", "compare_metrics",
           "prepare_reproduction", "Reproduction", "check_reproduction",
           # re-exported from .reproduction_report for existing importers
           "format_reproduction", "reproduction_html"]

SCORE_STEP = 1e-4        # window scores are rounded to 4 decimals
SNAP_STEP = 2.0          # window ends are rounded to multiples of the 2 s clip
MAX_TS = 150.0           # after being clamped to [0, 150] s
METRIC_ROUNDING = 0.01   # metrics are percentages with 2 decimals
_EPS = 1e-6              # float32 slack when comparing values that went through float32 and 4 decimals


@dataclass(frozen=True)
class NoiseBounds:
    """How far a re-run may be from the original computation at one noise level.

    prob: foreground probability (window score) before rounding; span: window end points as a fraction
    of the video duration, before snapping; saliency: raw saliency relative to ``max(1, |s|)``, before
    float16 rounding.
    """
    name: str
    prob: float
    span: float
    saliency: float
    description: str


# Measured (benchmarks/reproduction_noise.py, README): largest difference seen on the fixtures, with margin.
NOISE_BOUNDS = {
    "float32": NoiseBounds("float32", prob=2e-5, span=2e-5, saliency=1e-5,
                           description="float32 rounding: another device or kernel at the same precision"),
    "tf32": NoiseBounds("tf32", prob=2e-3, span=2e-3, saliency=1e-3,
                        description="TF32 matmuls: torch < 1.12 on an Ampere or newer GPU"),
}


# ------------------------------------------------------------------------------------------------
# Finding and reading the original files
# ------------------------------------------------------------------------------------------------

def prediction_file_candidates(model_path, opt=None):
    """Names (glob patterns) looked for beside the checkpoint, in order.

    ``model_best.ckpt`` -> ``best_{dset}_{split}_preds.jsonl``, ``best_*_preds.jsonl`` (and ``_unsorted``);
    ``model_latest.ckpt`` likewise with ``latest``; then ``hl_{split}_submission.jsonl`` and
    ``*_submission.jsonl`` (the original inference's output) for every checkpoint name.
    """
    stem = os.path.splitext(os.path.basename(os.fspath(model_path)))[0]
    tag = re.search(r"(?:^|_)(best|latest)$", stem)
    dset = getattr(opt, "dset_name", None) or "hl"
    split = getattr(opt, "eval_split_name", None) or "val"
    names = []
    if tag:
        t = tag.group(1)
        names += [f"{t}_{dset}_{split}_preds.jsonl", f"{t}_*_preds.jsonl",
                  f"{t}_{dset}_{split}_preds_unsorted.jsonl", f"{t}_*_preds_unsorted.jsonl"]
    names += [f"hl_{split}_submission.jsonl", "*_submission.jsonl", "*_submission_unsorted.jsonl"]
    return list(dict.fromkeys(names))


def find_original_predictions(model_path, opt=None):
    """``(path or None, names looked for, note or None)``: the first candidate file beside the checkpoint."""
    folder = os.path.dirname(os.path.abspath(os.fspath(model_path)))
    names = prediction_file_candidates(model_path, opt)
    for name in names:
        hits = sorted(p for p in glob.glob(os.path.join(glob.escape(folder), name))
                      if os.path.isfile(p) and "_nms_thd_" not in os.path.basename(p))
        if hits:
            note = None
            if len(hits) > 1:
                note = (f"{len(hits)} files match {name}; compared with {os.path.basename(hits[0])} "
                        f"(name one with --original_predictions)")
            stem = os.path.splitext(os.path.basename(os.fspath(model_path)))[0]
            if hits[0].endswith("_submission.jsonl") and stem.endswith("latest"):
                note = ((note + "; ") if note else "") + ("the original train.py writes its final submission "
                                                           "file from model_best.ckpt, not model_latest.ckpt")
            return hits[0], names, note
    return None, names, None


def _rows_ok(rows):
    return (isinstance(rows, list) and len(rows) > 0 and all(
        isinstance(r, list) and len(r) >= 3 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                     and np.isfinite(v) for v in r[:3]) for r in rows))


def _numbers_ok(values):
    return isinstance(values, list) and len(values) > 0 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in values)


def read_original_predictions(path):
    """The lines of an original prediction file; DataError (naming the file) when it is not one."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: prediction file not found")
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise DataError(f"{path}: prediction file is empty")
    lines = read_jsonl(path, required=("qid", "pred_relevant_windows", "pred_saliency_scores"))
    for i, line in enumerate(lines, 1):
        if not _rows_ok(line["pred_relevant_windows"]):
            raise DataError(f"{path}: record {i} (qid {line['qid']}): 'pred_relevant_windows' must be a non-empty "
                            "list of [start, end, score] rows of finite numbers")
        if not _numbers_ok(line["pred_saliency_scores"]):
            raise DataError(f"{path}: record {i} (qid {line['qid']}): 'pred_saliency_scores' must be a non-empty "
                            "list of finite numbers")
    return lines


def read_original_metrics(path):
    """The ``brief`` metrics of ``<stem>_metrics.json`` beside ``path``: ``(metrics path, brief)`` or
    ``(None, None)`` when there is no such file; DataError when it is not a metrics file."""
    mpath = metrics_path_for(os.fspath(path))
    if not os.path.isfile(mpath):
        return None, None
    try:
        with open(mpath) as fh:
            obj = json.load(fh)
    except (OSError, ValueError) as exc:
        raise DataError(f"{mpath}: not a readable metrics file ({exc})") from None
    brief = obj.get("brief") if isinstance(obj, dict) else None
    if not isinstance(brief, dict) or not all(isinstance(v, (int, float)) for v in brief.values()):
        raise DataError(f"{mpath}: not a metrics file (expected a 'brief' object of numbers)")
    return mpath, brief


# ------------------------------------------------------------------------------------------------
# The re-run
# ------------------------------------------------------------------------------------------------

def rerun_original_batching(model, opt, dataset, progress=False, before_forward=None, device=None):
    """Run ``dataset`` as the original inference did; returns ``(lines, raw)``.

    Batches of ``opt.eval_bsz`` in dataset order, ``model.set_batching("original")`` (restored after),
    gate tracking paused. ``lines``: submission lines (``qd_detr.postprocess``); ``raw``: per qid the
    values before rounding, ``{"prob": (nq,), "windows": (nq, 2) seconds, "saliency": (L,)}`` float64.
    ``before_forward(metas, inputs)`` may change the inputs in place (used to measure noise).
    """
    fusion = getattr(model, "fusion", None)
    tracking = bool(fusion is not None and getattr(fusion, "gate_tracking_enabled", False))
    previous = getattr(model, "batching", "query")
    device = device or next(model.parameters()).device
    batches = make_batches(dataset, "original", None, opt)
    lines, raw = [], {}
    if tracking:
        fusion.disable_gate_tracking()
    model.set_batching("original")
    try:
        for metas, inputs, outputs in iterate_batches(model, dataset, batches, device, progress=progress,
                                                      desc="reproduction", before_forward=before_forward):
            lines += submission_lines(metas, outputs, inputs["src_vid_mask"])
            prob = torch.softmax(outputs["pred_logits"].float(), -1)[..., 0].cpu().double()
            spans = span_cxw_to_xx(outputs["pred_spans"].float().cpu()).double()
            sal = outputs["saliency_scores"].float().cpu().double()
            lengths = inputs["src_vid_mask"].sum(1).long().tolist()
            for j, meta in enumerate(metas):
                raw[meta["qid"]] = {"prob": prob[j].numpy(), "windows": (spans[j] * meta["duration"]).numpy(),
                                    "saliency": sal[j, :lengths[j]].numpy()}
    finally:
        model.set_batching(previous)
        if tracking:
            fusion.enable_gate_tracking()
    return lines, raw


# ------------------------------------------------------------------------------------------------
# Comparison
# ------------------------------------------------------------------------------------------------

def _fp16_step(x):
    """Spacing of float16 at |x| (the rounding step of the file's saliency values)."""
    return np.spacing(np.abs(x).astype(np.float16)).astype(np.float64)


def _near_snap_boundary(x, tol):
    """True where rounding ``x / SNAP_STEP`` could flip under noise ``tol`` (x within tol of (k + 1/2) * step)."""
    frac = np.abs(np.mod(x / SNAP_STEP, 1.0) - 0.5) * SNAP_STEP
    return frac <= tol


def compare_query(original, rerun, raw, duration, bounds, sorted_original=True):
    """Compare one query's original line with its re-run.

    original / rerun: submission lines (``pred_relevant_windows`` (K, 3), ``pred_saliency_scores`` (L,));
    raw: the re-run's unrounded values (``rerun_original_batching``); duration: seconds.
    Returns a dict: ``status`` identical / within_noise / differs, ``problem`` (first reason, or None),
    ``max_end_diff_s``, ``max_score_diff``, ``max_saliency_diff``, ``max_saliency_steps`` (float16 steps),
    ``snap_flips``, ``reordered_windows`` (at another rank), ``unmatched_windows``.
    """
    o = np.asarray(original["pred_relevant_windows"], dtype=np.float64)[:, :3]
    r = np.asarray(rerun["pred_relevant_windows"], dtype=np.float64)[:, :3]
    so = np.asarray(original["pred_saliency_scores"], dtype=np.float64)
    sr = np.asarray(rerun["pred_saliency_scores"], dtype=np.float64)
    out = {"qid": original["qid"], "status": "identical", "problem": None, "max_end_diff_s": 0.0,
           "max_score_diff": 0.0, "max_saliency_diff": 0.0, "max_saliency_steps": 0.0, "snap_flips": 0,
           "reordered_windows": 0, "unmatched_windows": 0}

    def differs(problem):
        if out["status"] != "differs":
            out["problem"] = problem
        out["status"] = "differs"

    if original.get("vid") is not None and rerun.get("vid") is not None and original["vid"] != rerun["vid"]:
        differs(f"vid {original['vid']} in the file, {rerun['vid']} in the data")
    if len(o) != len(r):
        differs(f"{len(o)} windows in the file, {len(r)} in the re-run")
    else:
        # the re-run's unrounded rows in the order of its line (stable sort by score, as the original)
        order = np.argsort(-raw["prob"], kind="stable")
        r_raw = np.column_stack([np.clip(raw["windows"][order], 0, MAX_TS), raw["prob"][order]])  # clamped first
        score_tol = bounds.prob + SCORE_STEP + _EPS
        end_tol = bounds.span * duration + 5e-5  # noise plus the 4-decimal rounding before snapping
        d_end = np.abs(o[:, None, :2] - r[None, :, :2])                        # (K, K, 2)
        flip = (np.abs(d_end - SNAP_STEP) <= _EPS) & _near_snap_boundary(r_raw[None, :, :2], end_tol)
        end_ok = (d_end <= _EPS) | flip
        d_score = np.abs(o[:, None, 2] - r[None, :, 2])
        ok = end_ok.all(-1) & (d_score <= score_tol)
        k = len(o)
        rank = np.abs(np.arange(k)[:, None] - np.arange(k)[None, :]) * 1e-3
        cost = d_end.sum(-1) / SNAP_STEP + d_score / score_tol + rank + np.where(ok, 0.0, 1e6)
        rows, cols = linear_sum_assignment(cost)
        matched = ok[rows, cols]
        out["unmatched_windows"] = int((~matched).sum())
        out["max_end_diff_s"] = float(d_end[rows, cols].max())
        out["max_score_diff"] = float(d_score[rows, cols].max())
        out["snap_flips"] = int(flip[rows, cols][matched].any(-1).sum() if matched.any() else 0)
        if not matched.all():
            i = int(rows[~matched][0])
            j = int(cols[~matched][0])
            differs(f"window {o[i].tolist()} has no counterpart within bounds (closest {r[j].tolist()})")
        elif sorted_original:
            s = r_raw[cols, 2]  # re-run scores in the file's order: non-increasing up to ties within noise
            rise = np.maximum.accumulate(s[::-1])[::-1][1:] - s[:-1] if k > 1 else np.zeros(0)
            out["reordered_windows"] = int((cols != np.arange(k)).sum())
            if len(rise) and rise.max() > 2 * bounds.prob + _EPS:
                i = int(np.argmax(rise))
                differs(f"window order: rank {i + 1} scores {s[i]:.6f} in the re-run, below a later window "
                        f"({s[i] + rise[i]:.6f}); not a tie within noise")
        if out["status"] != "differs" and not (np.array_equal(o, r)):
            out["status"] = "within_noise"
    if len(so) != len(sr):
        differs(f"saliency has {len(so)} clips in the file, {len(sr)} in the re-run")
    else:
        d = np.abs(so - sr)
        steps = d / np.maximum(_fp16_step(sr), 1e-12)
        out["max_saliency_diff"] = float(d.max()) if len(d) else 0.0
        out["max_saliency_steps"] = float(steps.max()) if len(d) else 0.0
        tol = bounds.saliency * np.maximum(1.0, np.abs(sr)) + _fp16_step(np.abs(sr) + bounds.saliency
                                                                        * np.maximum(1.0, np.abs(sr)))
        bad = d > tol
        if bad.any():
            c = int(np.argmax(d - tol))
            differs(f"saliency clip {c}: {so[c]:.6g} in the file, {sr[c]:.6g} in the re-run "
                    f"(allowed {tol[c]:.3g})")
        elif d.max(initial=0.0) > 0 and out["status"] == "identical":
            out["status"] = "within_noise"
    return out


def _severity(q):
    return (q["status"] == "differs", q["unmatched_windows"], q["max_end_diff_s"], q["max_score_diff"],
            q["max_saliency_steps"])


def compare_predictions(original_lines, rerun_lines, raw, records, bounds):
    """Compare every query; returns a dict with ``passed``, counts per status, the largest differences,
    the tolerated effects (snap flips, reordered windows) and the ``worst`` queries (most different first).

    original_lines / rerun_lines: submission lines (matched by qid); raw: ``rerun_original_batching``'s;
    records: the data records (for durations); bounds: a ``NoiseBounds``.
    """
    by_qid = {line["qid"]: line for line in rerun_lines}
    duration = {r["qid"]: float(r["duration"]) for r in records}
    sorted_original = all(
        np.all(np.diff(np.asarray(line["pred_relevant_windows"], dtype=float)[:, 2]) <= 0) for line in original_lines)
    queries = [compare_query(line, by_qid[line["qid"]], raw[line["qid"]], duration[line["qid"]], bounds,
                             sorted_original) for line in original_lines]
    counts = {s: sum(q["status"] == s for q in queries) for s in ("identical", "within_noise", "differs")}
    worst = sorted(queries, key=_severity, reverse=True)[:WORST_SHOWN]
    return {"bounds": bounds.name, "passed": counts["differs"] == 0, "n_queries": len(queries), **counts,
            "sorted_original": sorted_original,
            "max_end_diff_s": max((q["max_end_diff_s"] for q in queries), default=0.0),
            "max_score_diff": max((q["max_score_diff"] for q in queries), default=0.0),
            "max_saliency_diff": max((q["max_saliency_diff"] for q in queries), default=0.0),
            "max_saliency_steps": max((q["max_saliency_steps"] for q in queries), default=0.0),
            "snap_flips": sum(q["snap_flips"] for q in queries),
            "reordered_windows": sum(q["reordered_windows"] for q in queries),
            "worst": [q for q in worst if q["status"] != "identical"],
            "_changed": {q["qid"] for q in queries if q["status"] == "within_noise"}}


def _metric_population(key, records):
    """qids a brief metric averages over: every query, or (MR-{bucket}-mAP) those with a GT window in the bucket."""
    m = re.match(r"MR-(short|middle|long)-", key)
    if not m:
        return {r["qid"] for r in records}
    lo, hi = LENGTH_BUCKETS[m.group(1)]
    return {r["qid"] for r in records if any(lo < w[1] - w[0] <= hi for w in r.get("relevant_windows") or [])}


def compare_metrics(reference, rerun, changed, records):
    """Compare brief metrics: ``reference`` (the file's or recomputed) vs ``rerun``.

    A delta is allowed up to METRIC_ROUNDING plus 100 / n for each of the n queries a metric averages
    over whose re-run differs within noise (``changed``). Returns ``{"passed", "max_abs_delta",
    "metrics": [{metric, original, rerun, delta, allowed}], "beyond": [names]}``.
    """
    rows, beyond = [], []
    for key in dict.fromkeys([*reference, *rerun]):
        a, b = reference.get(key), rerun.get(key)
        pop = _metric_population(key, records)
        allowed = METRIC_ROUNDING + _EPS + (100.0 * len(pop & changed) / len(pop) if pop else 0.0)
        delta = None if a is None or b is None else round(float(b) - float(a), 4)
        rows.append({"metric": key, "original": a, "rerun": b, "delta": delta, "allowed": round(allowed, 4)})
        if delta is None or abs(delta) > allowed:
            beyond.append(key)
    deltas = [abs(r["delta"]) for r in rows if r["delta"] is not None]
    return {"passed": not beyond, "max_abs_delta": max(deltas, default=0.0), "metrics": rows, "beyond": beyond}


# ------------------------------------------------------------------------------------------------
# The whole check
# ------------------------------------------------------------------------------------------------

def _find_file(path, model_path):
    """``path`` as given, else relative to the checkpoint's folder and its parent (as feature folders)."""
    ckpt_dir = os.path.dirname(os.path.abspath(os.fspath(model_path)))
    for cand in [path] if os.path.isabs(path) else [path, os.path.join(ckpt_dir, path),
                                                     os.path.join(os.path.dirname(ckpt_dir), path)]:
        if os.path.isfile(cand):
            return os.path.abspath(cand)
    return None


class Reproduction:
    """A prepared check: the original file read and matched with the data; ``run(model)`` re-runs and compares."""

    def __init__(self, result, lines=None, records=None, dataset=None, opt=None, metrics=None):
        self.result, self.lines, self.records, self.dataset, self.opt = result, lines, records, dataset, opt
        self.metrics = metrics

    @property
    def ready(self):
        return self.dataset is not None

    def run(self, model, progress=False):
        """The verdict dict (JSON-able); unchanged when there was nothing to check."""
        if not self.ready:
            return self.result
        res = self.result
        rerun, raw = rerun_original_batching(model, self.opt, self.dataset, progress=progress)
        for bounds in NOISE_BOUNDS.values():  # the tightest level that holds
            cmp = compare_predictions(self.lines, rerun, raw, self.records, bounds)
            if cmp["passed"]:
                break
        changed = cmp.pop("_changed")
        res["predictions"] = cmp
        res["noise_level"] = bounds.name if cmp["passed"] else None
        res["bounds"] = asdict(bounds)
        metrics_ok = True
        if all(has_labels(r) for r in self.records):
            recomputed = evaluate(self.lines, self.records)["brief"]
            rerun_brief = evaluate(rerun, self.records)["brief"]
            # the metrics file, unless it disagrees with its own predictions on this data (other labels):
            # then the file's predictions, so that only the re-run is judged
            consistent = None if self.metrics is None else compare_metrics(self.metrics, recomputed, set(),
                                                                            self.records)["passed"]
            use_file = bool(consistent)
            res["metrics"] = compare_metrics(self.metrics if use_file else recomputed, rerun_brief, changed,
                                             self.records)
            res["metrics"].update(compared_with="metrics file" if use_file else "recomputed from the file",
                                  file_matches_its_predictions=consistent)
            metrics_ok = res["metrics"]["passed"]
        else:
            res["metrics"] = None
        reproduces = cmp["passed"] and metrics_ok
        res["status"] = "reproduces" if reproduces else "differs"
        res["verdict"] = "REPRODUCES" if reproduces else "DIFFERS"
        res["message"] = verdict_message(res)
        return res


def prepare_reproduction(model_path, opt, data=None, original_predictions=None):
    """Find and read the original prediction file and match it with the data; returns a ``Reproduction``.

    data: ``{"data_path", "v_feat_dirs", "t_feat_dir", "a_feat_dir"}``, each optional: the JSONL (default:
    the checkpoint's ``eval_path``, tried from the current folder, the checkpoint's folder and its
    parent) and feature folders (default: the checkpoint's). No file found, or (for a found file) no
    data or features: the result says so and ``run`` checks nothing. A malformed file, a metrics file
    that is not one, or qids missing from the data raise DataError; missing data or features for an
    explicitly given file raise ConfigError.
    """
    data = data or {}
    explicit = original_predictions is not None
    if explicit:
        path, looked_for, note = os.path.abspath(os.fspath(original_predictions)), [], None
    else:
        path, looked_for, note = find_original_predictions(model_path, opt)
    result = {"status": None, "verdict": None, "predictions_path": path, "source": "given" if explicit else
              "found beside the checkpoint", "looked_for": looked_for, "note": note}
    if path is None:
        result.update(status="not_found", source=None, message=(
            "not checked: no prediction file of the original run beside the checkpoint (looked for "
            + ", ".join(looked_for) + "); name one with --original_predictions"))
        return Reproduction(result)
    lines = read_original_predictions(path)
    result["metrics_path"], metrics = read_original_metrics(path)

    def not_checked(reason):
        if explicit:
            raise ConfigError(f"{path}: cannot re-run its queries: {reason}")
        result.update(status="not_checked", message=f"not checked: found {path}, but {reason}")
        return Reproduction(result)

    wanted = data.get("data_path") or getattr(opt, "eval_path", None)
    if not wanted:
        return not_checked("no data file is known (pass --data_path)")
    data_path = _find_file(wanted, model_path)
    if data_path is None:
        return not_checked(f"the data file {wanted} was not found (pass --data_path)")
    records = read_jsonl(data_path)
    by_qid = {r["qid"]: r for r in records}
    missing = [line["qid"] for line in lines if line["qid"] not in by_qid]
    if missing:
        raise DataError(f"{path}: {len(missing)} of {len(lines)} qids are not in {data_path} (e.g. "
                        f"{', '.join(map(str, missing[:5]))}); pass the data file the original run used")
    try:
        dirs = resolve_feature_dirs(opt, model_path, data.get("v_feat_dirs"), data.get("t_feat_dir"),
                                    data.get("a_feat_dir"))
    except (ConfigError, DataError) as exc:
        return not_checked(f"the features are not available ({exc})")
    records = [by_qid[line["qid"]] for line in lines]  # the file's order: the original batches
    try:
        dataset = build_dataset(opt, records, dirs)
    except DataError as exc:
        return not_checked(f"the features are not available ({exc})")
    bsz = int(getattr(opt, "eval_bsz", 100) or 100)
    result.update(data_path=data_path, feature_dirs=dirs, n_queries=len(lines),
                  batching={"policy": "original", "batch_size": bsz, "n_batches": -(-len(lines) // bsz)})
    return Reproduction(result, lines, records, dataset, opt, metrics)


def check_reproduction(model, opt, model_path, data=None, original_predictions=None, progress=False):
    """``prepare_reproduction`` then ``run``: the verdict dict (see the module docstring)."""
    return prepare_reproduction(model_path, opt, data, original_predictions).run(model, progress)
