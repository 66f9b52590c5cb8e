"""Gates tied to the task's metrics: per-query performance joined with gate statistics, correlations,
failure cases against matched successes, and query subsets (e.g. audio-related queries).

- ``performance_table``: one row per query x gate (every layer and ``layer == "all"``, the mean of the
  query's per-layer means) with the query's gate mean/std, its mean effective contribution (runs with
  ``--contributions``), its official per-query metrics (``qd_detr.eval.per_query_metrics``) and the
  effect of the reference audio-off intervention (runs with ``--ablate``).
- ``correlation_table``: Spearman's rho (with n and the two-sided p-value) of each gate feature against
  each metric and against each intervention's per-query effect.
- ``failure_cases``: the N worst queries by top-1 IoU (ties: lower MR AP first, then qid), each matched
  to a successful query (top-1 IoU >= 0.5) by nearest-neighbour matching without replacement on
  video duration and total relevant-window length (both divided by their standard deviation over all
  labelled queries; the worst failure chooses first, ties by smaller qid). Their gates are compared
  pair by pair (paired Wilcoxon signed-rank p-value).
- ``read_subset`` / ``apply_subset`` / ``subset_comparison``: a qid list (text: one qid per line, ``#``
  comments; or JSONL with a ``qid`` field per line) restricts a run (``--subset FILE``) or splits its
  statistics into queries in and out of the list (``--subset_mode split``; Mann-Whitney U p-values).
"""
import json
import os

import numpy as np
import pandas as pd

from qd_detr.engine import evaluate
from qd_detr.errors import ConfigError, DataError
from qd_detr.eval import per_query_metrics
from qd_detr.gates import ALL_LAYERS, gate_name
from qd_detr.io import write_csv

from .lazy import lazy_attributes
from .outputs import (
    FAILURE_COMPARISON_FILE,
    FAILURE_PAIRS_FILE,
    PERFORMANCE_ABLATION_FILE,
    PERFORMANCE_CORRELATIONS_FILE,
    PERFORMANCE_FILE,
    PERFORMANCE_PLOTS,
    SUBSET_COMPARISON_FILE,
)
from .rank_stats import mann_whitney, paired_wilcoxon, spearman
from .stats_csv import gate_id_columns

__all__ = ["QueryMetrics", "performance_table", "ablation_join", "correlation_table", "failure_cases", "failure_comparison", "read_subset",
           "apply_subset", "subset_comparison", "query_gate_features", "write_performance", "CSV_COLUMNS",
           "PLOT_FILES", "METRICS", "SUCCESS_IOU"]

#: per-query metrics of ``qd_detr.eval.per_query_metrics`` joined with the gates
METRICS = ("top1_iou", "r1_05", "r1_07", "mr_ap", "mr_ap_05", "mr_ap_075", "hl_hit1_verygood", "hl_ap_verygood")
CORRELATED_METRICS = ("top1_iou", "mr_ap", "hl_ap_verygood", "hl_hit1_verygood")
ABLATION_EFFECTS = ("delta_top1_iou", "delta_mr_ap", "delta_hl_ap_verygood")
FEATURES = ("gate_mean", "gate_std", "contribution_mean")
SUCCESS_IOU = 0.5

_ID = gate_id_columns("the mean of the query's per-layer values")

