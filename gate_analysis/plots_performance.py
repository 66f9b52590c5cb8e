"""Figures of the performance link (``gate_analysis.performance``): per-query mean gate vs top-1 IoU and vs
the audio-off effect, the correlation heatmap, failures vs matched successes, and a query subset vs the
others (``PERFORMANCE_PLOTS``). Gate axes and colours follow the declared gate ranges."""
import os

import numpy as np
import pandas as pd

from qd_detr.gates import ALL_LAYERS, GATE_KINDS, gate_name

from .figures import (
    EFFECT_CMAP,
    LAYOUT,
    PAD_COLOR,
    all_tanh,
    cmap_norm,
    colorbar,
    kind_label,
    panel_scale,
    plt,
    save_png,
    value_lim,
    zero_line,
)
from .outputs import PERFORMANCE_PLOTS, PLOTS_DIR
from .rank_stats import spearman

__all__ = ["plot_performance", "plot_failure_cases", "plot_subset_comparison"]


def _zoomed_gate_lim(ax, x, sc):
    """x limits around the data (gate values; at least 20% of the range ``sc`` wide, within it + 2.5%)."""
    x = x[np.isfinite(x)]
    width = sc.hi - sc.lo
    if not x.size:
        ax.set_xlim(sc.lo - 0.01 * width, sc.hi + 0.01 * width)
        return
    lo, hi = float(x.min()), float(x.max())
    pad = max(0.2 * width - (hi - lo), 0) / 2 + 0.05 * (hi - lo)
    ax.set_xlim(max(lo - pad, min(lo, sc.lo) - 0.025 * width), min(hi + pad, max(hi, sc.hi) + 0.025 * width))


def plot_performance(perf, corr, output_dir, gate_ranges=None, ablation=None, figures=None):
    """Scatter of the per-query mean gate (per layer and over all layers) vs top-1 IoU and, with ``ablation``
    (the ``gate_performance_ablation.csv`` rows of one audio-off intervention), vs its effect, and the
    correlation heatmap (its title names intervention effects only when ``corr`` has them, i.e. after
    ``--ablate``); returns the written paths. Scatter colours follow each gate's declared range
    (``gate_ranges``; tanh [-1, 1] without); correlations use the effect colours (``EFFECT_CMAP``).
    ``figures``: only these of ``("scatter", "correlations")`` (default: both)."""
    out = os.path.join(output_dir, PLOTS_DIR)
    os.makedirs(out, exist_ok=True)
    wanted = {"scatter", "correlations"} if figures is None else set(figures)
    paths = [_plot_scatter(perf, out, gate_ranges, ablation)] if "scatter" in wanted else []
    if "correlations" in wanted:
        paths += _plot_correlations(corr, out)
    return paths


