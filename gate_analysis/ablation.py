"""What audio causally changes: every intervention (``gate_analysis.interventions``) re-runs inference and
is compared with the baseline (the main pass), per query and overall, with the task's own metrics.

Every comparison is ablated minus baseline (the main pass), per query and overall:
``ablation.csv`` and ``ablation_overall.csv`` (columns in ``CSV_COLUMNS``). For audio-off
interventions a negative delta means audio helped that query; a positive one that audio hurt it.
The effective contributions of ``--contributions`` are in ``gate_analysis.contributions``.
"""
import os
import time

import numpy as np
import pandas as pd

from qd_detr.engine import evaluate
from qd_detr.eval import per_query_metrics
from qd_detr.io import write_csv, write_jsonl

from .contributions import CSV_COLUMNS as CONTRIBUTION_COLUMNS
from .interventions import run_intervention
from .lazy import lazy_attributes
from .outputs import ABLATION_DIR, ABLATION_FILE, ABLATION_OVERALL_FILE, ABLATION_PLOTS

__all__ = ["compare_predictions", "overall_effects", "run_ablation", "CSV_COLUMNS", "PLOT_FILES", "QUERY_METRICS",
           "BRIEF_METRICS"]

#: per-query metrics of ``qd_detr.eval.per_query_metrics`` compared per intervention
QUERY_METRICS = ("top1_iou", "r1_05", "r1_07", "mr_ap", "hl_hit1_verygood", "hl_ap_verygood")
#: official brief metrics compared in ablation_overall.csv
BRIEF_METRICS = ("MR-full-mAP", "MR-full-mAP@0.5", "MR-full-mAP@0.75", "MR-full-R1@0.5", "MR-full-R1@0.7",
                 "HL-min-VeryGood-mAP", "HL-min-VeryGood-Hit1")

_INTERVENTION_DOC = {
    "intervention": "Intervention name: '{value}@{layers}:{gates}' for gate clamps (e.g. 'zero@all:both'), "
                    "'audio_zero' or 'audio_swap' for audio inputs.",
    "target": "'gates' (gate outputs replaced) or 'audio' (audio input replaced).",
    "value": "zero | one | minus_one | mean (gates; mean = the gate's dataset mean from the main pass) or "
             "audio_zero | audio_swap.",
    "layers": "Clamped fusion layers: 'all' or one layer index ('' for audio interventions).",
    "gates": "Clamped gates: 'mha', 'ffn', 'beta', 'mha+ffn' or 'mha+ffn+beta' ('' for audio interventions).",
}
_METRIC_DOC = {
    "top1_iou": "IoU of the top-1 predicted window with its best GT window (official R1 definition)",
    "r1_05": "R1@0.5 hit (1 if top1_iou >= 0.5)",
    "r1_07": "R1@0.7 hit (1 if top1_iou >= 0.7)",
    "mr_ap": "per-query MR AP averaged over IoU 0.5:0.05:0.95, percent",
    "hl_hit1_verygood": "saliency HIT@1 at VeryGood (100 if an annotator scored the top-saliency clip >= 4)",
    "hl_ap_verygood": "per-query highlight AP at VeryGood, percent",
}


def _metric_columns():
    cols = {}
    for m, doc in _METRIC_DOC.items():
        cols[f"base_{m}"] = f"Baseline (main pass) {doc}; empty without labels."
        cols[f"ablated_{m}"] = "The same under the intervention."
        cols[f"delta_{m}"] = f"ablated_{m} - base_{m} (< 0: the intervention hurt this query)."
    return cols


