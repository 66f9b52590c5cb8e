"""Order statistics read off sorted float32 rows: exact fixed-bin histogram counts, threshold counts
and linear-interpolation percentiles, all from one ``np.sort`` per row and ``np.searchsorted``.

Rows are float32 arrays [G, n] sorted along the last axis (NaN last). Bin edges are those
``np.histogram`` uses for float32 input (``np.linspace(lo, hi, bins + 1, dtype=float32)``), so every
value lands in the bin ``np.histogram(values, bins, range=(lo, hi))`` puts it in (the last bin includes
its right edge); thresholds are rounded to float32 so that float32 comparisons equal the exact ones
(``x < v`` <=> ``x < ceil32(v)``, ``x <= v`` <=> ``x <= floor32(v)``).
"""
import numpy as np

__all__ = ["round32", "search_points", "sorted_nan_counts", "sorted_percentiles", "count_sorted"]


def round32(values, up):
    """Round float64 values to the nearest float32 above (``up``) or below."""
    v = np.asarray(values, dtype=np.float64)
    f = v.astype(np.float32)
    step = np.float32(np.inf if up else -np.inf)
    off = (f.astype(np.float64) < v) if up else (f.astype(np.float64) > v)
    return np.where(off, np.nextafter(f, step), f).astype(np.float32)


def search_points(lo, hi, bins, positive, negative, near_low, near_high, sat_low, sat_high):
    """(left points [bins + 4], right points [4]) float32 searched in a sorted row: ``side="left"`` on the
    left points counts values < v (the bins + 1 edges, then ``negative``, ``near_low``, ``sat_low``),
    ``side="right"`` on the right points values <= v (the last edge, then ``positive``, ``near_high``,
    ``sat_high``). Pass +-inf for a threshold the gate cannot reach (it then counts nothing)."""
    edges = np.linspace(lo, hi, bins + 1, endpoint=True, dtype=np.float32)
    thr_left = round32([negative, near_low, sat_low], up=True)
    thr_right = round32([positive, near_high, sat_high], up=False)
    return np.concatenate([edges, thr_left]), np.concatenate([edges[-1:], thr_right])


def sorted_nan_counts(x):
    """NaN values per sorted row of ``x`` [G, n] (int64 [G])."""
    n_nan = np.isnan(x[:, -1]).astype(np.int64)
    if n_nan.any():
        n_nan = np.count_nonzero(np.isnan(x), axis=1)
    return n_nan


def sorted_percentiles(x, pcts, n_nan):
    """Percentiles ``pcts`` (0..100) of each sorted row of ``x`` [G, n], exactly as
    ``np.percentile(..., method="linear")`` on the float64 values; NaN for rows holding a NaN. [G, len(pcts)]."""
    n = x.shape[1]
    vi = (n - 1) * (np.asarray(pcts) / 100.0)
    lo_i = np.floor(vi).astype(np.intp)
    hi_i = np.minimum(lo_i + 1, n - 1)
    gamma = vi - lo_i
    a, b = x[:, lo_i].astype(np.float64), x[:, hi_i].astype(np.float64)
    diff = b - a
    pct = np.where(gamma >= 0.5, b - diff * (1 - gamma), a + diff * gamma)  # numpy's _lerp
    pct[n_nan > 0] = np.nan
    return pct


def count_sorted(x, points, bins, n_nan):
    """(hist int64 [G, bins + 3], counts int64 [G, 4]) of the sorted rows ``x`` [G, n] with their
    ``search_points`` ``points`` (one pair per row). ``hist``: the bins, then underflow (< lo), overflow
    (> hi) and NaN; ``counts``: values > positive, < negative, in [near_low, near_high], and < sat_low or
    > sat_high."""
    g, n = x.shape
    nb = bins
    left = np.stack([r.searchsorted(p[0], side="left") for r, p in zip(x, points)])   # [G, bins+1+3]: # < v
    right = np.stack([r.searchsorted(p[1], side="right") for r, p in zip(x, points)])  # [G, 4]: # <= v
    n_valid = n - n_nan
    hist = np.empty((g, nb + 3), dtype=np.int64)
    hist[:, :nb - 1] = np.diff(left[:, :nb], axis=1)      # [e_i, e_i+1)
    hist[:, nb - 1] = right[:, 0] - left[:, nb - 1]       # last bin includes its right edge
    hist[:, nb] = left[:, 0]                              # underflow: x < lo
    hist[:, nb + 1] = n_valid - right[:, 0]               # overflow: x > hi
    hist[:, nb + 2] = n_nan
    counts = np.stack([n_valid - right[:, 1],                                   # x > pos
                       left[:, nb + 1],                                         # x < neg
                       right[:, 2] - left[:, nb + 2],                           # -z <= x <= z
                       (n_valid - right[:, 3]) + left[:, nb + 3]], axis=1)      # |x| > s
    return hist, counts
