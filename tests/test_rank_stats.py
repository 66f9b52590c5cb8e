"""gate_analysis.rank_stats against scipy.stats (imported here only): ranks and statistics exactly,
p-values to rtol 1e-12 / atol 1e-15, over deterministic batteries around scipy's method switch points
(Wilcoxon: n = 13 and 50; Mann-Whitney: 8 per side), with ties, zeros, NaN, constant inputs and large
magnitudes; and the module itself never imports scipy."""
import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
from scipy import special, stats

from conftest import ROOT, SCRIPT_ENV
from gate_analysis.rank_stats import (
    betainc,
    mann_whitney,
    midranks,
    midranks_rows,
    paired_wilcoxon,
    spearman,
    spearman_rows,
    student_t_sf,
    wilcoxon,
)

RTOL, ATOL = 1e-12, 1e-15


def _close(got, want):
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, equal_nan=True)


def _quiet(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kw)


def test_midranks_rows_equal_rankdata_exactly():
    rng = np.random.default_rng(0)
    for g, t in [(1, 1), (3, 2), (7, 13), (50, 75), (1000, 40), (4, 0), (0, 5)]:
        for kind in ("ties", "continuous", "special"):
            if kind == "ties":
                x = rng.integers(0, 4, size=(g, t)).astype(float)
            elif kind == "continuous":
                x = rng.standard_normal((g, t)) * 1e300
            else:  # signed zeros, infinities, a NaN in some rows
                x = rng.choice([0.0, -0.0, 1.0, np.inf, -np.inf, 2.5], size=(g, t))
                if g and t:
                    x[rng.random(g) < 0.3, rng.integers(0, t)] = np.nan
            got = midranks_rows(x)
            assert got.shape == (g, t) and got.dtype == np.float64
            if g and t:
                np.testing.assert_array_equal(got, stats.rankdata(x, axis=1))
                for i in range(min(g, 5)):
                    if not np.isnan(x[i]).any():
                        np.testing.assert_array_equal(got[i], midranks(x[i]))
    with pytest.raises(ValueError):
        midranks_rows(np.arange(3.0))


def test_student_t_sf_equals_stdtr_including_far_tails():
    rng = np.random.default_rng(1)
    smallest = 1.0
    for dof in [*range(1, 80), 100, 250, 998]:
        t = np.concatenate([rng.standard_normal(60) * 3, 10 ** rng.uniform(-3, 8, 60),
                            -(10 ** rng.uniform(-3, 3, 20)), [0.0, 1e150, np.inf, -np.inf, np.nan]])
        got, want = student_t_sf(t, dof), special.stdtr(dof, -t)
        far = want < 1e-300                    # underflow territory: both (nearly) zero
        _close(got[~far], want[~far])
        assert np.all(got[far] < 1e-290)
        smallest = min(smallest, want[(want > 0) & ~far].min())
    assert smallest < 1e-290                   # the battery reached p ~ 1e-300
    # near 0 scipy's stdtr(1, .) loses digits; the closed forms for 1 and 2 dof hold there
    t = 10 ** np.linspace(-12, -3, 40)
    _close(student_t_sf(t, 1), 0.5 - np.arctan(t) / np.pi)
    _close(student_t_sf(t, 2), 0.5 - t / (2 * np.sqrt(2 + t * t)))
    assert student_t_sf(0.0, 5) == 0.5 and student_t_sf(np.inf, 5) == 0.0 and student_t_sf(-np.inf, 5) == 1.0
    assert np.ndim(student_t_sf(1.0, 3)) == 0


def test_betainc_equals_scipy():
    rng = np.random.default_rng(2)
    a, b = 10 ** rng.uniform(-1, 2, 3000), 10 ** rng.uniform(-1, 2, 3000)
    x = np.concatenate([rng.random(2990), [0, 1, 1e-300, 1 - 1e-16, 0.5, 1e-10, 0.999, 0.3, 0.7, np.nan]])
    np.testing.assert_allclose(betainc(a, b, x), special.betainc(a, b, x), rtol=1e-12, atol=1e-14,
                               equal_nan=True)


def _spearman_want(x, y):
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return np.nan, np.nan, int(x.size)
    res = _quiet(stats.spearmanr, x, y)
    return res.statistic, res.pvalue, int(x.size)