#: Every CSV written by this module: {file name: {column: description}}.
CSV_COLUMNS = {
    ABLATION_FILE: {
        "qid": "QVHighlights query id.",
        "vid": "Video id of the query.",
        **_INTERVENTION_DOC,
        "audio_source_vid": "audio_swap: the video whose audio the query received ('' otherwise).",
        "top1_window_iou_vs_base": "IoU between the baseline and the ablated top-1 window (1 = unchanged; "
                                   "label-free).",
        "saliency_mean_abs_change": "Mean over valid clips of |ablated - baseline| predicted saliency "
                                    "(label-free; 0 = unchanged).",
        **_metric_columns(),
    },
    ABLATION_OVERALL_FILE: {
        **_INTERVENTION_DOC,
        "metric": "An official brief metric (e.g. 'MR-full-mAP'), a per-query metric averaged over queries "
                  "('mean_top1_iou', ...), or a label-free change: 'frac_top1_window_changed' (fraction of "
                  "queries whose top-1 window moved), 'mean_saliency_abs_change'.",
        "baseline": "Value of the main pass (0 for the label-free changes).",
        "ablated": "Value under the intervention.",
        "delta": "ablated - baseline.",
        "n_queries": "Queries the value is computed over.",
        "n_improved": "Per-query metrics: queries with delta > 0 (empty otherwise).",
        "n_worsened": "Per-query metrics: queries with delta < 0 (empty otherwise).",
        "n_unchanged": "Per-query metrics: queries with delta == 0 (empty otherwise).",
    },
    **CONTRIBUTION_COLUMNS,
}
PLOT_FILES = ABLATION_PLOTS


# -- interventions --------------------------------------------------------------------------------
# -- comparison -----------------------------------------------------------------------------------
def _iou(a, b):
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = max(a[1], b[1]) - min(a[0], b[0])
    return inter / union if union > 0 else float(a[:2] == b[:2])


def _metrics_by_qid(lines, records):
    labelled = [r for r in records if r.get("relevant_windows")]
    if not labelled or not lines:
        return {}
    return {row["qid"]: row for row in per_query_metrics(lines, labelled)}


def compare_predictions(intervention, base_lines, ablated_lines, records, base_metrics=None, source_vid=None):
    """One ``ablation.csv`` row per query (dict per CSV_COLUMNS) comparing ablated with baseline lines."""
    ablated = {line["qid"]: line for line in ablated_lines}
    base_metrics = _metrics_by_qid(base_lines, records) if base_metrics is None else base_metrics
    abl_metrics = _metrics_by_qid(ablated_lines, records)
    rows = []
    for line in base_lines:
        qid = line["qid"]
        other = ablated[qid]
        b_sal = np.asarray(line["pred_saliency_scores"], dtype=np.float64)
        a_sal = np.asarray(other["pred_saliency_scores"], dtype=np.float64)
        row = {"qid": qid, "vid": line["vid"], **intervention.describe(),
               "audio_source_vid": (source_vid or {}).get(str(line["vid"]), ""),
               "top1_window_iou_vs_base": _iou(line["pred_relevant_windows"][0][:2],
                                               other["pred_relevant_windows"][0][:2]),
               "saliency_mean_abs_change": float(np.abs(a_sal - b_sal).mean()) if b_sal.size else float("nan")}
        bm, am = base_metrics.get(qid, {}), abl_metrics.get(qid, {})
        for m in QUERY_METRICS:
            b, a = bm.get(m), am.get(m)
            row[f"base_{m}"] = np.nan if b is None else float(b)
            row[f"ablated_{m}"] = np.nan if a is None else float(a)
            row[f"delta_{m}"] = row[f"ablated_{m}"] - row[f"base_{m}"]
        rows.append(row)
    return pd.DataFrame(rows, columns=list(CSV_COLUMNS[ABLATION_FILE]))