CSV_COLUMNS = {
    PERFORMANCE_FILE: {
        "qid": "QVHighlights query id (labelled, predicted queries).",
        "vid": "Video id of the query.",
        **_ID,
        "gate_mean": "Mean gate value of the query (over clips and dims; 'all': mean of the layer means).",
        "gate_std": "Std (ddof=0) of the query's gate values ('all': mean of the layer stds).",
        "contribution_mean": "Mean effective contribution over the query's clips (empty without --contributions).",
        "top1_iou": "IoU of the top-1 window with its best GT window.",
        "r1_05": "R1@0.5 hit (0/1).",
        "r1_07": "R1@0.7 hit (0/1).",
        "mr_ap": "Per-query MR AP over IoU 0.5:0.05:0.95 (percent).",
        "mr_ap_05": "Per-query MR AP at IoU 0.5 (percent).",
        "mr_ap_075": "Per-query MR AP at IoU 0.75 (percent).",
        "hl_hit1_verygood": "Saliency HIT@1 at VeryGood (0 or 100).",
        "hl_ap_verygood": "Per-query highlight AP at VeryGood (percent).",
        "length_bucket": "short / middle / long bucket of the query's longest GT window.",
        "duration": "Video duration in seconds (JSONL).",
        "window_length": "Total length of the relevant windows in seconds.",
    },
    PERFORMANCE_ABLATION_FILE: {
        "qid": "QVHighlights query id (labelled, predicted queries; runs with --ablate).",
        "vid": "Video id of the query.",
        **_ID,
        "gate_mean": "Mean gate value of the query (as in gate_performance.csv).",
        "intervention": "The intervention (every one of the run, in --ablate order).",
        "delta_top1_iou": "Its per-query change in top-1 IoU (ablated - baseline; for audio-off interventions "
                          "< 0: audio helped).",
        "delta_mr_ap": "Its per-query change in MR AP (ablated - baseline, points).",
        "delta_hl_ap_verygood": "Its per-query change in highlight AP at VeryGood (ablated - baseline, points).",
    },
    PERFORMANCE_CORRELATIONS_FILE: {
        **_ID,
        "x": "Gate feature: gate_mean, gate_std or contribution_mean.",
        "y": "Metric (top1_iou, mr_ap, hl_ap_verygood, hl_hit1_verygood) or intervention effect "
             "(delta_top1_iou, delta_mr_ap, delta_hl_ap_verygood).",
        "intervention": "The intervention whose effect is y ('' for metrics).",
        "method": "'spearman'.",
        "n": "Queries with both values.",
        "rho": "Spearman's rho (NaN when either side is constant or n < 3).",
        "p_value": "Two-sided p-value (scipy.stats.spearmanr).",
    },
    FAILURE_PAIRS_FILE: {
        "pair": "Pair index (0 = the worst failure).",
        "failure_qid": "A failed query (among the N lowest top-1 IoU).",
        "failure_top1_iou": "Its top-1 IoU.",
        "failure_duration": "Its video duration (s).",
        "failure_window_length": "Its total relevant-window length (s).",
        "matched_qid": "The successful query matched to it (top-1 IoU >= 0.5), nearest on duration and window "
                       "length (standardised), without replacement.",
        "matched_top1_iou": "Its top-1 IoU.",
        "matched_duration": "Its video duration (s).",
        "matched_window_length": "Its total relevant-window length (s).",
        "distance": "Euclidean distance of the pair in standardised (duration, window length).",
    },
    FAILURE_COMPARISON_FILE: {
        **_ID,
        "feature": "gate_mean or contribution_mean (per query).",
        "n_pairs": "Matched pairs.",
        "mean_failure": "Mean of the feature over the failures.",
        "mean_matched": "Mean over their matched successes.",
        "diff": "mean_failure - mean_matched.",
        "p_value": "Paired Wilcoxon signed-rank test (two-sided; NaN with < 2 non-zero differences).",
    },
    SUBSET_COMPARISON_FILE: {
        "section": "'gates' (per-query gate means), 'contributions', 'metrics' (per-query metrics), 'official' "
                   "(official brief metrics of each group), 'ablation' (per-query intervention effects).",
        **_ID,
        "statistic": "What is compared: e.g. gate_mean, top1_iou, MR-full-mAP, delta_mr_ap[zero@all:both].",
        "mean_in": "Mean over the queries in the subset (official: the group's metric).",
        "mean_out": "Mean over the other queries.",
        "diff": "mean_in - mean_out.",
        "n_in": "Queries in the subset with a value.",
        "n_out": "Other queries with a value.",
        "p_value": "Two-sided Mann-Whitney U test of in vs out (empty for official metrics).",
    },
}
PLOT_FILES = PERFORMANCE_PLOTS


