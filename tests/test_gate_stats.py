"""Gate statistics: hand-checked values, exact histograms, weighting, out-of-range counts, merge,
rankings with few queries, CSV output and bounded (streaming) state."""
import math
import os

import numpy as np
import pandas as pd
import pytest

from gate_analysis import CSV_COLUMNS, GateStatsAccumulator, GateStoreWriter, load_gate_run, write_stats_csvs
from gate_analysis.stats_csv import CSV_FILES

KINDS = ("mha", "ffn")
f32 = np.float32


def hand_case():
    """Two clipwise queries, one layer; dyadic values so every statistic is exact.

    qid 1 (T=4): mha [0.5, -0.5, 0.0, 1.0]  ffn [0.25, 0.25, 0.25, 0.25]
    qid 2 (T=2): mha [-1.0, 0.0625]        ffn [0.96875, -0.984375]
    """
    q1 = {(0, "mha"): np.array([0.5, -0.5, 0.0, 1.0], f32), (0, "ffn"): np.full(4, 0.25, f32)}
    q2 = {(0, "mha"): np.array([-1.0, 0.0625], f32), (0, "ffn"): np.array([0.96875, -0.984375], f32)}
    acc = GateStatsAccumulator("clipwise", [0], bins=4)
    acc.update(1, q1, vid="v1")
    acc.update(2, q2, vid="v2")
    return acc, q1, q2


def test_query_stats_by_hand():
    acc, _, _ = hand_case()
    qs = acc.query_stats()
    assert list(qs.columns) == list(CSV_COLUMNS["gate_stats_per_query.csv"])
    r = qs[(qs.qid == 1) & (qs.gate == "mha")].iloc[0]
    assert r["name"] == "layers.0.gate_mha" and r["vid"] == "v1" and r["n_clips"] == 4 and r["count"] == 4
    # mean (0.5 - 0.5 + 0 + 1) / 4 = 0.25; deviations .25 -.75 -.25 .75 -> var 1.25/4 = 0.3125 (ddof=0)
    assert r["mean"] == 0.25
    assert r["std"] == pytest.approx(math.sqrt(0.3125), abs=1e-15)
    # sorted [-0.5, 0, 0.5, 1]; linear interpolation at (n-1)q = 0.15, 0.75, 1.5, 2.25, 2.85
    got = r[["min", "p5", "p25", "median", "p75", "p95", "max"]].to_numpy(float)
    np.testing.assert_allclose(got, [-0.5, -0.425, -0.125, 0.25, 0.625, 0.925, 1.0], rtol=0, atol=1e-15)
    # > 0.1: {0.5, 1}; < -0.1: {-0.5}; |g| <= 0.1: {0}; |g| > 0.95: {1}
    assert (r["frac_positive"], r["frac_negative"], r["frac_near_zero"], r["frac_saturated"]) == (
        0.5, 0.25, 0.25, 0.25)
    r = qs[(qs.qid == 1) & (qs.gate == "ffn")].iloc[0]
    assert (r["mean"], r["std"], r["median"], r["frac_positive"], r["frac_near_zero"]) == (0.25, 0.0, 0.25, 1.0, 0.0)
    r = qs[(qs.qid == 2) & (qs.gate == "mha")].iloc[0]
    # [-1, 0.0625]: mean -0.46875, std 0.53125, 0.0625 is near zero (not positive), -1 is saturated
    assert (r["mean"], r["std"], r["median"]) == (-0.46875, 0.53125, -0.46875)
    assert (r["frac_positive"], r["frac_negative"], r["frac_near_zero"], r["frac_saturated"]) == (0.0, 0.5, 0.5, 0.5)
    r = qs[(qs.qid == 2) & (qs.gate == "ffn")].iloc[0]
    assert r["mean"] == -0.0078125 and r["frac_saturated"] == 1.0


