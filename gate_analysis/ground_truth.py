"""Gates against the annotations: inside vs outside the relevant windows, and vs saliency scores.

For every labelled query (``relevant_clip_ids`` present) and every layer x gate, with per-clip values
``x_t`` (clipwise: the gate; elementwise: the gate averaged over feature dims; and, when the run
captured them, the effective contributions, which exist per clip for every gating type):

- inside = the query's ``relevant_clip_ids`` (the clips of its relevant windows) below the number of
  valid clips T; outside = the other valid clips;
- ``mean_inside``, ``mean_outside`` and their difference;
- ``auroc_inside``: the probability that a random inside clip has a higher value than a random outside
  clip (ties count 1/2), from mid-ranks (``auroc``); NaN when either side is empty;
- ``spearman_saliency``: Spearman's rho between ``x_t`` and the clip's saliency, the mean of the 3
  annotators' scores (0 for clips outside ``relevant_clip_ids``); NaN when either is constant.

Overall (``gate_ground_truth_overall.csv``) per layer x gate x measure: the same statistics over all
clips pooled (scope ``pooled``), the mean of the per-query values with a Wilcoxon signed-rank p-value
against no effect (difference 0, AUROC 0.5, rho 0; scope ``per_query``), and across queries the
Spearman correlation of the query's mean value with its fraction of relevant clips (scope
``across_queries``). Global gates have one value per query: the within-query comparisons do not
apply (a row with statistic ``not_applicable`` says so) and only ``across_queries`` is given for them.
Queries without labels are left out; without any labelled query nothing is written.
"""
import os
import warnings

import numpy as np
import pandas as pd
from scipy import stats

from .store import GATE_KINDS, PER_CLIP_GATING_TYPES, atomic_write_csv, gate_name

__all__ = ["auroc", "midranks", "clip_labels", "query_ground_truth", "ground_truth_tables",
           "write_ground_truth", "plot_ground_truth", "CSV_COLUMNS", "PLOT_FILES", "MEASURES"]

MEASURES = ("gate", "contribution")
_ID = {"layer": "Fusion layer index (0-based).",
       "gate": "Gate kind: 'mha' (audio branch) or 'ffn' (FFN branch).",
       "name": "Dotted gate name 'layers.{layer}.gate_{gate}'.",
       "measure": "'gate': the gate value per clip (elementwise: mean over dims); 'contribution': the "
                  "effective contribution ||g * branch|| / ||residual|| per clip (runs with --contributions)."}

CSV_COLUMNS = {
    "gate_ground_truth.csv": {
        "qid": "QVHighlights query id (labelled queries only).",
        "vid": "Video id of the query.",
        **_ID,
        "n_clips": "Valid clips T of the query.",
        "n_inside": "Valid clips inside the relevant windows (relevant_clip_ids < T).",
        "fraction_relevant": "n_inside / n_clips.",
        "mean_inside": "Mean value over the inside clips (NaN if none).",
        "mean_outside": "Mean value over the outside clips (NaN if none).",
        "diff_inside_minus_outside": "mean_inside - mean_outside.",
        "auroc_inside": "Rank AUROC of the value separating inside from outside clips (ties count 1/2; "
                        "0.5 = no separation; NaN when a side is empty).",
        "spearman_saliency": "Spearman rho between the value and the mean annotator saliency per clip (0 outside "
                             "relevant clips); NaN when either is constant.",
        "spearman_p_value": "Two-sided p-value of spearman_saliency (scipy.stats.spearmanr).",
    },
    "gate_ground_truth_overall.csv": {
        **_ID,
        "scope": "'pooled': all labelled clips of all queries together; 'per_query': mean of the per-query "
                 "values; 'across_queries': one value per query (its mean) against a per-query label; "
                 "'within_query': only for the not_applicable note of global gates.",
        "statistic": "mean_inside, mean_outside, diff_inside_minus_outside, auroc_inside, spearman_saliency, "
                     "spearman_fraction_relevant (across_queries: query mean vs fraction of relevant clips), "
                     "or not_applicable.",
        "value": "The statistic's value.",
        "n": "Clips (pooled) or queries (per_query, across_queries) it is computed over.",
        "p_value": "pooled/across_queries Spearman: its p-value; per_query: Wilcoxon signed-rank test of the "
                   "per-query values against 0 (difference, rho) or 0.5 (AUROC); empty otherwise.",
        "note": "Explanation where a comparison does not apply.",
    },
}
PLOT_FILES = {
    "distributions": "ground_truth_auroc_spearman.png",
    "inside_outside": "ground_truth_inside_outside.png",
    "across_queries": "ground_truth_across_queries.png",
    "examples": "ground_truth_examples.png",
}
GLOBAL_NOTE = ("global gating: one gate per query, so inside/outside windows and per-clip saliency do not apply "
               "to the gate itself (see across_queries, and the per-clip contributions with --contributions)")


