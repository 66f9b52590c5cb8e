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
import warnings

import numpy as np
import pandas as pd
from scipy import stats

from qd_detr.errors import ConfigError, DataError
from qd_detr.eval import per_query_metrics
from qd_detr.inference import evaluate

from .ground_truth import _spearman, _wilcoxon
from .store import GATE_KINDS, atomic_write_csv, gate_name

__all__ = ["performance_table", "correlation_table", "failure_cases", "failure_comparison", "read_subset",
           "apply_subset", "subset_comparison", "query_gate_features", "write_performance", "plot_performance",
           "plot_failure_cases", "plot_subset_comparison", "CSV_COLUMNS", "PLOT_FILES", "METRICS",
           "SUCCESS_IOU"]

#: per-query metrics of ``qd_detr.eval.per_query_metrics`` joined with the gates
METRICS = ("top1_iou", "r1_05", "r1_07", "mr_ap", "mr_ap_05", "mr_ap_075", "hl_hit1_verygood", "hl_ap_verygood")
CORRELATED_METRICS = ("top1_iou", "mr_ap", "hl_ap_verygood", "hl_hit1_verygood")
ABLATION_EFFECTS = ("delta_top1_iou", "delta_mr_ap", "delta_hl_ap_verygood")
FEATURES = ("gate_mean", "gate_std", "contribution_mean")
SUCCESS_IOU = 0.5
ALL = "all"

_ID = {"layer": "Fusion layer index, or 'all' for the mean of the query's per-layer values.",
       "gate": "Gate kind: 'mha' (audio branch), 'ffn' (FFN branch) or 'beta' (v2 FiLM shift).",
       "name": "Dotted gate name 'layers.{layer}.gate_{gate}' ('layers.all.gate_{gate}' for all layers)."}

