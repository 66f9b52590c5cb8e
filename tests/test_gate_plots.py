"""Plots: every function writes a non-empty PNG for each gating type, figures are closed, padding
is NaN in the clip heatmap, and importing the package does not import matplotlib."""
import os
import subprocess
import sys

import numpy as np
import pytest

from gate_analysis import GateStatsAccumulator, GateStoreWriter, load_gate_run

matplotlib = pytest.importorskip("matplotlib")
import matplotlib.image as mpimg  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

from gate_analysis import figures, plots  # noqa: E402

GATING_TYPES = ["global", "clipwise", "elementwise"]
KINDS = ("mha", "ffn")
LAYERS = 2


def build(tmp_path, gating_type, n=7, d=6, seed=0):
    rng = np.random.default_rng(seed)
    w = GateStoreWriter(tmp_path / "run", gating_type, LAYERS, hidden_dim=d if gating_type == "elementwise" else None)
    acc = GateStatsAccumulator(gating_type, LAYERS)
    lengths = {}
    for i in range(n):
        qid, t = 500 + i, 3 + (i * 5) % 11
        shape = {"global": (1,), "clipwise": (t,), "elementwise": (t, d)}[gating_type]
        g = {(l, k): np.tanh(rng.normal(0.3 - 0.4 * l, 0.7, shape)).astype(np.float32) for l in range(LAYERS)
             for k in KINDS}
        w.add(qid, f"vid{i}_30.0_180.0", g, n_clips=t)
        acc.update(qid, g, vid=f"vid{i}_30.0_180.0", n_clips=t)
        lengths[qid] = t
    w.close()
    return acc, load_gate_run(tmp_path / "run"), lengths


def check_png(path, min_px=200):
    assert os.path.isfile(path) and os.path.getsize(path) > 1000
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] >= min_px and img.shape[1] >= min_px
    assert img[..., :3].std() > 0.01  # not a blank canvas
    assert not [f for f in os.listdir(os.path.dirname(path)) if f.startswith(".tmp")]


@pytest.mark.parametrize("gating_type", GATING_TYPES)
def test_plot_all_writes_every_applicable_figure(tmp_path, gating_type):
    """plot_all calls every plot function that applies to the gating type: each gives a real PNG."""
    acc, run, _ = build(tmp_path, gating_type)
    paths = plots.plot_all(acc, run, tmp_path / "out")
    names = sorted(os.path.basename(p) for p in paths)
    expected = {"layer_distributions.png", "query_layer_heatmap.png", "layer_evolution.png", "rankings.png",
                "sample_comparison.png"}
    if gating_type != "global":
        expected |= {f"query_clip_heatmap_layers.{l}.gate_{k}.png" for l in range(LAYERS) for k in KINDS}
    if gating_type == "elementwise":
        expected.add("dim_profile.png")
    assert set(names) == expected and len(names) == len(expected)
    assert sorted(os.listdir(tmp_path / "out" / "plots")) == sorted(expected)
    for p in paths:
        assert os.path.dirname(p) == os.path.join(tmp_path, "out", "plots")
        check_png(p)
    assert plt.get_fignums() == []  # every figure closed


def test_plot_functions_direct_calls_and_inapplicable_views(tmp_path):
    acc, run, _ = build(tmp_path, "global", n=5)
    out = tmp_path / "figs"
    p = plots.plot_rankings(acc.rankings(2), out / "sub" / "rank.png")  # creates missing folders
    assert p == os.fspath(out / "sub" / "rank.png")
    check_png(p)
    with pytest.raises(ValueError, match="clipwise or elementwise"):
        plots.plot_query_clip_heatmap(run, 0, "mha", out / "clip.png")
    with pytest.raises(ValueError, match="elementwise"):
        plots.plot_dim_profile(acc.dim_stats(), out / "dim.png")
    with pytest.raises(ValueError, match="no rankings for layer 7"):
        plots.plot_rankings(acc.rankings(2), out / "r.png", layer=7)
    assert not (out / "clip.png").exists() and not (out / "dim.png").exists()
    # without a gate run, plot_all draws only the statistics figures
    names = {os.path.basename(p) for p in plots.plot_all(acc, None, tmp_path / "out2")}
    assert names == {"layer_distributions.png", "query_layer_heatmap.png", "layer_evolution.png", "rankings.png"}
    assert plt.get_fignums() == []


