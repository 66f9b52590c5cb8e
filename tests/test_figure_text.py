"""Figures explain themselves: no drawn text lies outside its image or is cut by its axes (the check of
``figures.save_png``, run here on every figure kind of small runs), titles name only the analyses that ran,
and one colour convention holds (red/blue = gate values; effects and correlations: the effect colours)."""
import json
import os

import numpy as np
import pandas as pd
import pytest

from conftest import analysis_config, small_checkpoint

matplotlib = pytest.importorskip("matplotlib")
from matplotlib import colors as mcolors  # noqa: E402

from gate_analysis import (  # noqa: E402
    figures,
    plots_causal,
    plots_clips,
    plots_compare,
    plots_gates,
    plots_ground_truth,
    plots_performance,
)
from gate_analysis.pipeline import run_analysis  # noqa: E402

CHECK = figures.CHECK_TEXT_ENV
PLOT_MODULES = (plots_gates, plots_clips, plots_causal, plots_compare, plots_ground_truth, plots_performance)
GATE_CMAPS = {"RdBu_r", "Reds", "Reds_r"}
# name: (gating type, model options, analysis options); "full" also compares with "plain" and splits a subset
RUNS = {
    "plain": ("elementwise", {}, {}),
    "full": ("clipwise", {}, dict(ablate=["zero", "audio_zero"], ablate_layers=["all", "0"], contributions=True,
                                  failure_cases=3, subset_mode="split")),
    "film": ("clipwise", dict(mha_gate_temp=2.0, ffn_gate_film=True),
             dict(ablate=["zero"], ablate_gates=["both", "all"], contributions=True)),
}


def _colours(fig):
    """(colormap names, rounded RGBA fills of bars and single-colour markers) of a figure."""
    cmaps, fills = set(), set()
    for ax in fig.axes:
        cmaps |= {im.get_cmap().name for im in ax.images}
        for c in ax.collections:
            if c.get_array() is not None:
                cmaps.add(c.get_cmap().name)
            else:
                fills |= {tuple(np.round(fc, 3)) for fc in c.get_facecolors()}
        fills |= {tuple(np.round(p.get_facecolor(), 3)) for p in ax.patches}
    return cmaps, fills


def _spy(mp, seen):
    """Record ``_colours`` of every figure the plot modules save, keyed by file name."""
    real = figures.save_png

    def spy(fig, path, *args, **kwargs):
        seen[os.path.basename(os.fspath(path))] = _colours(fig)
        return real(fig, path, *args, **kwargs)

    for module in PLOT_MODULES:
        mp.setattr(module, "save_png", spy)


def _norm(path):
    return os.path.normpath(os.path.abspath(os.fspath(path)))


@pytest.fixture(scope="module")
def runs(demo_data, tmp_path_factory):
    """The runs of ``RUNS`` with every figure, the text check on (raising) and plots drawn in process:
    {name: (output folder, {png name: [(role, text)]}, {png name: (cmaps, fills)})}."""
    _, paths = demo_data
    root = tmp_path_factory.mktemp("figure_text")
    subset = root / "subset.txt"
    records = [json.loads(line) for line in open(paths["jsonl"]["val"])]
    subset.write_text("".join(f"{r['qid']}\n" for r in records[:5]))
    done = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CHECK, "1")
        mp.setenv("AVIGATE_PLOT_PROCESS", "0")
        for name, (gating, model_kw, kw) in RUNS.items():
            colours = {}
            _spy(mp, colours)
            out = root / name
            out.mkdir()
            ckpt = small_checkpoint(root / f"{name}.ckpt", "custom", gating, seed=3, **model_kw)[0]
            if name == "full":
                kw = dict(kw, subset=str(subset), compare_runs=[str(root / "plain")])
            run_analysis(analysis_config(ckpt, paths, out, batch_size=4, top_n=3, **kw), progress=False,
                         log=lambda m: None)
            plots = _norm(out / "plots")
            texts = {os.path.basename(p): t for p, t in figures.CHECKED_TEXTS.items()
                     if os.path.dirname(_norm(p)) == plots}
            done[name] = (out, texts, colours)
    return done


def _titles(texts, name, roles=("suptitle", "title")):
    """The titles of figure ``name``, line breaks (from wrapping) read as spaces."""
    return " | ".join(" ".join(t.split()) for role, t in texts[name] if role in roles)


