"""Per-clip views of selected queries, read from the raw gates (a ``GateRun`` or a mapping
``{qid: {(layer, kind): array}}``): the queries x clips heatmap of one gate and the side-by-side
comparison of a few queries. Clipwise and elementwise gating only (elementwise: mean over dims)."""
import os

import numpy as np

from qd_detr.gates import gate_name

from .figures import (
    LAYOUT,
    PAD_COLOR,
    cmap_norm,
    colorbar,
    gate_source,
    heatmap_height,
    kind_label,
    legend_columns,
    panel_scale,
    plt,
    query_label,
    save_png,
    subsample_indices,
    value_label,
    value_lim,
    zero_line,
)
from .gate_arrays import PER_CLIP_GATING_TYPES, per_clip_values

__all__ = ["plot_query_clip_heatmap", "plot_query_clip_heatmaps", "plot_sample_comparison"]


def _heatmap_rows(src, layer, kind, qids, max_queries):
    """(chosen qids, [n, T_max] matrix with NaN padding, T_max) of one gate's per-clip values."""
    chosen = [qids[i] for i in subsample_indices(len(qids), max_queries)]
    if not chosen:
        raise ValueError("plot_query_clip_heatmap: no queries to plot")
    get = src.gate if hasattr(src, "gate") else (lambda q, l, k: src.gates(q)[(l, k)])
    rows = [per_clip_values(get(q, layer, kind)) for q in chosen]
    t_max = max(r.size for r in rows)
    m = np.full((len(rows), max(t_max, 1)), np.nan)  # NaN = padding (no such clip)
    for i, r in enumerate(rows):
        m[i, :r.size] = r
    return chosen, m, t_max


def _heatmap_title(src, layer, kind, n, n_requested, units):
    how = " (mean over feature dims)" if src.gating_type == "elementwise" else ""
    note = f"{n:,} of {n_requested:,} {units} (evenly spaced)" if n < n_requested else f"{n:,} {units}"
    return f"{gate_name(layer, kind)}: gate per clip{how}, {src.gating_type} gating; {note}"


def _draw_heatmap(src, chosen, m, t_max, sc, unit, units, title):
    """The heatmap figure: (fig, ax, image)."""
    from matplotlib.patches import Patch
    cmap, norm, _ = cmap_norm(sc)
    n = len(chosen)
    fig, ax = plt.subplots(layout=LAYOUT, figsize=(min(max(0.12 * t_max + 3.5, 7.5), 16), heatmap_height(n)))
    im = ax.imshow(m, aspect="auto", interpolation="nearest", cmap=cmap, norm=norm)
    ax.set_xlabel("clip index t (2-second clips)")
    if n <= 60:
        ax.set_yticks(range(n), [query_label(src, q) for q in chosen], fontsize=7)
        ax.set_ylabel(unit)
    else:
        ax.set_yticks([])
        ax.set_ylabel(f"{units} (row = one {unit}; {n:,} rows)")
    colorbar(fig, im, ax, sc)
    ax.legend(handles=[Patch(facecolor=PAD_COLOR, label="no clip (video shorter)")], loc="upper right",
              fontsize=8, framealpha=0.9)
    ax.set_title(title, fontsize=11)
    return fig, ax, im


def _check_heatmap_args(src, gate_ranges, qids):
    src = gate_source(src)
    if gate_ranges is None:
        gate_ranges = getattr(src, "gate_ranges", None)
    if src.gating_type not in PER_CLIP_GATING_TYPES:
        raise ValueError(f"plot_query_clip_heatmap needs clipwise or elementwise gates; this run has "
                         f"{src.gating_type!r} gating (one gate per query)")
    return src, gate_ranges, list(src.qids if qids is None else qids)


def plot_query_clip_heatmap(gate_run, layer, kind, path, qids=None, max_queries=100, value_range=None,
                            gate_ranges=None, unit="query"):
    """Queries x clips heatmap of one gate (``layers.{layer}.gate_{kind}``) for clipwise or
    elementwise gating (elementwise averaged over the D dims). Clips beyond a video's end are NaN and
    drawn grey. ``qids``: rows to show (default: up to ``max_queries`` evenly spaced queries). Colours
    follow the gate's declared range (``gate_ranges``, default: the gate run's). ``unit="video"``: the rows are
    one query per video (its gates are the video's) and are labelled as videos."""
    return plot_query_clip_heatmaps(gate_run, [(layer, kind)], [path], qids, max_queries, value_range, gate_ranges,
                                    unit)[0]