def midranks(x):
    """1-based ranks of ``x`` with ties given the mean of the ranks they span (as scipy's 'average')."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    n = xs.size
    ranks = np.empty(n, dtype=np.float64)
    if n == 0:
        return ranks
    starts = np.flatnonzero(np.concatenate([[True], xs[1:] != xs[:-1]]))
    ends = np.concatenate([starts[1:], [n]])
    avg = (starts + 1 + ends) / 2.0  # mean of ranks start+1 .. end
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def auroc(scores, labels):
    """Rank-based AUROC: P(score of a positive > score of a negative) + 0.5 P(tie).

    ``labels`` are booleans (True = positive). Equals the Mann-Whitney U of the positives divided by
    n_pos * n_neg. NaN when a class is empty or a score is NaN."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=bool).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.shape} vs {y.shape}")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0 or np.isnan(s).any():
        return float("nan")
    r = midranks(s)
    u = r[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def clip_labels(record, n_clips):
    """(inside bool (T,), saliency float64 (T,)) of a labelled record; saliency = mean of the annotators'
    scores on relevant clips, 0 elsewhere (NaN everywhere when the record has no saliency_scores)."""
    inside = np.zeros(n_clips, dtype=bool)
    ids = list(record.get("relevant_clip_ids") or [])
    scores = record.get("saliency_scores")
    sal = np.zeros(n_clips) if scores else np.full(n_clips, np.nan)
    for k, cid in enumerate(ids):
        cid = int(cid)
        if 0 <= cid < n_clips:
            inside[cid] = True
            if scores:
                sal[cid] = float(np.mean(scores[k]))
    return inside, sal


def _spearman(x, y):
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), float("nan"), int(x.size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = stats.spearmanr(x, y)
    return float(res.statistic), float(res.pvalue), int(x.size)


def query_ground_truth(values, inside, saliency):
    """Statistics of one query's per-clip ``values`` (T,) against its labels (a dict)."""
    v = np.asarray(values, dtype=np.float64)
    n_in = int(inside.sum())
    rho, p, _ = _spearman(v, saliency)
    m_in = float(v[inside].mean()) if n_in else float("nan")
    m_out = float(v[~inside].mean()) if n_in < v.size else float("nan")
    return {"n_clips": int(v.size), "n_inside": n_in, "fraction_relevant": n_in / v.size if v.size else np.nan,
            "mean_inside": m_in, "mean_outside": m_out, "diff_inside_minus_outside": m_in - m_out,
            "auroc_inside": auroc(v, inside), "spearman_saliency": rho, "spearman_p_value": p}


def _per_clip(arr):
    a = np.asarray(arr, dtype=np.float64)
    return a.mean(axis=1) if a.ndim == 2 else a.reshape(-1)


def _contribution_arrays(contrib):
    """{qid: {(layer, kind): (T,) array ordered by clip}} from a gate_contributions DataFrame."""
    out = {}
    c = contrib.sort_values(["qid", "layer", "gate", "clip"], kind="stable")
    for (qid, layer, kind), sel in c.groupby(["qid", "layer", "gate"], sort=False):
        out.setdefault(int(qid), {})[(int(layer), str(kind))] = sel["contribution"].to_numpy(np.float64)
    return out


def _wilcoxon(values, center):
    d = np.asarray(values, dtype=np.float64)
    d = d[np.isfinite(d)] - center
    if d.size < 2 or np.all(d == 0):
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return float(stats.wilcoxon(d).pvalue)
        except ValueError:
            return float("nan")


def ground_truth_tables(records, gate_run=None, contributions=None):
    """(per-query DataFrame, overall DataFrame) with the columns of ``CSV_COLUMNS``.

    ``records``: JSONL records (labelled ones are used); ``gate_run``: a GateRun (or None);
    ``contributions``: a ``gate_contributions.csv`` DataFrame (or None)."""
    labelled = {r["qid"]: r for r in records if r.get("relevant_clip_ids")}
    sources = {}
    gating_type = getattr(gate_run, "gating_type", None)
    layers = list(getattr(gate_run, "layers", []))
    kinds = tuple(getattr(gate_run, "kinds", GATE_KINDS))
    if gate_run is not None:
        sources["gate"] = gate_run
    if contributions is not None and len(contributions):
        sources["contribution"] = _contribution_arrays(contributions)
        if not layers:
            layers = sorted(int(l) for l in contributions["layer"].unique())
    rows, query_means = [], []
    for measure, src in sources.items():
        qids = [q for q in (src.qids if measure == "gate" else list(src)) if q in labelled]
        for qid in qids:
            arrays = src.gates(qid) if measure == "gate" else src[qid]
            for (layer, kind), arr in arrays.items():
                vals = _per_clip(arr)
                rec = labelled[qid]
                if measure == "gate" and gating_type not in PER_CLIP_GATING_TYPES:
                    n = gate_run.n_clips.get(qid, -1)
                    inside, _ = clip_labels(rec, n) if n > 0 else (np.zeros(0, bool), None)
                    frac = inside.mean() if inside.size else np.nan
                    query_means.append((measure, layer, kind, qid, float(vals.mean()), frac))
                    continue
                inside, sal = clip_labels(rec, vals.size)
                row = {"qid": qid, "vid": str(rec.get("vid", "")), "layer": layer, "gate": kind,
                       "name": gate_name(layer, kind), "measure": measure, **query_ground_truth(vals, inside, sal)}
                rows.append(row)
                query_means.append((measure, layer, kind, qid, float(vals.mean()), row["fraction_relevant"]))
    per_query = pd.DataFrame(rows, columns=list(CSV_COLUMNS["gate_ground_truth.csv"]))

    overall = []

    def add(measure, layer, kind, scope, statistic, value, n, p=np.nan, note=""):
        overall.append({"layer": layer, "gate": kind, "name": gate_name(layer, kind), "measure": measure,
                        "scope": scope, "statistic": statistic, "value": value, "n": n, "p_value": p, "note": note})

    for measure, src in sources.items():
        for layer in layers:
            for kind in kinds:
                if measure == "gate" and gating_type not in PER_CLIP_GATING_TYPES:
                    add(measure, layer, kind, "within_query", "not_applicable", np.nan, 0, note=GLOBAL_NOTE)
                else:
                    _pooled_rows(add, measure, layer, kind, src, labelled, gate_run if measure == "gate" else None)
                    sel = per_query[(per_query["measure"] == measure) & (per_query["layer"] == layer)
                                    & (per_query["gate"] == kind)]
                    for stat, center in (("diff_inside_minus_outside", 0.0), ("auroc_inside", 0.5),
                                         ("spearman_saliency", 0.0)):
                        v = sel[stat].to_numpy(float)
                        ok = np.isfinite(v)
                        add(measure, layer, kind, "per_query", stat, float(v[ok].mean()) if ok.any() else np.nan,
                            int(ok.sum()), _wilcoxon(v, center))
                qm = [(m, f) for (ms, l, k, _, m, f) in query_means if ms == measure and l == layer and k == kind]
                if qm:
                    rho, p, n = _spearman([m for m, _ in qm], [f for _, f in qm])
                    add(measure, layer, kind, "across_queries", "spearman_fraction_relevant", rho, n, p)
    overall = pd.DataFrame(overall, columns=list(CSV_COLUMNS["gate_ground_truth_overall.csv"]))
    return per_query, overall


def _pooled_rows(add, measure, layer, kind, src, labelled, gate_run):
    vals, ins, sals = [], [], []
    qids = src.qids if gate_run is not None else list(src)
    for qid in qids:
        if qid not in labelled:
            continue
        arr = gate_run.gate(qid, layer, kind) if gate_run is not None else src[qid].get((layer, kind))
        if arr is None:
            continue
        v = _per_clip(arr)
        inside, sal = clip_labels(labelled[qid], v.size)
        vals.append(v)
        ins.append(inside)
        sals.append(sal)
    if not vals:
        return
    v, inside, sal = np.concatenate(vals), np.concatenate(ins), np.concatenate(sals)
    n_in = int(inside.sum())
    m_in = float(v[inside].mean()) if n_in else np.nan
    m_out = float(v[~inside].mean()) if n_in < v.size else np.nan
    add(measure, layer, kind, "pooled", "mean_inside", m_in, n_in)
    add(measure, layer, kind, "pooled", "mean_outside", m_out, int(v.size - n_in))
    add(measure, layer, kind, "pooled", "diff_inside_minus_outside", m_in - m_out, int(v.size))
    add(measure, layer, kind, "pooled", "auroc_inside", auroc(v, inside), int(v.size))
    rho, p, n = _spearman(v, sal)
    add(measure, layer, kind, "pooled", "spearman_saliency", rho, n, p)


def write_ground_truth(records, output_dir, gate_run=None, contributions=None):
    """Write both CSVs into ``output_dir``; returns ``(per_query, overall, {key: path})``, or
    ``(None, None, {})`` when no record is labelled."""
    if not any(r.get("relevant_clip_ids") for r in records):
        return None, None, {}
    per_query, overall = ground_truth_tables(records, gate_run, contributions)
    paths = {}
    for key, df in (("per_query", per_query), ("overall", overall)):
        name = list(CSV_COLUMNS)[0 if key == "per_query" else 1]
        paths[key] = atomic_write_csv(df, os.path.join(output_dir, name), float_format="%.9g")
    return per_query, overall, paths


# -- plots ----------------------------------------------------------------------------------------
def plot_ground_truth(per_query, overall, output_dir, records=None, gate_run=None, contributions=None,
                      n_examples=4):
    """Figures of ``PLOT_FILES`` (those that apply); returns the written paths."""
    from . import plots as P
    plt = P.plt
    out = os.path.join(output_dir, "plots")
    os.makedirs(out, exist_ok=True)
    paths = []
    measures = [m for m in MEASURES if len(per_query) and (per_query["measure"] == m).any()]
    if measures:
        paths.append(_plot_distributions(P, plt, per_query, measures, os.path.join(out, PLOT_FILES["distributions"])))
        paths.append(_plot_inside_outside(P, plt, per_query, measures, os.path.join(out, PLOT_FILES["inside_outside"])))
    if records is not None and (gate_run is not None or contributions is not None):
        paths.append(_plot_across_queries(P, plt, records, gate_run, contributions,
                                          os.path.join(out, PLOT_FILES["across_queries"])))
    if records is not None and gate_run is not None and gate_run.gating_type in PER_CLIP_GATING_TYPES:
        p = _plot_examples(P, plt, records, gate_run, n_examples, os.path.join(out, PLOT_FILES["examples"]))
        if p:
            paths.append(p)
    return paths


def _layer_color(i):
    return ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive",
            "tab:cyan")[i % 8]


