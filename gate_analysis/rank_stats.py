"""Rank statistics shared by the analyses: mid-ranks, rank AUROC, Spearman's rho, Wilcoxon signed-rank
and Mann-Whitney U p-values, in pure numpy + math (no scipy import: ``scipy.stats`` alone costs about 1 s).

Every function takes 1-D array-likes (``spearman_rows`` / ``midranks_rows``: a [G, T] matrix), works in
float64 and returns NaN where the statistic is undefined (too few values, a constant side, NaN input)
instead of raising or warning. The p-values follow the rules of scipy 1.17.1 with its defaults:

- ``spearman``: ``scipy.stats.spearmanr`` (Pearson correlation of average ranks, two-sided Student t with
  n - 2 dof; the t survival function comes from a regularized incomplete beta written here);
- ``wilcoxon``: ``scipy.stats.wilcoxon(d)`` (zero_method="wilcox", correction=False, method="auto"):
  n > 50 normal approximation with tie correction; no ties and no zeros: the exact null distribution;
  ties or zeros with n <= 13: the exact permutation test over all 2**n sign flips; else the normal one;
- ``mann_whitney``: ``scipy.stats.mannwhitneyu(a, b, alternative="two-sided")`` (method="auto",
  use_continuity=True): exact null distribution when a side has at most 8 values and there are no ties,
  else the tie-corrected normal approximation with continuity correction.
"""
import math

import numpy as np

__all__ = ["midranks", "midranks_rows", "auroc", "spearman", "spearman_rows", "spearman_p_values", "student_t_sf",
           "betainc",
           "wilcoxon", "paired_wilcoxon", "mann_whitney"]

_SQRT1_2 = math.sqrt(0.5)
_EPS = np.finfo(np.float64).eps
_TINY = 1e-300


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


