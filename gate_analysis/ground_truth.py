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
clips pooled (scope ``pooled``; per-clip values rounded to float32, as the gates are stored), the mean of the per-query values with a Wilcoxon signed-rank p-value
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

from .ranges import DEFAULT_KINDS
from .store import GATE_KINDS, PER_CLIP_GATING_TYPES, atomic_write_csv, gate_name

__all__ = ["auroc", "midranks", "clip_labels", "query_ground_truth", "ground_truth_tables",
           "write_ground_truth", "plot_ground_truth", "plot_examples", "GroundTruthAccumulator", "CSV_COLUMNS",
           "PLOT_FILES", "MEASURES"]

MEASURES = ("gate", "contribution")
_ID = {"layer": "Fusion layer index (0-based).",
       "gate": "Gate kind: 'mha' (audio branch), 'ffn' (FFN branch) or 'beta' (v2 FiLM shift).",
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
_ROW_STATS = ("n_clips", "n_inside", "fraction_relevant", "mean_inside", "mean_outside", "diff_inside_minus_outside",
              "auroc_inside", "spearman_saliency", "spearman_p_value")
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


def _spearman_rows(x, y, x_ranks=None):
    """Spearman rho and two-sided p-value of each row of ``x`` [G, T] against ``y`` [T], computed as
    ``scipy.stats.spearmanr`` does (Pearson correlation of average ranks, Student t with T - 2 dof);
    NaN where a row or ``y`` is constant or T < 3. Rows with non-finite values go through ``_spearman``.
    ``x_ranks``: ``rankdata(x, axis=1)`` when already computed."""
    g, t = x.shape
    rho, p = np.full(g, np.nan), np.full(g, np.nan)
    finite = np.isfinite(x).all(axis=1) & bool(np.isfinite(y).all())
    for i in np.flatnonzero(~finite):
        rho[i], p[i], _ = _spearman(x[i], y)
    ok = finite & (np.ptp(x, axis=1) > 0) & (t >= 3) & (np.ptp(y) > 0 if t else False)
    if ok.any():
        rx = (stats.rankdata(x, axis=1) if x_ranks is None else x_ranks)[ok]
        rx = rx - rx.mean(axis=1, keepdims=True)
        ry = stats.rankdata(y)
        ry -= ry.mean()
        r = np.clip((rx @ ry) / np.sqrt((rx * rx).sum(axis=1) * (ry @ ry)), -1.0, 1.0)
        with np.errstate(divide="ignore"):
            tt = r * np.sqrt((t - 2) / ((r + 1.0) * (1.0 - r))).clip(0)
        rho[ok], p[ok] = r, np.minimum(2 * stats.t.sf(np.abs(tt), t - 2), 1.0)
    return rho, p


def _query_rows(vals, inside, saliency):
    """Per-query statistics (columns ``_ROW_STATS``) of each row of ``vals`` [G, T] against one query's
    labels: ``inside`` bool [T] and ``saliency`` [T]."""
    g, t = vals.shape
    n_in = int(inside.sum())
    out = np.full((g, len(_ROW_STATS)), np.nan)
    out[:, 0], out[:, 1] = t, n_in
    out[:, 2] = n_in / t if t else np.nan
    if n_in:
        out[:, 3] = vals[:, inside].mean(axis=1)
    if n_in < t:
        out[:, 4] = vals[:, ~inside].mean(axis=1)
    out[:, 5] = out[:, 3] - out[:, 4]
    ranks = stats.rankdata(vals, axis=1) if t else None  # average ranks of ties, as ``midranks``
    if 0 < n_in < t:
        u = ranks[:, inside].sum(axis=1) - n_in * (n_in + 1) / 2.0
        out[:, 6] = np.where(np.isnan(vals).any(axis=1), np.nan, u / (n_in * (t - n_in)))
    out[:, 7], out[:, 8] = _spearman_rows(vals, saliency, ranks)
    return out


def query_ground_truth(values, inside, saliency):
    """Statistics of one query's per-clip ``values`` (T,) against its labels (a dict)."""
    row = _query_rows(np.asarray(values, dtype=np.float64).reshape(1, -1), inside, saliency)[0]
    out = dict(zip(_ROW_STATS, row.tolist()))
    out["n_clips"], out["n_inside"] = int(out["n_clips"]), int(out["n_inside"])
    return out


def _per_clip(arr):
    """Per-clip float64 values: elementwise (T, D) gates averaged over D (float64 sums), else as they are."""
    a = np.asarray(arr)
    return a.mean(axis=1, dtype=np.float64) if a.ndim == 2 else a.astype(np.float64).reshape(-1)


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


class GroundTruthAccumulator:
    """Ground-truth statistics streamed query by query: ``add`` each query's gates (or contributions),
    then ``tables()`` / ``write()``. Kept per query: its statistics and its per-clip values, rounded to
    float32, for the pooled statistics (about 3 KB per query with 4 fusion layers and 75 clips).
    Per-query statistics use the float64 per-clip values.

    ``records``: JSONL records (only labelled ones are used); ``gating_type``, ``layers``, ``kinds``:
    those of the gate run (layers and kinds default to the keys of the first query added)."""

    def __init__(self, records, gating_type=None, layers=(), kinds=DEFAULT_KINDS):
        self.labelled = {r["qid"]: r for r in records if r.get("relevant_clip_ids")}
        self.gating_type = gating_type
        self.layers, self.kinds = list(layers), tuple(kinds)
        self._m = {}  # measure -> per-query lists

    def wants(self, qid):
        return qid in self.labelled

    def _per_clip_measure(self, measure):
        return measure == "contribution" or self.gating_type in PER_CLIP_GATING_TYPES

    def add(self, measure, qid, arrays, n_clips=None):
        """Add one query: ``arrays`` {(layer, kind): array} of gates (any layout) or per-clip contributions.
        ``n_clips``: the query's valid clips (only needed for global gates). Unlabelled queries are ignored."""
        rec = self.labelled.get(qid)
        if rec is None:
            return
        st = self._m.get(measure)
        if st is None:
            if not self.layers:
                self.layers = sorted({layer for layer, _ in arrays})
            kind_order = {k: i for i, k in enumerate(self.kinds)}
            keys = sorted(arrays, key=lambda key: (key[0], kind_order.get(key[1], len(kind_order)), str(key[1])))
            st = self._m[measure] = {"keys": keys, "qids": [], "vals": [], "rows": [], "means": [], "fracs": []}
        try:
            raw = [arrays[key] for key in st["keys"]]
        except KeyError as exc:
            raise ValueError(f"qid {qid}: {measure} of {exc.args[0]} missing (other queries have it)") from None
        vals = np.stack([_per_clip(a) for a in raw])  # [G, T] float64 (global: [G, 1])
        st["qids"].append(qid)
        st["means"].append(vals.mean(axis=1))
        if not self._per_clip_measure(measure):
            n = -1 if n_clips is None else int(n_clips)
            inside, _ = clip_labels(rec, n) if n > 0 else (np.zeros(0, bool), None)
            st["fracs"].append(inside.mean() if inside.size else np.nan)
            return
        rows = _query_rows(vals, *clip_labels(rec, vals.shape[1]))
        st["rows"].append(rows)
        st["fracs"].append(rows[0, 2])
        st["vals"].append(vals.astype(np.float32))  # for the pooled statistics; float32 halves the memory

    def add_contributions(self, contributions):
        """Add a ``gate_contributions.csv`` DataFrame (measure ``contribution``)."""
        if contributions is not None and len(contributions):
            for qid, arrays in _contribution_arrays(contributions).items():
                self.add("contribution", qid, arrays)

    def _measures(self):
        return [m for m in MEASURES if m in self._m] + [m for m in self._m if m not in MEASURES]

    def across_queries(self):
        """One row per measure x query x gate: the query's mean value and its fraction of relevant clips."""
        frames = []
        for measure in self._measures():
            st = self._m[measure]
            g = len(st["keys"])
            frames.append(pd.DataFrame({
                "measure": measure, "qid": np.repeat(st["qids"], g),
                "layer": [layer for layer, _ in st["keys"]] * len(st["qids"]),
                "gate": [kind for _, kind in st["keys"]] * len(st["qids"]),
                "mean": np.asarray(st["means"], dtype=np.float64).reshape(-1),
                "frac": np.repeat(np.asarray(st["fracs"], dtype=np.float64), g)}))
        return pd.concat(frames, ignore_index=True) if frames else \
            pd.DataFrame(columns=["measure", "qid", "layer", "gate", "mean", "frac"])

    def per_query_table(self):
        cols = list(CSV_COLUMNS["gate_ground_truth.csv"])
        frames = []
        for measure in self._measures():
            st = self._m[measure]
            if not st["rows"]:
                continue
            keys, nq = st["keys"], len(st["qids"])
            stats_ = np.concatenate(st["rows"])
            df = pd.DataFrame({
                "qid": np.repeat(st["qids"], len(keys)),
                "vid": np.repeat([str(self.labelled[q].get("vid", "")) for q in st["qids"]], len(keys)),
                "layer": [layer for layer, _ in keys] * nq, "gate": [kind for _, kind in keys] * nq,
                "name": [gate_name(layer, kind) for layer, kind in keys] * nq, "measure": measure,
                **{k: stats_[:, i] for i, k in enumerate(_ROW_STATS)}})
            frames.append(df.astype({"n_clips": np.int64, "n_inside": np.int64}))
        return pd.concat(frames, ignore_index=True)[cols] if frames else pd.DataFrame(columns=cols)

    def tables(self):
        """(per-query DataFrame, overall DataFrame) with the columns of ``CSV_COLUMNS``."""
        per_query = self.per_query_table()
        across = self.across_queries()
        overall = []

        def add(measure, layer, kind, scope, statistic, value, n, p=np.nan, note=""):
            overall.append({"layer": layer, "gate": kind, "name": gate_name(layer, kind), "measure": measure,
                            "scope": scope, "statistic": statistic, "value": value, "n": n, "p_value": p,
                            "note": note})

        for measure in self._measures():
            st = self._m[measure]
            labels = None
            for layer in self.layers:
                for kind in self.kinds:
                    if (layer, kind) not in st["keys"]:
                        continue
                    if not self._per_clip_measure(measure):
                        add(measure, layer, kind, "within_query", "not_applicable", np.nan, 0, note=GLOBAL_NOTE)
                    elif st["vals"]:
                        if labels is None:  # pooled clip labels, rebuilt from the records
                            parts = [clip_labels(self.labelled[q], v.shape[1]) for q, v in zip(st["qids"], st["vals"])]
                            labels = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
                        g = st["keys"].index((layer, kind))
                        v = np.concatenate([a[g] for a in st["vals"]]).astype(np.float64)
                        _pooled_rows(add, measure, layer, kind, v, *labels)
                        sel = per_query[(per_query["measure"] == measure) & (per_query["layer"] == layer)
                                        & (per_query["gate"] == kind)]
                        for stat, center in (("diff_inside_minus_outside", 0.0), ("auroc_inside", 0.5),
                                             ("spearman_saliency", 0.0)):
                            x = sel[stat].to_numpy(float)
                            ok = np.isfinite(x)
                            add(measure, layer, kind, "per_query", stat, float(x[ok].mean()) if ok.any() else np.nan,
                                int(ok.sum()), _wilcoxon(x, center))
                    qm = across[(across["measure"] == measure) & (across["layer"] == layer) & (across["gate"] == kind)]
                    if len(qm):
                        rho, p, n = _spearman(qm["mean"], qm["frac"])
                        add(measure, layer, kind, "across_queries", "spearman_fraction_relevant", rho, n, p)
        overall = pd.DataFrame(overall, columns=list(CSV_COLUMNS["gate_ground_truth_overall.csv"]))
        return per_query, overall

    def write(self, output_dir):
        """Write both CSVs; returns ``(per_query, overall, {key: path})``, or ``(None, None, {})`` when
        no record is labelled."""
        if not self.labelled:
            return None, None, {}
        per_query, overall = self.tables()
        paths = {}
        for key, df in (("per_query", per_query), ("overall", overall)):
            name = list(CSV_COLUMNS)[0 if key == "per_query" else 1]
            paths[key] = atomic_write_csv(df, os.path.join(output_dir, name), float_format="%.9g")
        return per_query, overall, paths


def _accumulate(records, gate_run=None, contributions=None):
    acc = GroundTruthAccumulator(records, getattr(gate_run, "gating_type", None),
                                 getattr(gate_run, "layers", ()), tuple(getattr(gate_run, "kinds", DEFAULT_KINDS)))
    if gate_run is not None:
        for qid in gate_run.qids:
            if acc.wants(qid):
                acc.add("gate", qid, gate_run.gates(qid), n_clips=gate_run.n_clips.get(qid, -1))
    acc.add_contributions(contributions)
    return acc


def ground_truth_tables(records, gate_run=None, contributions=None):
    """(per-query DataFrame, overall DataFrame) with the columns of ``CSV_COLUMNS``.

    ``records``: JSONL records (labelled ones are used); ``gate_run``: a GateRun (or None);
    ``contributions``: a ``gate_contributions.csv`` DataFrame (or None)."""
    return _accumulate(records, gate_run, contributions).tables()


def _pooled_rows(add, measure, layer, kind, v, inside, sal):
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
    return _accumulate(records, gate_run, contributions).write(output_dir)


# -- plots ----------------------------------------------------------------------------------------
def plot_ground_truth(per_query, overall, output_dir, records=None, gate_run=None, contributions=None,
                      n_examples=4, across=None, gate_ranges=None):
    """Figures of ``PLOT_FILES`` (those that apply); returns the written paths. ``across``: the
    accumulator's ``across_queries()`` when at hand (else computed from records, gate run, contributions);
    ``n_examples=0`` leaves out the examples figure (``plot_examples``). Gate axes follow the declared
    ``gate_ranges`` (default: the gate run's; tanh [-1, 1] without either)."""
    from . import plots as P
    if gate_ranges is None:
        gate_ranges = getattr(gate_run, "gate_ranges", None)
    plt = P.plt
    out = os.path.join(output_dir, "plots")
    os.makedirs(out, exist_ok=True)
    paths = []
    measures = [m for m in MEASURES if len(per_query) and (per_query["measure"] == m).any()]
    if measures:
        paths.append(_plot_distributions(P, plt, per_query, measures, os.path.join(out, PLOT_FILES["distributions"])))
        paths.append(_plot_inside_outside(P, plt, per_query, measures, os.path.join(out, PLOT_FILES["inside_outside"]),
                                          gate_ranges))
    if across is None and records is not None and (gate_run is not None or contributions is not None):
        across = _accumulate(records, gate_run, contributions).across_queries()
    if across is not None:
        paths.append(_plot_across_queries(P, plt, across, os.path.join(out, PLOT_FILES["across_queries"]),
                                          gate_ranges))
    if n_examples and records is not None and gate_run is not None:
        paths += plot_examples(records, gate_run, output_dir, n_examples)
    return paths


def plot_examples(records, gate_run, output_dir, n_examples=4):
    """``PLOT_FILES["examples"]``: gates along the video of a few labelled queries (clipwise and
    elementwise runs); returns the written paths. Needs no table, so it can be drawn early."""
    from . import plots as P
    if gate_run.gating_type not in PER_CLIP_GATING_TYPES:
        return []
    out = os.path.join(output_dir, "plots")
    os.makedirs(out, exist_ok=True)
    p = _plot_examples(P, P.plt, records, gate_run, n_examples, os.path.join(out, PLOT_FILES["examples"]))
    return [p] if p else []


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


def _plot_inside_outside(P, plt, per_query, measures, path, gate_ranges=None):
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
                if measure == "gate":  # the gate's declared range (2% margin), widened to the data
                    sc = P._scale(None, kind, gate_ranges, layer)
                    both = np.concatenate([x, y])
                    both = both[np.isfinite(both)]
                    lo, hi = (min(sc.lo, both.min()), max(sc.hi, both.max())) if both.size else (sc.lo, sc.hi)
                    lo, hi = lo - 0.02 * (hi - lo), hi + 0.02 * (hi - lo)
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
    fig.suptitle("Per-query mean inside vs outside the relevant windows\n(above the diagonal: higher inside)",
                 fontsize=11)
    return P._save(fig, path)


def _plot_across_queries(P, plt, df, path, gate_ranges=None):
    """``df``: ``GroundTruthAccumulator.across_queries()``."""
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
            sc = P._scale(None, kind, gate_ranges)
            if measure == "gate":
                P._value_lim(ax, sc, df.loc[(df["measure"] == "gate") & (df["gate"] == kind), "mean"])
                P._zero_line(ax, sc, axis="y")
            ax.set_xlabel("fraction of the video's clips that are relevant")
            ax.set_ylabel(f"query mean {measure}")
            ax.set_title(f"{measure}: {P._kind_label(kind, sc.rng)}", fontsize=10, loc="left")
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
    gate_ranges = getattr(gate_run, "gate_ranges", None)
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
            sc = P._scale(None, kind, gate_ranges)
            P._value_lim(ax, sc, np.concatenate([_per_clip(gates[(layer, kind)]) for layer in gate_run.layers]))
            lo, hi = ax.get_ylim()
            ax.broken_barh([(a - 0.5, b - a) for a, b in zip(starts, ends)], (lo, hi - lo), color="0.85", lw=0,
                           zorder=0)
            P._zero_line(ax, sc, axis="y")
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
