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

from . import figures
from .figures import MappingSource, gate_source, kinds_in, per_clip_values, subsample_indices
from .gate_arrays import PER_CLIP_GATING_TYPES
from .plots_clips import plot_query_clip_heatmap, plot_sample_comparison
from .plots_gates import (
    plot_dim_profile,
    plot_layer_distributions,
    plot_layer_evolution,
    plot_query_layer_heatmap,
    plot_rankings,
)

__all__ = ["plot_layer_distributions", "plot_query_layer_heatmap", "plot_query_clip_heatmap", "plot_dim_profile",
           "plot_layer_evolution", "plot_sample_comparison", "plot_rankings", "plot_all", "PLOT_FILES",
           "select_compare_qids"]

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
    """Default queries for ``plot_sample_comparison``: the top-1 and bottom-1 query of every gate kind
    over all layers (then the next ranks), deduplicated, at most ``max_n``."""
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


def plot_all(acc, gate_run, output_dir, compare_qids=None, top_n=10, max_heatmap_queries=200,
             max_clip_heatmap_queries=100):
    """Write every applicable figure into ``{output_dir}/plots/`` with the names of ``PLOT_FILES`` and
    return their paths. ``acc``: a GateStatsAccumulator (built from ``gate_run`` when None);
    ``gate_run``: GateRun (or mapping) for the per-clip views, skipped when None. Per-query figures
    cover only selected queries: one clip heatmap per gate (clipwise/elementwise; at most
    ``max_clip_heatmap_queries`` evenly spaced rows) and one comparison figure for ``compare_qids``
    (default: ``select_compare_qids`` of the rankings)."""
    if acc is None:
        if gate_run is None:
            raise ValueError("plot_all needs an accumulator or a gate run")
        from .stats import GateStatsAccumulator
        acc = GateStatsAccumulator.from_gate_run(gate_run)
    out = os.path.join(os.fspath(output_dir), "plots")
    os.makedirs(out, exist_ok=True)
    vr = acc.value_range if acc.value_range_given else None  # else: the declared ranges
    gr = acc.gate_ranges
    qs, ls, rk = acc.query_stats(), acc.layer_stats(), acc.rankings(top_n)
    if len(qs) == 0:
        raise ValueError("plot_all: the accumulator has no queries")
    f = PLOT_FILES
    paths = [
        plot_layer_distributions(acc.histograms(), qs, os.path.join(out, f["layer_distributions"]), vr,
                                 gating_type=acc.gating_type, near_zero=acc.near_zero_threshold, gate_ranges=gr),
        plot_query_layer_heatmap(qs, os.path.join(out, f["query_layer_heatmap"]), max_heatmap_queries, vr,
                                 gate_ranges=gr),
        plot_layer_evolution(ls, os.path.join(out, f["layer_evolution"]), vr, gate_ranges=gr),
        plot_rankings(rk, os.path.join(out, f["rankings"]), "all", vr, gate_ranges=gr),
    ]
    dims = acc.dim_stats()
    if len(dims):
        paths.append(plot_dim_profile(dims, os.path.join(out, f["dim_profile"]), vr, gate_ranges=gr))
    if gate_run is not None:
        src = gate_source(gate_run)
        if src.gating_type in PER_CLIP_GATING_TYPES:
            # read the selected queries once, reduced to per-clip values, for all layer x kind heatmaps
            chosen = [src.qids[i] for i in subsample_indices(len(src.qids), max_clip_heatmap_queries)]
            reduced = MappingSource({q: {key: per_clip_values(a) for key, a in src.gates(q).items()} for q in chosen},
                                     gating_type=src.gating_type, vids=getattr(src, "vids", None), gate_ranges=gr)
            for layer in src.layers:
                for kind in src.kinds:
                    name = f["query_clip_heatmap"].format(layer=layer, kind=kind)
                    paths.append(plot_query_clip_heatmap(reduced, layer, kind, os.path.join(out, name),
                                                         max_queries=max_clip_heatmap_queries, value_range=vr,
                                                         gate_ranges=gr))
        available = set(src.qids)
        qids = select_compare_qids(rk, available) if compare_qids is None else list(compare_qids)
        if qids:
            paths.append(plot_sample_comparison(src, qids, os.path.join(out, f["sample_comparison"]), vr,
                                                gate_ranges=gr))
    return paths




# compatibility (H-F): tests/test_gate_ranges.py (H-A's) still reads these three by their old private names;
# remove once it uses gate_analysis.figures.panel_scale / cmap_norm / value_label
_scale, _cmap_norm, _value_label = figures.panel_scale, figures.cmap_norm, figures.value_label