# -- per-query table ------------------------------------------------------------------------------
def query_gate_features(query_stats, contrib_summary=None):
    """Per query x layer x gate (plus layer 'all'): gate_mean, gate_std, contribution_mean."""
    qs = query_stats[["qid", "vid", "layer", "gate", "mean", "std"]].rename(
        columns={"mean": "gate_mean", "std": "gate_std"}).copy()
    qs["layer"] = qs["layer"].astype(int)
    if contrib_summary is not None and len(contrib_summary):
        c = contrib_summary[["qid", "layer", "gate", "contribution_mean"]].copy()
        c["layer"] = c["layer"].astype(int)
        qs = qs.merge(c, on=["qid", "layer", "gate"], how="left")
    else:
        qs["contribution_mean"] = np.nan
    allrows = qs.groupby(["qid", "gate"], sort=False).agg(
        vid=("vid", "first"), gate_mean=("gate_mean", "mean"), gate_std=("gate_std", "mean"),
        contribution_mean=("contribution_mean", "mean")).reset_index()
    allrows["layer"] = ALL_LAYERS
    qs["layer"] = qs["layer"].astype(object)
    out = pd.concat([qs, allrows[qs.columns]], ignore_index=True)
    out["name"] = [gate_name(l, k) for l, k in zip(out["layer"], out["gate"])]
    return out


def _window_length(rec):
    return float(sum(max(0.0, float(w[1]) - float(w[0])) for w in rec.get("relevant_windows") or []))


class QueryMetrics:
    """The official per-query metrics (``qd_detr.eval.per_query_metrics``) of a run's predictions, computed
    batch by batch while the model runs (``add``, on the gate bookkeeping thread) instead of all at once
    afterwards. ``rows(lines, records)`` equals ``per_query_metrics(lines, labelled records)``: a query whose
    final line or record is not the one ``add`` saw (e.g. restored by ``--resume``) is computed then."""

    def __init__(self, records):
        self._labelled = {r["qid"]: r for r in records if r.get("relevant_windows")}
        self._seen = {}  # qid -> (line, record, metrics row)

    def add(self, lines):
        """Metrics of the labelled queries among ``lines`` (submission lines of one batch)."""
        lines = [line for line in lines if line.get("qid") in self._labelled]
        if not lines:
            return
        recs = [self._labelled[line["qid"]] for line in lines]
        try:
            rows = per_query_metrics(lines, recs)
        except (DataError, KeyError, TypeError, ValueError):
            return  # not kept: ``rows`` computes these queries again and reports the problem there
        by_qid = {line["qid"]: (line, rec) for line, rec in zip(lines, recs)}
        for row in rows:
            self._seen[row["qid"]] = by_qid[row["qid"]] + (row,)

    def rows(self, lines, records):
        """``per_query_metrics(lines, [r for r in records if r.get("relevant_windows")])``."""
        labelled = [r for r in records if r.get("relevant_windows")]
        preds = {line["qid"]: line for line in lines}
        if not labelled or not lines or len(preds) != len(lines) or len({r["qid"] for r in labelled}) != len(labelled):
            return per_query_metrics(lines, labelled)  # also what reports duplicate qids
        known, missing = {}, []
        for rec in labelled:
            line, seen = preds.get(rec["qid"]), self._seen.get(rec["qid"])
            if line is None:
                continue
            if seen is not None and seen[0] == line and seen[1] == rec:
                known[rec["qid"]] = seen[2]
            else:
                missing.append(rec)
        if missing:
            known.update((row["qid"], row) for row in per_query_metrics([preds[r["qid"]] for r in missing], missing))
        return [known[r["qid"]] for r in labelled if r["qid"] in known]


