"""Figures of the comparison of runs (``gate_analysis.compare``): per-layer gates across runs and the
per-video mean gate of every layer in each run (``COMPARE_PLOTS``); axes and colours cover every run's
declared ranges."""
import os

import numpy as np
import pandas as pd

from qd_detr.gates import ALL_LAYERS, GATE_KINDS

from .compare import run_gate_ranges
from .figures import (
    LAYOUT,
    cmap_norm,
    colorbar,
    heatmap_height,
    kind_label,
    panel_scale,
    plt,
    save_png,
    shorten,
    subsample_indices,
    union_scale,
    value_lim,
    zero_line,
)
from .outputs import COMPARE_PLOTS, PLOTS_DIR

__all__ = ["plot_compare"]


def plot_compare(runs, layers, queries, output_dir, max_queries=80, gate_ranges=None):
    """Per-layer mean ± spread across runs, and the per-video mean gate of every layer in each run (signed,
    gate colours; the ``all`` rows, a mean of magnitudes, are left to the CSV); returns paths.
    Gate axes and colours cover every run's declared ranges (``gate_ranges``: one {gate name: GateRange}
    per run; default: read from the runs' folders; tanh [-1, 1] for runs that declare none). Rows are
    videos when the tables have them (``n_videos`` / ``vid`` columns), else queries."""
    if gate_ranges is None:
        gate_ranges = [run_gate_ranges(path) if os.path.isdir(str(path)) else {} for path in runs["path"]]
    per_run = [g or None for g in gate_ranges] or [None]
    out = os.path.join(output_dir, PLOTS_DIR)
    os.makedirs(out, exist_ok=True)
    kinds = [k for k in GATE_KINDS if (layers["gate"] == k).any()]
    run_labels = list(runs["run_label"])
    x = np.arange(len(run_labels))
    unit = "video" if "n_videos" in layers.columns else "query"
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
            axes[1, j].plot(x, s["std"], "o-", color=color, label=f"layer {layer}: across {unit}s")
            axes[1, j].plot(x, s["mean_within_std"], "x:", color=color)
        sc = union_scale([panel_scale(None, kind, g) for g in per_run])
        value_lim(axes[0, j], sc, layers.loc[layers["gate"] == kind, ["p25", "p75", "mean"]].to_numpy())
        zero_line(axes[0, j], sc, axis="y")
        axes[0, j].set_ylabel(f"mean of per-{unit} mean gate\n(band: IQR over {unit}s)")
        axes[0, j].set_title(kind_label(kind, sc.rng), fontsize=10, loc="left")
        axes[0, j].legend(fontsize=7)
        axes[1, j].set_ylim(bottom=0)
        axes[1, j].set_ylabel(f"spread: std across {unit}s (o)\nmean std within a {unit} (x)")
        axes[1, j].set_xticks(x, run_labels, rotation=25, ha="right", fontsize=8)
        axes[1, j].set_xlabel("run")
    fig.suptitle("Per-layer gates across runs", fontsize=12)
    paths = [save_png(fig, os.path.join(out, COMPARE_PLOTS["layers"]))]

    per_layer = queries[queries["layer"].astype(str) != ALL_LAYERS]
    if len(per_layer):
        paths.append(_plot_query_differences(per_layer, run_labels, kinds, per_run, max_queries,
                                             os.path.join(out, COMPARE_PLOTS["queries"])))
    return paths


def _plot_query_differences(per_layer, run_labels, kinds, per_run, max_queries, path):
    """Heatmaps rows (videos, or queries) x (layer, run) of the mean gate, one panel per gate kind."""
    layers = sorted({int(l) for l in per_layer["layer"]})
    runs = sorted(per_layer["run"].unique())
    vids = dict(zip(per_layer["qid"], per_layer["vid"].fillna("").astype(str))) if "vid" in per_layer else {}
    videos = bool(vids) and all(vids.values())
    unit = "video" if videos else "query"
    rows = list(dict.fromkeys(per_layer["qid"]))
    if len(rows) > max_queries:
        rows = [rows[i] for i in subsample_indices(len(rows), max_queries)]
    cols = [(l, r) for l in layers for r in runs]
    ncol = len(cols)
    width = max(5.0, 0.42 * ncol + 4.2)
    fig, axes = plt.subplots(1, len(kinds), figsize=(width * len(kinds), heatmap_height(len(rows)) + 0.4),
                             layout=LAYOUT, squeeze=False)
    for j, (ax, kind) in enumerate(zip(axes[0], kinds)):
        sel = per_layer[per_layer["gate"] == kind]
        key = pd.MultiIndex.from_arrays([sel["layer"].astype(int), sel["run"]])
        mat = (sel.assign(_c=list(key)).pivot_table(index="qid", columns="_c", values="mean", sort=False)
               .reindex(index=rows, columns=cols))
        sc = union_scale([panel_scale(None, kind, g) for g in per_run])
        cmap_g, norm, _ = cmap_norm(sc)
        im = ax.imshow(mat.to_numpy(float), aspect="auto", cmap=cmap_g, norm=norm, interpolation="nearest")
        for k in range(1, len(layers)):  # white gaps between the layers' column groups
            ax.axvline(k * len(runs) - 0.5, color="white", lw=3)
        ax.set_xticks(np.arange(ncol), [run_labels[r] for _, r in cols], rotation=40, ha="right", fontsize=7)
        top = ax.secondary_xaxis("top")
        top.set_xticks([(k + 0.5) * len(runs) - 0.5 for k in range(len(layers))], [f"layer {l}" for l in layers],
                       fontsize=8)
        top.tick_params(length=0)
        if j == 0:
            labels = [shorten(vids[q], 24) if videos else f"qid {q}" for q in rows]
            ax.set_yticks(np.arange(len(rows)), labels, fontsize=6 if len(rows) > 30 else 7)
            ax.set_ylabel(unit)
        else:
            ax.set_yticks([])
        last = sel[sel["run"] == runs[-1]]["diff_vs_first"].abs().mean()
        ax.set_title(f"{kind_label(kind, sc.rng)}\nmean |last run − first run| {last:.3f} ({unit}s x layers)",
                     fontsize=9, loc="left")
        colorbar(fig, im, ax, sc, f"{unit} mean gate")
    n = per_layer["qid"].nunique()
    shown = f"{len(rows)} of {n}" if len(rows) < n else f"{n}"
    fig.suptitle(f"Mean gate per {unit} and layer in each run ({shown} {unit}s present in all runs)", fontsize=11)
    return save_png(fig, path)
