"""The main gate figures of a run: ``plot_all`` writes them into ``{output_dir}/plots/`` with the names
of ``PLOT_FILES``. The figures are drawn by ``plots_gates`` (statistics frames) and ``plots_clips``
(per-clip views) and re-exported here; the shared helpers are in ``figures``. Each function draws one
figure, writes one PNG atomically (temp file in the same folder + ``os.replace``), closes the figure and
returns the path. Backend Agg (set at import); never ``plt.show``.

Reading the figures: colours and axes follow each gate's declared range (``gate_ranges``:
{gate name: ``qd_detr.gates.GateRange``}, from the accumulator or the gate run; tanh [-1, 1] when none
is declared). Signed gates (tanh, scaled tanh, FiLM) use a diverging colormap (``RdBu_r``) centred on
their reference value 0: red = audio added (g > 0), blue = audio subtracted (g < 0), near-white =
audio ignored (for the FiLM FFN gate: g = 0 is branch weight 1, not off). Sigmoid gates, never
negative, use a sequential white-to-red scale from 0 (audio ignored) to their scale (fully used).
Grey cells = no value (padding: the video has no such clip). An explicit ``value_range`` (``(lo, hi)``
or ``{kind: (lo, hi)}``) replaces the declared limits; then the scale is diverging around 0 when it
lies inside, viridis otherwise. Axes widen beyond the range when data lie outside, never hiding
values. Titles use the dotted gate names ``layers.{layer}.gate_{kind}`` (kind ``mha``, ``ffn``, ``beta``).

Inputs are the DataFrames of ``GateStatsAccumulator`` (``histograms()``, ``query_stats()``,
``layer_stats()``, ``dim_stats()``, ``rankings()``) and, for per-clip views, a ``GateRun`` or a
mapping ``{qid: {(layer, kind): array}}``.
"""
import os

from .background import as_paths
from .figures import MappingSource, gate_source, kinds_in, subsample_indices
from .gate_arrays import PER_CLIP_GATING_TYPES, per_clip_values
from .plots_clips import plot_query_clip_heatmap, plot_query_clip_heatmaps, plot_sample_comparison
from .plots_gates import (
    plot_dim_profile,
    plot_layer_distributions,
    plot_layer_evolution,
    plot_query_layer_heatmap,
    plot_rankings,
)

__all__ = ["plot_layer_distributions", "plot_query_layer_heatmap", "plot_query_clip_heatmap", "plot_query_clip_heatmaps",
           "plot_dim_profile", "plot_layer_evolution", "plot_sample_comparison", "plot_rankings", "plot_all", "plot_tasks",
           "draw_clip_heatmaps", "draw_sample_comparison", "task_priority", "PLOT_FILES", "select_compare_qids"]

#: Stable file names written by ``plot_all`` into ``{output_dir}/plots/``.
PLOT_FILES = {
    "layer_distributions": "layer_distributions.png",
    "query_layer_heatmap": "query_layer_heatmap.png",
    "query_clip_heatmap": "query_clip_heatmap_layers.{layer}.gate_{kind}.png",
    "dim_profile": "dim_profile.png",
    "layer_evolution": "layer_evolution.png",
    "sample_comparison": "sample_comparison.png",
    "rankings": "rankings.png",
}


def select_compare_qids(rankings_df, available=None, max_n=6):
    """Default queries for ``plot_sample_comparison``: the first query of the top-1 and bottom-1 video of every
    gate kind over all layers (then the next ranks), one per video, at most ``max_n``."""
    r = rankings_df[rankings_df["layer"].astype(str) == "all"]
    if not len(r):
        return []
    out = []
    for rank in range(1, int(r["rank"].max()) + 1):
        for kind in kinds_in(r):
            for rank_type in ("top", "bottom"):
                sel = r[(r["gate"] == kind) & (r["rank_type"] == rank_type) & (r["rank"] == rank)]
                for q in sel["qid"]:
                    q = int(q)
                    if q not in out and (available is None or q in available):
                        out.append(q)
        if len(out) >= max_n:
            break
    return out[:max_n]


def _open_source(gate_run):
    """(gate source, close) of ``gate_run``: a GateRun-like object or mapping as is, or the output folder of a
    closed gate store (a path), opened here."""
    if isinstance(gate_run, (str, os.PathLike)):
        from .store import load_gate_run
        run = load_gate_run(gate_run)
        return run, run.close
    return gate_source(gate_run), (lambda: None)


def draw_clip_heatmaps(gate_run, keys, paths, chosen, value_range=None, gate_ranges=None, max_queries=100):
    """The per-video clip heatmaps of ``keys`` [(layer, kind)] into ``paths`` (``plot_all``'s): the per-clip
    values of the ``chosen`` queries are read once from ``gate_run`` (a gate source or an output folder),
    then ``plot_query_clip_heatmaps`` draws them. Returns the paths."""
    src, close = _open_source(gate_run)
    try:
        get = src.gate if hasattr(src, "gate") else (lambda q, l, k: src.gates(q)[(l, k)])
        reduced = MappingSource({q: {(l, k): per_clip_values(get(q, l, k)) for l, k in keys} for q in chosen},
                                gating_type=src.gating_type, vids=getattr(src, "vids", None), gate_ranges=gate_ranges)
    finally:
        close()
    return plot_query_clip_heatmaps(reduced, keys, paths, qids=chosen, max_queries=max_queries,
                                    value_range=value_range, gate_ranges=gate_ranges, unit="video")


def draw_sample_comparison(gate_run, qids, path, value_range=None, gate_ranges=None):
    """``plot_sample_comparison`` of ``qids`` from ``gate_run`` (a gate source or an output folder)."""
    src, close = _open_source(gate_run)
    try:
        return plot_sample_comparison(src, qids, path, value_range, gate_ranges=gate_ranges)
    finally:
        close()