def performance_table(lines, records, query_stats, contrib_summary=None, metrics=None):
    """``gate_performance.csv`` rows (DataFrame) for the labelled, predicted queries; empty without labels.
    ``metrics``: a ``QueryMetrics`` fed during the run (default: the metrics are computed here)."""
    cols = list(CSV_COLUMNS[PERFORMANCE_FILE])
    labelled = [r for r in records if r.get("relevant_windows")]
    if not labelled:
        return pd.DataFrame(columns=cols)
    metrics = pd.DataFrame(per_query_metrics(lines, labelled) if metrics is None else metrics.rows(lines, labelled))
    info = pd.DataFrame({"qid": [r["qid"] for r in labelled], "duration": [float(r["duration"]) for r in labelled],
                         "window_length": [_window_length(r) for r in labelled]})
    feats = query_gate_features(query_stats, contrib_summary)
    df = feats.merge(metrics, on="qid", how="inner").merge(info, on="qid", how="left")
    order = {q: i for i, q in enumerate(r["qid"] for r in labelled)}
    df["_o"] = df["qid"].map(order)
    df["_l"] = [99999 if l == ALL_LAYERS else int(l) for l in df["layer"]]
    df = df.sort_values(["_o", "_l", "gate"], kind="stable").drop(columns=["_o", "_l"])
    return df[cols].reset_index(drop=True)


def ablation_join(perf, ablation):
    """``gate_performance_ablation.csv``: every row of ``perf`` (query x gate) joined with every intervention's
    per-query effect of ``ablation`` (the ``ablation.csv`` frame), interventions in their run order."""
    cols = list(CSV_COLUMNS[PERFORMANCE_ABLATION_FILE])
    if ablation is None or not len(ablation) or not len(perf):
        return pd.DataFrame(columns=cols)
    effects = ablation[["qid", "intervention", *ABLATION_EFFECTS]]
    order = {name: i for i, name in enumerate(dict.fromkeys(ablation["intervention"]))}
    df = perf[["qid", "vid", "layer", "gate", "name", "gate_mean"]].reset_index().merge(effects, on="qid")
    df["_i"] = df["intervention"].map(order)
    df = df.sort_values(["_i", "index"], kind="stable")
    return df[cols].reset_index(drop=True)


def correlation_table(perf, ablation=None):
    """``gate_performance_correlations.csv`` rows: every gate feature x metric / intervention effect."""
    rows = []
    effects = {}
    if ablation is not None and len(ablation):
        for name, sel in ablation.groupby("intervention", sort=False):
            effects[name] = sel.set_index("qid")
    for (layer, kind), sel in perf.groupby(["layer", "gate"], sort=False):
        for x in FEATURES:
            xs = sel[x].to_numpy(float)
            if not np.isfinite(xs).any():
                continue
            for y in CORRELATED_METRICS:
                rho, p, n = spearman(xs, sel[y].to_numpy(float))
                rows.append((layer, kind, gate_name(layer, kind), x, y, "", "spearman", n, rho, p))
            for name, eff in effects.items():
                for y in ABLATION_EFFECTS:
                    ys = eff[y].reindex(sel["qid"]).to_numpy(float)
                    rho, p, n = spearman(xs, ys)
                    rows.append((layer, kind, gate_name(layer, kind), x, y, name, "spearman", n, rho, p))
    return pd.DataFrame(rows, columns=list(CSV_COLUMNS[PERFORMANCE_CORRELATIONS_FILE]))


