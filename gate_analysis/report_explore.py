"""The explorer of ``report.html``: a sortable, filterable table of queries (or videos) and, on a click, that
video's timeline: relevant and predicted windows, true and predicted saliency of each of its queries, every
layer's gates along the clips, and the intervention results of its queries.

Everything is inline (data as JSON, script and style written here; no external resource). The data:

* ``<script type="application/json" id="gx-data">`` (parsed when the page opens; no per-clip values)::

      {"format": 1, "gating_type", "clip_len" (s), "n_videos", "notes": [str],
       "gates": [{"name", "low", "high", "ref"}]          (lanes, declared ranges; null = unbounded)
       "ablation_fields": [str]                           (the columns of each video's intervention rows)
       "views": {"queries" | "videos": {"columns": [{"k": key, "l": label, "g": group, "t": "n" | "s"}],
                                        "rows": [[video index, value per column, ...]]}}}

  ``g`` is "id", "metric" (gate_performance.csv), "gate" (gate_stats_per_video.csv means; ``layers.all.gate_{kind}``:
  mean over layers of |layer mean|) or "ablation" (ablation.csv); numbers keep 4 significant digits.
* ``<script type="application/json" id="gx-v{i}">``, video ``i``, parsed only when it is opened::

      {"vid", "n_clips", "duration", "gate_qid" (the query whose stored gates are the video's),
       "lanes": {gate name: {"m": fixed, "s": fixed (elementwise: std over dims)} | {"g": [[qid, value]]}},
       "queries": [{"qid", "query", "gt": {"windows": [[s, e]], "clips": [t], "scores": [[a1, a2, a3]]} | null,
                    "pred": {"windows": [[s, e, score]], "saliency": fixed} | null,
                    "ablation": [[intervention, value per ablation field]]}]}

  ``fixed`` = ``{"e": k, "v": [int | null]}``, value = int * 10**k, with k per array so that its largest
  |value| keeps 4 significant digits (``encode_fixed``). Per-clip gates are per video (queries share them);
  per-query gating (global) stores one value per query (``"g"``).

The page reads ``#gx:`` links: ``report.html#gx:view=videos&sort=-mr_ap&filter=mr_ap<10&q=QID`` (``-`` sorts
descending; ``fit=0`` draws gate lanes over their declared range); ``click=th:KEY,row:N`` clicks a header or the
N-th shown row after loading (used by the tests).
"""
import html
import json
import os

import numpy as np
import pandas as pd

from qd_detr.errors import DataError
from qd_detr.io import file_sha256, iter_json_lines

from .gate_arrays import PER_CLIP_GATING_TYPES, as_qid
from .outputs import ABLATION_FILE, GATES_DIR, PERFORMANCE_FILE, PREDICTIONS_FILE, STATS_CSV_FILES
from .ranges import ranges_from_meta, reference, resolve_ranges
from .store import load_gate_run

__all__ = ["explore_data", "explore_html", "LaneAccumulator", "encode_fixed", "decode_fixed", "EXPLORE_FORMAT",
           "METRIC_COLUMNS", "ABLATION_FIELDS", "ROW_LIMIT"]

EXPLORE_FORMAT = 1
ROW_LIMIT = 200   # rows drawn at first (more on request): the page opens fast at any size
METRIC_COLUMNS = ("top1_iou", "r1_05", "r1_07", "mr_ap", "hl_hit1_verygood", "hl_ap_verygood", "length_bucket")
ABLATION_FIELDS = ("top1_window_iou_vs_base", "saliency_mean_abs_change", "delta_top1_iou", "delta_mr_ap",
                   "delta_hl_ap_verygood", "audio_source_vid")


def encode_fixed(values, digits=4):
    """``{"e": k, "v": ints}``: ``values`` (any shape, flattened) as integers times 10**k, k chosen so that the
    largest finite |value| keeps ``digits`` significant digits; NaN/inf -> None."""
    a = np.asarray(values, dtype=np.float64).ravel()
    ok = np.isfinite(a)
    top = float(np.abs(a[ok]).max()) if ok.any() else 0.0
    e = int(np.floor(np.log10(top))) - (digits - 1) if top > 0 else 0
    q = np.round(a * 10.0 ** -e) if e <= 0 else np.round(a / 10.0 ** e)
    if ok.all():
        return {"e": e, "v": q.astype(np.int64).tolist()}
    return {"e": e, "v": [int(x) if f else None for x, f in zip(q, ok)]}


