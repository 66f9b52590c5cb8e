"""Figures of the causal analyses: the effect of each intervention (``gate_analysis.ablation``: overall
deltas, per-query deltas, a queries x interventions heatmap) and the effective contribution of each gated
branch (``gate_analysis.contributions``: raw gate vs contribution per clip, contribution per layer); file
names in ``ABLATION_PLOTS``."""
import math
import os

import numpy as np

from qd_detr.gates import GATE_KINDS, gate_name

from .contributions import contrib_layer_table
from .figures import (
    EFFECT_CMAP,
    KIND_COLOR,
    LAYOUT,
    PAD_COLOR,
    cmap_norm,
    colorbar,
    effect_colors,
    heatmap_height,
    kind_short_label,
    panel_scale,
    plt,
    save_png,
    subsample_indices,
    value_lim,
    wrap_text,
    zero_line,
)
from .interventions import AUDIO_INTERVENTIONS
from .outputs import ABLATION_PLOTS, PLOTS_DIR
from .ranges import DEFAULT_KINDS

__all__ = ["plot_ablation", "plot_contributions"]


def plot_ablation(per_query, overall, output_dir, max_queries=60, max_panels=10, kinds=DEFAULT_KINDS):
    """Figures of ``ABLATION_PLOTS`` for the ablation results; returns the written paths. ``kinds``: the
    model's gate kinds (a clamp to zero removes audio only when it covers all of them). Effects use the
    effect colours (``figures.EFFECT_CMAP``: purple = better under the intervention, orange = worse), never
    the gate colours; label-free changes (no labels: how much the predictions moved) are drawn grey."""
    out = os.path.join(output_dir, PLOTS_DIR)
    os.makedirs(out, exist_ok=True)
    paths = []
    names = list(dict.fromkeys(per_query["intervention"]))
    if not names:
        return paths
    # 1. overall deltas per intervention: official metrics when labelled, else label-free changes
    keys = [k for k in ("MR-full-mAP", "MR-full-R1@0.5", "HL-min-VeryGood-mAP", "HL-min-VeryGood-Hit1")
            if k in set(overall["metric"])]
    unit = "percentage points"
    if not keys:
        keys, unit = ["frac_top1_window_changed", "mean_saliency_abs_change"], "change"
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys) + 1.5, 0.42 * len(names) + 2.0),
                             layout=LAYOUT, squeeze=False, sharey=True)
    for ax, key in zip(axes[0], keys):
        sel = overall[overall["metric"] == key].set_index("intervention").reindex(names)
        d = sel["delta"].to_numpy(float)
        colors = effect_colors(d) if unit != "change" else ["0.45"] * len(d)
        ax.barh(np.arange(len(names)), np.nan_to_num(d), color=colors)
        for i, v in enumerate(d):
            if np.isfinite(v):
                ax.text(v, i, f" {v:+.2f} ", va="center", ha="left" if v >= 0 else "right", fontsize=8)
        ax.axvline(0, color="0.3", lw=0.8)
        lim = max(np.nanmax(np.abs(d)) if np.isfinite(d).any() else 0, 1e-6) * 1.35
        ax.set_xlim(-lim, lim)
        base = sel["baseline"].iloc[0] if len(sel) else float("nan")
        ax.set_title(f"{key}\n(baseline {base:.2f})" if unit != "change" else key, fontsize=10)
        ax.set_xlabel(f"ablated − baseline ({unit})")
    axes[0, 0].set_yticks(np.arange(len(names)), names)
    axes[0, 0].invert_yaxis()
    fig.suptitle("Effect of each intervention on the run's metrics (orange: worse than baseline, purple: better)"
                 if unit != "change" else "How much each intervention changed the predictions (no labels)",
                 fontsize=12)
    paths.append(save_png(fig, os.path.join(out, ABLATION_PLOTS["overall"])))

    # 2. per-query deltas, sorted, one panel per intervention (audio-off ones first): which queries audio
    #    helps and hurts
    metric = "top1_iou" if per_query["delta_top1_iou"].notna().any() else None
    col = f"delta_{metric}" if metric else "saliency_mean_abs_change"
    first = per_query.drop_duplicates("intervention").set_index("intervention")
    off = {n: _is_audio_off(first.loc[n], kinds) for n in names}
    shown = sorted(names, key=lambda n: not off[n])[:max_panels]
    ncol = min(2, len(shown))
    nrow = math.ceil(len(shown) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(7 * ncol, 2.8 * nrow + 0.8), layout=LAYOUT, squeeze=False)
    for ax, name in zip(axes.flat, shown):
        sel = per_query[per_query["intervention"] == name].sort_values(col, kind="stable")
        d = sel[col].to_numpy(float)
        colors = effect_colors(d) if metric else ["0.45"] * len(d)
        ax.bar(np.arange(len(d)), d, color=colors, width=0.9)
        ax.axhline(0, color="0.3", lw=0.8)
        if metric:
            ax.set_ylim(-1.05, 1.05)
            worse, better = int((d < 0).sum()), int((d > 0).sum())
            same = len(d) - worse - better
            what = (f"audio helped {worse}, hurt {better}, no effect {same} queries" if off[name] else
                    f"worse {worse}, better {better}, unchanged {same} queries")
            ax.set_title(f"{name}: {what}", fontsize=10, loc="left")
            ax.set_ylabel("Δ top-1 IoU (ablated − base)")
        else:
            ax.set_title(f"{name}: saliency change per query (no labels)", fontsize=10, loc="left")
            ax.set_ylabel("mean |Δ saliency|")
        ax.set_xlabel("queries (sorted by effect)")
        if len(d) <= 30:
            ax.set_xticks(np.arange(len(d)), sel["qid"].astype(str), rotation=90, fontsize=7)
    for ax in list(axes.flat)[len(shown):]:
        ax.set_visible(False)
    more = f"; {len(names) - len(shown)} more in ablation.csv" if len(names) > len(shown) else ""
    if metric:
        audio = "; for audio-off interventions orange = audio helped the query" if any(off[n] for n in shown) else ""
        title = (f"Per-query effect of each intervention on the top-1 IoU (orange: worse under it, purple: better"
                 f"{audio}){more}")
    else:
        title = f"Per-query change of the saliency scores under each intervention (no labels){more}"
    fig.suptitle(wrap_text(fig, title, 11, fig.get_figwidth() * fig.dpi - 40), fontsize=11)
    paths.append(save_png(fig, os.path.join(out, ABLATION_PLOTS["per_query"])))

    # 3. heatmap queries x interventions
    hm_col = "delta_mr_ap" if per_query["delta_mr_ap"].notna().any() else "saliency_mean_abs_change"
    mat = per_query.pivot_table(index="qid", columns="intervention", values=hm_col, sort=False)[names]
    if len(mat) > max_queries:
        mat = mat.iloc[subsample_indices(len(mat), max_queries)]
    lim = max(float(np.nanmax(np.abs(mat.to_numpy()))) if np.isfinite(mat.to_numpy()).any() else 0, 1e-6)
    fig, ax = plt.subplots(figsize=(min(0.9 * len(names) + 4, 16), heatmap_height(len(mat))), layout=LAYOUT)
    labelled = hm_col == "delta_mr_ap"
    if labelled:  # signed effect: the effect colours around 0
        cmap, vmin = plt.get_cmap(EFFECT_CMAP).with_extremes(bad=PAD_COLOR), -lim
        label, title = ("Δ MR AP of the query (points)\npurple: better, orange: worse",
                        "Per-query change of the MR AP under each intervention (ablated − base)")
    else:  # a size of change (>= 0): sequential
        cmap, vmin = plt.get_cmap("viridis").with_extremes(bad=PAD_COLOR), 0.0
        label, title = "mean |Δ saliency|", "Per-query change of the saliency under each intervention (no labels)"
    im = ax.imshow(mat.to_numpy(float), aspect="auto", cmap=cmap, vmin=vmin, vmax=lim, interpolation="nearest")
    ax.set_xticks(np.arange(len(names)), names, rotation=40, ha="right", fontsize=8 if len(names) <= 14 else 6)
    ax.set_yticks(np.arange(len(mat)), [f"qid {q}" for q in mat.index], fontsize=7)
    colorbar(fig, im, ax, None, label=label)
    ax.set_title(wrap_text(fig, title, 11, fig.get_figwidth() * fig.dpi - 190), fontsize=11)
    paths.append(save_png(fig, os.path.join(out, ABLATION_PLOTS["heatmap"])))
    return paths