# -- failure cases --------------------------------------------------------------------------------
def failure_cases(perf_queries, n, success_iou=SUCCESS_IOU):
    """Pairs (DataFrame, columns of ``gate_failure_pairs.csv``) of the ``n`` worst queries and matched successes.

    ``perf_queries``: one row per query with qid, top1_iou, mr_ap, duration, window_length. Fewer pairs
    are returned when there are not enough successful queries (the unmatched failures are left out)."""
    q = perf_queries.drop_duplicates("qid").reset_index(drop=True)
    if n <= 0:
        raise ConfigError(f"--failure_cases must be positive, got {n}")
    worst = q.sort_values(["top1_iou", "mr_ap", "qid"], kind="stable").head(n)
    pool = q[(q["top1_iou"] >= success_iou) & ~q["qid"].isin(worst["qid"])].sort_values("qid")
    scale = q[["duration", "window_length"]].std(ddof=0).replace(0, 1.0).fillna(1.0).to_numpy(float)
    pf = pool[["duration", "window_length"]].to_numpy(float) / scale
    used = np.zeros(len(pool), dtype=bool)
    rows = []
    for _, f in worst.iterrows():
        if used.all():
            break
        d = np.sqrt((((pf - f[["duration", "window_length"]].to_numpy(float) / scale) ** 2).sum(axis=1)))
        d[used] = np.inf
        j = int(np.argmin(d))  # ties: the first, i.e. the smaller qid
        used[j] = True
        m = pool.iloc[j]
        rows.append({"pair": len(rows), "failure_qid": int(f["qid"]), "failure_top1_iou": f["top1_iou"],
                     "failure_duration": f["duration"], "failure_window_length": f["window_length"],
                     "matched_qid": int(m["qid"]), "matched_top1_iou": m["top1_iou"],
                     "matched_duration": m["duration"], "matched_window_length": m["window_length"],
                     "distance": float(d[j])})
    return pd.DataFrame(rows, columns=list(CSV_COLUMNS[FAILURE_PAIRS_FILE]))


def failure_comparison(pairs, perf):
    """``gate_failure_comparison.csv`` rows: per gate and feature, failures vs their matched successes."""
    rows = []
    for (layer, kind), sel in perf.groupby(["layer", "gate"], sort=False):
        s = sel.drop_duplicates("qid").set_index("qid")
        for feature in ("gate_mean", "contribution_mean"):
            a = s[feature].reindex(pairs["failure_qid"]).to_numpy(float)
            b = s[feature].reindex(pairs["matched_qid"]).to_numpy(float)
            if not np.isfinite(a).any():
                continue
            rows.append((layer, kind, gate_name(layer, kind), feature, len(pairs), float(np.nanmean(a)),
                         float(np.nanmean(b)), float(np.nanmean(a) - np.nanmean(b)), paired_wilcoxon(a, b)))
    return pd.DataFrame(rows, columns=list(CSV_COLUMNS[FAILURE_COMPARISON_FILE]))