def _plot_scatter(perf, out, gate_ranges=None, ablation=None):
    """``PERFORMANCE_PLOTS["scatter"]`` (see ``plot_performance``); returns its path."""
    kinds = [k for k in GATE_KINDS if (perf["gate"] == k).any()]
    layers = [l for l in dict.fromkeys(perf["layer"]) if str(l) != ALL_LAYERS] + [ALL_LAYERS]
    ys = [("top1_iou", "top-1 IoU", (-0.03, 1.03))]
    if ablation is not None and len(ablation):
        effect = ablation.set_index(["qid", ablation["layer"].astype(str), "gate"])["delta_top1_iou"]
        perf = perf.assign(ablation_delta_top1_iou=effect.reindex(
            pd.MultiIndex.from_arrays([perf["qid"], perf["layer"].astype(str), perf["gate"]])).to_numpy(float))
        ys.append(("ablation_delta_top1_iou",
                   f"Δ top-1 IoU under {ablation['intervention'].iloc[0]}\n(< 0: audio helped)", (-1.05, 1.05)))
    rows = [(y, kind) for y in ys for kind in kinds]
    fig, axes = plt.subplots(len(rows), len(layers), figsize=(3.3 * len(layers) + 1, 3.0 * len(rows) + 0.9),
                             layout=LAYOUT, squeeze=False, sharey="row")
    for i, ((y, label, ylim), kind) in enumerate(rows):
        for j, layer in enumerate(layers):
            ax = axes[i, j]
            sc = panel_scale(None, kind, gate_ranges, layer)
            cmap, norm, _ = cmap_norm(sc)
            sel = perf[(perf["gate"] == kind) & (perf["layer"].astype(str) == str(layer))]
            x, yy = sel["gate_mean"].to_numpy(float), sel[y].to_numpy(float)
            ax.scatter(x, yy, c=x, cmap=cmap, norm=norm, s=20, edgecolors="0.3", linewidths=0.4)
            rho, p, n = spearman(x, yy)
            _zoomed_gate_lim(ax, x, sc)
            if sc.diverging and ax.get_xlim()[0] < sc.centre < ax.get_xlim()[1]:
                ax.axvline(sc.centre, color="0.3", lw=0.7)
            if y.startswith("ablation"):
                ax.axhline(0, color="0.3", lw=0.7)
            ax.set_ylim(*ylim)
            ax.set_xlabel(f"query mean gate ({'mean of layers' if layer == ALL_LAYERS else 'layer ' + str(layer)})",
                          fontsize=8)
            if j == 0:
                ax.set_ylabel(label, fontsize=9)
            ax.set_title(f"{gate_name(layer, kind)}\nrho {rho:+.2f} (p={p:.2g}, n={n})", fontsize=9, loc="left")
    scale = "the fixed [-1, 1] scale" if not gate_ranges or all_tanh(gate_ranges) else "its declared range"
    fig.suptitle(f"Per-query gate vs performance (colour: gate on {scale}; x axis zoomed to the data)",
                 fontsize=11)
    return save_png(fig, os.path.join(out, PERFORMANCE_PLOTS["scatter"]))


def _plot_correlations(corr, out):
    """``PERFORMANCE_PLOTS["correlations"]`` when ``corr`` has gate-mean rows (see ``plot_performance``); returns
    the written paths."""
    paths = []
    c = corr[(corr["x"] == "gate_mean") & ((corr["intervention"] == "") | (corr["y"] == "delta_mr_ap"))].copy()
    if len(c):
        c["row"] = [y if not iv else f"Δ MR AP [{iv}]" for y, iv in zip(c["y"], c["intervention"])]
        mat = c.pivot_table(index="row", columns="name", values="rho", sort=False)
        mat = mat[[n for n in dict.fromkeys(c["name"]) if n in mat.columns]]  # perf order: mha, ffn, beta
        fig, ax = plt.subplots(figsize=(1.25 * mat.shape[1] + 4.5, 0.38 * mat.shape[0] + 2.4), layout=LAYOUT)
        cmap_r = plt.get_cmap(EFFECT_CMAP).with_extremes(bad=PAD_COLOR)
        im = ax.imshow(mat.to_numpy(float), cmap=cmap_r, vmin=-1, vmax=1, aspect="auto", interpolation="nearest")
        for (r, k), v in np.ndenumerate(mat.to_numpy(float)):
            if np.isfinite(v):
                ax.text(k, r, f"{v:+.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(np.arange(mat.shape[1]), mat.columns, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(np.arange(mat.shape[0]), mat.index, fontsize=8)
        colorbar(fig, im, ax, None, label="Spearman rho\n(purple: positive, orange: negative)")
        effects = (c["intervention"] != "").any()
        ax.set_title("Spearman rho of the per-query mean gate with the per-query metrics"
                     + ("\nand with each intervention's effect (Δ MR AP, ablated − base)" if effects else ""),
                     fontsize=10)
        paths.append(save_png(fig, os.path.join(out, PERFORMANCE_PLOTS["correlations"])))
    return paths


def plot_failure_cases(pairs, perf, output_dir, gate_ranges=None):
    """Per layer and gate kind: mean gate of the failures (orange) vs their matched successes (purple;
    the effect colours), paired lines; y axis: the kind's declared range (``gate_ranges``)."""
    path = os.path.join(output_dir, "plots", PERFORMANCE_PLOTS["failure"])
    kinds = [k for k in GATE_KINDS if (perf["gate"] == k).any()]
    layers = sorted({int(l) for l in perf["layer"] if str(l) != ALL_LAYERS})
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4.2), layout=LAYOUT, squeeze=False)
    worse, better = plt.get_cmap(EFFECT_CMAP)(0.15), plt.get_cmap(EFFECT_CMAP)(0.85)  # the effect colours
    for ax, kind in zip(axes[0], kinds):
        for layer in layers:
            s = perf[(perf["gate"] == kind) & (perf["layer"].astype(str) == str(layer))].drop_duplicates("qid")
            s = s.set_index("qid")["gate_mean"]
            a, b = s.reindex(pairs["failure_qid"]).to_numpy(float), s.reindex(pairs["matched_qid"]).to_numpy(float)
            for k in range(len(a)):
                ax.plot([layer - 0.15, layer + 0.15], [a[k], b[k]], color="0.75", lw=0.7, zorder=1)
            ax.scatter(np.full(len(a), layer - 0.15), a, color=worse, s=14, zorder=2,
                       label="failures" if layer == layers[0] else None)
            ax.scatter(np.full(len(b), layer + 0.15), b, color=better, s=14, zorder=2,
                       label="matched successes" if layer == layers[0] else None)
        sc = panel_scale(None, kind, gate_ranges)
        value_lim(ax, sc, perf.loc[perf["gate"] == kind, "gate_mean"])
        zero_line(ax, sc, axis="y")
        ax.set_xticks(layers)
        ax.set_xlabel("fusion layer")
        ax.set_ylabel("query mean gate")
        ax.set_title(f"{kind_label(kind, sc.rng)}", fontsize=10, loc="left")
        ax.legend(fontsize=8)
    fig.suptitle(f"{len(pairs)} worst queries (top-1 IoU) vs successes matched on duration and window length",
                 fontsize=11)
    return save_png(fig, path)