def test_every_figure_of_every_run_was_checked(runs):
    expected = {
        "plain": {"dim_profile.png", "query_clip_heatmap_layers.1.gate_ffn.png", "sample_comparison.png",
                  "ground_truth_auroc_spearman.png", "ground_truth_across_queries.png", "ground_truth_examples.png",
                  "performance_correlations.png", "performance_scatter.png", "query_layer_heatmap.png"},
        "full": {"ablation_overall.png", "ablation_per_query.png", "ablation_heatmap.png", "contributions.png",
                 "contribution_layers.png", "failure_cases.png", "subset_split.png", "compare_layer_evolution.png",
                 "compare_query_differences.png", "ground_truth_inside_outside.png", "rankings.png"},
        "film": {"query_clip_heatmap_layers.0.gate_beta.png", "query_clip_heatmap_layers.1.gate_mha.png",
                 "ablation_heatmap.png", "layer_distributions.png", "layer_evolution.png"},
    }
    for name, (out, texts, colours) in runs.items():
        written = set(os.listdir(out / "plots"))
        assert expected[name] <= written, (name, expected[name] - written)
        assert set(texts) == written, name  # the check saw every PNG (and raised on none)
        for png, t in texts.items():
            roles = {role for role, _ in t}
            assert {"tick label", "axis label"} <= roles, (name, png)
            assert roles & {"suptitle", "title"}, (name, png)
    legend = [t for role, t in runs["full"][1]["sample_comparison.png"] if role == "legend"]
    assert len(legend) == len(set(legend)) >= 3  # one entry per compared video, all drawn inside the image


def test_titles_name_only_the_analyses_that_ran(runs):
    plain, full = runs["plain"][1], runs["full"][1]
    assert "intervention" not in _titles(plain, "performance_correlations.png")
    assert "intervention" in _titles(full, "performance_correlations.png")
    for png in ("ground_truth_across_queries.png", "ground_truth_auroc_spearman.png"):
        assert "contribution" not in _titles(plain, png).lower(), png
        assert "contribution" in _titles(full, png).lower(), png
    # only the run with an audio-off intervention says what orange means for it
    assert "audio-off" in _titles(full, "ablation_per_query.png")
    assert "darker = higher saliency" in _titles(plain, "ground_truth_examples.png")


def test_one_colour_convention(runs):
    effect = matplotlib.colormaps[figures.EFFECT_CMAP]
    assert figures.EFFECT_CMAP not in GATE_CMAPS | {"RdBu"}
    worse, better = (tuple(np.round(effect(v), 3)) for v in (0.15, 0.85))
    assert better[2] > better[0] and worse[0] > worse[2]  # purple = better, orange = worse
    grey = tuple(np.round(mcolors.to_rgba("0.6"), 3))
    assert [tuple(np.round(c if not isinstance(c, str) else mcolors.to_rgba(c), 3))
            for c in figures.effect_colors([1.0, -2.0, 0.0])] == [better, worse, grey]
    gate_maps = {"query_layer_heatmap.png", "compare_query_differences.png"}
    for name, (_, _, colours) in runs.items():
        for png, (cmaps, fills) in colours.items():
            if png.startswith(("query_clip_heatmap", "query_layer_heatmap", "compare_query_differences")):
                assert cmaps and cmaps <= GATE_CMAPS, (name, png, cmaps)  # gate values: the gate colours
            if png in ("ablation_heatmap.png", "performance_correlations.png"):
                assert cmaps == {figures.EFFECT_CMAP}, (name, png, cmaps)  # effects: never the gate colours
            if png in ("ablation_overall.png", "ablation_per_query.png", "failure_cases.png"):
                assert fills and fills <= {better, worse, grey}, (name, png, fills)
                assert not cmaps & GATE_CMAPS, (name, png)
    assert {better, worse} <= runs["full"][2]["failure_cases.png"][1]
    assert gate_maps <= set(runs["full"][2])


def test_label_free_ablation_figures_are_grey_and_sequential(runs, tmp_path, monkeypatch):
    """Without labels, the ablation figures show how much predictions moved: sizes, never better/worse."""
    out = runs["full"][0]
    ab = pd.read_csv(out / "ablation.csv", dtype={"layers": str})
    ov = pd.read_csv(out / "ablation_overall.csv", dtype={"layers": str})
    labelled = [c for c in ab.columns if c.startswith(("base_", "ablated_", "delta_"))]
    ab[labelled] = np.nan
    ov = ov[ov["metric"].isin(["frac_top1_window_changed", "mean_saliency_abs_change"])]
    monkeypatch.setenv(CHECK, "1")
    seen = {}
    _spy(monkeypatch, seen)
    paths = plots_causal.plot_ablation(ab, ov, tmp_path)
    assert sorted(os.path.basename(p) for p in paths) == ["ablation_heatmap.png", "ablation_overall.png",
                                                          "ablation_per_query.png"]
    grey = tuple(np.round(mcolors.to_rgba("0.45"), 3))
    assert seen["ablation_overall.png"][1] == {grey} and seen["ablation_per_query.png"][1] == {grey}
    assert seen["ablation_heatmap.png"][0] == {"viridis"}
    texts = {"heatmap": figures.CHECKED_TEXTS[os.fspath(tmp_path / "plots" / "ablation_heatmap.png")]}
    assert "no labels" in _titles(texts, "heatmap") and "better" not in _titles(texts, "heatmap", ("axis label",))


def _save(fig, path):
    figures.save_png(fig, path)
    return path