def _spearman_cases(rng):
    for n in [*range(1, 25), 30, 40, 50, 60, 75]:
        yield rng.standard_normal(n), rng.standard_normal(n)
        yield rng.integers(0, 3, n).astype(float), rng.integers(0, 4, n).astype(float)  # heavy ties
        x = rng.standard_normal(n) * 1e300
        yield x, x * 0.5 + rng.standard_normal(n) * 1e299
        yield x, -x                                          # rho = -1
        yield x, np.exp(x / 1e300)                           # rho = +1
        yield np.ones(n), rng.standard_normal(n)             # constant side
        y = rng.standard_normal(n)
        yield x, np.where(rng.random(n) < 0.2, np.nan, y)    # NaN pairs dropped
        yield np.where(rng.random(n) < 0.2, np.inf, x), y    # inf pairs dropped
        z = np.arange(n, dtype=float)
        yield z, z + 0.01 * rng.standard_normal(n) * n       # rho near 1, small p


def test_spearman_equals_spearmanr():
    rng = np.random.default_rng(3)
    tails = 0
    for x, y in _spearman_cases(rng):
        rho, p, n = spearman(x, y)
        want_rho, want_p, want_n = _spearman_want(x, y)
        assert n == want_n
        if np.isnan(want_rho):
            assert np.isnan(rho) and np.isnan(p)
        else:
            assert rho == want_rho             # same ranks through np.corrcoef: bit for bit
            _close(p, want_p)
        tails += bool(want_p < 1e-30)
    assert tails > 5                           # the battery includes far tails


def test_spearman_rows_equal_spearmanr_per_row():
    rng = np.random.default_rng(4)
    for t in [1, 2, 3, 4, 5, 8, 13, 30, 75]:
        y = rng.integers(0, 4, t).astype(float) if t % 2 else rng.standard_normal(t)
        x = rng.integers(0, 5, size=(40, t)).astype(float)
        x[:10] = rng.standard_normal((10, t)) * 1e300
        x[10] = 3.0                                          # constant row
        if t >= 3:
            x[11] = np.argsort(np.argsort(y, kind="stable"), kind="stable")   # rho = 1 when y has no ties
            x[12, 0] = np.nan                                # through ``spearman``
            x[13, -1] = np.inf
        for ranks in (None, midranks_rows(x)):
            rho, p = spearman_rows(x, y, ranks)
            for i in range(x.shape[0]):
                want_rho, want_p, _ = _spearman_want(x[i], y)
                np.testing.assert_allclose(rho[i], want_rho, rtol=1e-12, atol=1e-15, equal_nan=True)
                _close(p[i], want_p)
    rho, p = spearman_rows(np.ones((3, 6)) * np.arange(6), np.full(6, 2.0))   # constant y
    assert np.isnan(rho).all() and np.isnan(p).all()
    rho, p = spearman_rows(np.zeros((3, 0)), np.zeros(0))
    assert np.isnan(rho).all() and np.isnan(p).all()


def _wilcoxon_want(values, center):
    d = np.asarray(values, dtype=np.float64)
    d = d[np.isfinite(d)] - center
    if d.size < 2 or np.all(d == 0):
        return np.nan
    return float(_quiet(stats.wilcoxon, d).pvalue)


def _wilcoxon_cases(rng):
    for n in range(1, 61):
        # scipy's permutation test (ties or zeros, n <= 13) costs 0.4-2 s for n = 10..13: few cases there
        heavy = 10 <= n <= 13
        yield rng.standard_normal(n) + 0.3, 0.0              # no ties: exact (n <= 50) or normal
        if not heavy or n in (11, 13):
            yield rng.integers(-3, 5, n).astype(float), 0.0  # ties and zeros
        if not heavy:
            yield rng.integers(-4, 4, n).astype(float) + 0.5, 0.0  # ties, no zeros
            yield rng.integers(1, 20, n).astype(float), 10.0  # ties and zeros after the center
            v = rng.standard_normal(n)
            v[rng.random(n) < 0.3] = 0.0
            yield v, 0.0                                     # zeros, no other ties
            yield np.full(n, 2.0), 1.0                       # all tied
        yield rng.standard_normal(n) * 1e300, 0.0            # large magnitudes
        yield np.abs(rng.standard_normal(n)) + 1, 0.0        # all positive: smallest p
        yield np.where(rng.random(n) < 0.2, np.nan, rng.standard_normal(n)), 0.1   # NaN dropped
        yield np.full(n, 2.0), 2.0                           # all zero
        yield rng.standard_normal(n), np.nan                 # NaN center


def test_wilcoxon_equals_scipy_on_every_path():
    rng = np.random.default_rng(5)
    paths = set()
    for values, center in _wilcoxon_cases(rng):
        got, want = wilcoxon(values, center), _wilcoxon_want(values, center)
        _close(got, want)
        d = np.asarray(values)[np.isfinite(values)] - center
        nz = np.abs(d[d != 0])
        if d.size >= 2 and nz.size and not np.isnan(d).any():
            tied = np.unique(nz).size < nz.size or nz.size < d.size
            paths.add("normal" if d.size > 50 else "exact" if not tied else "permutation" if d.size <= 13
                      else "normal ties")
    assert paths == {"normal", "exact", "permutation", "normal ties"}
    assert np.isnan(wilcoxon([1.0], 0.0)) and np.isnan(wilcoxon([np.nan, np.inf, 3.0], 0.0))