def test_layer_stats_query_vs_clip_weighting():
    acc, _, _ = hand_case()
    ls = acc.layer_stats()
    assert list(ls.columns) == list(CSV_COLUMNS["gate_stats_per_layer.csv"])
    q = ls[(ls.gate == "mha") & (ls.weighting == "video")].iloc[0]
    c = ls[(ls.gate == "mha") & (ls.weighting == "clip")].iloc[0]
    assert q["n_queries"] == c["n_queries"] == 2 and q["n_videos"] == 2 and c["n_values"] == 6
    # video-weighted (each query is its own video here): per-query means 0.25 and -0.46875
    assert q["mean"] == -0.109375 and q["std"] == 0.359375
    assert (q["min"], q["max"]) == (-0.46875, 0.25)
    assert q["frac_positive"] == 0.25  # (0.5 + 0) / 2
    # clip-weighted: all six values [0.5, -0.5, 0, 1, -1, 0.0625]
    assert c["mean"] == pytest.approx(0.0625 / 6, abs=1e-15)
    vals = np.array([0.5, -0.5, 0, 1, -1, 0.0625])
    assert c["std"] == pytest.approx(vals.std(), abs=1e-12)
    assert (c["min"], c["max"]) == (-1.0, 1.0)
    assert c["frac_positive"] == pytest.approx(2 / 6) and c["frac_near_zero"] == pytest.approx(2 / 6)
    assert q["mean"] != pytest.approx(c["mean"])  # T differs (4 vs 2), so the weightings differ


def test_histogram_matches_numpy_by_hand_and_random():
    acc, q1, q2 = hand_case()
    h = acc.histograms()
    assert list(h.columns) == list(CSV_COLUMNS["gate_histograms.csv"])
    mha = h[(h.gate == "mha") & (h.bin_type == "bin")]
    # edges -1, -.5, 0, .5, 1: -1 | -.5 | 0, .0625 | .5, 1 (the last bin includes 1.0)
    assert mha["count"].tolist() == [1, 1, 2, 2]
    assert mha["bin_left"].tolist() == [-1.0, -0.5, 0.0, 0.5] and mha["bin_right"].tolist() == [-0.5, 0.0, 0.5, 1.0]
    np.testing.assert_array_equal(
        mha["count"], np.histogram(np.concatenate([q1[(0, "mha")], q2[(0, "mha")]]), bins=4, range=(-1, 1))[0])
    rng = np.random.default_rng(0)
    acc = GateStatsAccumulator("elementwise", 2, bins=200)
    allv = {k: [] for k in [(l, k) for l in range(2) for k in KINDS]}
    edges = np.linspace(-1, 1, 201).astype(f32)
    for q in range(20):
        t = int(rng.integers(1, 30))
        g = {k: np.tanh(rng.normal(size=(t, 6)) * 2).astype(f32) for k in allv}
        g[(0, "mha")].flat[:5] = edges[rng.integers(0, 201, 5)]  # values exactly on bin edges
        acc.update(q, g)
        for k, v in g.items():
            allv[k].append(v.ravel())
    h = acc.histograms()
    for (layer, kind), parts in allv.items():
        v = np.concatenate(parts)
        got = h[(h.layer == layer) & (h.gate == kind) & (h.bin_type == "bin")]["count"].to_numpy()
        np.testing.assert_array_equal(got, np.histogram(v, bins=200, range=(-1.0, 1.0))[0])
        assert h[(h.layer == layer) & (h.gate == kind)]["count"].sum() == v.size


def test_out_of_range_values_are_counted_not_clipped():
    # v2-like range (0, 1.5): -0.2 is below, 1.7 above, 1.5 is in the last bin
    acc = GateStatsAccumulator("clipwise", [0], bins=3, value_range=(0.0, 1.5))
    acc.update(1, {(0, "mha"): np.array([-0.2, 0.1, 0.7, 1.5, 1.7], f32), (0, "ffn"): np.array([0.2] * 5, f32)})
    h = acc.histograms()
    m = h[h.gate == "mha"].set_index("bin_type")
    assert m.loc["underflow", "count"] == 1 and m.loc["overflow", "count"] == 1 and m.loc["nan", "count"] == 0
    assert m.loc["underflow", "bin_left"] == -np.inf and m.loc["overflow", "bin_right"] == np.inf
    assert h[(h.gate == "mha") & (h.bin_type == "bin")]["count"].tolist() == [1, 1, 1]
    ls = acc.layer_stats()
    c = ls[(ls.gate == "mha") & (ls.weighting == "clip")].iloc[0]
    assert (c["n_underflow"], c["n_overflow"]) == (1, 1)
    assert (c["min"], c["max"]) == (pytest.approx(-0.2), pytest.approx(1.7))  # statistics use the true values
    with pytest.raises(ValueError):
        GateStatsAccumulator("clipwise", 1, value_range=(1.0, 1.0))


