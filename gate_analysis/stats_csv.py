"""The statistics CSV files of a gate analysis: their names (``CSV_FILES``), their columns with one
sentence each (``CSV_COLUMNS``, also rendered into the README by ``csv_columns_markdown``) and
``write_stats_csvs``, which writes the tables of a ``gate_analysis.stats.GateStatsAccumulator``.
"""
import os

import pandas as pd

from qd_detr.io import write_csv

from .gate_arrays import PER_CLIP_GATING_TYPES
from .outputs import STATS_CSV_FILES

__all__ = ["CSV_COLUMNS", "CSV_FILES", "GATE_ID_COLUMNS", "gate_id_columns", "write_stats_csvs",
           "csv_columns_markdown", "empty_frame"]

#: Short key -> CSV file name, as returned by ``write_stats_csvs``.
CSV_FILES = STATS_CSV_FILES

#: The gate columns shared by every analysis table (``gate_id_columns``).
GATE_ID_COLUMNS = {
    "layer": "Fusion layer index (0-based).",
    "gate": "Gate kind: 'mha' scales the audio cross-attention branch, 'ffn' scales the FFN branch (v2 FiLM: "
            "by 1 + g), 'beta' is the v2 FiLM shift added to the FFN output.",
    "name": "Dotted gate name 'layers.{layer}.gate_{gate}', as in code and plot titles."}


def gate_id_columns(all_layers=None):
    """The ``layer``, ``gate`` and ``name`` column descriptions; ``all_layers``: what a row of layer 'all'
    holds (e.g. "the query's mean over its layers") in tables that have such rows."""
    if all_layers is None:
        return dict(GATE_ID_COLUMNS)
    return {"layer": f"Fusion layer index, or 'all' for {all_layers}.", "gate": GATE_ID_COLUMNS["gate"],
            "name": "Dotted gate name 'layers.{layer}.gate_{gate}' ('layers.all.gate_{gate}' for all layers)."}


#: How the fraction thresholds follow each gate's declared range (m, r: see gate_analysis.ranges).
_RANGE_NOTE = ("where m is the magnitude of the gate's declared range (gate_ranges in gates/meta.json; tanh "
               "[-1, 1] when none is recorded) and r its reference value 0")
_FRAC_DOC = {
    "frac_positive": f"Fraction of values with g > r + 0.1 m, {_RANGE_NOTE} (tanh: g > +0.1): audio added "
                     "(sigmoid: used; FiLM FFN gate: branch weight above 1).",
    "frac_negative": "Fraction of values with g < r - 0.1 m (tanh: g < -0.1): audio subtracted (FiLM FFN gate: "
                     "weight below 1); empty for gates that cannot be negative (sigmoid).",
    "frac_near_zero": "Fraction of values with |g - r| <= 0.1 m (tanh: |g| <= 0.1): audio ignored; for the FiLM "
                      "FFN gate g near 0 means branch weight near 1, not off.",
    "frac_saturated": "Fraction of values within 0.05 m of a bound of the range, g > high - 0.05 m or "
                      "g < low + 0.05 m (tanh: |g| > 0.95; a sigmoid gate also near 0).",
}

def _value_stats(whose):
    """The columns count ... frac_saturated of one query's or video's gate values."""
    pct = "percentile (numpy 'linear' interpolation)."
    return {"count": f"Number of gate values of this {whose} and gate (1 global, T clipwise, T*D elementwise).",
            "mean": f"Mean of the {whose}'s gate values.",
            "std": f"Population standard deviation (ddof=0) of the {whose}'s gate values.",
            "min": "Minimum gate value.", "p5": f"5th {pct}", "p25": f"25th {pct}", "median": "Median (50th percentile).",
            "p75": f"75th {pct}", "p95": f"95th {pct}", "max": "Maximum gate value.", **_FRAC_DOC}


