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

import numpy as np
import pandas as pd

from qd_detr.gates import DEFAULT_KINDS, gate_name
from qd_detr.io import write_csv

from .gate_arrays import PER_CLIP_GATING_TYPES, per_clip_values
from .lazy import lazy_attributes
from .outputs import GROUND_TRUTH_FILE, GROUND_TRUTH_OVERALL_FILE, GROUND_TRUTH_PLOTS
from .rank_stats import auroc, midranks_rows, spearman, spearman_p_values, spearman_rows, wilcoxon
from .stats_csv import gate_id_columns

__all__ = ["clip_labels", "query_ground_truth", "ground_truth_tables", "accumulate_ground_truth",
           "write_ground_truth", "GroundTruthAccumulator", "CSV_COLUMNS", "PLOT_FILES", "MEASURES",
           "GLOBAL_NOTE"]

MEASURES = ("gate", "contribution")
_ID = {**gate_id_columns(),
       "measure": "'gate': the gate value per clip (elementwise: mean over dims); 'contribution': the "
                  "effective contribution ||g * branch|| / ||residual|| per clip (runs with --contributions)."}

CSV_COLUMNS = {
    GROUND_TRUTH_FILE: {
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
    GROUND_TRUTH_OVERALL_FILE: {
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
PLOT_FILES = GROUND_TRUTH_PLOTS
GLOBAL_NOTE = ("global gating: one gate per query, so inside/outside windows and per-clip saliency do not apply "
               "to the gate itself (see across_queries, and the per-clip contributions with --contributions)")


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


def _query_rows(vals, inside, saliency, p_values=True):
    """Per-query statistics (columns ``_ROW_STATS``) of each row of ``vals`` [G, T] against one query's
    labels: ``inside`` bool [T] and ``saliency`` [T]. ``p_values=False``: ``spearman_p_value`` of the rows
    without NaN is left NaN, for ``_fill_p_values`` over all queries at once."""
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
    ranks = midranks_rows(vals) if t else None  # average ranks of ties, as ``midranks``
    if 0 < n_in < t:
        u = ranks[:, inside].sum(axis=1) - n_in * (n_in + 1) / 2.0
        out[:, 6] = np.where(np.isnan(vals).any(axis=1), np.nan, u / (n_in * (t - n_in)))
    out[:, 7], out[:, 8] = spearman_rows(vals, saliency, ranks, p_values=p_values)
    return out


def _fill_p_values(rows):
    """``rows`` ([N, stats] of ``_query_rows(..., p_values=False)``) with the missing Spearman p-values, from
    rho and T - 2 dof in one vectorised call (per query it costs ~2 ms, on the thread beside the model)."""
    rho, p, n_clips = rows[:, 7], rows[:, 8], rows[:, 0]
    missing = np.isnan(p) & np.isfinite(rho)
    if missing.any():
        rows = rows.copy()
        rows[missing, 8] = spearman_p_values(rho[missing], n_clips[missing] - 2)
    return rows


def query_ground_truth(values, inside, saliency):
    """Statistics of one query's per-clip ``values`` (T,) against its labels (a dict)."""
    row = _query_rows(np.asarray(values, dtype=np.float64).reshape(1, -1), inside, saliency)[0]
    out = dict(zip(_ROW_STATS, row.tolist()))
    out["n_clips"], out["n_inside"] = int(out["n_clips"]), int(out["n_inside"])
    return out


def _contribution_arrays(contrib):
    """{qid: {(layer, kind): (T,) array ordered by clip}} from a gate_contributions DataFrame."""
    out = {}
    c = contrib.sort_values(["qid", "layer", "gate", "clip"], kind="stable")
    for (qid, layer, kind), sel in c.groupby(["qid", "layer", "gate"], sort=False):
        out.setdefault(int(qid), {})[(int(layer), str(kind))] = sel["contribution"].to_numpy(np.float64)
    return out


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
        vals = np.stack([per_clip_values(a) for a in raw])  # [G, T] float64 (global: [G, 1])
        st["qids"].append(qid)
        st["means"].append(vals.mean(axis=1))
        if not self._per_clip_measure(measure):
            n = -1 if n_clips is None else int(n_clips)
            inside, _ = clip_labels(rec, n) if n > 0 else (np.zeros(0, bool), None)
            st["fracs"].append(inside.mean() if inside.size else np.nan)
            return
        rows = _query_rows(vals, *clip_labels(rec, vals.shape[1]), p_values=False)  # p-values: per_query_table
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
        cols = list(CSV_COLUMNS[GROUND_TRUTH_FILE])
        frames = []
        for measure in self._measures():
            st = self._m[measure]
            if not st["rows"]:
                continue
            keys, nq = st["keys"], len(st["qids"])
            stats_ = _fill_p_values(np.concatenate(st["rows"]))
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
                                int(ok.sum()), wilcoxon(x, center))
                    qm = across[(across["measure"] == measure) & (across["layer"] == layer) & (across["gate"] == kind)]
                    if len(qm):
                        rho, p, n = spearman(qm["mean"], qm["frac"])
                        add(measure, layer, kind, "across_queries", "spearman_fraction_relevant", rho, n, p)
        overall = pd.DataFrame(overall, columns=list(CSV_COLUMNS[GROUND_TRUTH_OVERALL_FILE]))
        return per_query, overall

    def write(self, output_dir):
        """Write both CSVs; returns ``(per_query, overall, {key: path})``, or ``(None, None, {})`` when
        no record is labelled."""
        if not self.labelled:
            return None, None, {}
        per_query, overall = self.tables()
        paths = {}
        for key, df in (("per_query", per_query), ("overall", overall)):
            name = GROUND_TRUTH_FILE if key == "per_query" else GROUND_TRUTH_OVERALL_FILE
            paths[key] = write_csv(df, os.path.join(output_dir, name), float_format="%.9g")
        return per_query, overall, paths


def accumulate_ground_truth(records, gate_run=None, contributions=None):
    """A ``GroundTruthAccumulator`` fed with every labelled query of ``gate_run`` (a GateRun or None) and the
    ``gate_contributions.csv`` DataFrame ``contributions`` (or None)."""
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
    return accumulate_ground_truth(records, gate_run, contributions).tables()


def _pooled_rows(add, measure, layer, kind, v, inside, sal):
    n_in = int(inside.sum())
    m_in = float(v[inside].mean()) if n_in else np.nan
    m_out = float(v[~inside].mean()) if n_in < v.size else np.nan
    add(measure, layer, kind, "pooled", "mean_inside", m_in, n_in)
    add(measure, layer, kind, "pooled", "mean_outside", m_out, int(v.size - n_in))
    add(measure, layer, kind, "pooled", "diff_inside_minus_outside", m_in - m_out, int(v.size))
    add(measure, layer, kind, "pooled", "auroc_inside", auroc(v, inside), int(v.size))
    rho, p, n = spearman(v, sal)
    add(measure, layer, kind, "pooled", "spearman_saliency", rho, n, p)


def write_ground_truth(records, output_dir, gate_run=None, contributions=None):
    """Write both CSVs into ``output_dir``; returns ``(per_query, overall, {key: path})``, or
    ``(None, None, {})`` when no record is labelled."""
    return accumulate_ground_truth(records, gate_run, contributions).write(output_dir)


# the figures live in gate_analysis.plots_ground_truth (matplotlib, imported on first use)
_PLOT_NAMES = ("plot_ground_truth", "plot_examples")
__all__ += _PLOT_NAMES
__getattr__ = lazy_attributes(__name__, "gate_analysis.plots_ground_truth", _PLOT_NAMES)