def midranks_rows(x):
    """Average ranks of each row of ``x`` [G, T] -> [G, T] float64, as ``scipy.stats.rankdata(x, axis=1)``:
    1-based, ties share the mean of the ranks they span, a row containing NaN is all NaN."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"midranks_rows needs a 2-D array, got shape {x.shape}")
    g, t = x.shape
    if g == 0 or t == 0:
        return np.empty((g, t), dtype=np.float64)
    order = np.argsort(x, axis=1, kind="stable")
    xs = np.take_along_axis(x, order, axis=1)
    pos = np.broadcast_to(np.arange(t), (g, t))
    new = np.ones((g, t), dtype=bool)          # first element of a run of equal values
    new[:, 1:] = xs[:, 1:] != xs[:, :-1]
    last = np.ones((g, t), dtype=bool)         # last element of a run
    last[:, :-1] = new[:, 1:]
    start = np.maximum.accumulate(np.where(new, pos, 0), axis=1)
    end = np.minimum.accumulate(np.where(last, pos, t - 1)[:, ::-1], axis=1)[:, ::-1]
    ranks = np.empty((g, t), dtype=np.float64)
    np.put_along_axis(ranks, order, (start + end) / 2.0 + 1.0, axis=1)  # mean of ranks start+1 .. end+1
    ranks[np.isnan(x).any(axis=1)] = np.nan
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


# ---------------------------------------------------------------- Student t via the incomplete beta

def _lgamma(v):
    if np.ndim(v) == 0:
        return math.lgamma(float(v))
    v = np.asarray(v, dtype=np.float64)
    uniq, inv = np.unique(v, return_inverse=True)
    return np.array([math.lgamma(u) for u in uniq.tolist()])[inv].reshape(v.shape)


def _stirling_corr(z):
    """lgamma(z) - ((z - 1/2) log z - z + log(2 pi) / 2) for z >= 20 (error below 1e-17)."""
    r = 1.0 / (z * z)
    return (1 / 12 - r * (1 / 360 - r * (1 / 1260 - r * (1 / 1680 - r / 1188)))) / z


def _lbeta(a, b):
    """log B(a, b) for a, b > 0 (arrays broadcast). When the larger argument is >= 20 the difference
    lgamma(big) - lgamma(big + small) is formed without cancelling large terms (Stirling + log1p)."""
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    direct = _lgamma(a) + _lgamma(b) - _lgamma(a + b)
    big = hi >= 20
    if not np.any(big):
        return direct
    h = np.where(big, hi, 20.0)
    diff = (-(h - 0.5) * np.log1p(lo / h) - lo * np.log(h + lo) + lo
            + _stirling_corr(h) - _stirling_corr(h + lo))
    return np.where(big, _lgamma(lo) + diff, direct)


def _beta_cf(a, b, x, max_iter=5000):
    """Continued fraction 1 / (1 + d_1 / (1 + d_2 / (1 + ...))) of I_x(a, b) / (x^a (1-x)^b / (a B(a, b)))
    by the modified Lentz method; arrays broadcast. Meant for x < (a + 1) / (a + b + 2), where it converges
    in O(sqrt(max(a, b))) terms. d_2m = m (b - m) x / ((a + 2m - 1)(a + 2m)),
    d_2m+1 = -(a + m)(a + b + m) x / ((a + 2m)(a + 2m + 1))."""
    one = np.ones(np.broadcast(a, b, x).shape)
    a, b, x = a * one, b * one, x * one

    def guard(v):
        return np.where(np.abs(v) < _TINY, _TINY, v)

    d = 1.0 / guard(1.0 - (a + b) * x / (a + 1.0))   # 1 / (1 + d_1)
    c = one.copy()
    f = d.copy()
    active = ~(np.isnan(a) | np.isnan(b) | np.isnan(x))
    for m in range(1, max_iter + 1):
        for coef in (m * (b - m) * x / ((a + 2 * m - 1.0) * (a + 2 * m)),
                     -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1.0))):
            d = 1.0 / guard(1.0 + coef * d)
            c = guard(1.0 + coef / c)
            step = c * d
            f = np.where(active, f * step, f)
            active &= ~(np.abs(step - 1.0) <= 2.0 * _EPS)
        if not active.any():
            break
    return f


def betainc(a, b, x, y=None):
    """Regularized incomplete beta I_x(a, b) for a, b > 0 and x in [0, 1] (arrays broadcast); ``y`` = 1 - x
    when known more precisely than by subtraction. The continued fraction runs on (a, b, x) or, where
    x >= (a + 1) / (a + b + 2), on the mirror (b, a, 1 - x) with I = 1 - I_{1-x}(b, a)."""
    a, b, x = (np.asarray(v, dtype=np.float64) for v in (a, b, x))
    y = 1.0 - x if y is None else np.asarray(y, dtype=np.float64)
    a, b, x, y = np.broadcast_arrays(a, b, x, y)
    lbeta = _lbeta(a, b)
    swap = x >= (a + 1.0) / (a + b + 2.0)
    aa, bb = np.where(swap, b, a), np.where(swap, a, b)
    xx, yy = np.where(swap, y, x), np.where(swap, x, y)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
        log_x = np.where(xx < 0.5, np.log(xx), np.log1p(-yy))  # the more accurate of the two
        log_y = np.where(yy < 0.5, np.log(yy), np.log1p(-xx))
        front = np.exp(aa * log_x + bb * log_y - lbeta) / aa
        part = front * _beta_cf(aa, bb, xx)
    part = np.where(xx == 0, 0.0, part)
    out = np.where(swap, 1.0 - part, part)
    out = np.where(x <= 0, 0.0, np.where(y <= 0, 1.0, out))
    return np.where(np.isnan(x) | np.isnan(y) | np.isnan(a) | np.isnan(b), np.nan, out)


def student_t_sf(t, dof):
    """Survival function P(T > t) of Student's t with ``dof`` > 0 degrees of freedom; arrays broadcast.

    P(T > |t|) = I_x(dof / 2, 1 / 2) / 2 with x = dof / (dof + t^2) (1 - x = t^2 / (dof + t^2) exactly)."""
    t = np.asarray(t, dtype=np.float64)
    dof = np.asarray(dof, dtype=np.float64)
    t, dof = np.broadcast_arrays(t, dof)
    at = np.abs(t)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        t2 = at * at
        big = ~np.isfinite(t2)                  # t^2 overflows: x = dof / t / t, 1 - x = 1
        s = dof + t2
        x = np.where(big, dof / at / at, dof / s)
        y = np.where(big, 1.0, t2 / s)
    tail = 0.5 * betainc(dof / 2.0, 0.5, x, y)
    tail = np.where(at == 0, 0.5, np.where(np.isinf(at), 0.0, tail))
    out = np.where(t > 0, tail, 1.0 - tail)
    out = np.where(np.isnan(t) | np.isnan(dof), np.nan, out)
    return out[()] if out.ndim == 0 else out


def spearman(x, y):
    """(rho, two-sided p-value, n) of ``scipy.stats.spearmanr`` over the pairs where both values are finite;
    NaN rho and p when n < 3 or a side is constant."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    n = int(x.size)
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), float("nan"), n
    # [n, 2] columns of ranks through np.corrcoef, exactly as spearmanr does it
    rho = np.corrcoef(np.column_stack((midranks(x), midranks(y))), rowvar=False)[1, 0]  # a float64
    return float(rho), float(spearman_p_values(rho, n - 2)), n