def test_nan_values_are_counted_and_propagate():
    acc = GateStatsAccumulator("clipwise", [0])
    acc.update(1, {(0, "mha"): np.array([0.5, np.nan], f32), (0, "ffn"): np.array([0.5, 0.5], f32)})
    h = acc.histograms()
    assert h[(h.gate == "mha") & (h.bin_type == "nan")]["count"].item() == 1
    qs = acc.query_stats()
    assert np.isnan(qs[qs.gate == "mha"]["mean"].item()) and np.isnan(qs[qs.gate == "mha"]["median"].item())
    assert qs[qs.gate == "ffn"]["mean"].item() == 0.5


@pytest.mark.parametrize("gating_type", ["global", "clipwise", "elementwise"])
def test_query_stats_match_numpy(gating_type):
    rng = np.random.default_rng(1)
    acc = GateStatsAccumulator(gating_type, 3)
    ref = []
    for q in range(6):
        t = int(rng.integers(1, 40))
        shape = {"global": (1,), "clipwise": (t,), "elementwise": (t, 16)}[gating_type]
        g = {(l, k): np.tanh(rng.normal(size=shape)).astype(f32) for l in range(3) for k in KINDS}
        acc.update(100 + q, g, vid=f"v{q}", n_clips=t)
        ref.append((100 + q, t, g))
    qs = acc.query_stats()
    assert len(qs) == 6 * 3 * 2
    for qid, t, g in ref:
        for (l, k), a in g.items():
            r = qs[(qs.qid == qid) & (qs.layer == l) & (qs.gate == k)].iloc[0]
            v = a.astype(np.float64).ravel()
            assert r["n_clips"] == t and r["count"] == v.size
            assert r["mean"] == pytest.approx(v.mean(), abs=1e-12)
            assert r["std"] == pytest.approx(v.std(), abs=1e-9)
            np.testing.assert_array_equal(r[["min", "p5", "p25", "median", "p75", "p95", "max"]].to_numpy(float),
                                          np.percentile(v, [0, 5, 25, 50, 75, 95, 100]))
            assert r["frac_saturated"] == np.mean(np.abs(v) > 0.95)
    cps, ds = acc.clip_position_stats(), acc.dim_stats()
    assert list(cps.columns) == list(CSV_COLUMNS["gate_stats_per_clip_position.csv"])
    assert list(ds.columns) == list(CSV_COLUMNS["gate_stats_per_dim.csv"])
    if gating_type == "global":
        assert len(cps) == 0
    else:  # clip position 0: every query has it
        r = cps[(cps.layer == 1) & (cps.gate == "ffn") & (cps["clip"] == 0)].iloc[0]
        v = np.concatenate([np.atleast_1d(g[(1, "ffn")][0]) for _, _, g in ref]).astype(np.float64)
        assert r["n_queries"] == 6 and r["n_values"] == v.size
        assert r["mean"] == pytest.approx(v.mean(), abs=1e-12) and r["std"] == pytest.approx(v.std(), abs=1e-9)
        t_max = max(t for _, t, _ in ref)
        last = cps[(cps.layer == 1) & (cps.gate == "ffn") & (cps["clip"] == t_max - 1)].iloc[0]
        assert last["n_queries"] == sum(t == t_max for _, t, _ in ref)
    if gating_type == "elementwise":
        r = ds[(ds.layer == 2) & (ds.gate == "mha") & (ds["dim"] == 5)].iloc[0]
        v = np.concatenate([g[(2, "mha")][:, 5] for _, _, g in ref]).astype(np.float64)
        assert r["n_values"] == v.size and r["mean"] == pytest.approx(v.mean(), abs=1e-12)
        assert r["std"] == pytest.approx(v.std(), abs=1e-9) and r["max"] == v.max()
    else:
        assert len(ds) == 0