def test_a_clipped_figure_is_caught_and_named(tmp_path, monkeypatch):
    plt = figures.plt
    monkeypatch.setenv(CHECK, "1")

    def clipped_title():
        fig, ax = plt.subplots(figsize=(3, 2), layout="constrained")
        ax.plot([0, 1], [0, 1])
        ax.set_title("a title far too long for a figure only three inches wide, so it sticks out")
        return fig

    with pytest.raises(figures.FigureTextError, match=r"wide\.png: clipped text: title 'a title far too long"):
        _save(clipped_title(), tmp_path / "wide.png")
    assert not (tmp_path / "wide.png").exists() and plt.get_fignums() == []
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]

    # a legend placed beside the axes, beyond the right edge: named with the side and the overshoot
    fig, ax = plt.subplots(figsize=(4, 3), layout=None)
    ax.plot([0, 1], label="a line whose legend entry is outside")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5))
    with pytest.raises(figures.FigureTextError, match=r"legend 'a line whose legend entry is outside' extends beyond "
                                                     r"the image \(right by \d+ px\)"):
        _save(fig, tmp_path / "legend.png")

    # an annotation inside the figure but cut by the axes that clips it (ax.text clips to its axes)
    fig = plt.figure(figsize=(4, 3))
    ax = fig.add_axes((0.15, 0.15, 0.45, 0.7))
    ax.set_xlim(0, 1)
    ax.text(0.9, 0.5, "+0.123 value label", clip_on=True)
    with pytest.raises(figures.FigureTextError, match="annotation '\\+0.123 value label' is cut by its axes"):
        _save(fig, tmp_path / "cut.png")

    # a suptitle wider than the figure (the layout cannot help)
    fig, ax = plt.subplots(figsize=(3, 2), layout="constrained")
    fig.suptitle("x" * 80)
    with pytest.raises(figures.FigureTextError, match="suptitle"):
        _save(fig, tmp_path / "sup.png")

    # warn: a warning naming the text, and the figure is still written
    monkeypatch.setenv(CHECK, "warn")
    with pytest.warns(UserWarning, match="clipped text: title"):
        _save(clipped_title(), tmp_path / "warned.png")
    assert (tmp_path / "warned.png").stat().st_size > 0
    # off: nothing checked
    monkeypatch.delenv(CHECK)
    _save(clipped_title(), tmp_path / "unchecked.png")
    assert os.fspath(tmp_path / "unchecked.png") not in figures.CHECKED_TEXTS


def test_what_the_check_accepts(tmp_path, monkeypatch):
    plt = figures.plt
    monkeypatch.setenv(CHECK, "1")
    # texts of hidden axes and ticks outside the view are not drawn, so they are not checked
    fig, axes = plt.subplots(1, 2, figsize=(5, 3), layout="constrained")
    axes[0].plot(np.arange(10), np.arange(10))
    axes[0].set_xlim(2.1, 4.9)
    axes[0].set_yticks([])
    axes[0].set_title("fits")
    axes[1].set_title("a hidden panel's title that would stick out far beyond the right edge of the image")
    axes[1].set_visible(False)
    fig.suptitle("a suptitle")
    path = _save(fig, tmp_path / "ok.png")
    texts = figures.CHECKED_TEXTS[os.fspath(path)]
    assert ("suptitle", "a suptitle") in texts and ("title", "fits") in texts
    assert not [t for _, t in texts if "hidden" in t]
    ticks = [float(t) for role, t in texts if role == "tick label"]
    locs = axes[0].xaxis.get_majorticklocs()
    assert ticks == [v for v in locs if 2.1 <= v <= 4.9] and len(ticks) < len(locs)  # only those in the view
    # a tight bounding box grows to the texts: nothing is clipped
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.set_title("a long title that a tight bounding box takes in whole, whatever the figure size")
    figures.save_png(fig, tmp_path / "tight.png", bbox_inches="tight")
    assert (tmp_path / "tight.png").stat().st_size > 0


def test_long_labels_fit_at_the_default_size(tmp_path, monkeypatch):
    """Long video ids in the comparison legend and a long colour-bar label on a short heatmap still fit."""
    monkeypatch.setenv(CHECK, "1")
    rng = np.random.default_rng(0)
    mapping, vids = {}, {}
    for i in range(10):
        t = 5 + i
        mapping[100 + i] = {(l, k): np.tanh(rng.normal(0, 0.5, t)).astype(np.float32) for l in range(2)
                            for k in ("mha", "ffn")}
        vids[100 + i] = f"averyveryverylongvideoidentifier{i}_1620.0_1770.0"
    src = figures.MappingSource(mapping, vids=vids)
    path = plots_clips.plot_sample_comparison(src, list(mapping), tmp_path / "cmp.png")
    legend = [t for role, t in figures.CHECKED_TEXTS[os.fspath(path)] if role == "legend"]
    assert len(legend) == 10
    path = plots_clips.plot_query_clip_heatmap(src, 0, "mha", tmp_path / "clip.png", qids=[100])
    fig = figures.plt.figure(figsize=(4, 3.6))
    assert "\n" in figures.wrap_text(fig, "word " * 40, 9, 200)
    assert figures.legend_columns(fig, ["x" * 60] * 4, 9) == 1 and figures.legend_columns(fig, ["a", "b"], 9) == 2
    figures.plt.close(fig)