def decode_fixed(obj):
    """float64 array of an ``encode_fixed`` dict (None -> NaN)."""
    v = np.array([np.nan if x is None else x for x in obj["v"]], dtype=np.float64)
    return v * 10.0 ** obj["e"] if obj["e"] >= 0 else v / 10.0 ** -obj["e"]


def _r4(v):
    """A table value: 4 significant digits, None for NaN / missing; strings stay strings."""
    if v is None or isinstance(v, str):
        return v
    v = float(v)
    if not np.isfinite(v):
        return None
    v = float(f"{v:.4g}")
    return int(v) if v.is_integer() and abs(v) < 1e15 else v  # 38, not 38.0: shorter JSON


def _csv(folder, name):
    """The CSV as strings (None when absent or unreadable); numbers are converted where used."""
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return None
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError):
        return None


def _num(s):
    return pd.to_numeric(s, errors="coerce")


def _jsonl(path, what, notes):
    """{qid: record} of a JSONL file; a problem is a note, not an error (the report shows what it can)."""
    out = {}
    try:
        for _, rec in iter_json_lines(path, what=what):
            if isinstance(rec.get("qid"), int):
                out[rec["qid"]] = rec
    except DataError as exc:
        notes.append(f"{what} not read: {exc}")
        return {}
    return out


def _labels(folder, run, notes):
    data = run.get("data") or {}
    path = data.get("path") or (run.get("arguments") or {}).get("data_path")
    if not path:
        notes.append("run.json names no data file: relevant windows and true saliency are not shown")
        return {}
    if not os.path.isabs(path):
        path = os.path.join(folder, path)
    if not os.path.isfile(path):
        notes.append(f"the data file {path} is gone: relevant windows and true saliency are not shown")
        return {}
    if data.get("sha256") and file_sha256(path) != data["sha256"]:
        notes.append(f"the data file {path} changed since the run (SHA-256 differs): its labels are shown as they "
                     "are now")
    return _jsonl(path, "data file", notes)


def _gate_run(folder, notes):
    try:
        return load_gate_run(folder)
    except (FileNotFoundError, ValueError) as exc:
        notes.append(f"no gate lanes: {exc}")
        return None


def _ranges(run, gr):
    declared = ranges_from_meta(run) or ranges_from_meta(gr.meta)
    out = []
    for (layer, kind), rng in resolve_ranges(declared, gr.layers, gr.kinds).items():
        bound = [float(b) if np.isfinite(b) else None for b in (rng.low, rng.high)]
        out.append({"name": f"layers.{layer}.gate_{kind}", "low": bound[0], "high": bound[1], "ref": reference(rng)})
    return out


def _video_key(qid, vid):
    """The explorer's key of a query's video: its vid, or ``qid:{qid}`` when the video is unknown."""
    return vid or f"qid:{qid}"


def _as_stored(a):
    """A gate array as the store holds it (C-contiguous float32): lanes computed from it or from the store's
    copy are the same numbers."""
    return np.ascontiguousarray(a, dtype=np.float32)


def _clip_lanes(gates, keys):
    """Per-clip lanes of one query's gates ``{(layer, kind): (T,) or (T, D) array}``, in the order of ``keys``:
    {name: {"m": fixed mean over dims, "s": fixed std over dims (elementwise only)}}."""
    lanes = {}
    for layer, kind in keys:
        a = _as_stored(gates[(layer, kind)])
        lane = {"m": encode_fixed(a.mean(axis=1, dtype=np.float64) if a.ndim == 2 else a)}
        if a.ndim == 2:
            lane["s"] = encode_fixed(a.std(axis=1, dtype=np.float64))
        lanes[f"layers.{layer}.gate_{kind}"] = lane
    return lanes


def _add_query_lanes(lanes, qid, gates, keys):
    """Append one query's mean gate per (layer, kind) of ``keys`` to the per-query lanes {name: {"g": [[qid, value]]}}."""
    for layer, kind in keys:
        lanes.setdefault(f"layers.{layer}.gate_{kind}", {"g": []})["g"].append(
            [qid, _r4(_as_stored(gates[(layer, kind)]).astype(np.float64).mean())])


def _lanes(gr, qids, per_clip):
    """Gate lanes of one video (its queries ``qids``, store order) read from the store: per clip from the first
    query, or one value per query for per-query gating."""
    keys = [(layer, kind) for layer in gr.layers for kind in gr.kinds]
    if per_clip:
        return _clip_lanes(gr.gates(qids[0]), keys)
    lanes = {}
    for qid in qids:
        _add_query_lanes(lanes, qid, gr.gates(qid), keys)
    return lanes