def _positions(per_query):
    keys = sorted({(int(l), k) for l, k in zip(per_query["layer"], per_query["gate"])},
                  key=lambda t: (t[0], GATE_KINDS.index(t[1]) if t[1] in GATE_KINDS else 9))
    return keys


def _plot_distributions(P, plt, per_query, measures, path):
    keys = _positions(per_query)
    fig, axes = plt.subplots(len(measures), 2, figsize=(max(8, 0.9 * len(keys) + 5), 3.4 * len(measures) + 0.9),
                             layout=P.LAYOUT, squeeze=False)
    for i, measure in enumerate(measures):
        pq = per_query[per_query["measure"] == measure]
        for j, (stat, ref, lim, label) in enumerate((("auroc_inside", 0.5, (0, 1), "AUROC inside vs outside"),
                                                     ("spearman_saliency", 0.0, (-1, 1), "Spearman rho with saliency"))):
            ax = axes[i, j]
            data, pos, colors = [], [], []
            for x, (layer, kind) in enumerate(keys):
                v = pq[(pq["layer"] == layer) & (pq["gate"] == kind)][stat].to_numpy(float)
                v = v[np.isfinite(v)]
                data.append(v)
                pos.append(x)
                colors.append(P.KIND_COLOR.get(kind, "tab:gray"))
            ok = [k for k, d in enumerate(data) if d.size]
            if ok:
                bp = ax.boxplot([data[k] for k in ok], positions=[pos[k] for k in ok], widths=0.6, patch_artist=True,
                                showfliers=False)
                for k, box in zip(ok, bp["boxes"]):
                    box.set_facecolor(colors[k])
                    box.set_alpha(0.45)
                for k in ok:
                    jitter = (np.random.default_rng(k).random(data[k].size) - 0.5) * 0.3
                    ax.scatter(pos[k] + jitter, data[k], s=8, color="k", alpha=0.5, zorder=3)
            ax.axhline(ref, color="0.3", lw=0.8, ls="--")
            ax.set_ylim(lim[0] - 0.03, lim[1] + 0.03)
            ax.set_xticks(pos, [gate_name(l, k) for l, k in keys], rotation=35, ha="right", fontsize=8)
            ax.set_ylabel(f"per-query {label}")
            ax.set_title(f"{measure}: {label} (dashed: no relation)", fontsize=10, loc="left")
    fig.suptitle("Do gates follow the annotations? One point per labelled query", fontsize=12)
    return P._save(fig, path)