def spearman_p_values(rho, dof):
    """Two-sided p-values of Spearman correlations ``rho`` with ``dof`` = n - 2 degrees of freedom, as
    ``scipy.stats.spearmanr``: min(2 P(T > |t|), 1), t = rho sqrt(dof / ((1 + rho)(1 - rho))); NaN where rho
    is not finite or dof < 1. Arrays broadcast: one call for many correlations costs about what one costs
    (the continued fraction of ``betainc`` runs once over all of them)."""
    rho, dof = np.broadcast_arrays(np.asarray(rho, dtype=np.float64), np.asarray(dof, dtype=np.float64))
    p = np.full(rho.shape, np.nan)
    ok = np.isfinite(rho) & (dof >= 1)
    if ok.any():
        r, d = rho[ok], dof[ok]
        with np.errstate(divide="ignore"):
            t = r * np.sqrt(d / ((r + 1.0) * (1.0 - r))).clip(0)
        p[ok] = np.minimum(2 * student_t_sf(np.abs(t), d), 1.0)
    return p[()] if p.ndim == 0 else p


def spearman_rows(x, y, x_ranks=None, p_values=True):
    """Spearman rho and two-sided p-value of each row of ``x`` [G, T] against ``y`` [T], computed as
    ``scipy.stats.spearmanr`` does (Pearson correlation of average ranks, Student t with T - 2 dof);
    NaN where a row or ``y`` is constant or T < 3. Rows with non-finite values go through ``spearman``.
    ``x_ranks``: ``midranks_rows(x)`` when already computed. ``p_values=False``: the p-values of the rows
    with finite values are left NaN, for one later ``spearman_p_values(rho, T - 2)`` over many queries.
    Returns (rho [G], p [G])."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    g, t = x.shape
    rho, p = np.full(g, np.nan), np.full(g, np.nan)
    finite = np.isfinite(x).all(axis=1) & bool(np.isfinite(y).all())
    for i in np.flatnonzero(~finite):
        rho[i], p[i], _ = spearman(x[i], y)
    ok = finite & (np.ptp(x, axis=1) > 0 if t else False) & (t >= 3) & (np.ptp(y) > 0 if t else False)
    if ok.any():
        rx = (midranks_rows(x[ok]) if x_ranks is None else np.asarray(x_ranks, dtype=np.float64)[ok])
        rx = rx - rx.mean(axis=1, keepdims=True)
        ry = midranks(y)
        ry -= ry.mean()
        rho[ok] = np.clip((rx @ ry) / np.sqrt((rx * rx).sum(axis=1) * (ry @ ry)), -1.0, 1.0)
        if p_values:
            p[ok] = spearman_p_values(rho[ok], t - 2)
    return rho, p


# ---------------------------------------------------------------- Wilcoxon signed-rank

_SIGNED_RANK_COUNTS = {}


def _signed_rank_counts(n):
    """Number of subsets of {1..n} with each sum 0 .. n(n+1)/2 (int64; exact for n <= 60)."""
    c = _SIGNED_RANK_COUNTS.get(n)
    if c is None:
        c = np.ones(1, dtype=np.int64)
        for k in range(1, n + 1):
            nxt = np.zeros(c.size + k, dtype=np.int64)
            nxt[:c.size] += c
            nxt[k:] += c
            c = nxt
        _SIGNED_RANK_COUNTS[n] = c
    return c


def _subset_sum_counts(weights):
    """Number of subsets of the positive integer ``weights`` with each sum 0 .. sum(weights) (int64)."""
    c = np.ones(1, dtype=np.int64)
    for w in weights:
        nxt = np.zeros(c.size + w, dtype=np.int64)
        nxt[:c.size] += c
        nxt[w:] += c
        c = nxt
    return c


def _normal_two_sided(z):
    """2 * P(Z > |z|) for a standard normal Z (``math.erfc``)."""
    return math.erfc(abs(z) * _SQRT1_2)


def wilcoxon(values, center):
    """Two-sided Wilcoxon signed-rank p-value of the finite ``values`` against ``center``; NaN with fewer
    than 2 values, when every difference is 0 or when a difference is NaN (a NaN ``center``).

    Same p-value as ``scipy.stats.wilcoxon(d)`` of scipy 1.17.1 with its defaults; see the module doc."""
    d = np.asarray(values, dtype=np.float64).reshape(-1)
    d = d[np.isfinite(d)] - center
    n = int(d.size)
    if n < 2 or np.all(d == 0) or np.isnan(d).any():
        return float("nan")
    nonzero = d != 0
    dz = d[nonzero]
    m = int(dz.size)                           # zeros are dropped from the ranks (zero_method="wilcox")
    r = midranks(np.abs(dz))
    r_plus = float(np.sum(r[dz > 0]))
    srt = np.sort(np.abs(dz))
    starts = np.flatnonzero(np.concatenate([[True], srt[1:] != srt[:-1]]))
    ties = np.diff(np.append(starts, m)).astype(np.float64)  # sizes of the runs of equal |d|
    has_ties = bool(ties.size < m)
    has_zeros = m < n
    if n <= 50 and not (has_ties or has_zeros):
        # exact null distribution of r_plus (integral here): p = 2 min(P(R >= r), P(R <= r)), clipped
        counts = _signed_rank_counts(n)
        cum = np.cumsum(counts)
        k_lo, k_hi = int(math.floor(r_plus)), int(math.ceil(r_plus))
        sf = int(cum[-1] - (cum[k_lo - 1] if k_lo > 0 else 0))
        cdf = int(cum[k_hi])
        return min(2.0 * (min(sf, cdf) / 2.0 ** n), 1.0)
    if n <= 13:
        # exact permutation test over the 2**n sign flips (zeros flip to zeros: each doubles every count);
        # doubled ranks are integers, the null statistic is s / 2
        counts = _subset_sum_counts((2 * r).astype(np.int64).tolist())
        null = np.arange(counts.size) / 2.0
        gamma = abs(_EPS * 100 * r_plus)
        scale = 2 ** (n - m)
        less = int(counts[null <= r_plus + gamma].sum()) * scale / 2 ** n
        greater = int(counts[null >= r_plus - gamma].sum()) * scale / 2 ** n
        return min(min(less, greater) * 2, 1.0)
    count = float(m)
    mn = count * (count + 1.0) * 0.25
    se = count * (count + 1.0) * (2.0 * count + 1.0)
    tie_correct = float(np.sum(ties ** 3 - ties))
    se = math.sqrt((se - tie_correct / 2) / 24)
    return _normal_two_sided((r_plus - mn) / se)


def paired_wilcoxon(a, b):
    """Paired Wilcoxon signed-rank p-value of ``a - b`` (pairs with a non-finite side dropped); NaN with
    fewer than 2 non-zero differences."""
    d = np.asarray(a, float) - np.asarray(b, float)
    d = d[np.isfinite(d)]
    if np.count_nonzero(d) < 2:
        return float("nan")
    return wilcoxon(d, 0.0)


# ---------------------------------------------------------------- Mann-Whitney U

_MWU_COUNTS = {}


def _strided_cumsum(c, step):
    """c[k] += c[k - step] for k = step, step + 1, ... (in that order), on a copy."""
    size = c.size
    pad = (-size) % step
    full = np.concatenate([c, np.zeros(pad, dtype=c.dtype)]) if pad else c
    return np.cumsum(full.reshape(-1, step), axis=0).reshape(-1)[:size]


def _mwu_counts(n1, n2, kmax):
    """Number of arrangements of n1 + n2 distinct values with U = 0 .. kmax for the smaller sample (the
    coefficients of the Gaussian binomial [n1 + n2, n1]); exact (Python ints when int64 could overflow)."""
    n1, n2 = min(n1, n2), max(n1, n2)
    key = (n1, n2)
    c = _MWU_COUNTS.get(key)
    if c is None or c.size < kmax + 1:
        size = max(kmax + 1, 1)
        dtype = np.int64 if math.comb(n1 + n2, n1) < 2 ** 62 else object
        c = np.zeros(size, dtype=dtype)
        c[0] = 1
        for i in range(1, n1 + 1):            # times (1 - q^(n2 + i)) / (1 - q^i)
            c = _strided_cumsum(c, i)
            s = n2 + i
            if s < size:
                c[s:] = c[s:] - c[:size - s]  # the right side is evaluated first: old values
        _MWU_COUNTS[key] = c
    return c[:kmax + 1]


def mann_whitney(a, b):
    """Two-sided Mann-Whitney U p-value of the finite values of ``a`` against those of ``b``; NaN when a
    side is empty.

    Same p-value as ``scipy.stats.mannwhitneyu(a, b, alternative="two-sided")`` of scipy 1.17.1."""
    a, b = np.asarray(a, float).reshape(-1), np.asarray(b, float).reshape(-1)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    n1, n2 = int(a.size), int(b.size)
    if n1 < 1 or n2 < 1:
        return float("nan")
    xy = np.concatenate([a, b])
    ranks = midranks(xy)
    u1 = float(np.sum(ranks[:n1])) - n1 * (n1 + 1) / 2
    u = max(u1, n1 * n2 - u1)
    srt = np.sort(xy)
    starts = np.flatnonzero(np.concatenate([[True], srt[1:] != srt[:-1]]))
    ties = np.diff(np.append(starts, srt.size)).astype(np.float64)
    if (n1 <= 8 or n2 <= 8) and ties.size == srt.size:
        # exact: P(U >= u) = P(U <= n1 n2 - u) by symmetry, summed from the left
        kc = n1 * n2 - int(u)
        counts = _mwu_counts(n1, n2, kc)
        total = float(math.comb(n1 + n2, n1))
        p = float(np.cumsum(counts.astype(np.float64) / total)[-1])
        return min(max(2.0 * p, 0.0), 1.0)
    n = n1 + n2
    tie_term = float(np.sum(ties ** 3 - ties))
    s = math.sqrt(n1 * n2 / 12 * ((n + 1) - tie_term / (n * (n - 1))))
    numerator = u - n1 * n2 / 2 - 0.5
    if s == 0:
        z = math.copysign(math.inf, numerator)
    else:
        z = numerator / s
    return min(math.erfc(z * _SQRT1_2), 1.0)
