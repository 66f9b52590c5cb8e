"""``figures.save_png``: matplotlib's own ticks are capped at ``MAX_TICK_BINS`` intervals (ticks a figure
sets are kept), and placing each title once gives the same PNG as matplotlib's placement in every pass,
also where a title has to rise (an x axis on top, a y offset text), with the text check on and off."""
import io

import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")

from gate_analysis import figures  # noqa: E402
from gate_analysis.figures import plt  # noqa: E402


def _in_view(axis):
    lo, hi = sorted(axis.get_view_interval())
    return [float(v) for v in axis.get_majorticklocs() if lo - 1e-9 <= v <= hi + 1e-9]


@pytest.mark.parametrize("check", ["", "1"])
def test_automatic_ticks_are_capped_and_set_ticks_kept(tmp_path, monkeypatch, check):
    monkeypatch.setenv(figures.CHECK_TEXT_ENV, check)
    fig, (a, b, c) = plt.subplots(3, 1, figsize=(6, 12), layout=figures.LAYOUT)
    a.plot([0, 75], [-1, 1])  # a tall gate axis: matplotlib alone puts 9 ticks on it (steps of 0.25)
    b.plot([0, 75], [-0.3, 0.3])
    b.set_ylim(-0.3, 0.3)  # a FiLM gate's range: 6 intervals of 0.1 are within the cap
    b.set_xticks(range(0, 76, 5))  # the figure's own choice: 16 ticks
    c.plot([0, 1], [0, 1])
    c.set_xlim(0, 1)
    figures.save_png(fig, tmp_path / "ticks.png", close=False)
    assert _in_view(a.yaxis) == [-1.0, -0.5, 0.0, 0.5, 1.0]
    assert _in_view(a.xaxis) == [0, 20, 40, 60]
    assert _in_view(b.xaxis) == list(range(0, 76, 5))
    assert _in_view(b.yaxis) == pytest.approx([-0.3, -0.2, -0.1, 0.0, 0.1, 0.2, 0.3])
    assert len(_in_view(c.xaxis)) - 1 <= figures.MAX_TICK_BINS
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([0, 75], [-1, 1])
    assert len(_in_view(ax.yaxis)) == 9  # matplotlib's own choice, for the comparison above
    plt.close(fig)


def test_capped_ticks_follow_the_room_of_a_small_axis():
    fig, ax = plt.subplots(figsize=(0.9, 3))
    ax.set_xlim(0, 100)
    figures.cap_auto_ticks(fig)
    assert isinstance(ax.xaxis.get_major_locator(), figures.CappedAutoLocator)
    fig.canvas.draw()
    room = ax.xaxis.get_tick_space()
    assert room < figures.MAX_TICK_BINS and len(_in_view(ax.xaxis)) - 1 <= room
    plt.close(fig)


def _figure(kind):
    """A figure whose titles matplotlib places: plain, with an axis on top, with a y offset text."""
    x = np.linspace(0, 70, 36)
    fig, axes = plt.subplots(2, 2, figsize=(8, 5), layout=figures.LAYOUT)
    for i, ax in enumerate(axes.flat):
        offset = kind == "offset" and i == 2  # ScalarFormatter shows an offset above this y axis
        ax.plot(x, 1000 + x * 1e-4 if offset else np.sin(x / (4 + i)), label="layer 0")
        ax.set_title(f"layers.{i}.gate_mha per clip", loc="left", fontsize=9)
        ax.set_xlabel("clip index t")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("Gates of four panels")
    if kind == "top_axis":
        top = axes[0, 1].secondary_xaxis("top")
        top.set_xticks([10, 50], ["layer 0", "layer 1"])
    return fig


@pytest.mark.parametrize("check", ["", "1"])
@pytest.mark.parametrize("kind", ["plain", "top_axis", "offset"])
def test_titles_placed_once_give_matplotlibs_image(tmp_path, monkeypatch, kind, check):
    monkeypatch.setenv(figures.CHECK_TEXT_ENV, check)
    monkeypatch.setattr(figures, "cap_auto_ticks", lambda fig: None)  # the reference keeps matplotlib's ticks
    ref = _figure(kind)
    buf = io.BytesIO()
    ref.savefig(buf, format="png", dpi=figures.DPI, pil_kwargs={"compress_level": 1})
    plt.close(ref)
    fig = _figure(kind)
    frozen = figures._freeze_titles(fig)
    figures._thaw_titles(frozen)
    assert bool(frozen) == (kind != "top_axis")  # an axis on top: matplotlib places every title itself
    figures.save_png(fig, tmp_path / "f.png", close=False)
    if kind == "offset":
        assert figures._offset_text_shown(fig)
    assert all(ax._autotitlepos for ax in frozen)  # a kept figure places its titles again when next drawn
    plt.close(fig)
    assert (tmp_path / "f.png").read_bytes() == buf.getvalue()
