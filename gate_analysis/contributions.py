"""Effective contribution of each gated branch (``run_gate_analysis.py --contributions``).

The recorder (``GateRecorder(..., capture_contributions=True)``) gives, per query, layer and clip,
``||g_mha * a|| / ||V||`` and ``||g_ffn * ffn1(norm2 z)|| / ||z||`` (v2 FiLM: ``(1 + g_ffn)`` and
``||g_beta|| / ||z||`` for the shift); ``ContributionWriter`` streams them with the raw gate into
``gate_contributions.csv`` during the main pass (resumable with the run); ``load_contributions``,
``contribution_summary`` (per query) and ``contrib_layer_table`` (per layer) read them back.
"""
import csv
import os

import numpy as np
import pandas as pd

from qd_detr.gates import GATE_KINDS, gate_name

from .outputs import CONTRIBUTIONS_FILE, CONTRIBUTIONS_PARTIAL

__all__ = ["ContributionWriter", "load_contributions", "contribution_summary", "contrib_layer_table", "CSV_COLUMNS",
           "CONTRIBUTIONS_FILE", "CONTRIBUTIONS_PARTIAL"]

#: The CSV written by this module: {file name: {column: description}}.
CSV_COLUMNS = {
    CONTRIBUTIONS_FILE: {
        "qid": "QVHighlights query id.",
        "vid": "Video id of the query.",
        "layer": "Fusion layer index (0-based).",
        "gate": "'mha' (audio branch: contribution ||g_mha * a|| / ||V||), 'ffn' (FFN branch: "
                "||g_ffn * ffn1(norm2 z)|| / ||z||; v2 FiLM: (1 + g_ffn) instead of g_ffn) or 'beta' (v2 FiLM "
                "shift: ||g_beta|| / ||z||).",
        "name": "Dotted gate name 'layers.{layer}.gate_{gate}'.",
        "clip": "Clip index t (0-based; valid clips only).",
        "n_clips": "Valid clips T of the query.",
        "gate_value": "The raw gate at this clip (global: the query's gate; elementwise: mean over dims).",
        "gate_abs": "Mean |gate| over dims (elementwise); |gate_value| otherwise.",
        "contribution": "Effective contribution: L2 norm over features of the gated branch output divided by "
                        "the L2 norm of the residual stream it is added to (0 = adds nothing).",
    },
}


class ContributionWriter:
    """Stream per-clip effective contributions (with the raw gate) of recorded queries to CSV.

    Rows go to ``gate_contributions.partial.csv`` as each forward is recorded; ``finish()`` moves
    the file to ``gate_contributions.csv``. With ``keep_qids`` (a resumed run) rows of other queries
    left by the interrupted run are dropped first, so the result equals an uninterrupted run's rows."""

    COLUMNS = list(CSV_COLUMNS[CONTRIBUTIONS_FILE])

    def __init__(self, output_dir, keep_qids=None):
        self.path = os.path.join(output_dir, CONTRIBUTIONS_PARTIAL)
        self.final = os.path.join(output_dir, CONTRIBUTIONS_FILE)
        if keep_qids is not None and os.path.exists(self.path):
            self._filter(set(keep_qids))
        elif os.path.exists(self.path):
            os.remove(self.path)
        fresh = not os.path.exists(self.path)
        self._fh = open(self.path, "a", newline="")
        self._csv = csv.writer(self._fh, lineterminator="\n")
        if fresh:
            self._csv.writerow(self.COLUMNS)

    def _filter(self, keep):
        kept = []
        with open(self.path, newline="") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            for row in reader:
                if len(row) == len(self.COLUMNS) and row[-1] != "" and int(row[0]) in keep:
                    kept.append(row)
        with open(self.path, "w", newline="") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(header or self.COLUMNS)
            w.writerows(kept)

    def add(self, record, vid):
        """Write the rows of one ``GateRecord`` (needs ``record.contributions``)."""
        if not record.contributions:
            raise ValueError("the recorder was not created with capture_contributions=True")
        t = record.n_clips
        vid = str(vid)
        if any(ch in vid for ch in ',"\n\r'):
            vid = '"' + vid.replace('"', '""') + '"'
        lines = []
        for (layer, kind), contrib in sorted(record.contributions.items()):
            g = np.asarray(record.gates[(layer, kind)], dtype=np.float64)
            if g.ndim == 2:  # elementwise (T, D)
                value, absval = g.mean(axis=1), np.abs(g).mean(axis=1)
            elif g.size == 1:  # global
                value = np.full(t, g.reshape(-1)[0])
                absval = np.abs(value)
            else:
                value, absval = g, np.abs(g)
            head = f"{record.sample_id},{vid},{layer},{kind},{gate_name(layer, kind)},"
            lines.extend(f"{head}{clip},{t},{v:.9g},{a:.9g},{c:.9g}\n" for clip, (v, a, c) in
                         enumerate(zip(value.tolist(), absval.tolist(), np.asarray(contrib, np.float64).tolist())))
        self._fh.write("".join(lines))
        self._fh.flush()

    def close(self):
        if not self._fh.closed:
            self._fh.close()

    def finish(self):
        """Close and move the streamed rows to ``gate_contributions.csv``; returns its path."""
        self.close()
        os.replace(self.path, self.final)
        return self.final


def load_contributions(path_or_dir):
    """``gate_contributions.csv`` as a DataFrame (a run folder or the file itself)."""
    path = path_or_dir
    if os.path.isdir(path):
        path = os.path.join(path, CONTRIBUTIONS_FILE)
    return pd.read_csv(path, dtype={"vid": str}, keep_default_na=False, na_values=[""])


def contribution_summary(contrib):
    """Per query x layer x gate: mean gate, mean |gate| and mean / median / max contribution."""
    g = contrib.groupby(["qid", "layer", "gate"], sort=False)
    out = g.agg(vid=("vid", "first"), n_clips=("n_clips", "first"), gate_mean=("gate_value", "mean"),
                gate_abs_mean=("gate_abs", "mean"), contribution_mean=("contribution", "mean"),
                contribution_median=("contribution", "median"), contribution_max=("contribution", "max"))
    out = out.reset_index()
    out["name"] = [gate_name(l, k) for l, k in zip(out["layer"], out["gate"])]
    return out


def contrib_layer_table(contrib):
    """Per layer x gate: median, p25, p75 and mean of the per-clip contribution and the mean gate."""
    g = contrib.groupby(["layer", "gate"], sort=True)
    out = g["contribution"].agg(median="median", p25=lambda s: s.quantile(0.25), p75=lambda s: s.quantile(0.75),
                                mean="mean").reset_index()
    out["gate_mean"] = g["gate_value"].mean().to_numpy()
    order = [GATE_KINDS.index(k) if k in GATE_KINDS else len(GATE_KINDS) for k in out["gate"]]
    return out.assign(_k=order).sort_values(["layer", "_k"], kind="stable").drop(columns="_k").reset_index(drop=True)