def plot_subset_comparison(comp, output_dir, label="subset", gate_ranges=None):
    """Per-layer mean gate in (dark) vs out of (light grey) the subset (y axis: the kind's declared range),
    and the per-query metrics of both groups."""
    path = os.path.join(output_dir, "plots", PERFORMANCE_PLOTS["subset"])
    g = comp[(comp["section"] == "gates") & (comp["layer"].astype(str) != ALL_LAYERS)]
    met = comp[comp["section"] == "metrics"]
    kinds = [k for k in GATE_KINDS if (g["gate"] == k).any()]
    fig, axes = plt.subplots(1, len(kinds) + (1 if len(met) else 0), figsize=(5 * (len(kinds) + 1), 4),
                             layout=LAYOUT, squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        s = g[g["gate"] == kind]
        x = s["layer"].astype(int).to_numpy()
        ax.plot(x, s["mean_in"], "o-", color="0.1", label=f"in {label} (n={int(s['n_in'].max())})")
        ax.plot(x, s["mean_out"], "s--", color="0.6", label=f"others (n={int(s['n_out'].max())})")
        sc = panel_scale(None, kind, gate_ranges)
        value_lim(ax, sc, np.concatenate([s["mean_in"].to_numpy(float), s["mean_out"].to_numpy(float)]))
        zero_line(ax, sc, axis="y")
        ax.set_xticks(x)
        ax.set_xlabel("fusion layer")
        ax.set_ylabel("mean of per-query mean gate")
        ax.set_title(kind_label(kind, sc.rng), fontsize=10, loc="left")
        ax.legend(fontsize=8)
    if len(met):
        ax = axes[0, -1]
        keep = met[met["statistic"].isin(["top1_iou", "r1_05", "r1_07"])]
        x = np.arange(len(keep))
        ax.bar(x - 0.2, keep["mean_in"], 0.4, color="0.25", label=f"in {label}")
        ax.bar(x + 0.2, keep["mean_out"], 0.4, color="0.7", label="others")
        ax.set_xticks(x, keep["statistic"])
        ax.set_ylim(0, 1)
        ax.set_ylabel("mean over queries")
        ax.set_title("moment retrieval per group", fontsize=10, loc="left")
        ax.legend(fontsize=8)
    fig.suptitle(f"Queries in the {label} vs the others", fontsize=12)
    return save_png(fig, path)
