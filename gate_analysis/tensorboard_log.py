"""Fusion gates in TensorBoard: what ``GateMonitor(..., writer=SummaryWriter(...))`` writes at each capture.

For every gate ``layers.{l}.gate_{kind}`` of a capture after ``n`` completed epochs (TensorBoard step
``n``, the step of the original ``Train/...`` and ``Eval/...`` scalars):

- the histogram ``gates/layers.{l}.gate_{kind}`` of the gate values the capture pooled: every valid
  clip (and feature dim) of every monitored video, padding excluded, each video once (its queries
  share their gates; a video whose queries got different gates once per distinct set), exactly the
  values of the capture's ``gate_stats_per_layer.csv``. Its count, min, max, sum and sum of squares are
  those of the **clip-weighted** row (``weighting`` "clip": ``n_values``, ``min``, ``max``, ``mean * n``,
  ``n * (std^2 + mean^2)``); its buckets are the fixed bins of ``gate_histograms.csv`` (over the gate's
  declared range), plus one bucket for values below and one for values above the range when there are
  any. A gate with NaN values gets no histogram (``write_gate_summaries`` returns its name).
- the scalars ``gates/layers.{l}.gate_{kind}/{stat}`` for ``stat`` in ``GATE_SCALARS``: the values of the
  same clip-weighted row: ``mean``, ``std`` (population), ``frac_positive`` (audio added),
  ``frac_negative`` (audio subtracted; not written for gates that cannot be negative, where the CSV
  leaves it empty), ``frac_near_zero`` (audio ignored; v2 FiLM FFN gate: weight near 1) and
  ``frac_saturated`` (near a bound of the range); thresholds as in the CSV (``gate_analysis.stats``).
  Values that are not finite (empty in the CSV) are not written.

The writer is any object with ``add_histogram_raw`` and ``add_scalar`` of ``SummaryWriter``'s signature;
this module imports no TensorBoard code.
"""
import math

import numpy as np

from qd_detr.gates import gate_name

__all__ = ["GATE_TAG_PREFIX", "GATE_SCALARS", "GATE_WEIGHTING", "gate_tag", "gate_histograms",
           "write_gate_summaries", "check_writer"]

#: Top-level TensorBoard section of the gate summaries.
GATE_TAG_PREFIX = "gates"
#: Columns of the clip-weighted ``gate_stats_per_layer.csv`` rows written as scalars.
GATE_SCALARS = ("mean", "std", "frac_positive", "frac_negative", "frac_near_zero", "frac_saturated")
#: The ``weighting`` of the ``gate_stats_per_layer.csv`` rows the summaries equal.
GATE_WEIGHTING = "clip"


def gate_tag(layer, kind, stat=None):
    """``gates/layers.{layer}.gate_{kind}`` (the histogram), or ``.../{stat}`` (a scalar)."""
    tag = f"{GATE_TAG_PREFIX}/{gate_name(layer, kind)}"
    return tag if stat is None else f"{tag}/{stat}"


def check_writer(writer):
    """``writer`` itself when it has ``add_histogram_raw``, ``add_scalar`` and ``flush``; else TypeError."""
    missing = [m for m in ("add_histogram_raw", "add_scalar", "flush") if not callable(getattr(writer, m, None))]
    if missing:
        raise TypeError(f"writer must be a TensorBoard SummaryWriter (torch.utils.tensorboard); "
                        f"{type(writer).__name__} has no {', '.join(missing)}")
    return writer


def gate_histograms(acc):
    """{(layer, kind): histogram or None} of a ``GateStatsAccumulator`` (``GateSink.stats``).

    A histogram is the keyword arguments of ``SummaryWriter.add_histogram_raw`` but tag and step:
    ``min``, ``max``, ``num``, ``sum``, ``sum_squares`` (of the clip-weighted pool), ``bucket_limits``
    (right edges: ``lo`` for the values below the range when there are any, the bin edges, the largest
    value for the values above the range when there are any) and ``bucket_counts`` (exact integers).
    None for a gate without values or with NaN values."""
    layers = acc.layer_stats()
    rows = layers[layers["weighting"] == GATE_WEIGHTING]
    hist = acc.histograms()
    out = {}
    for row in rows.itertuples(index=False):
        key = (int(row.layer), str(row.gate))
        h = hist[(hist["layer"] == key[0]) & (hist["gate"] == key[1])]
        count = dict(zip(h["bin_type"], h["count"]))  # the last row per type: underflow / overflow / nan
        bins = h[h["bin_type"] == "bin"]
        n = int(row.n_values)
        if n == 0 or int(count.get("nan", 0)) > 0 or not math.isfinite(float(row.mean)):
            out[key] = None
            continue
        limits, counts = [], []
        under, over = int(count.get("underflow", 0)), int(count.get("overflow", 0))
        if under:
            limits.append(float(bins["bin_left"].iloc[0]))
            counts.append(under)
        limits.extend(bins["bin_right"].astype(float).tolist())
        counts.extend(bins["count"].astype(np.int64).tolist())
        if over:
            limits.append(float(row.max))
            counts.append(over)
        mean, std = float(row.mean), float(row.std)
        out[key] = {"min": float(row.min), "max": float(row.max), "num": n, "sum": mean * n,
                    "sum_squares": n * (std * std + mean * mean), "bucket_limits": limits,
                    "bucket_counts": [int(c) for c in counts]}
    return out


def write_gate_summaries(writer, acc, step):
    """Write the histograms and scalars of the module docstring for the statistics ``acc`` (a
    ``GateStatsAccumulator``, e.g. ``GateSink.stats`` of a capture) at ``step`` (completed epochs).

    Returns {"histograms": [tags], "scalars": [tags], "skipped": [gate names without a histogram]}."""
    check_writer(writer)
    step = int(step)
    written = {"histograms": [], "scalars": [], "skipped": []}
    for (layer, kind), h in gate_histograms(acc).items():
        if h is None:
            written["skipped"].append(gate_name(layer, kind))
            continue
        tag = gate_tag(layer, kind)
        writer.add_histogram_raw(tag, global_step=step, **h)
        written["histograms"].append(tag)
    layers = acc.layer_stats()
    for row in layers[layers["weighting"] == GATE_WEIGHTING].itertuples(index=False):
        for stat in GATE_SCALARS:
            value = float(getattr(row, stat))
            if not math.isfinite(value):  # e.g. frac_negative of a sigmoid gate (empty in the CSV)
                continue
            tag = gate_tag(int(row.layer), str(row.gate), stat)
            writer.add_scalar(tag, value, step)
            written["scalars"].append(tag)
    return written