def _plot_inside_outside(P, plt, per_query, measures, path):
    keys = _positions(per_query)
    layers = sorted({l for l, _ in keys})
    kinds = [k for k in GATE_KINDS if any(kk == k for _, kk in keys)]
    fig, axes = plt.subplots(len(measures) * len(kinds), len(layers),
                             figsize=(3.2 * len(layers) + 1, 3.1 * len(measures) * len(kinds) + 0.8),
                             layout=P.LAYOUT, squeeze=False)
    r = 0
    for measure in measures:
        pq = per_query[per_query["measure"] == measure]
        for kind in kinds:
            for j, layer in enumerate(layers):
                ax = axes[r, j]
                sel = pq[(pq["layer"] == layer) & (pq["gate"] == kind)]
                x, y = sel["mean_outside"].to_numpy(float), sel["mean_inside"].to_numpy(float)
                ax.scatter(x, y, s=12, color=P.KIND_COLOR.get(kind, "tab:gray"), alpha=0.7)
                if measure == "gate":
                    lo, hi = -1.02, 1.02
                else:
                    both = np.concatenate([x, y])
                    both = both[np.isfinite(both)]
                    lo, hi = 0.0, (float(both.max()) * 1.05 if both.size else 1.0) or 1.0
                ax.plot([lo, hi], [lo, hi], color="0.4", lw=0.8, ls="--")
                ax.set_xlim(lo, hi)
                ax.set_ylim(lo, hi)
                ax.set_aspect("equal", adjustable="box")
                above = int(np.sum(y > x))
                ax.set_title(f"{measure} {gate_name(layer, kind)}\n{above}/{len(sel)} queries higher inside",
                             fontsize=9, loc="left")
                ax.set_xlabel("mean outside windows")
                if j == 0:
                    ax.set_ylabel("mean inside windows")
            r += 1
    fig.suptitle("Per-query mean inside vs outside the relevant windows (above the diagonal: higher inside)",
                 fontsize=11)
    return P._save(fig, path)