def _is_audio_off(row, kinds=DEFAULT_KINDS):
    """An ablation.csv row's intervention removes audio (audio_zero/audio_swap, or zero on every gate kind
    ``kinds`` of the model in all layers: zero@all:both, with v2 FiLM zero@all:all)."""
    return row["value"] in AUDIO_INTERVENTIONS or (row["value"] == "zero" and str(row["layers"]) == "all"
                                                   and set(str(row["gates"]).split("+")) == set(kinds))


def plot_contributions(contrib, output_dir, max_points=4000, value_range=None, gate_ranges=None):
    """Raw gate vs effective contribution per clip (one panel per layer x gate; x axis and colours: the
    gate's declared range from ``gate_ranges``, or ``value_range``), and the contribution per layer;
    returns the written paths."""
    out = os.path.join(output_dir, PLOTS_DIR)
    os.makedirs(out, exist_ok=True)
    layers = sorted(contrib["layer"].unique())
    kinds = [k for k in GATE_KINDS if k in set(contrib["gate"])]
    fig, axes = plt.subplots(len(kinds), len(layers), figsize=(3.4 * len(layers) + 1.5, 3.2 * len(kinds) + 0.8),
                             layout=LAYOUT, squeeze=False, sharey="row")
    for i, kind in enumerate(kinds):
        for j, layer in enumerate(layers):
            ax = axes[i, j]
            sc = panel_scale(value_range, kind, gate_ranges, layer)
            cmap, norm, _ = cmap_norm(sc)
            sel = contrib[(contrib["layer"] == layer) & (contrib["gate"] == kind)]
            idx = subsample_indices(len(sel), max_points)
            x = sel["gate_value"].to_numpy(float)[idx]
            y = sel["contribution"].to_numpy(float)[idx]
            ax.scatter(x, y, s=5, c=x, cmap=cmap, norm=norm, alpha=0.6, edgecolors="none")
            value_lim(ax, sc, x, axis="x")
            zero_line(ax, sc, axis="x")
            med = float(np.nanmedian(sel["contribution"])) if len(sel) else float("nan")
            ax.set_title(f"{gate_name(layer, kind)}\nmedian contribution {med:.3g}", fontsize=9, loc="left")
            ax.set_xlabel("raw gate value")
            if j == 0:
                ax.set_ylabel("||gated branch|| / ||residual||")
            ax.set_ylim(bottom=0)
    fig.suptitle("Raw gate vs effective contribution per clip (a large gate on a small branch adds little)",
                 fontsize=11)
    paths = [save_png(fig, os.path.join(out, ABLATION_PLOTS["contributions"]))]

    summ = contrib_layer_table(contrib)
    fig, ax = plt.subplots(figsize=(6.5, 4), layout=LAYOUT)
    for k, kind in enumerate(kinds):
        s = summ[summ["gate"] == kind]
        x = s["layer"].to_numpy(float) + (k - (len(kinds) - 1) / 2) * 0.15
        ax.errorbar(x, s["median"], yerr=[s["median"] - s["p25"], s["p75"] - s["median"]], fmt="o-",
                    color=KIND_COLOR.get(kind), label=kind_short_label(kind, panel_scale(None, kind, gate_ranges).rng),
                    capsize=3)
    ax.set_xticks(layers)
    ax.set_xlabel("fusion layer")
    ax.set_ylabel("effective contribution (median, IQR over clips)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax.set_title("Effective contribution of each gated branch per layer", fontsize=11)
    paths.append(save_png(fig, os.path.join(out, ABLATION_PLOTS["contribution_layers"])))
    return paths