def _chunks(items, n):
    """``items`` cut into ``n`` consecutive parts of about equal size (none empty)."""
    n = max(1, min(n, len(items)))
    bounds = [round(i * len(items) / n) for i in range(n + 1)]
    return [items[a:b] for a, b in zip(bounds, bounds[1:])]


#: Order in which a pool starts ``plot_tasks``' tasks (larger figures first, so the processes finish together).
_PRIORITY = ("draw_sample_comparison", "plot_layer_distributions", "draw_clip_heatmaps", "plot_layer_evolution",
             "plot_rankings", "plot_query_layer_heatmap", "plot_dim_profile")


def task_priority(fn):
    """Sort key of a figure task's function: the order a pool starts the tasks of ``plot_tasks`` in."""
    name = getattr(fn, "__name__", "")
    return _PRIORITY.index(name) if name in _PRIORITY else len(_PRIORITY)


def plot_tasks(acc, gate_run, output_dir, compare_qids=None, top_n=10, max_heatmap_queries=200,
               max_clip_heatmap_queries=100):
    """The figures of ``plot_all`` as independent tasks ``[(fn, args, kwargs)]`` (module-level functions with
    picklable arguments, e.g. for ``background.FigurePool``): calling each in turn writes what ``plot_all``
    writes, and their returned paths, concatenated, are ``plot_all``'s list. ``gate_run``: a GateRun, a
    mapping, the output folder of a closed gate store (what a forked process can open), or None."""
    if acc is None:
        if gate_run is None:
            raise ValueError("plot_all needs an accumulator or a gate run")
        from .stats import GateStatsAccumulator
        src, close = _open_source(gate_run)
        try:
            acc = GateStatsAccumulator.from_gate_run(src)
        finally:
            close()
    out = os.path.join(os.fspath(output_dir), "plots")
    os.makedirs(out, exist_ok=True)
    vr = acc.value_range if acc.value_range_given else None  # else: the declared ranges
    gr = acc.gate_ranges
    qs, ls, rk = acc.video_stats(), acc.layer_stats(), acc.rankings(top_n)  # each video once
    if len(qs) == 0:
        raise ValueError("plot_all: the accumulator has no queries")
    f = PLOT_FILES
    tasks = [
        (plot_layer_distributions, (acc.histograms(), qs, os.path.join(out, f["layer_distributions"]), vr),
         dict(gating_type=acc.gating_type, near_zero=acc.near_zero_threshold, gate_ranges=gr)),
        (plot_query_layer_heatmap, (qs, os.path.join(out, f["query_layer_heatmap"]), max_heatmap_queries, vr),
         dict(gate_ranges=gr)),
        (plot_layer_evolution, (ls, os.path.join(out, f["layer_evolution"]), vr), dict(gate_ranges=gr)),
        (plot_rankings, (rk, os.path.join(out, f["rankings"]), "all", vr), dict(gate_ranges=gr)),
    ]
    dims = acc.dim_stats()
    if len(dims):
        tasks.append((plot_dim_profile, (dims, os.path.join(out, f["dim_profile"]), vr), dict(gate_ranges=gr)))
    if gate_run is not None:
        src, close = _open_source(gate_run)
        try:
            all_qids, gating_type, layers, kinds = list(src.qids), src.gating_type, list(src.layers), list(src.kinds)
        finally:
            close()
        # a forked process opens the store itself; an object in memory is handed over as it is
        ref = os.fspath(gate_run) if isinstance(gate_run, (str, os.PathLike)) else gate_run
        stored = set(all_qids)
        if gating_type in PER_CLIP_GATING_TYPES:
            first = [q for q in dict.fromkeys(qs["qid"].astype(int)) if q in stored]  # one query per video
            first = first or all_qids
            chosen = [first[i] for i in subsample_indices(len(first), max_clip_heatmap_queries)]
            # consecutive layers per task (the figure of one task is laid out once per colour scale)
            for part in _chunks(layers, -(-len(layers) * len(kinds) // 6)):
                keys = [(layer, kind) for layer in part for kind in kinds]
                names = [os.path.join(out, f["query_clip_heatmap"].format(layer=l, kind=k)) for l, k in keys]
                tasks.append((draw_clip_heatmaps, (ref, keys, names, chosen, vr, gr, max_clip_heatmap_queries), {}))
        qids = select_compare_qids(rk, stored) if compare_qids is None else list(compare_qids)
        if qids:
            tasks.append((draw_sample_comparison, (ref, qids, os.path.join(out, f["sample_comparison"]), vr, gr), {}))
    return tasks


def plot_all(acc, gate_run, output_dir, compare_qids=None, top_n=10, max_heatmap_queries=200,
             max_clip_heatmap_queries=100):
    """Write every applicable figure into ``{output_dir}/plots/`` with the names of ``PLOT_FILES`` and
    return their paths. ``acc``: a GateStatsAccumulator (built from ``gate_run`` when None);
    ``gate_run``: GateRun (or mapping, or the output folder of a closed gate store) for the per-clip views,
    skipped when None. Per-query figures cover only selected queries: one clip heatmap per gate
    (clipwise/elementwise; at most ``max_clip_heatmap_queries`` evenly spaced rows) and one comparison
    figure for ``compare_qids`` (default: ``select_compare_qids`` of the rankings). The figures are those
    of ``plot_tasks``, drawn here one after the other."""
    paths = []
    for fn, args, kwargs in plot_tasks(acc, gate_run, output_dir, compare_qids, top_n, max_heatmap_queries,
                                       max_clip_heatmap_queries):
        paths += as_paths(fn(*args, **kwargs))
    return paths