def overall_effects(intervention, per_query, base_brief=None, ablated_brief=None):
    """``ablation_overall.csv`` rows of one intervention (a DataFrame)."""
    desc = intervention.describe()
    rows = []
    n = len(per_query)
    for key in BRIEF_METRICS:
        if base_brief and ablated_brief and key in base_brief and key in ablated_brief:
            b, a = float(base_brief[key]), float(ablated_brief[key])
            rows.append({**desc, "metric": key, "baseline": b, "ablated": a, "delta": round(a - b, 6),
                         "n_queries": n})
    for m in QUERY_METRICS:
        d = per_query[f"delta_{m}"].to_numpy(float)
        ok = np.isfinite(d)
        if not ok.any():
            continue
        rows.append({**desc, "metric": f"mean_{m}", "baseline": float(per_query.loc[ok, f"base_{m}"].mean()),
                     "ablated": float(per_query.loc[ok, f"ablated_{m}"].mean()), "delta": float(d[ok].mean()),
                     "n_queries": int(ok.sum()), "n_improved": int((d[ok] > 0).sum()),
                     "n_worsened": int((d[ok] < 0).sum()), "n_unchanged": int((d[ok] == 0).sum())})
    changed = float((per_query["top1_window_iou_vs_base"] < 1).mean()) if n else float("nan")
    sal = float(per_query["saliency_mean_abs_change"].mean()) if n else float("nan")
    rows.append({**desc, "metric": "frac_top1_window_changed", "baseline": 0.0, "ablated": changed,
                 "delta": changed, "n_queries": n})
    rows.append({**desc, "metric": "mean_saliency_abs_change", "baseline": 0.0, "ablated": sal, "delta": sal,
                 "n_queries": n})
    return pd.DataFrame(rows, columns=list(CSV_COLUMNS[ABLATION_OVERALL_FILE]))


def run_ablation(model, dataset, batches, device, interventions, base_lines, output_dir=None, gate_means=None,
                 seed=0, progress=False, num_workers=0, base_brief=None, log=None, base_metrics=None):
    """Run every intervention and compare it with ``base_lines`` (the main pass, dataset order).

    Returns ``(per_query_df, overall_df, info)``; with ``output_dir`` also writes ``ablation.csv``,
    ``ablation_overall.csv`` and ``ablation/{name}.jsonl`` (ablated predictions). ``info`` holds
    seconds and the ablated brief metrics per intervention. ``base_metrics``: ``{qid: per-query metrics}`` of
    ``base_lines`` when already computed (e.g. by ``performance.QueryMetrics``)."""
    records = dataset.records
    if base_metrics is None:
        base_metrics = _metrics_by_qid(base_lines, records)
    if base_brief is None:
        base_brief = (evaluate(base_lines, records) or {}).get("brief")
    per_query, overall, info = [], [], {}
    for iv in interventions:
        t0 = time.time()
        lines, source = run_intervention(model, dataset, batches, device, iv, gate_means, seed, progress, num_workers)
        metrics = evaluate(lines, records)
        brief = (metrics or {}).get("brief")
        pq = compare_predictions(iv, base_lines, lines, records, base_metrics, source)
        per_query.append(pq)
        overall.append(overall_effects(iv, pq, base_brief, brief))
        info[iv.name] = {"seconds": round(time.time() - t0, 2), "metrics_brief": brief}
        if output_dir is not None:
            folder = os.path.join(output_dir, ABLATION_DIR)
            os.makedirs(folder, exist_ok=True)
            write_jsonl(os.path.join(folder, _safe_name(iv.name) + ".jsonl"), lines)
        if log is not None:
            key = "MR-full-mAP"
            if brief and base_brief and key in brief:
                log(f"  ablation {iv.name}: {key} {base_brief[key]} -> {brief[key]} "
                    f"({brief[key] - base_brief[key]:+.2f})")
            else:
                log(f"  ablation {iv.name}: done")
    pq = pd.concat(per_query, ignore_index=True) if per_query else pd.DataFrame(columns=list(CSV_COLUMNS[ABLATION_FILE]))
    ov = pd.concat(overall, ignore_index=True) if overall else pd.DataFrame(
        columns=list(CSV_COLUMNS[ABLATION_OVERALL_FILE]))
    if output_dir is not None:
        write_csv(pq, os.path.join(output_dir, ABLATION_FILE), float_format="%.9g")
        write_csv(ov, os.path.join(output_dir, ABLATION_OVERALL_FILE), float_format="%.9g")
    return pq, ov, info


def _safe_name(name):
    return "".join(c if c.isalnum() or c in "-_.+" else "_" for c in name)


# the figures live in gate_analysis.plots_causal (matplotlib, imported on first use)
_PLOT_NAMES = ("plot_ablation", "plot_contributions")
__all__ += _PLOT_NAMES
__getattr__ = lazy_attributes(__name__, "gate_analysis.plots_causal", _PLOT_NAMES)