class LaneAccumulator:
    """Each video's explorer lanes, built while a run's gates stream into its store (``GateSink``), so that
    the report need not read the gates back: the values ``explore_data`` would read from the store.

    ``add(qid, vid, gates)`` in store order; ``lanes(key, qids)`` is the video's lanes when this accumulator saw
    exactly the store's queries ``qids`` of it (per-clip gating: the same first query), else None."""

    def __init__(self, gating_type, layers, kinds):
        self.per_clip = gating_type in PER_CLIP_GATING_TYPES
        self.keys = [(layer, kind) for layer in layers for kind in kinds]
        self._videos = {}  # video key -> (qids added, lanes)

    def add(self, qid, vid, gates):
        qid = as_qid(qid)
        key = _video_key(qid, "" if vid is None else str(vid))
        seen = self._videos.get(key)
        if seen is None:
            seen = self._videos[key] = ([], _clip_lanes(gates, self.keys) if self.per_clip else {})
        seen[0].append(qid)
        if not self.per_clip:
            _add_query_lanes(seen[1], qid, gates, self.keys)

    def lanes(self, key, qids):
        seen = self._videos.get(key)
        if seen is None:
            return None
        if (seen[0][0] == qids[0]) if self.per_clip else (seen[0] == list(qids)):
            return seen[1]
        return None


def _gt(rec):
    try:
        return {"windows": [[_r4(s), _r4(e)] for s, e in rec["relevant_windows"]],
                "clips": [int(c) for c in rec.get("relevant_clip_ids") or []],
                "scores": [[int(x) for x in row] for row in rec.get("saliency_scores") or []]}
    except (KeyError, TypeError, ValueError):  # unlabelled (or a record this code cannot read)
        return None


def _pred(rec):
    try:
        sal = rec.get("pred_saliency_scores")
        return {"windows": [[_r4(x) for x in w[:3]] for w in rec.get("pred_relevant_windows") or []],
                "saliency": encode_fixed(sal) if sal else None}
    except (AttributeError, TypeError, ValueError):
        return None


def _metrics(folder):
    """({qid: {metric: value}}, metric columns) from gate_performance.csv (its rows repeat a query's metrics)."""
    perf = _csv(folder, PERFORMANCE_FILE)
    if perf is None or not len(perf):
        return {}, []
    first = perf.drop_duplicates("qid").copy()
    cols = [c for c in (*METRIC_COLUMNS, "duration") if c in first.columns]
    for c in cols:
        if c != "length_bucket":
            first[c] = _num(first[c])
    return {int(r["qid"]): {c: _r4(r[c]) for c in cols} for r in first.to_dict("records")}, \
        [c for c in cols if c != "duration"]


def _video_gates(folder):
    """({video key: {gate name or layers.all.gate_{kind}: mean}}, those names) from gate_stats_per_video.csv."""
    pv = _csv(folder, STATS_CSV_FILES["per_video"])
    if pv is None or not len(pv):
        return {}, []
    pv = pv.assign(mean=_num(pv["mean"]), key=[_video_key(q, v) for v, q in zip(pv["vid"], pv["qid"])])
    out = {}
    for key, name, mean in zip(pv["key"], pv["name"], pv["mean"]):
        out.setdefault(key, {})[name] = _r4(mean)
    for (key, kind), mean in pv.assign(mean=pv["mean"].abs()).groupby(["key", "gate"], sort=False)["mean"].mean().items():
        out[key][f"layers.all.gate_{kind}"] = _r4(mean)
    return out, list(dict.fromkeys(pv["name"])) + [f"layers.all.gate_{k}" for k in dict.fromkeys(pv["gate"])]


def _ablation(folder):
    """({qid: [[intervention, value per field]]}, interventions, fields, the field the table shows)."""
    ab = _csv(folder, ABLATION_FILE)
    if ab is None or not len(ab):
        return {}, [], [], None
    fields = [f for f in ABLATION_FIELDS if f in ab.columns]
    for f in fields:
        if f != "audio_source_vid":
            ab[f] = _num(ab[f])
    rows = {}
    for rec in ab.to_dict("records"):
        rows.setdefault(int(rec["qid"]), []).append(
            [rec["intervention"], *[rec[f] if f == "audio_source_vid" else _r4(rec[f]) for f in fields]])
    labelled = "delta_mr_ap" in fields and ab["delta_mr_ap"].notna().any()
    return rows, list(dict.fromkeys(ab["intervention"])), fields, "delta_mr_ap" if labelled else \
        "top1_window_iou_vs_base"