def test_paired_wilcoxon_equals_scipy():
    rng = np.random.default_rng(6)
    for n in [2, 3, 5, 8, 9, 14, 20, 50, 51, 60]:
        a = rng.integers(0, 6, n).astype(float)
        b = rng.integers(0, 6, n).astype(float)
        a[rng.random(n) < 0.1] = np.nan
        d = a - b
        d = d[np.isfinite(d)]
        want = np.nan if np.count_nonzero(d) < 2 else _quiet(stats.wilcoxon, d).pvalue
        _close(paired_wilcoxon(a, b), want)
        c = rng.standard_normal(n)
        _close(paired_wilcoxon(c + 0.2, c * 0.9), _quiet(stats.wilcoxon, (c + 0.2) - c * 0.9).pvalue)
    assert np.isnan(paired_wilcoxon([1, 2, 3], [1, 2, 4]))  # one non-zero difference


def _mwu_want(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if a.size < 1 or b.size < 1:
        return np.nan
    return float(_quiet(stats.mannwhitneyu, a, b, alternative="two-sided").pvalue)


def test_mann_whitney_equals_scipy_on_every_path():
    rng = np.random.default_rng(7)
    sizes = [1, 2, 3, 5, 7, 8, 9, 10, 13, 20, 35, 60]
    exact = normal = 0
    for n1 in sizes:
        for n2 in sizes:
            cases = [(rng.standard_normal(n1), rng.standard_normal(n2) + 0.5),      # no ties
                     (rng.integers(0, 4, n1).astype(float), rng.integers(1, 5, n2).astype(float)),  # ties
                     (rng.standard_normal(n1) * 1e300, rng.standard_normal(n2) * 1e300 + 1e300),
                     (np.arange(n1, dtype=float), np.arange(n1, n1 + n2, dtype=float)),  # separated
                     (np.full(n1, 1.0), np.full(n2, 1.0)),                              # all tied
                     (np.where(rng.random(n1) < 0.2, np.nan, rng.standard_normal(n1)),
                      np.where(rng.random(n2) < 0.2, np.inf, rng.standard_normal(n2)))]
            for a, b in cases:
                _close(mann_whitney(a, b), _mwu_want(a, b))
                fa, fb = a[np.isfinite(a)], b[np.isfinite(b)]
                xy = np.concatenate([fa, fb])
                if fa.size and fb.size:
                    if (fa.size <= 8 or fb.size <= 8) and np.unique(xy).size == xy.size:
                        exact += 1
                    else:
                        normal += 1
    assert exact > 50 and normal > 50
    # one small side against a long one (exact, long null distribution)
    for n2 in (100, 400, 900):                 # 900: counts beyond int64, Python ints
        a, b = rng.standard_normal(8), rng.standard_normal(n2) + 0.3
        _close(mann_whitney(a, b), _mwu_want(a, b))
        _close(mann_whitney(b, a), _mwu_want(b, a))
    assert np.isnan(mann_whitney([], [1.0])) and np.isnan(mann_whitney([np.nan], [1.0, 2.0]))


def test_no_scipy_import():
    code = ("import sys, numpy as np\n"
            "import gate_analysis.rank_stats as r\n"
            "x = np.arange(12.0); y = np.sin(x)\n"
            "r.midranks(x); r.midranks_rows(np.vstack([x, y])); r.auroc(x, x > 5)\n"
            "r.spearman(x, y); r.spearman_rows(np.vstack([x, y]), y); r.student_t_sf(2.0, 3)\n"
            "r.betainc(2.0, 3.0, 0.4)\n"
            "r.wilcoxon(y, 0.0); r.wilcoxon(np.round(y), 0.0); r.wilcoxon(np.tile(y, 6), 0.0)\n"
            "r.paired_wilcoxon(x, y); r.mann_whitney(x[:4], y); r.mann_whitney(np.round(x), np.round(y))\n"
            "print(sorted(m for m in sys.modules if m == 'scipy' or m.startswith('scipy.')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=SCRIPT_ENV,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_exact_wilcoxon_null_counts_sum_to_two_to_the_n():
    """The exact paths are dyadic fractions: p times 2**n is an integer (checks the count tables)."""
    rng = np.random.default_rng(8)
    for n in (2, 7, 13, 30, 50):
        p = wilcoxon(rng.standard_normal(n), 0.0)
        assert math.isclose(p * 2 ** n, round(p * 2 ** n), abs_tol=0) and 0 < p <= 1
