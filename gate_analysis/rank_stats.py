"""Rank statistics shared by the analyses: mid-ranks, rank AUROC, Spearman's rho, Wilcoxon signed-rank
and Mann-Whitney U p-values.

Every function takes 1-D array-likes (``spearman_rows``: a [G, T] matrix against a [T] vector), works in
float64 and returns NaN where the statistic is undefined (too few values, a constant side, NaN input)
instead of raising or warning. ``scipy.stats`` (about 1 s to import) is imported when first needed.
"""
import warnings

import numpy as np

__all__ = ["midranks", "auroc", "spearman", "spearman_rows", "wilcoxon", "paired_wilcoxon", "mann_whitney"]


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


def spearman(x, y):
    """(rho, two-sided p-value, n) of ``scipy.stats.spearmanr`` over the pairs where both values are finite;
    NaN rho and p when n < 3 or a side is constant."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), float("nan"), int(x.size)
    from scipy import stats
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = stats.spearmanr(x, y)
    return float(res.statistic), float(res.pvalue), int(x.size)


def spearman_rows(x, y, x_ranks=None):
    """Spearman rho and two-sided p-value of each row of ``x`` [G, T] against ``y`` [T], computed as
    ``scipy.stats.spearmanr`` does (Pearson correlation of average ranks, Student t with T - 2 dof);
    NaN where a row or ``y`` is constant or T < 3. Rows with non-finite values go through ``spearman``.
    ``x_ranks``: ``rankdata(x, axis=1)`` when already computed. Returns (rho [G], p [G])."""
    g, t = x.shape
    from scipy import stats
    rho, p = np.full(g, np.nan), np.full(g, np.nan)
    finite = np.isfinite(x).all(axis=1) & bool(np.isfinite(y).all())
    for i in np.flatnonzero(~finite):
        rho[i], p[i], _ = spearman(x[i], y)
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


def wilcoxon(values, center):
    """Two-sided Wilcoxon signed-rank p-value of the finite ``values`` against ``center``; NaN with fewer
    than 2 values or when every difference is 0."""
    d = np.asarray(values, dtype=np.float64)
    d = d[np.isfinite(d)] - center
    if d.size < 2 or np.all(d == 0):
        return float("nan")
    from scipy import stats
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return float(stats.wilcoxon(d).pvalue)
        except ValueError:
            return float("nan")


def paired_wilcoxon(a, b):
    """Paired Wilcoxon signed-rank p-value of ``a - b`` (pairs with a non-finite side dropped); NaN with
    fewer than 2 non-zero differences."""
    d = np.asarray(a, float) - np.asarray(b, float)
    d = d[np.isfinite(d)]
    if np.count_nonzero(d) < 2:
        return float("nan")
    return wilcoxon(d, 0.0)


def mann_whitney(a, b):
    """Two-sided Mann-Whitney U p-value of the finite values of ``a`` against those of ``b``; NaN when a
    side is empty."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if a.size < 1 or b.size < 1:
        return float("nan")
    from scipy import stats
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return float(stats.mannwhitneyu(a, b, alternative="two-sided").pvalue)
        except ValueError:
            return float("nan")