def _plot_across_queries(P, plt, records, gate_run, contributions, path):
    labelled = {r["qid"]: r for r in records if r.get("relevant_clip_ids")}
    rows = []
    if gate_run is not None:
        for qid in gate_run.qids:
            if qid not in labelled:
                continue
            n = gate_run.n_clips.get(qid, -1)
            for (layer, kind), arr in gate_run.gates(qid).items():
                v = _per_clip(arr)
                t = v.size if gate_run.gating_type in PER_CLIP_GATING_TYPES else n
                if t <= 0:
                    continue
                inside, _ = clip_labels(labelled[qid], t)
                rows.append(("gate", layer, kind, float(v.mean()), float(inside.mean())))
    if contributions is not None and len(contributions):
        for (qid, layer, kind), sel in contributions.groupby(["qid", "layer", "gate"], sort=False):
            if int(qid) in labelled:
                inside, _ = clip_labels(labelled[int(qid)], len(sel))
                rows.append(("contribution", int(layer), kind, float(sel["contribution"].mean()),
                             float(inside.mean())))
    df = pd.DataFrame(rows, columns=["measure", "layer", "gate", "mean", "frac"])
    measures = [m for m in MEASURES if (df["measure"] == m).any()]
    kinds = [k for k in GATE_KINDS if (df["gate"] == k).any()]
    fig, axes = plt.subplots(max(len(measures), 1), max(len(kinds), 1),
                             figsize=(5 * max(len(kinds), 1) + 1, 3.6 * max(len(measures), 1) + 0.6),
                             layout=P.LAYOUT, squeeze=False)
    layers = sorted(df["layer"].unique()) if len(df) else []
    for i, measure in enumerate(measures):
        for j, kind in enumerate(kinds):
            ax = axes[i, j]
            for c, layer in enumerate(layers):
                sel = df[(df["measure"] == measure) & (df["gate"] == kind) & (df["layer"] == layer)]
                rho, _, n = _spearman(sel["frac"], sel["mean"])
                ax.scatter(sel["frac"], sel["mean"], s=14, alpha=0.75, color=_layer_color(c),
                           label=f"layer {layer} (rho {rho:+.2f}, n={n})")
            if measure == "gate":
                P._value_lim(ax, (-1.0, 1.0), df.loc[df["measure"] == "gate", "mean"])
                ax.axhline(0, color="0.3", lw=0.8)
            ax.set_xlabel("fraction of the video's clips that are relevant")
            ax.set_ylabel(f"query mean {measure}")
            ax.set_title(f"{measure}: {P.KIND_LABEL.get(kind, kind)}", fontsize=10, loc="left")
            ax.legend(fontsize=7)
    fig.suptitle("Across queries: mean gate / contribution vs how much of the video is relevant", fontsize=11)
    return P._save(fig, path)