def plot_query_clip_heatmaps(gate_run, keys, paths, qids=None, max_queries=100, value_range=None, gate_ranges=None,
                             unit="query"):
    """``plot_query_clip_heatmap`` of every (layer, kind) of ``keys`` into the matching ``paths``; returns the
    paths. Each PNG equals the one ``plot_query_clip_heatmap`` writes: heatmaps of the same rows, clips and
    colour scale share one figure, laid out once (its other texts are the same; a title of another height
    gets a figure of its own), whose image and title are replaced for each."""
    units = "videos" if unit == "video" else "queries"
    src, gate_ranges, requested = _check_heatmap_args(gate_run, gate_ranges, qids)
    drawn, opened = {}, []  # layout key -> (fig, ax, image, title box): figures whose positions are fixed
    try:
        for (layer, kind), path in zip(keys, paths):
            chosen, m, t_max = _heatmap_rows(src, layer, kind, requested, max_queries)
            sc = panel_scale(value_range, kind, gate_ranges, layer)
            title = _heatmap_title(src, layer, kind, len(chosen), len(requested), units)
            key = (sc, value_label(sc), t_max, tuple(chosen))
            reuse = key in drawn
            if reuse:
                fig, ax, im, box = drawn[key]
                old = ax.get_title()
                ax.set_title(title, fontsize=11)
                new_box = ax.title.get_window_extent(fig.canvas.get_renderer())
                reuse = (new_box.y0, new_box.y1) == (box.y0, box.y1)  # else the layout could differ
                if reuse:
                    im.set_data(m)
                else:
                    ax.set_title(old, fontsize=11)
            if not reuse:
                fig, ax, im = _draw_heatmap(src, chosen, m, t_max, sc, unit, units, title)
                opened.append(fig)
            save_png(fig, path, close=False)  # the first save lays the figure out and fixes the positions
            if key not in drawn:
                drawn[key] = (fig, ax, im, ax.title.get_window_extent(fig.canvas.get_renderer()))
    finally:
        for fig in opened:
            plt.close(fig)
    return [os.fspath(p) for p in paths]


def plot_sample_comparison(gate_run_or_mapping, qids, path, value_range=None, max_samples=10, gate_ranges=None):
    """Selected queries side by side: per-layer mean gate (one panel per gate kind); for clipwise and
    elementwise gating also the per-clip gate profile of every layer (elementwise: mean over dims,
    ± std over dims when at most 3 queries are shown). Axes follow the declared ``gate_ranges``
    (default: the gate run's)."""
    src = gate_source(gate_run_or_mapping)
    if gate_ranges is None:
        gate_ranges = getattr(src, "gate_ranges", None)
    qids = list(qids)
    if not qids:
        raise ValueError("plot_sample_comparison: no qids given")
    shown = qids[:max_samples]
    gates = {q: src.gates(q) for q in shown}  # KeyError names the unknown qid
    layers, kinds = list(src.layers), list(src.kinds)
    per_clip = src.gating_type in PER_CLIP_GATING_TYPES
    elementwise = src.gating_type == "elementwise"
    nrow = 1 + (len(layers) if per_clip else 0)
    t_max = max((np.asarray(a).shape[0] for g in gates.values() for a in g.values()), default=1)
    fig, axes = plt.subplots(nrow, len(kinds), layout=LAYOUT, squeeze=False,
                             figsize=(6.2 * len(kinds), 3.0 + 2.3 * (nrow - 1)))
    colors = plt.get_cmap("tab10")
    for j, kind in enumerate(kinds):
        ax = axes[0, j]
        all_means = []
        for c, q in enumerate(shown):
            means = [float(np.mean(gates[q][(l, kind)], dtype=np.float64)) for l in layers]
            all_means += means
            ax.plot(layers, means, marker="o", color=colors(c % 10), label=query_label(src, q))
        sc = panel_scale(value_range, kind, gate_ranges)
        zero_line(ax, sc, axis="y")
        value_lim(ax, sc, all_means)
        ax.set_xticks(layers)
        ax.set_xlabel("fusion layer")
        ax.set_ylabel("mean gate of the query")
        ax.set_title(f"{kind_label(kind, sc.rng)}: mean per layer", fontsize=10, loc="left")
        for i, layer in enumerate(layers if per_clip else []):
            ax = axes[i + 1, j]
            values = []
            for c, q in enumerate(shown):
                arr = np.asarray(gates[q][(layer, kind)], dtype=np.float64)
                y = per_clip_values(arr)
                values.append(y)
                ax.plot(np.arange(y.size), y, color=colors(c % 10), lw=1.1)
                if arr.ndim == 2 and len(shown) <= 3:  # spread over dims; too cluttered for more queries
                    sd = arr.std(axis=1)
                    ax.fill_between(np.arange(y.size), y - sd, y + sd, color=colors(c % 10), alpha=0.12, lw=0)
            sc = panel_scale(value_range, kind, gate_ranges, layer)
            zero_line(ax, sc, axis="y")
            value_lim(ax, sc, np.concatenate(values))
            ax.set_xlim(-0.5, t_max - 0.5)
            if j == 0:
                ax.set_ylabel("gate value")
            dims = f" (mean over dims{' ± std' if len(shown) <= 3 else ''})" if elementwise else ""
            ax.set_title(f"{gate_name(layer, kind)} per clip{dims}", fontsize=10, loc="left")
            if i == len(layers) - 1:
                ax.set_xlabel("clip index t (2-second clips)")
            else:
                ax.tick_params(labelbottom=False)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=legend_columns(fig, labels, 9, max_cols=5),
               fontsize=9, frameon=False)
    note = f" (first {len(shown)} of {len(qids)} requested)" if len(shown) < len(qids) else ""
    fig.suptitle(f"Gate comparison of selected queries, {src.gating_type} gating{note}", fontsize=12)
    return save_png(fig, path)