@pytest.mark.parametrize("gating_type", ["global", "clipwise", "elementwise"])
def test_merge_equals_single_accumulator(gating_type):
    rng = np.random.default_rng(2)
    data = []
    for q in range(12):
        t = int(rng.integers(1, 20 if q < 6 else 35))  # the second half has longer videos
        shape = {"global": (1,), "clipwise": (t,), "elementwise": (t, 4)}[gating_type]
        data.append((q, {(l, k): np.tanh(rng.normal(size=shape)).astype(f32) for l in range(2) for k in KINDS}))
    one, a, b = (GateStatsAccumulator(gating_type, 2, bins=50) for _ in range(3))
    for q, g in data:
        one.update(q, g, vid=f"v{q}")
        (a if q < 6 else b).update(q, g, vid=f"v{q}")
    assert a.merge(b) is a
    pd.testing.assert_frame_equal(a.histograms(), one.histograms())
    pd.testing.assert_frame_equal(a.query_stats(), one.query_stats())
    pd.testing.assert_frame_equal(a.rankings(3), one.rankings(3))
    for name in ("layer_stats", "clip_position_stats", "dim_stats"):
        pd.testing.assert_frame_equal(getattr(a, name)(), getattr(one, name)(), check_exact=False, rtol=1e-12,
                                      atol=1e-14)
    with pytest.raises(ValueError, match="different settings"):
        a.merge(GateStatsAccumulator(gating_type, 2, bins=51))


def test_rankings_few_queries_do_not_overlap():
    # 5 queries, n=10 -> top ceil(5/2)=3, bottom 2, disjoint; MHA and FFN ranked separately
    acc = GateStatsAccumulator("global", 2)
    means = {1: (0.9, -0.9), 2: (0.5, -0.5), 3: (0.1, 0.0), 4: (-0.3, 0.3), 5: (-0.7, 0.7)}
    for qid, (m, f) in means.items():
        acc.update(qid, {(l, "mha"): np.array([m], f32) for l in range(2)}
                   | {(0, "ffn"): np.array([f], f32), (1, "ffn"): np.array([f / 2], f32)}, vid=f"v{qid}")
    rk = acc.rankings(10)
    assert list(rk.columns) == list(CSV_COLUMNS["gate_rankings.csv"])
    for layer in (0, 1, "all"):
        for kind in KINDS:
            sel = rk[(rk.layer.astype(str) == str(layer)) & (rk.gate == kind)]
            top, bottom = sel[sel.rank_type == "top"], sel[sel.rank_type == "bottom"]
            assert len(top) == 3 and len(bottom) == 2
            assert set(top.qid).isdisjoint(bottom.qid) and set(top.qid) | set(bottom.qid) == set(means)
            assert top["rank"].tolist() == [1, 2, 3] and top["value"].is_monotonic_decreasing
            assert bottom["value"].is_monotonic_increasing
    # over all layers: the mean of |layer mean| (signs do not cancel), each kind on its own
    all_mha = rk[(rk.layer.astype(str) == "all") & (rk.gate == "mha")]
    assert all_mha[all_mha.rank_type == "top"]["qid"].tolist() == [1, 5, 2]
    assert all_mha[all_mha.rank_type == "bottom"]["qid"].tolist() == [3, 4]
    assert (all_mha["name"] == "layers.all.gate_mha").all()
    all_ffn = rk[(rk.layer.astype(str) == "all") & (rk.gate == "ffn")]
    top_ffn = all_ffn[all_ffn.rank_type == "top"]
    assert top_ffn["qid"].tolist() == [1, 5, 2]
    assert top_ffn["value"].iloc[0] == pytest.approx((0.9 + 0.45) / 2)  # FFN values only: kinds never mixed
    assert top_ffn["value"].iloc[1] == pytest.approx((0.7 + 0.35) / 2)
    assert len(rk[(rk.layer.astype(str) == "0") & (rk.gate == "mha")]) == 5
    # ties: all equal -> still disjoint
    acc = GateStatsAccumulator("global", 1)
    for qid in range(4):
        acc.update(qid, {(0, "mha"): np.array([0.5], f32), (0, "ffn"): np.array([0.5], f32)})
    rk = acc.rankings(10)
    sel = rk[(rk.layer.astype(str) == "0") & (rk.gate == "mha")]
    assert set(sel[sel.rank_type == "top"].qid).isdisjoint(sel[sel.rank_type == "bottom"].qid)
    # enough queries: exactly n each
    acc = GateStatsAccumulator("global", 1)
    for qid in range(30):
        acc.update(qid, {(0, "mha"): np.array([qid / 30], f32), (0, "ffn"): np.array([0.0], f32)})
    sel = acc.rankings(10)
    sel = sel[(sel.layer.astype(str) == "0") & (sel.gate == "mha")]
    assert sel[sel.rank_type == "top"]["qid"].tolist() == list(range(29, 19, -1))
    assert sel[sel.rank_type == "bottom"]["qid"].tolist() == list(range(10))