# -- subsets --------------------------------------------------------------------------------------
def read_subset(path):
    """Query ids listed in ``path`` (order kept, duplicates dropped): a text file with one qid per line
    (blank lines and ``#`` comments ignored) or a JSONL file whose lines are objects with a ``qid``."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: subset file not found")
    qids = []
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, start=1):
            text = line.strip()
            if text.startswith("{"):  # a JSONL record
                try:
                    value = json.loads(text)
                except ValueError:
                    raise DataError(f"{path}:{i}: not valid JSON") from None
                if not isinstance(value, dict) or "qid" not in value:
                    raise DataError(f"{path}:{i}: JSON line without a 'qid' field")
                value = value["qid"]
            else:  # plain text, '#' starts a comment
                value = text.split("#", 1)[0].strip()
                if not value:
                    continue
            if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str)
                                                                          and value.lstrip("-").isdigit())):
                raise DataError(f"{path}:{i}: expected an integer qid, got {str(value)[:40]!r}")
            qids.append(int(value))
    if not qids:
        raise DataError(f"{path}: the subset file lists no query id")
    return list(dict.fromkeys(qids))


def apply_subset(records, path, mode="restrict"):
    """(records to analyse, subset info dict). ``restrict`` keeps only listed queries; ``split`` keeps all.
    ConfigError when no listed qid is in the data; listed qids absent from the data are counted."""
    if mode not in ("restrict", "split"):
        raise ConfigError(f"--subset_mode must be restrict or split, got {mode!r}")
    qids = read_subset(path)
    present = {r["qid"] for r in records}
    listed = set(qids)
    n_in = len(listed & present)
    if n_in == 0:
        raise ConfigError(f"{path}: none of its {len(qids)} query ids is in the data")
    if mode == "split" and n_in == len(present):
        raise ConfigError(f"{path}: every query of the data is in the subset; nothing to split against")
    info = {"path": os.path.abspath(path), "mode": mode, "n_listed": len(qids), "n_in_data": n_in,
            "n_missing_from_data": len(listed - present)}
    if mode == "restrict":
        records = [r for r in records if r["qid"] in listed]
    return records, info


def subset_comparison(subset_qids, query_features, perf=None, ablation=None, lines=None, records=None):
    """``gate_subset_comparison.csv`` rows: queries in ``subset_qids`` vs the others."""
    inside = set(subset_qids)
    rows = []

    def add(section, layer, kind, statistic, a, b, official=None):
        name = gate_name(layer, kind) if kind else ""
        if official is not None:
            rows.append((section, layer, kind, name, statistic, official[0], official[1],
                         official[0] - official[1], official[2], official[3], np.nan))
            return
        a, b = np.asarray(a, float), np.asarray(b, float)
        rows.append((section, layer, kind, name, statistic, float(np.nanmean(a)) if np.isfinite(a).any() else np.nan,
                     float(np.nanmean(b)) if np.isfinite(b).any() else np.nan,
                     (float(np.nanmean(a)) - float(np.nanmean(b))) if np.isfinite(a).any() and np.isfinite(b).any()
                     else np.nan, int(np.isfinite(a).sum()), int(np.isfinite(b).sum()), mann_whitney(a, b)))

    for (layer, kind), sel in query_features.groupby(["layer", "gate"], sort=False):
        m = sel["qid"].isin(inside)
        add("gates", layer, kind, "gate_mean", sel.loc[m, "gate_mean"], sel.loc[~m, "gate_mean"])
        if sel["contribution_mean"].notna().any():
            add("contributions", layer, kind, "contribution_mean", sel.loc[m, "contribution_mean"],
                sel.loc[~m, "contribution_mean"])
    if perf is not None and len(perf):
        q = perf.drop_duplicates("qid")
        m = q["qid"].isin(inside)
        for metric in METRICS:
            add("metrics", "", "", metric, q.loc[m, metric], q.loc[~m, metric])
    if lines is not None and records is not None:
        groups = {}
        for label, keep in (("in", lambda r: r["qid"] in inside), ("out", lambda r: r["qid"] not in inside)):
            recs = [r for r in records if keep(r)]
            qids = {r["qid"] for r in recs}
            groups[label] = ((evaluate([l for l in lines if l["qid"] in qids], recs) or {}).get("brief") or {},
                             len(recs))
        for key in groups["in"][0]:
            if key in groups["out"][0]:
                add("official", "", "", key, None, None,
                    official=(groups["in"][0][key], groups["out"][0][key], groups["in"][1], groups["out"][1]))
    if ablation is not None and len(ablation):
        for name, sel in ablation.groupby("intervention", sort=False):
            m = sel["qid"].isin(inside)
            for y in ("delta_top1_iou", "delta_mr_ap", "delta_hl_ap_verygood", "saliency_mean_abs_change"):
                add("ablation", "", "", f"{y}[{name}]", sel.loc[m, y], sel.loc[~m, y])
    return pd.DataFrame(rows, columns=list(CSV_COLUMNS[SUBSET_COMPARISON_FILE]))


def write_performance(output_dir, frames):
    """Write ``{file name: DataFrame}`` (names of ``CSV_COLUMNS``) atomically; returns {name: path}."""
    paths = {}
    for name, df in frames.items():
        if name not in CSV_COLUMNS:
            raise KeyError(name)
        if list(df.columns) != list(CSV_COLUMNS[name]):
            raise AssertionError(f"{name}: columns {list(df.columns)} differ from CSV_COLUMNS")
        paths[name] = write_csv(df, os.path.join(output_dir, name), float_format="%.9g")
    return paths


# the figures live in gate_analysis.plots_performance (matplotlib, imported on first use)
_PLOT_NAMES = ("plot_performance", "plot_failure_cases", "plot_subset_comparison")
__all__ += _PLOT_NAMES
__getattr__ = lazy_attributes(__name__, "gate_analysis.plots_performance", _PLOT_NAMES)