CSV_COLUMNS = {
    "gate_performance.csv": {
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
        "ablation_intervention": "The reference audio-off intervention whose effect follows ('' without --ablate).",
        "ablation_delta_top1_iou": "Its per-query change in top-1 IoU (ablated - baseline; < 0: audio helped).",
        "ablation_delta_mr_ap": "Its per-query change in MR AP (ablated - baseline, points).",
    },
    "gate_performance_correlations.csv": {
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
    "gate_failure_pairs.csv": {
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
    "gate_failure_comparison.csv": {
        **_ID,
        "feature": "gate_mean or contribution_mean (per query).",
        "n_pairs": "Matched pairs.",
        "mean_failure": "Mean of the feature over the failures.",
        "mean_matched": "Mean over their matched successes.",
        "diff": "mean_failure - mean_matched.",
        "p_value": "Paired Wilcoxon signed-rank test (two-sided; NaN with < 2 non-zero differences).",
    },
    "gate_subset_comparison.csv": {
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
PLOT_FILES = {
    "scatter": "performance_scatter.png",
    "correlations": "performance_correlations.png",
    "failure": "failure_cases.png",
    "subset": "subset_split.png",
}


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
    allrows["layer"] = ALL
    qs["layer"] = qs["layer"].astype(object)
    out = pd.concat([qs, allrows[qs.columns]], ignore_index=True)
    out["name"] = [gate_name(l, k) for l, k in zip(out["layer"], out["gate"])]
    return out


def _window_length(rec):
    return float(sum(max(0.0, float(w[1]) - float(w[0])) for w in rec.get("relevant_windows") or []))


def performance_table(lines, records, query_stats, contrib_summary=None, ablation=None, reference=None):
    """``gate_performance.csv`` rows (DataFrame) for the labelled, predicted queries; empty without labels.

    ``ablation``: the ``ablation.csv`` frame; ``reference``: the intervention name whose effect is joined."""
    cols = list(CSV_COLUMNS["gate_performance.csv"])
    labelled = [r for r in records if r.get("relevant_windows")]
    if not labelled:
        return pd.DataFrame(columns=cols)
    metrics = pd.DataFrame(per_query_metrics(lines, labelled))
    info = pd.DataFrame({"qid": [r["qid"] for r in labelled], "duration": [float(r["duration"]) for r in labelled],
                         "window_length": [_window_length(r) for r in labelled]})
    feats = query_gate_features(query_stats, contrib_summary)
    df = feats.merge(metrics, on="qid", how="inner").merge(info, on="qid", how="left")
    if ablation is not None and reference is not None and len(ablation):
        a = ablation[ablation["intervention"] == reference][["qid", "delta_top1_iou", "delta_mr_ap"]]
        a = a.rename(columns={"delta_top1_iou": "ablation_delta_top1_iou", "delta_mr_ap": "ablation_delta_mr_ap"})
        df = df.merge(a, on="qid", how="left")
        df["ablation_intervention"] = reference
    else:
        df["ablation_intervention"] = ""
        df["ablation_delta_top1_iou"] = np.nan
        df["ablation_delta_mr_ap"] = np.nan
    order = {q: i for i, q in enumerate(r["qid"] for r in labelled)}
    df["_o"] = df["qid"].map(order)
    df["_l"] = [99999 if l == ALL else int(l) for l in df["layer"]]
    df = df.sort_values(["_o", "_l", "gate"], kind="stable").drop(columns=["_o", "_l"])
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
                rho, p, n = _spearman(xs, sel[y].to_numpy(float))
                rows.append((layer, kind, gate_name(layer, kind), x, y, "", "spearman", n, rho, p))
            for name, eff in effects.items():
                for y in ABLATION_EFFECTS:
                    ys = eff[y].reindex(sel["qid"]).to_numpy(float)
                    rho, p, n = _spearman(xs, ys)
                    rows.append((layer, kind, gate_name(layer, kind), x, y, name, "spearman", n, rho, p))
    return pd.DataFrame(rows, columns=list(CSV_COLUMNS["gate_performance_correlations.csv"]))


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
    return pd.DataFrame(rows, columns=list(CSV_COLUMNS["gate_failure_pairs.csv"]))


def _paired_p(a, b):
    d = np.asarray(a, float) - np.asarray(b, float)
    d = d[np.isfinite(d)]
    if np.count_nonzero(d) < 2:
        return float("nan")
    return _wilcoxon(d, 0.0)


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
                         float(np.nanmean(b)), float(np.nanmean(a) - np.nanmean(b)), _paired_p(a, b)))
    return pd.DataFrame(rows, columns=list(CSV_COLUMNS["gate_failure_comparison.csv"]))


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


def _mw(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if a.size < 1 or b.size < 1:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return float(stats.mannwhitneyu(a, b, alternative="two-sided").pvalue)
        except ValueError:
            return float("nan")


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
                     else np.nan, int(np.isfinite(a).sum()), int(np.isfinite(b).sum()), _mw(a, b)))

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
    return pd.DataFrame(rows, columns=list(CSV_COLUMNS["gate_subset_comparison.csv"]))


def write_performance(output_dir, frames):
    """Write ``{file name: DataFrame}`` (names of ``CSV_COLUMNS``) atomically; returns {name: path}."""
    paths = {}
    for name, df in frames.items():
        if name not in CSV_COLUMNS:
            raise KeyError(name)
        if list(df.columns) != list(CSV_COLUMNS[name]):
            raise AssertionError(f"{name}: columns {list(df.columns)} differ from CSV_COLUMNS")
        paths[name] = atomic_write_csv(df, os.path.join(output_dir, name), float_format="%.9g")
    return paths


# -- plots ----------------------------------------------------------------------------------------
def _zoomed_gate_lim(ax, x, sc):
    """x limits around the data (gate values; at least 20% of the range ``sc`` wide, within it + 2.5%)."""
    x = x[np.isfinite(x)]
    width = sc.hi - sc.lo
    if not x.size:
        ax.set_xlim(sc.lo - 0.01 * width, sc.hi + 0.01 * width)
        return
    lo, hi = float(x.min()), float(x.max())
    pad = max(0.2 * width - (hi - lo), 0) / 2 + 0.05 * (hi - lo)
    ax.set_xlim(max(lo - pad, min(lo, sc.lo) - 0.025 * width), min(hi + pad, max(hi, sc.hi) + 0.025 * width))


def plot_performance(perf, corr, output_dir, gate_ranges=None):
    """Scatter of the per-query mean gate (per layer and over all layers) vs top-1 IoU and vs the
    audio-off effect, and the correlation heatmap; returns the written paths. Colours follow each
    gate's declared range (``gate_ranges``; tanh [-1, 1] without)."""
    from . import plots as P
    plt = P.plt
    out = os.path.join(output_dir, "plots")
    os.makedirs(out, exist_ok=True)
    paths = []
    kinds = [k for k in GATE_KINDS if (perf["gate"] == k).any()]
    layers = [l for l in dict.fromkeys(perf["layer"]) if str(l) != ALL] + [ALL]
    ys = [("top1_iou", "top-1 IoU", (-0.03, 1.03))]
    if perf["ablation_delta_top1_iou"].notna().any():
        ys.append(("ablation_delta_top1_iou",
                   f"Δ top-1 IoU under {perf['ablation_intervention'].iloc[0]}\n(< 0: audio helped)", (-1.05, 1.05)))
    rows = [(y, kind) for y in ys for kind in kinds]
    fig, axes = plt.subplots(len(rows), len(layers), figsize=(3.3 * len(layers) + 1, 3.0 * len(rows) + 0.9),
                             layout=P.LAYOUT, squeeze=False, sharey="row")
    for i, ((y, label, ylim), kind) in enumerate(rows):
        for j, layer in enumerate(layers):
            ax = axes[i, j]
            sc = P._scale(None, kind, gate_ranges, layer)
            cmap, norm, _ = P._cmap_norm(sc)
            sel = perf[(perf["gate"] == kind) & (perf["layer"].astype(str) == str(layer))]
            x, yy = sel["gate_mean"].to_numpy(float), sel[y].to_numpy(float)
            ax.scatter(x, yy, c=x, cmap=cmap, norm=norm, s=20, edgecolors="0.3", linewidths=0.4)
            rho, p, n = _spearman(x, yy)
            _zoomed_gate_lim(ax, x, sc)
            if sc.diverging and ax.get_xlim()[0] < sc.centre < ax.get_xlim()[1]:
                ax.axvline(sc.centre, color="0.3", lw=0.7)
            if y.startswith("ablation"):
                ax.axhline(0, color="0.3", lw=0.7)
            ax.set_ylim(*ylim)
            ax.set_xlabel(f"query mean gate ({'mean of layers' if layer == ALL else 'layer ' + str(layer)})",
                          fontsize=8)
            if j == 0:
                ax.set_ylabel(label, fontsize=9)
            ax.set_title(f"{gate_name(layer, kind)}\nrho {rho:+.2f} (p={p:.2g}, n={n})", fontsize=9, loc="left")
    scale = "the fixed [-1, 1] scale" if not gate_ranges or P._all_tanh(gate_ranges) else "its declared range"
    fig.suptitle(f"Per-query gate vs performance (colour: gate on {scale}; x axis zoomed to the data)",
                 fontsize=11)
    paths.append(P._save(fig, os.path.join(out, PLOT_FILES["scatter"])))

    c = corr[(corr["x"] == "gate_mean") & ((corr["intervention"] == "") | (corr["y"] == "delta_mr_ap"))].copy()
    if len(c):
        c["row"] = [y if not iv else f"Δ MR AP [{iv}]" for y, iv in zip(c["y"], c["intervention"])]
        mat = c.pivot_table(index="row", columns="name", values="rho", sort=False)
        mat = mat[[n for n in dict.fromkeys(c["name"]) if n in mat.columns]]  # perf order: mha, ffn, beta
        fig, ax = plt.subplots(figsize=(1.25 * mat.shape[1] + 4.5, 0.38 * mat.shape[0] + 2.4), layout=P.LAYOUT)
        cmap_r = plt.get_cmap("RdBu_r").with_extremes(bad=P.PAD_COLOR)
        im = ax.imshow(mat.to_numpy(float), cmap=cmap_r, vmin=-1, vmax=1, aspect="auto", interpolation="nearest")
        for (r, k), v in np.ndenumerate(mat.to_numpy(float)):
            if np.isfinite(v):
                ax.text(k, r, f"{v:+.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(np.arange(mat.shape[1]), mat.columns, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(np.arange(mat.shape[0]), mat.index, fontsize=8)
        cb = fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02)
        cb.set_label("Spearman rho")
        ax.set_title("Spearman rho of the per-query mean gate with metrics\nand with intervention effects "
                     "(Δ MR AP, ablated − base)", fontsize=10)
        paths.append(P._save(fig, os.path.join(out, PLOT_FILES["correlations"])))
    return paths


def plot_failure_cases(pairs, perf, output_dir, gate_ranges=None):
    """Per layer and gate kind: mean gate of the failures vs their matched successes (paired lines);
    y axis: the kind's declared range (``gate_ranges``)."""
    from . import plots as P
    plt = P.plt
    path = os.path.join(output_dir, "plots", PLOT_FILES["failure"])
    kinds = [k for k in GATE_KINDS if (perf["gate"] == k).any()]
    layers = sorted({int(l) for l in perf["layer"] if str(l) != ALL})
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4.2), layout=P.LAYOUT, squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for layer in layers:
            s = perf[(perf["gate"] == kind) & (perf["layer"].astype(str) == str(layer))].drop_duplicates("qid")
            s = s.set_index("qid")["gate_mean"]
            a, b = s.reindex(pairs["failure_qid"]).to_numpy(float), s.reindex(pairs["matched_qid"]).to_numpy(float)
            for k in range(len(a)):
                ax.plot([layer - 0.15, layer + 0.15], [a[k], b[k]], color="0.75", lw=0.7, zorder=1)
            ax.scatter(np.full(len(a), layer - 0.15), a, color="tab:red", s=14, zorder=2,
                       label="failures" if layer == layers[0] else None)
            ax.scatter(np.full(len(b), layer + 0.15), b, color="tab:blue", s=14, zorder=2,
                       label="matched successes" if layer == layers[0] else None)
        sc = P._scale(None, kind, gate_ranges)
        P._value_lim(ax, sc, perf.loc[perf["gate"] == kind, "gate_mean"])
        P._zero_line(ax, sc, axis="y")
        ax.set_xticks(layers)
        ax.set_xlabel("fusion layer")
        ax.set_ylabel("query mean gate")
        ax.set_title(f"{P._kind_label(kind, sc.rng)}", fontsize=10, loc="left")
        ax.legend(fontsize=8)
    fig.suptitle(f"{len(pairs)} worst queries (top-1 IoU) vs successes matched on duration and window length",
                 fontsize=11)
    return P._save(fig, path)


