"""The statistics CSV files of a gate analysis: their names (``CSV_FILES``), their columns with one
sentence each (``CSV_COLUMNS``, also rendered into the README by ``csv_columns_markdown``) and
``write_stats_csvs``, which writes the tables of a ``gate_analysis.stats.GateStatsAccumulator``.
"""
import os

import pandas as pd

from qd_detr.io import write_csv

from .outputs import STATS_CSV_FILES

__all__ = ["CSV_COLUMNS", "CSV_FILES", "write_stats_csvs", "csv_columns_markdown", "empty_frame"]

#: Short key -> CSV file name, as returned by ``write_stats_csvs``.
CSV_FILES = STATS_CSV_FILES

_ID = {"layer": "Fusion layer index (0-based).",
       "gate": "Gate kind: 'mha' scales the audio cross-attention branch, 'ffn' scales the FFN branch (v2 FiLM: "
               "by 1 + g), 'beta' is the v2 FiLM shift added to the FFN output.",
       "name": "Dotted gate name 'layers.{layer}.gate_{gate}', as in code and plot titles."}
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

#: Every CSV written by ``write_stats_csvs``: {file name: {column: one-sentence description}}.
CSV_COLUMNS = {
    STATS_CSV_FILES["per_query"]: {
        "qid": "QVHighlights query id.",
        "vid": "Video id of the query ('' when unknown).",
        **_ID,
        "n_clips": "Valid (unpadded) clips T of the query; -1 when unknown (per-query gating without n_clips).",
        "count": "Number of gate values of this query and gate (1 global, T clipwise, T*D elementwise).",
        "mean": "Mean of the query's gate values.",
        "std": "Population standard deviation (ddof=0) of the query's gate values.",
        "min": "Minimum gate value.",
        "p5": "5th percentile (numpy 'linear' interpolation).",
        "p25": "25th percentile (numpy 'linear' interpolation).",
        "median": "Median (50th percentile).",
        "p75": "75th percentile (numpy 'linear' interpolation).",
        "p95": "95th percentile (numpy 'linear' interpolation).",
        "max": "Maximum gate value.",
        **_FRAC_DOC,
    },
    STATS_CSV_FILES["per_layer"]: {
        **_ID,
        "weighting": "'query': statistics of the per-query means (each query counts once); "
                     "'clip': statistics over all gate values pooled (long videos weigh more).",
        "n_queries": "Number of queries accumulated.",
        "n_values": "Number of pooled gate values (for 'query' rows the same pool, given for reference).",
        "mean": "'query': mean of per-query means; 'clip': mean of all values.",
        "std": "Population std (ddof=0): 'query' of the per-query means, 'clip' of all values.",
        "min": "'query': smallest per-query mean; 'clip': smallest value.",
        "max": "'query': largest per-query mean; 'clip': largest value.",
        "frac_positive": "'query': mean over queries of the per-query fraction; 'clip': fraction of all values; "
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
        **_ID,
        "bin_type": "'bin' for the fixed bins over the gate's declared range (tanh [-1, 1], sigmoid [0, scale], "
                    "scaled tanh [-|alpha|, |alpha|]; value_range when one is given), 'underflow' (< range), "
                    "'overflow' (> range), 'nan' (NaN values).",
        "bin_left": "Left bin edge (inclusive); -inf for underflow, empty for nan.",
        "bin_right": "Right bin edge (exclusive except for the last bin, as np.histogram); +inf for overflow.",
        "count": "Exact integer number of gate values in the bin over all queries and clips (and dims).",
    },
    STATS_CSV_FILES["per_clip_position"]: {
        **_ID,
        "clip": "Clip index t (0-based, 2 s per clip in QVHighlights); header only for per-query gating.",
        "n_queries": "Number of queries having a valid clip t.",
        "n_values": "Number of values at clip t (n_queries clipwise; n_queries * D elementwise).",
        "mean": "Mean gate value at clip t over those queries (and dims).",
        "std": "Population std (ddof=0) over the same values.",
        "min": "Smallest value at clip t.",
        "max": "Largest value at clip t.",
    },
    STATS_CSV_FILES["per_dim"]: {
        **_ID,
        "dim": "Feature dimension index d (elementwise gating only; header only otherwise).",
        "n_values": "Number of values in dim d (all valid clips of all queries).",
        "mean": "Mean gate value of dim d.",
        "std": "Population std (ddof=0) of dim d.",
        "min": "Smallest value of dim d.",
        "max": "Largest value of dim d.",
    },
    STATS_CSV_FILES["rankings"]: {
        "layer": "Fusion layer index, or 'all' for the query's mean over all layers (each layer weighted "
                 "equally; gate kinds are never mixed).",
        "gate": _ID["gate"],
        "name": "Dotted gate name 'layers.{layer}.gate_{gate}' ('layers.all.gate_{gate}' for all layers).",
        "rank_type": "'top' (highest mean gate first) or 'bottom' (lowest first). With N queries, top has "
                     "min(n, ceil(N/2)) and bottom min(n, N - top) rows, so they never overlap.",
        "rank": "1-based rank within rank_type (ties broken by recorded order).",
        "qid": "QVHighlights query id.",
        "vid": "Video id of the query.",
        "mean": "Mean gate value of the query (over clips and dims; over layers for 'all').",
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
    """Write the six statistics CSVs into ``output_dir`` (created if needed), each atomically, floats
    as ``%.9g`` (lossless for float32). Files are always written with the columns of ``CSV_COLUMNS``:
    ``gate_stats_per_dim.csv`` is header-only unless gating is elementwise, and
    ``gate_stats_per_clip_position.csv`` is header-only for per-query gating, so tools can rely on the
    files existing. Returns {key: path} with the keys of ``CSV_FILES``."""
    os.makedirs(output_dir, exist_ok=True)
    frames = {
        "per_query": acc.query_stats(),
        "per_layer": acc.layer_stats(),
        "histograms": acc.histograms(),
        "per_clip_position": acc.clip_position_stats(),
        "per_dim": acc.dim_stats(),
        "rankings": acc.rankings(top_n),
    }
    paths = {}
    for key, df in frames.items():
        fname = CSV_FILES[key]
        cols = list(CSV_COLUMNS[fname])
        if list(df.columns) != cols:
            raise AssertionError(f"{fname}: columns {list(df.columns)} differ from CSV_COLUMNS {cols}")
        paths[key] = write_csv(df, os.path.join(output_dir, fname), float_format="%.9g")
    return paths
