"""Figures of the comparison of runs (``gate_analysis.compare``): per-layer gates across runs and the
per-query mean gate in each run (``COMPARE_PLOTS``); axes and colours cover every run's declared ranges."""
import os

import numpy as np

from qd_detr.gates import GATE_KINDS, gate_name

from .compare import ALL, run_gate_ranges
from .figures import (
    LAYOUT,
    cmap_norm,
    colorbar,
    heatmap_height,
    kind_label,
    panel_scale,
    plt,
    save_png,
    subsample_indices,
    union_scale,
    value_lim,
    zero_line,
)
from .outputs import COMPARE_PLOTS, PLOTS_DIR

__all__ = ["plot_compare"]


def plot_compare(runs, layers, queries, output_dir, max_queries=80, gate_ranges=None):
    """Per-layer mean ± spread across runs, and per-query differences vs the first run; returns paths.
    Gate axes and colours cover every run's declared ranges (``gate_ranges``: one {gate name: GateRange}
    per run; default: read from the runs' folders; tanh [-1, 1] for runs that declare none)."""
    if gate_ranges is None:
        gate_ranges = [run_gate_ranges(path) if os.path.isdir(str(path)) else {} for path in runs["path"]]
    per_run = [g or None for g in gate_ranges] or [None]
    out = os.path.join(output_dir, PLOTS_DIR)
    os.makedirs(out, exist_ok=True)
    kinds = [k for k in GATE_KINDS if (layers["gate"] == k).any()]
    run_labels = list(runs["run_label"])
    x = np.arange(len(run_labels))
    fig, axes = plt.subplots(2, len(kinds), figsize=(max(5.5, 1.1 * len(x) + 3) * len(kinds), 7.2),
                             layout=LAYOUT, squeeze=False, sharex=True)
    cmap = plt.get_cmap("viridis")
    all_layers = sorted(layers["layer"].unique())
    for j, kind in enumerate(kinds):
        for c, layer in enumerate(all_layers):
            s = layers[(layers["gate"] == kind) & (layers["layer"] == layer)].set_index("run").reindex(x)
            color = cmap(c / max(len(all_layers) - 1, 1))
            axes[0, j].plot(x, s["mean"], "o-", color=color, label=f"layer {layer}")
            axes[0, j].fill_between(x, s["p25"], s["p75"], color=color, alpha=0.15)
            axes[1, j].plot(x, s["std"], "o-", color=color, label=f"layer {layer}: across queries")
            axes[1, j].plot(x, s["mean_within_std"], "x:", color=color)
        sc = union_scale([panel_scale(None, kind, g) for g in per_run])
        value_lim(axes[0, j], sc, layers.loc[layers["gate"] == kind, ["p25", "p75", "mean"]].to_numpy())
        zero_line(axes[0, j], sc, axis="y")
        axes[0, j].set_ylabel("mean of per-query mean gate\n(band: IQR over queries)")
        axes[0, j].set_title(kind_label(kind, sc.rng), fontsize=10, loc="left")
        axes[0, j].legend(fontsize=7)
        axes[1, j].set_ylim(bottom=0)
        axes[1, j].set_ylabel("spread: std across queries (o)\nmean std within a query (x)")
        axes[1, j].set_xticks(x, run_labels, rotation=25, ha="right", fontsize=8)
        axes[1, j].set_xlabel("run")
    fig.suptitle("Per-layer gates across runs", fontsize=12)
    paths = [save_png(fig, os.path.join(out, COMPARE_PLOTS["layers"]))]

    allq = queries[queries["layer"].astype(str) == ALL]
    if len(allq):
        fig, axes = plt.subplots(1, len(kinds), figsize=(max(5, 0.9 * len(x) + 3.5) * len(kinds),
                                                         heatmap_height(min(allq["qid"].nunique(), max_queries))),
                                 layout=LAYOUT, squeeze=False)
        for ax, kind in zip(axes[0], kinds):
            sc = union_scale([panel_scale(None, kind, g) for g in per_run])
            cmap_g, norm, _ = cmap_norm(sc)
            mat = allq[allq["gate"] == kind].pivot_table(index="qid", columns="run", values="mean", sort=False)
            if len(mat) > max_queries:
                mat = mat.iloc[subsample_indices(len(mat), max_queries)]
            im = ax.imshow(mat.to_numpy(float), aspect="auto", cmap=cmap_g, norm=norm, interpolation="nearest")
            ax.set_xticks(np.arange(mat.shape[1]), [run_labels[r] for r in mat.columns], rotation=25, ha="right",
                          fontsize=8)
            ax.set_yticks(np.arange(len(mat)), [f"qid {q}" for q in mat.index], fontsize=6)
            d = allq[(allq["gate"] == kind) & (allq["run"] == allq["run"].max())]["diff_vs_first"]
            ax.set_title(f"{gate_name(ALL, kind)} per query\nlast vs first run: mean |diff| {d.abs().mean():.3f}",
                         fontsize=9, loc="left")
            colorbar(fig, im, ax, sc, "query mean gate")
        fig.suptitle(f"Per-query mean gate in each run ({allq['qid'].nunique()} queries present in all runs)",
                     fontsize=11)
        paths.append(save_png(fig, os.path.join(out, COMPARE_PLOTS["queries"])))
    return paths