def _mean(values):
    v = [x for x in values if isinstance(x, (int, float))]
    return _r4(sum(v) / len(v)) if v else None


def explore_data(folder, run, lanes=None):
    """(table dict, [video dict]) of the explorer (module docstring), or None when the folder has neither a gate
    store nor predictions (e.g. a comparison of runs). ``lanes``: the run's ``LaneAccumulator`` (videos it has
    are not read back from the store)."""
    notes = []
    has_store = os.path.isdir(os.path.join(folder, GATES_DIR))
    has_pred = os.path.isfile(os.path.join(folder, PREDICTIONS_FILE))
    if not (has_store or has_pred):
        return None
    gr = _gate_run(folder, notes) if has_store else None
    if not has_store:
        notes.append(f"no gate store ({GATES_DIR}/) in this folder: no gate lanes")
    preds = _jsonl(os.path.join(folder, PREDICTIONS_FILE), "predictions file", notes) if has_pred else {}
    if not has_pred:
        notes.append(f"no {PREDICTIONS_FILE} in this folder: no predicted windows or saliency")
    labels = _labels(folder, run, notes)
    metrics, mcols = _metrics(folder)
    if not mcols:
        notes.append(f"no {PERFORMANCE_FILE} (unlabelled data or no predictions): no per-query metrics")
    gstats, gcols = _video_gates(folder)
    ab_rows, icols, fields, effect = _ablation(folder)
    effects = {(q, r[0]): r[1 + fields.index(effect)] for q, rows in ab_rows.items() for r in rows}
    gating = (gr.gating_type if gr else None) or (run.get("model") or {}).get("gating_type") or ""

    qids = list(gr.qids) if gr else list(preds)
    vid_of = {q: gr.vids[q] if gr else str(preds[q].get("vid", "")) for q in qids}
    key_of = {q: _video_key(q, vid_of[q]) for q in qids}  # an unknown video ('') is one per query, as in the CSV
    videos = {}
    for q in qids:
        videos.setdefault(key_of[q], []).append(q)
    vindex = {k: i for i, k in enumerate(videos)}
    text_of = {q: str((labels.get(q) or preds.get(q) or {}).get("query", "")) for q in qids}

    def n_clips_of(q):
        t = gr.n_clips.get(q, -1) if gr else -1
        sal = (preds.get(q) or {}).get("pred_saliency_scores")
        return int(t) if t >= 0 else (len(sal) if isinstance(sal, list) else None)

    short = {n: n.replace("layers.", "L").replace(".gate_", " ") for n in gcols}
    short.update({n: f"all |{n.split('_')[-1]}|" for n in gcols if ".all." in n})
    qcols = [{"k": k, "l": l, "g": "id", "t": t} for k, l, t in (("qid", "qid", "n"), ("vid", "vid", "s"),
                                                                 ("query", "query", "s"), ("n_clips", "clips", "n"))]
    qcols += [{"k": c, "l": c, "g": "metric", "t": "s" if c == "length_bucket" else "n"} for c in mcols]
    qcols += [{"k": c, "l": short[c], "g": "gate", "t": "n"} for c in gcols]
    what = "Δ MR AP" if effect == "delta_mr_ap" else "top-1 IoU vs base"
    qcols += [{"k": f"ab:{i}", "l": f"{what} {i}", "g": "ablation", "t": "n"} for i in icols]
    qrows = [[vindex[key_of[q]], q, vid_of[q], text_of[q], n_clips_of(q),
              *[(metrics.get(q) or {}).get(c) for c in mcols], *[(gstats.get(key_of[q]) or {}).get(c) for c in gcols],
              *[effects.get((q, i)) for i in icols]] for q in qids]

    vmetrics = [c for c in mcols if c != "length_bucket"]
    vcols = [{"k": k, "l": l, "g": "id", "t": t} for k, l, t in (("vid", "vid", "s"), ("n_queries", "queries", "n"),
                                                                 ("qids", "qids", "s"), ("n_clips", "clips", "n"))]
    vcols += [{"k": c, "l": f"mean {c}", "g": "metric", "t": "n"} for c in vmetrics]
    vcols += [c for c in qcols if c["g"] == "gate"] + [{**c, "l": "mean " + c["l"]} for c in qcols
                                                        if c["g"] == "ablation"]
    per_clip = gating in PER_CLIP_GATING_TYPES
    vrows, blobs = [], []
    for key, vq in videos.items():
        vrows.append([vindex[key], vid_of[vq[0]], len(vq), " ".join(map(str, vq)), n_clips_of(vq[0]),
                      *[_mean((metrics.get(q) or {}).get(c) for q in vq) for c in vmetrics],
                      *[(gstats.get(key) or {}).get(c) for c in gcols],
                      *[_mean(effects.get((q, i)) for q in vq) for i in icols]])
        duration = next((labels[q].get("duration") for q in vq if q in labels), None) or \
            next((metrics[q].get("duration") for q in vq if q in metrics), None)
        blobs.append({"vid": vid_of[vq[0]], "n_clips": n_clips_of(vq[0]), "duration": _r4(duration),
                      "gate_qid": vq[0] if gr else None, "lanes": _video_lanes(gr, lanes, key, vq, per_clip),
                      "queries": [{"qid": q, "query": text_of[q], "gt": _gt(labels.get(q)), "pred": _pred(preds.get(q)),
                                   "ablation": ab_rows.get(q, [])} for q in vq]})
    clip_len = float((run.get("model") or {}).get("clip_length") or 2)
    table = {"format": EXPLORE_FORMAT, "gating_type": gating, "clip_len": clip_len, "n_videos": len(videos),
             "notes": notes, "gates": _ranges(run, gr) if gr else [], "ablation_fields": fields,
             "views": {"queries": {"columns": qcols, "rows": qrows}, "videos": {"columns": vcols, "rows": vrows}}}
    return table, blobs