#: Every CSV written by ``write_stats_csvs``: {file name: {column: one-sentence description}}.
CSV_COLUMNS = {
    STATS_CSV_FILES["per_query"]: {
        "qid": "QVHighlights query id.",
        "vid": "Video id of the query ('' when unknown).",
        **GATE_ID_COLUMNS,
        "n_clips": "Valid (unpadded) clips T of the query; -1 when unknown (per-query gating without n_clips).",
        **_value_stats("query"),
    },
    STATS_CSV_FILES["per_layer"]: {
        **GATE_ID_COLUMNS,
        "weighting": "'video': statistics of the per-video means (each video counts once: its queries share "
                     "their gates); 'clip': statistics over the gate values of every video pooled (long videos "
                     "weigh more).",
        "n_queries": "Number of queries analysed.",
        "n_videos": "Number of distinct gate sets pooled: one per video (a video whose queries got different "
                    "gates counts once per distinct set, see run.json query_dependence).",
        "n_values": "Number of pooled gate values (for 'video' rows the same pool, given for reference).",
        "mean": "'video': mean of per-video means; 'clip': mean of all values.",
        "std": "Population std (ddof=0): 'video' of the per-video means, 'clip' of all values.",
        "min": "'video': smallest per-video mean; 'clip': smallest value.",
        "max": "'video': largest per-video mean; 'clip': largest value.",
        "frac_positive": "'video': mean over videos of the per-video fraction; 'clip': fraction of all values; "
                         f"with g > r + 0.1 m, {_RANGE_NOTE} (tanh: g > +0.1).",
        "frac_negative": "As frac_positive, g < r - 0.1 m (tanh: g < -0.1); empty for gates that cannot be "
                         "negative (sigmoid).",
        "frac_near_zero": "As frac_positive, |g - r| <= 0.1 m (tanh: |g| <= 0.1; FiLM FFN gate: weight near 1, "
                          "not off).",
        "frac_saturated": "As frac_positive, g > high - 0.05 m or g < low + 0.05 m (tanh: |g| > 0.95).",
        "n_underflow": "Values below the gate's histogram range lo (all queries; still included in the "
                       "statistics above, never clipped).",
        "n_overflow": "Values above the gate's histogram range hi (all queries; still included in the "
                      "statistics above, never clipped).",
    },
    STATS_CSV_FILES["histograms"]: {
        **GATE_ID_COLUMNS,
        "bin_type": "'bin' for the fixed bins over the gate's declared range (tanh [-1, 1], sigmoid [0, scale], "
                    "scaled tanh [-|alpha|, |alpha|]; value_range when one is given), 'underflow' (< range), "
                    "'overflow' (> range), 'nan' (NaN values).",
        "bin_left": "Left bin edge (inclusive); -inf for underflow, empty for nan.",
        "bin_right": "Right bin edge (exclusive except for the last bin, as np.histogram); +inf for overflow.",
        "count": "Exact integer number of gate values in the bin over all queries and clips (and dims).",
    },
    STATS_CSV_FILES["per_clip_position"]: {
        **GATE_ID_COLUMNS,
        "clip": "Clip index t (0-based, 2 s per clip in QVHighlights); header only for per-query gating.",
        "n_queries": "Number of queries having a valid clip t.",
        "n_values": "Number of values at clip t (n_queries clipwise; n_queries * D elementwise).",
        "mean": "Mean gate value at clip t over those queries (and dims).",
        "std": "Population std (ddof=0) over the same values.",
        "min": "Smallest value at clip t.",
        "max": "Largest value at clip t.",
    },
    STATS_CSV_FILES["per_dim"]: {
        **GATE_ID_COLUMNS,
        "dim": "Feature dimension index d (elementwise gating only; header only otherwise).",
        "n_values": "Number of values in dim d (all valid clips of all queries).",
        "mean": "Mean gate value of dim d.",
        "std": "Population std (ddof=0) of dim d.",
        "min": "Smallest value of dim d.",
        "max": "Largest value of dim d.",
    },
    STATS_CSV_FILES["rankings"]: {
        **gate_id_columns("the mean over all layers of |the video's layer mean| (layers of opposite sign do not "
                          "cancel; gate kinds are never mixed)"),
        "rank_type": "'top' (highest value first) or 'bottom' (lowest first). Videos are ranked (each once: "
                     "its queries share their gates). With N videos, top has min(n, ceil(N/2)) and bottom "
                     "min(n, N - top) rows, so they never overlap; videos tied with a top row are not listed as "
                     "bottom.",
        "rank": "1-based rank within rank_type (ties broken by recorded order).",
        "vid": "Video id of the ranked video.",
        "n_queries": "Number of the video's queries analysed.",
        "qid": "The video's first query id (its gates are the video's).",
        "value": "Per layer: the video's mean gate value (over clips and dims); 'all': the mean over layers of "
                 "|layer mean|.",
    },
    STATS_CSV_FILES["per_video"]: {
        "vid": "Video id ('' when unknown: then one row per query).",
        "n_queries": "Number of the video's queries analysed.",
        "qids": "The video's query ids, space-separated, in recorded order.",
        "qid": "The first of them: the statistics are its gates' (the video's gates).",
        **GATE_ID_COLUMNS,
        "n_clips": "Valid (unpadded) clips T of the video; -1 when unknown.",
        **_value_stats("video"),
        "query_spread": "Largest minus smallest mean of this gate over the video's queries: 0 (up to float "
                        "rounding, about 1e-7) when gates do not depend on the query.",
    },
}