@pytest.mark.parametrize("gating_type", ["global", "clipwise", "elementwise"])
def test_write_stats_csvs(tmp_path, gating_type):
    rng = np.random.default_rng(3)
    acc = GateStatsAccumulator(gating_type, 2)
    raw = {}
    for q in range(5):
        t = int(rng.integers(2, 9))
        shape = {"global": (1,), "clipwise": (t,), "elementwise": (t, 4)}[gating_type]
        raw[q] = {(l, k): rng.uniform(-1, 1, shape).astype(f32) for l in range(2) for k in KINDS}
        acc.update(q, raw[q], vid=f"vid{q}", n_clips=t)
    paths = write_stats_csvs(acc, tmp_path / "out", top_n=2)
    # only the tables the gating type has: no feature dims unless elementwise, no clips for global gating
    expected = set(CSV_FILES) - ({"per_dim"} if gating_type != "elementwise" else set()) - (
        {"per_clip_position"} if gating_type == "global" else set())
    assert set(paths) == expected and set(os.listdir(tmp_path / "out")) == {CSV_FILES[k] for k in expected}
    for key, path in paths.items():
        fname = CSV_FILES[key]
        assert os.path.basename(path) == fname and os.path.isfile(path)
        df = pd.read_csv(path)
        assert list(df.columns) == list(CSV_COLUMNS[fname])
    assert not [f for f in os.listdir(tmp_path / "out") if ".tmp" in f]
    if gating_type == "elementwise":
        assert len(pd.read_csv(paths["per_dim"])) == 2 * 2 * 4
    if gating_type != "global":
        assert len(pd.read_csv(paths["per_clip_position"])) > 0
    # float32 values survive the %.9g text round trip exactly
    qs = pd.read_csv(paths["per_query"])
    for q, g in raw.items():
        for (l, k), a in g.items():
            r = qs[(qs.qid == q) & (qs.layer == l) & (qs.gate == k)].iloc[0]
            assert f32(r["min"]) == a.min() and f32(r["max"]) == a.max()
    rk = pd.read_csv(paths["rankings"])
    assert "all" in rk["layer"].astype(str).tolist()
    assert len(pd.read_csv(paths["histograms"])) == 2 * 2 * (200 + 3)


def test_csv_columns_documented():
    assert set(CSV_COLUMNS) == set(CSV_FILES.values())
    for fname, cols in CSV_COLUMNS.items():
        for col, doc in cols.items():
            assert isinstance(doc, str) and len(doc) > 10 and doc.rstrip().endswith("."), (fname, col)


def test_from_gate_run_equals_direct(tmp_path):
    rng = np.random.default_rng(4)
    w = GateStoreWriter(tmp_path, "clipwise", 2)
    direct = GateStatsAccumulator("clipwise", 2)
    for q in range(6):
        g = {(l, k): rng.uniform(-1, 1, int(rng.integers(1, 9))).astype(f32) for l in range(2) for k in KINDS}
        t = len(g[(0, "mha")])
        g = {key: v[:t] if len(v) >= t else np.resize(v, t) for key, v in g.items()}
        w.add(q, f"v{q}", g)
        direct.update(q, g, vid=f"v{q}")
    w.close()
    acc = GateStatsAccumulator.from_gate_run(load_gate_run(tmp_path))
    pd.testing.assert_frame_equal(acc.query_stats(), direct.query_stats())
    pd.testing.assert_frame_equal(acc.histograms(), direct.histograms())