def test_clip_heatmap_pads_with_nan(tmp_path, monkeypatch):
    acc, run, lengths = build(tmp_path, "elementwise")
    captured = {}
    real_imshow = plt.Axes.imshow

    def spy(self, X, *args, **kwargs):
        captured["X"] = np.ma.getdata(X).copy()
        captured["cmap"] = kwargs.get("cmap")
        captured["norm"] = kwargs.get("norm")
        return real_imshow(self, X, *args, **kwargs)

    monkeypatch.setattr(plt.Axes, "imshow", spy)
    qids = run.qids[:5]
    path = plots.plot_query_clip_heatmap(run, 0, "mha", tmp_path / "h.png", qids=qids)
    check_png(path)
    m = captured["X"]
    t_max = max(lengths[q] for q in qids)
    assert m.shape == (5, t_max)
    for i, q in enumerate(qids):
        t = lengths[q]
        np.testing.assert_allclose(m[i, :t], run.gate(q, 0, "mha").astype(np.float64).mean(axis=1))
        assert np.isnan(m[i, t:]).all()  # padding is NaN, never 0
    cmap, norm = captured["cmap"], captured["norm"]
    assert cmap.name.startswith("RdBu_r")
    assert (norm.vmin, norm.vmax) == (-1.0, 1.0)  # symmetric, centred on 0
    assert tuple(cmap.get_bad()[:3]) != tuple(cmap(norm(0.0))[:3])  # padding colour differs from g = 0


def test_query_layer_heatmap_subsamples_deterministically(tmp_path, monkeypatch):
    acc, _, _ = build(tmp_path, "global", n=30)
    shapes = []
    real_imshow = plt.Axes.imshow
    monkeypatch.setattr(plt.Axes, "imshow",
                        lambda self, X, *a, **k: (shapes.append(np.shape(X)), real_imshow(self, X, *a, **k))[1])
    p1 = plots.plot_query_layer_heatmap(acc.query_stats(), tmp_path / "a.png", max_queries=10)
    p2 = plots.plot_query_layer_heatmap(acc.query_stats(), tmp_path / "b.png", max_queries=10)
    assert shapes[0] == (10, LAYERS) and shapes == [shapes[0]] * 4
    assert open(p1, "rb").read() == open(p2, "rb").read()


def test_value_range_follows_accumulator(tmp_path, monkeypatch):
    """A v2-like range (0, 1.5) is not forced into [-1, 1]."""
    rng = np.random.default_rng(1)
    acc = GateStatsAccumulator("clipwise", 1, value_range=(0.0, 1.5))
    for q in range(4):
        acc.update(q, {(0, k): rng.uniform(0, 1.5, 5).astype(np.float32) for k in KINDS})
    norms = []
    real_imshow = plt.Axes.imshow
    monkeypatch.setattr(plt.Axes, "imshow",
                        lambda self, X, *a, **k: (norms.append(k.get("norm")), real_imshow(self, X, *a, **k))[1])
    paths = plots.plot_all(acc, None, tmp_path)
    assert (norms[0].vmin, norms[0].vmax) == (0.0, 1.5)
    for p in paths:
        check_png(p)


def test_sample_comparison_accepts_mapping(tmp_path):
    rng = np.random.default_rng(2)
    mapping = {f"auto_{i}": {(l, k): np.tanh(rng.normal(size=7)).astype(np.float32) for l in range(3) for k in KINDS}
               for i in range(3)}
    check_png(plots.plot_sample_comparison(mapping, list(mapping), tmp_path / "c.png"))
    with pytest.raises(KeyError, match="nope"):
        plots.plot_sample_comparison(mapping, ["nope"], tmp_path / "d.png")


def test_package_import_does_not_import_matplotlib():
    code = "import sys, gate_analysis; assert 'matplotlib' not in sys.modules; " \
           "gate_analysis.plot_all; assert 'matplotlib' in sys.modules"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


def test_per_kind_value_ranges(tmp_path, monkeypatch):
    """v2: each kind has its own colour scale; data outside the range widen the axes."""
    rng = np.random.default_rng(3)
    vr = {"mha": (0.0, 1.5), "ffn": (-0.3, 0.3)}
    acc = GateStatsAccumulator("clipwise", 1, value_range=vr)
    mapping = {}
    for q in range(6):
        g = {(0, "mha"): rng.uniform(0, 1.5, 8).astype(np.float32),
             (0, "ffn"): rng.uniform(-0.6, 0.3, 8).astype(np.float32)}
        acc.update(q, g)
        mapping[q] = g
    norms = {}
    real_imshow = plt.Axes.imshow

    def spy(self, X, *a, **k):
        norms[self.get_title() or len(norms)] = k.get("norm")
        return real_imshow(self, X, *a, **k)

    monkeypatch.setattr(plt.Axes, "imshow", spy)
    plots.plot_query_clip_heatmap(mapping, 0, "mha", tmp_path / "m.png", value_range=vr)
    plots.plot_query_clip_heatmap(mapping, 0, "ffn", tmp_path / "f.png", value_range=vr)
    got = sorted((n.vmin, n.vmax) for n in norms.values())
    assert got == [(-0.3, 0.3), (0.0, 1.5)]
    # axes widen to show data outside the gate range (FFN values reach -0.6 here)
    fig, ax = plt.subplots()
    figures.value_lim(ax, vr, mapping[0][(0, "ffn")], kind="ffn")
    lo, hi = ax.get_ylim()
    plt.close(fig)
    assert lo <= mapping[0][(0, "ffn")].min() and hi >= 0.3
    path = plots.plot_sample_comparison(mapping, [0, 1], tmp_path / "c.png", value_range=vr)
    check_png(path)
    for p in plots.plot_all(acc, mapping, tmp_path / "all"):
        check_png(p)