def csv_columns_markdown(columns=None):
    """The README's CSV documentation: one markdown table per file of ``columns`` (default
    ``CSV_COLUMNS``), ``|`` escaped as ``\\|``."""
    parts = []
    for name, cols in (CSV_COLUMNS if columns is None else columns).items():
        rows = "".join(f"| `{c}` | {d.replace('|', chr(92) + '|')} |\n" for c, d in cols.items())
        parts.append(f"**`{name}`**\n\n| column | meaning |\n|---|---|\n{rows}")
    return "\n".join(parts)


def empty_frame(file_name):
    """A DataFrame with no rows and the columns of ``CSV_COLUMNS[file_name]``."""
    return pd.DataFrame({c: pd.Series(dtype=object) for c in CSV_COLUMNS[file_name]})


def write_stats_csvs(acc, output_dir, top_n=10):
    """Write the statistics CSVs into ``output_dir`` (created if needed), each atomically, floats as ``%.9g``
    (lossless for float32), with the columns of ``CSV_COLUMNS``. Only the tables the gating type has are
    written: ``gate_stats_per_dim.csv`` for elementwise gating, ``gate_stats_per_clip_position.csv`` for
    per-clip gating (a stale one is removed). Returns {key: path} for the files written."""
    os.makedirs(output_dir, exist_ok=True)
    frames = {
        "per_query": acc.query_stats(),
        "per_video": acc.video_stats(),
        "per_layer": acc.layer_stats(),
        "histograms": acc.histograms(),
        "per_clip_position": acc.clip_position_stats() if acc.gating_type in PER_CLIP_GATING_TYPES else None,
        "per_dim": acc.dim_stats() if acc.gating_type == "elementwise" else None,
        "rankings": acc.rankings(top_n),
    }
    paths = {}
    for key, df in frames.items():
        path = os.path.join(output_dir, CSV_FILES[key])
        if df is None:  # a table the gating type cannot have (no clips, no feature dims): not written
            if os.path.exists(path):
                os.remove(path)
            continue
        fname = CSV_FILES[key]
        cols = list(CSV_COLUMNS[fname])
        if list(df.columns) != cols:
            raise AssertionError(f"{fname}: columns {list(df.columns)} differ from CSV_COLUMNS {cols}")
        paths[key] = write_csv(df, path, float_format="%.9g")
    return paths