def plot_subset_comparison(comp, output_dir, label="subset", gate_ranges=None):
    """Per-layer mean gate in vs out of the subset (y axis: the kind's declared range), and the
    per-query metrics of both groups."""
    from . import plots as P
    plt = P.plt
    path = os.path.join(output_dir, "plots", PLOT_FILES["subset"])
    g = comp[(comp["section"] == "gates") & (comp["layer"].astype(str) != ALL)]
    met = comp[comp["section"] == "metrics"]
    kinds = [k for k in GATE_KINDS if (g["gate"] == k).any()]
    fig, axes = plt.subplots(1, len(kinds) + (1 if len(met) else 0), figsize=(5 * (len(kinds) + 1), 4),
                             layout=P.LAYOUT, squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        s = g[g["gate"] == kind]
        x = s["layer"].astype(int).to_numpy()
        ax.plot(x, s["mean_in"], "o-", color="tab:orange", label=f"in {label} (n={int(s['n_in'].max())})")
        ax.plot(x, s["mean_out"], "s--", color="tab:gray", label=f"others (n={int(s['n_out'].max())})")
        sc = P._scale(None, kind, gate_ranges)
        P._value_lim(ax, sc, np.concatenate([s["mean_in"].to_numpy(float), s["mean_out"].to_numpy(float)]))
        P._zero_line(ax, sc, axis="y")
        ax.set_xticks(x)
        ax.set_xlabel("fusion layer")
        ax.set_ylabel("mean of per-query mean gate")
        ax.set_title(P._kind_label(kind, sc.rng), fontsize=10, loc="left")
        ax.legend(fontsize=8)
    if len(met):
        ax = axes[0, -1]
        keep = met[met["statistic"].isin(["top1_iou", "r1_05", "r1_07"])]
        x = np.arange(len(keep))
        ax.bar(x - 0.2, keep["mean_in"], 0.4, color="tab:orange", label=f"in {label}")
        ax.bar(x + 0.2, keep["mean_out"], 0.4, color="tab:gray", label="others")
        ax.set_xticks(x, keep["statistic"])
        ax.set_ylim(0, 1)
        ax.set_ylabel("mean over queries")
        ax.set_title("moment retrieval per group", fontsize=10, loc="left")
        ax.legend(fontsize=8)
    fig.suptitle(f"Queries in the {label} vs the others", fontsize=12)
    return P._save(fig, path)