def test_state_does_not_hold_raw_gates():
    """Aggregates are independent of the number of queries; the per-query table grows by a fixed
    amount per query, independent of T and D (no raw gates are kept)."""
    rng = np.random.default_rng(5)
    acc = GateStatsAccumulator("clipwise", 4)
    pool = [{(l, k): rng.uniform(-1, 1, 75).astype(f32) for l in range(4) for k in KINDS} for _ in range(8)]
    sizes = {}
    for q in range(2000):
        acc.update(q, pool[q % 8])
        if q + 1 in (100, 2000):
            sizes[q + 1] = acc.state_nbytes()
    assert sizes[100]["aggregates"] == sizes[2000]["aggregates"]
    # raw clipwise gates of 2000 queries would be 2000 * 8 * 75 * 4 bytes = 4.8 MB
    assert sizes[2000]["aggregates"] < 200_000
    per_query = sizes[2000]["per_query"] / 2000
    assert per_query <= 2 * (8 * 14 * 8 + 16)  # G * 14 float64 (+ ids), at most doubled capacity
    # every ndarray attribute: none grows with N * T
    total = sum(v.nbytes for v in vars(acc).values() if isinstance(v, np.ndarray))
    assert total < 2000 * 8 * 75 * 4 / 2
    # per-query growth does not depend on T x D
    small, big = GateStatsAccumulator("elementwise", 4), GateStatsAccumulator("elementwise", 4)
    gs = {(l, k): rng.uniform(-1, 1, (3, 2)).astype(f32) for l in range(4) for k in KINDS}
    gb = {(l, k): rng.uniform(-1, 1, (75, 256)).astype(f32) for l in range(4) for k in KINDS}
    for q in range(300):
        small.update(q, gs)
        big.update(q, gb)
    assert small.state_nbytes()["per_query"] == big.state_nbytes()["per_query"]


def test_per_kind_value_ranges_v2():
    """v2 gates: MHA in (0, scale), FFN in [-alpha, alpha]; each kind gets its own exact bins."""
    rng = np.random.default_rng(6)
    vr = {"mha": (0.0, 1.5), "ffn": (-0.3, 0.3)}
    acc = GateStatsAccumulator("clipwise", 2, bins=30, value_range=vr)
    assert acc.value_range == vr
    vals = {k: [] for k in [(l, k) for l in range(2) for k in KINDS]}
    for q in range(10):
        t = int(rng.integers(1, 20))
        g = {(l, k): (rng.uniform(-0.1, 1.6, t) if k == "mha" else rng.uniform(-0.35, 0.35, t)).astype(f32)
             for l in range(2) for k in KINDS}
        acc.update(q, g)
        for key, v in g.items():
            vals[key].append(v)
    h = acc.histograms()
    for (layer, kind), parts in vals.items():
        v = np.concatenate(parts)
        sel = h[(h.layer == layer) & (h.gate == kind)]
        b = sel[sel.bin_type == "bin"]
        np.testing.assert_array_equal(b["count"], np.histogram(v, bins=30, range=vr[kind])[0])
        assert (b["bin_left"].iloc[0], b["bin_right"].iloc[-1]) == vr[kind]
        lo, hi = vr[kind]
        assert sel[sel.bin_type == "underflow"]["count"].item() == (v < lo).sum()
        assert sel[sel.bin_type == "overflow"]["count"].item() == (v > hi).sum()
    with pytest.raises(ValueError, match="one \\(lo, hi\\) per kind"):
        GateStatsAccumulator("clipwise", 2, value_range={"mha": (0, 1)})
    with pytest.raises(ValueError, match="different settings"):
        acc.merge(GateStatsAccumulator("clipwise", 2, bins=30))