def _video_lanes(gr, lanes, key, qids, per_clip):
    """A video's lanes: from the run's ``LaneAccumulator`` when it has them, else read from the store."""
    if gr is None:
        return {}
    known = lanes.lanes(key, qids) if lanes is not None and lanes.per_clip == per_clip else None
    return known if known is not None else _lanes(gr, qids, per_clip)


def _script_json(obj, element_id):
    """``obj`` as an inline JSON script element (``<`` escaped, so no text can close the element)."""
    text = json.dumps(obj, separators=(",", ":"), allow_nan=False, ensure_ascii=False).replace("<", "\\u003c")
    return f"<script type='application/json' id='{element_id}'>{text}</script>"


def explore_html(folder, run, lanes=None):
    """The explorer section's HTML (controls, table, timeline, data, script), or None (``explore_data``)."""
    built = explore_data(folder, run, lanes=lanes)
    if built is None:
        return None
    table, blobs = built
    n_q = len(table["views"]["queries"]["rows"])
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in table["notes"])
    return (f"<style>{EXPLORE_CSS}</style>"
            f"<p class='muted'>{n_q} queries of {table['n_videos']} videos. Click a column to sort (again: reverse), "
            "type to filter (words match qid, vid and query text; <code>mr_ap&lt;10</code>, <code>vid=abc</code> "
            "filter a column by key or label), click a row for its video's timeline. Gate columns are the video's "
            "mean gate (its queries share their gates); <code>all |kind|</code> is the mean over layers of "
            "|layer mean|.</p>"
            + (f"<ul class='muted'>{notes}</ul>" if notes else "") +
            "<div id='gx' data-state='loading'><div class='gx-controls'>"
            "<select id='gx-view'><option value='queries'>one row per query</option>"
            "<option value='videos'>one row per video</option></select>"
            "<input id='gx-filter' type='search' size='40' placeholder='filter: words, or column&lt;value'>"
            "<span id='gx-groups'></span><label><input id='gx-fit' type='checkbox' checked> gate lanes fitted to "
            "the video (else: declared range)</label><span id='gx-count' class='muted'></span></div>"
            "<div class='scroll gx-wrap'><table id='gx-table'><thead></thead><tbody></tbody></table></div>"
            "<button id='gx-more' type='button' hidden>show all rows</button>"
            "<div id='gx-detail'><p class='muted'>Click a row to see its video's timeline.</p></div>"
            "<pre id='gx-errors' hidden></pre></div>"
            + _script_json(table, "gx-data")
            + "".join(_script_json(b, f"gx-v{i}") for i, b in enumerate(blobs))
            + f"<script>const GX_LIMIT={ROW_LIMIT};{EXPLORE_JS}</script>")


def _asset(name):
    """The text of a file of this package (the page's stylesheet and script are kept as .css / .js files)."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), name), encoding="utf-8") as fh:
        return fh.read()


#: The explorer's stylesheet and its script (report_explore.js: table (sort, filter, groups, row limit), timeline
#: of one video on a click (SVG drawn from its JSON element, parsed then), pointer read-out, #gx: links; errors
#: are listed in #gx-errors).
EXPLORE_CSS = _asset("report_explore.css")
EXPLORE_JS = _asset("report_explore.js")