def _plot_examples(P, plt, records, gate_run, n_examples, path):
    labelled = {r["qid"]: r for r in records if r.get("relevant_clip_ids")}
    candidates = [q for q in gate_run.qids if q in labelled]
    if not candidates:
        return None
    chosen = [candidates[i] for i in P._subsample(len(candidates), n_examples)]
    kinds = list(gate_run.kinds)
    fig, axes = plt.subplots(len(chosen), len(kinds), figsize=(6.2 * len(kinds), 2.5 * len(chosen) + 0.8),
                             layout=P.LAYOUT, squeeze=False)
    for i, qid in enumerate(chosen):
        gates = gate_run.gates(qid)
        for j, kind in enumerate(kinds):
            ax = axes[i, j]
            t = None
            for c, layer in enumerate(gate_run.layers):
                v = _per_clip(gates[(layer, kind)])
                t = v.size
                ax.plot(np.arange(t), v, color=_layer_color(c), lw=1.2,
                        label=f"layer {layer}")
            inside, sal = clip_labels(labelled[qid], t)
            edges = np.diff(np.concatenate([[0], inside.astype(np.int8), [0]]))
            starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)  # runs of relevant clips
            ax.broken_barh([(a - 0.5, b - a) for a, b in zip(starts, ends)], (-1.05, 2.1), color="0.85", lw=0,
                           zorder=0)
            ax.set_ylim(-1.05, 1.05)
            ax.axhline(0, color="0.3", lw=0.6)
            ax.set_xlim(-0.5, t - 0.5)
            tw = ax.twinx()
            tw.plot(np.arange(t), sal, color="tab:red", lw=0.9, ls=":", label="saliency")
            tw.set_ylim(0, 4.2)
            tw.set_ylabel("saliency (mean of 3)", fontsize=8, color="tab:red")
            ax.set_title(f"qid {qid}: {gate_name('*', kind)} (grey: relevant clips)", fontsize=9, loc="left")
            ax.set_ylabel("gate")
            if i == len(chosen) - 1:
                ax.set_xlabel("clip (2 s)")
            if i == 0 and j == 0:
                ax.legend(fontsize=7, loc="lower left", ncol=2)
    fig.suptitle("Gates along the video, relevant clips shaded grey, saliency dotted red", fontsize=11)
    return P._save(fig, path)
