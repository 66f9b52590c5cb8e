"""Figures of the gate statistics (the DataFrames of ``GateStatsAccumulator``): value distributions per
layer, the queries x layers heatmap, the per-dimension profile, the evolution across layers and the
top / bottom rankings. Each function draws one figure, writes one PNG atomically and returns its path;
colours and axes follow the declared gate ranges (``gate_analysis.figures``)."""
import numpy as np

from qd_detr.gates import gate_name

from . import ranges as R
from .figures import (
    KIND_COLOR,
    LAYOUT,
    Scale,
    all_tanh,
    cmap_norm,
    colorbar,
    heatmap_height,
    kind_label,
    kind_short_label,
    kinds_in,
    layers_in,
    near_zero_band,
    panel_scale,
    plt,
    ranges_by_gate,
    same_scale,
    save_png,
    shorten,
    subsample_indices,
    union_scale,
    value_lim,
    zero_line,
)

__all__ = ["plot_layer_distributions", "plot_query_layer_heatmap", "plot_dim_profile", "plot_layer_evolution",
           "plot_rankings"]


def plot_layer_distributions(histograms_df, query_stats_df, path, value_range=None, gating_type=None,
                             near_zero=0.1, gate_ranges=None):
    """Per layer (rows) and gate kind (columns): the exact histogram of all gate values (fraction of
    values per bin, bars coloured by value; out-of-range and NaN counts written in the panel), and a
    bottom row with violins (+ points when few) of the per-video mean gate per layer (``query_stats_df``: the
    ``video_stats()`` frame). Each panel's x axis
    is its histogram's range; colours follow the declared ``gate_ranges``; the grey band marks the
    near-zero values (``near_zero`` times the range magnitude around the reference value)."""
    from matplotlib.collections import PolyCollection
    h = histograms_df
    if len(h) == 0:
        raise ValueError("plot_layer_distributions: the histograms frame is empty (no queries accumulated)")
    kinds, layers = kinds_in(h), layers_in(h)
    qs = query_stats_df
    nrow, ncol = len(layers) + 1, len(kinds)
    fig, axes = plt.subplots(nrow, ncol, layout=LAYOUT, figsize=(5.6 * ncol, 1.9 * len(layers) + 3.4),
                             squeeze=False, gridspec_kw={"height_ratios": [1] * len(layers) + [1.6]})
    any_band = False
    for j, kind in enumerate(kinds):
        for i, layer in enumerate(layers):
            ax = axes[i, j]
            sel = h[(h["layer"] == layer) & (h["gate"] == kind)]
            b = sel[sel["bin_type"] == "bin"]
            # the panel's range: its histogram's own bins (the declared range unless value_range was set)
            sc = panel_scale(value_range, kind, gate_ranges, layer)
            own = (float(b["bin_left"].min()), float(b["bin_right"].max())) if len(b) else (sc.lo, sc.hi)
            if own != (sc.lo, sc.hi):
                inside = sc.diverging and own[0] < sc.centre < own[1]
                centre = sc.centre if inside else (0.0 if sc.rng is None and own[0] < 0 < own[1] else None)
                sc = Scale(own[0], own[1], centre, sc.rng, kind)
            cmap, norm, _ = cmap_norm(sc)
            lo, hi = sc.lo, sc.hi
            total = int(sel["count"].sum())
            left, right = b["bin_left"].to_numpy(float), b["bin_right"].to_numpy(float)
            frac = b["count"].to_numpy(float) / max(total, 1)
            zero = np.zeros_like(frac)
            # one PolyCollection of bin rectangles (fast), coloured by the bin centre's gate value
            verts = np.stack([np.stack([left, zero], 1), np.stack([left, frac], 1),
                              np.stack([right, frac], 1), np.stack([right, zero], 1)], axis=1)
            ax.add_collection(PolyCollection(verts, facecolors=cmap(norm((left + right) / 2)), edgecolors="none"))
            ax.set_ylim(0, max(float(frac.max()) if frac.size else 0.0, 1e-9) * 1.25)
            band = near_zero_band(sc, near_zero)
            if band is not None:
                ax.axvspan(*band, color="0.9", zorder=0)
                any_band = True
            zero_line(ax, sc)
            ax.set_xlim(lo, hi)
            ax.set_title(gate_name(layer, kind), fontsize=10, loc="left")
            if j == 0:
                ax.set_ylabel("fraction of values")
            q = qs[(qs["layer"] == layer) & (qs["gate"] == kind)] if len(qs) else qs
            info = [f"n={total:,}"]
            if len(q):
                w = q["count"].to_numpy(float)
                info.append(f"mean {np.nansum(q['mean'].to_numpy(float) * w) / max(w.sum(), 1):+.3f}")
            if sc.rng is not None and sc.rng != R.TANH:
                info.append(f"range [{sc.rng.low:.3g}, {sc.rng.high:.3g}]")
            extra = {t: int(sel.loc[sel["bin_type"] == t, "count"].sum()) for t in ("underflow", "overflow", "nan")}
            if extra["underflow"] or extra["overflow"]:
                info.append(f"outside range: {extra['underflow']:,} below, {extra['overflow']:,} above")
            if extra["nan"]:
                info.append(f"NaN: {extra['nan']:,}")
            ax.text(0.01, 0.95, "  ".join(info), transform=ax.transAxes, va="top", fontsize=8,
                    bbox=dict(facecolor="white", alpha=0.8, edgecolor="none", pad=1.5))
            if i == len(layers) - 1:
                ax.set_xlabel("gate value")
            else:
                ax.tick_params(labelbottom=False)  # same x axis in every row
        ax = axes[-1, j]
        data = []
        for layer in layers:
            q = qs[(qs["layer"] == layer) & (qs["gate"] == kind)] if len(qs) else qs
            m = q["mean"].to_numpy(float) if len(q) else np.array([])
            data.append(m[np.isfinite(m)])
        ok = [k for k, d in enumerate(data) if d.size >= 2 and np.ptp(d) > 0]
        if ok:
            parts = ax.violinplot([data[k] for k in ok], positions=[layers[k] for k in ok], widths=0.8,
                                  showmedians=True, showextrema=True)
            for body in parts["bodies"]:
                body.set_facecolor(KIND_COLOR.get(kind, "tab:gray"))
                body.set_alpha(0.45)
        for k, d in enumerate(data):  # points when few queries, and for degenerate layers
            if d.size and (k not in ok or d.size <= 60):
                jitter = (np.random.default_rng(k).random(d.size) - 0.5) * 0.25 if d.size > 1 else 0
                ax.scatter(layers[k] + jitter, d, s=10, color="k", alpha=0.6, zorder=3)
        sc = panel_scale(value_range, kind, gate_ranges)
        zero_line(ax, sc, axis="y")
        value_lim(ax, sc, np.concatenate(data) if data else [])
        ax.set_xticks(layers)
        ax.set_xlabel("fusion layer")
        ax.set_ylabel("per-video mean gate")
        n_q = max((d.size for d in data), default=0)
        ax.set_title(f"{kind_label(kind, sc.rng)}: per-video mean, {n_q:,} videos" if len(kinds) < 3 else
                     f"{kind_short_label(kind, sc.rng)}: per-video mean, {n_q:,} videos", fontsize=10, loc="left")
    gt = f" ({gating_type} gating)" if gating_type else ""
    band = ""
    if any_band and (not gate_ranges or all_tanh(gate_ranges)):
        band = f"\ngrey band: near zero (|g| ≤ {near_zero:g}, audio ignored)"
    elif any_band:
        film = any(r.film for r in ranges_by_gate(gate_ranges).values())
        band = (f"\ngrey band: near zero, |g| ≤ {near_zero:.0%} of the gate's range (audio ignored"
                + ("; FiLM FFN gate: weight ≈ 1, not off" if film else "") + ")")
    fig.suptitle(f"Gate value distributions per layer{gt}\nexact histograms over all values "
                 f"(bars coloured by value) and per-video means{band}", fontsize=12)
    return save_png(fig, path)


def _query_matrix(query_stats_df, kind, layers):
    """[n_queries, n_layers] mean gate, rows in first-appearance order (repeated qids kept apart)."""
    q = query_stats_df[query_stats_df["gate"] == kind].copy()
    q["_occ"] = q.groupby(["qid", "layer"]).cumcount()
    keys = list(dict.fromkeys(zip(q["qid"], q["_occ"])))
    row_of = {k: i for i, k in enumerate(keys)}
    col_of = {l: j for j, l in enumerate(layers)}
    m = np.full((len(keys), len(layers)), np.nan)
    r = np.fromiter((row_of[k] for k in zip(q["qid"], q["_occ"])), dtype=np.intp, count=len(q))
    c = np.fromiter((col_of[int(l)] for l in q["layer"]), dtype=np.intp, count=len(q))
    m[r, c] = q["mean"].to_numpy(float)
    return m, [k[0] for k in keys]


def plot_query_layer_heatmap(query_stats_df, path, max_queries=200, value_range=None, gate_ranges=None):
    """Rows x layers heatmap of the mean gate, one panel per gate kind (shared colour scale when the kinds share
    a range; a kind's scale covers its layers' declared ranges). Rows are videos when the frame is
    ``video_stats()`` (it has ``n_queries``), else queries; labels when at most 60 are shown; above
    ``max_queries`` an evenly spaced subset (recorded order) is drawn and the title says so."""
    videos = "n_queries" in query_stats_df.columns
    unit, units = ("video", "videos") if videos else ("query", "queries")
    names = dict(zip(query_stats_df["qid"], query_stats_df["vid"])) if videos else {}
    if len(query_stats_df) == 0:
        raise ValueError("plot_query_layer_heatmap: the query_stats frame is empty")
    kinds, layers = kinds_in(query_stats_df), layers_in(query_stats_df)
    mats = {k: _query_matrix(query_stats_df, k, layers) for k in kinds}
    n_total = len(mats[kinds[0]][1])
    idx = subsample_indices(n_total, max_queries)
    n = idx.size
    scales = {k: panel_scale(value_range, k, gate_ranges) for k in kinds}
    shared = len(set(scales.values())) == 1
    width = 2.2 + 1.1 * len(layers) * len(kinds) + (1.5 if shared else 1.5 * len(kinds))
    fig, axes = plt.subplots(1, len(kinds), layout=LAYOUT, figsize=(width, heatmap_height(n)), squeeze=False,
                             sharey=True)
    for j, kind in enumerate(kinds):
        m, qids = mats[kind]
        ax = axes[0, j]
        cmap, norm, _ = cmap_norm(scales[kind])
        im = ax.imshow(m[idx], aspect="auto", interpolation="nearest", cmap=cmap, norm=norm)
        ax.set_xticks(range(len(layers)), [str(l) for l in layers])
        ax.set_xlabel("fusion layer")
        ax.set_title(kind_label(kind, scales[kind].rng).replace(" (", "\n("), fontsize=10)
        if j == 0:
            if n <= 60:
                labels = [shorten(names[qids[i]], 24) if videos else f"qid {qids[i]}" for i in idx]
                ax.set_yticks(range(n), labels, fontsize=7)
                ax.set_ylabel(unit)
            else:
                ax.set_ylabel(f"{units} (row = one {unit}, recorded order; {n:,} rows)")
                ax.set_yticks([])
        if not shared:
            colorbar(fig, im, ax, scales[kind], f"mean gate_{kind}")
    if shared:
        colorbar(fig, im, axes[0, :].tolist(), scales[kinds[0]], f"mean gate of the {unit}")
    note = (f"\n{n:,} of {n_total:,} {units} shown (evenly spaced, recorded order)" if n < n_total
            else f" ({n_total:,} {units})")
    fig.suptitle(f"Mean gate per {unit} and layer{note}", fontsize=11)
    return save_png(fig, path)


def plot_dim_profile(dim_stats_df, path, value_range=None, gate_ranges=None):
    """Elementwise gates: per feature dimension, mean ± std over all valid clips of all queries; one
    panel per layer (rows) and gate kind (columns; y axis: the kind's declared range)."""
    if len(dim_stats_df) == 0:
        raise ValueError("plot_dim_profile: no per-dimension statistics (only elementwise gating has them)")
    kinds, layers = kinds_in(dim_stats_df), layers_in(dim_stats_df)
    fig, axes = plt.subplots(len(layers), len(kinds), layout=LAYOUT, squeeze=False, sharex=True,
                             sharey=same_scale(value_range, kinds, gate_ranges),
                             figsize=(6.5 * len(kinds), 2.1 * len(layers) + 1.2))
    for j, kind in enumerate(kinds):
        sc = panel_scale(value_range, kind, gate_ranges)
        dk = dim_stats_df[dim_stats_df["gate"] == kind]
        band = np.concatenate([dk["mean"] - dk["std"], dk["mean"] + dk["std"]])
        for i, layer in enumerate(layers):
            ax = axes[i, j]
            d = dk[dk["layer"] == layer].sort_values("dim")
            x = d["dim"].to_numpy(int)
            mu, sd = d["mean"].to_numpy(float), d["std"].to_numpy(float)
            color = KIND_COLOR.get(kind, "tab:blue")
            ax.fill_between(x, mu - sd, mu + sd, color=color, alpha=0.25, lw=0, label="± std")
            ax.plot(x, mu, color=color, lw=1.0, label="mean")
            zero_line(ax, sc, axis="y")
            value_lim(ax, sc, band)
            ax.set_title(gate_name(layer, kind), fontsize=10, loc="left")
            if j == 0:
                ax.set_ylabel("gate value")
            if i == len(layers) - 1:
                ax.set_xlabel("feature dimension d")
    axes[0, -1].legend(loc="upper right", fontsize=8)
    n_values = int(dim_stats_df["n_values"].iloc[0])
    fig.suptitle(f"Elementwise gates per feature dimension: mean ± std over {n_values:,} valid clips "
                 f"(all queries)", fontsize=12)
    return save_png(fig, path)


def plot_layer_evolution(layer_stats_df, path, value_range=None, gate_ranges=None):
    """Across layers (x = layer): (1) mean gate ± std and (2) std, for each gate kind, video-weighted
    (solid) and clip-weighted (dashed); (3) clip-weighted fractions of values that are negative /
    near zero / positive per layer and kind (stacked; they sum to 1 unless there are NaN values;
    thresholds relative to each gate's declared range, and no negative part for sigmoid gates)."""
    ls = layer_stats_df
    if len(ls) == 0:
        raise ValueError("plot_layer_evolution: the layer_stats frame is empty")
    kinds, layers = kinds_in(ls), layers_in(ls)
    fig, axes = plt.subplots(1, 3, layout=LAYOUT, figsize=(17, 4.8))
    style = {"video": dict(ls="-", marker="o"), "clip": dict(ls="--", marker="s")}
    extent = []
    for k_i, kind in enumerate(kinds):
        for w_i, weighting in enumerate(("video", "clip")):
            d = ls[(ls["gate"] == kind) & (ls["weighting"] == weighting)].sort_values("layer")
            if not len(d):
                continue
            x = d["layer"].to_numpy(float) + (w_i - 0.5) * 0.08 + (k_i - 0.5) * 0.02
            lbl = f"gate_{kind}, {weighting}-weighted"
            axes[0].errorbar(x, d["mean"], yerr=d["std"], color=KIND_COLOR.get(kind), capsize=3, label=lbl,
                             **style[weighting])
            axes[1].plot(d["layer"], d["std"], color=KIND_COLOR.get(kind), label=lbl, **style[weighting])
            extent += list(d["mean"] - d["std"]) + list(d["mean"] + d["std"])
    sc = union_scale([panel_scale(value_range, k, gate_ranges) for k in kinds])
    zero_line(axes[0], sc, axis="y")
    value_lim(axes[0], sc, extent)
    axes[0].set_title("mean gate ± std", fontsize=10)
    axes[0].set_ylabel("gate value")
    axes[1].set_title("std of the gate (population)", fontsize=10)
    axes[1].set_ylabel("std (gate units)")
    axes[1].set_ylim(bottom=0)
    for ax in axes[:2]:
        ax.set_xticks(layers)
        ax.set_xlabel("fusion layer")
    axes[0].legend(fontsize=8, loc="best")
    ax = axes[2]
    width = 0.8 / max(len(kinds), 1)
    rdbu = plt.get_cmap("RdBu_r")
    ranges = ranges_by_gate(gate_ranges).values()
    plain = not gate_ranges or all_tanh(gate_ranges)
    film = any(r.film for r in ranges)
    sigmoid = any(r.activation == "sigmoid" for r in ranges)
    signed = ls["frac_negative"].notna().any()
    parts = [("frac_negative", "negative (audio subtracted" + ("; FiLM FFN: weight < 1" if film else "") + ")",
              rdbu(0.1)),
             ("frac_near_zero", "near zero (ignored)" if plain else
              "near zero (ignored" + ("; FiLM FFN: weight ≈ 1, not off" if film else "") + ")", "0.85"),
             ("frac_positive", "positive (audio added" + ("; sigmoid: used" if sigmoid else "")
              + ("; FiLM FFN: weight > 1" if film else "") + ")", rdbu(0.9))]
    if not signed:
        parts = parts[1:]
    ticks, ticklabels = [], []
    for k_i, kind in enumerate(kinds):
        d = ls[(ls["gate"] == kind) & (ls["weighting"] == "clip")].sort_values("layer")
        x = d["layer"].to_numpy(float) + (k_i - (len(kinds) - 1) / 2) * width
        bottom = np.zeros(len(d))
        for col, label, color in parts:
            v = np.nan_to_num(d[col].to_numpy(float))  # NaN: the gate cannot take such values
            ax.bar(x, v, width * 0.92, bottom=bottom, color=color, edgecolor="white", lw=0.5,
                   label=label if k_i == 0 else None)
            bottom += v
        ticks += list(x)
        ticklabels += [f"{l}\ngate_{kind}" for l in d["layer"]]
    ax.set_xticks(ticks, ticklabels, fontsize=8)
    ax.set_xlabel("fusion layer / gate kind")
    ax.set_ylabel("fraction of values (clip-weighted)")
    ax.set_ylim(0, 1.32)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_title("sign of the gate values" if plain else
                 "gate values vs 0 (thresholds: 10% of each gate's range)", fontsize=10)
    ax.legend(fontsize=8, loc="upper center", framealpha=0.9, ncol=1)
    fig.suptitle("Gates across fusion layers (video-weighted: each video counts once; clip-weighted: all values)",
                 fontsize=12)
    return save_png(fig, path)


def plot_rankings(rankings_df, path, layer="all", value_range=None, gate_ranges=None):
    """Top and bottom videos by mean gate (horizontal bars, coloured by value on the gate's declared range),
    one panel per gate kind; ``layer="all"`` ranks by the mean over layers of |layer mean| (gate kinds never
    mixed)."""
    r = rankings_df[rankings_df["layer"].astype(str) == str(layer)]
    if len(r) == 0:
        raise ValueError(f"plot_rankings: no rankings for layer {layer!r}")
    kinds = kinds_in(r)
    n_rows = max(len(r[r["gate"] == k]) for k in kinds)
    fig, axes = plt.subplots(1, len(kinds), layout=LAYOUT, figsize=(7.4 * len(kinds), 0.32 * n_rows + 2.4),
                             squeeze=False)
    where = "over all layers" if str(layer) == "all" else f"in layer {layer}"
    for j, kind in enumerate(kinds):
        ax = axes[0, j]
        sc = panel_scale(value_range, kind, gate_ranges, layer)
        cmap, norm, _ = cmap_norm(sc)
        d = r[r["gate"] == kind]
        top = d[d["rank_type"] == "top"].sort_values("rank")
        bot = d[d["rank_type"] == "bottom"].sort_values("rank", ascending=False)  # lowest at the bottom
        rows = list(top.itertuples()) + list(bot.itertuples())
        y = np.arange(len(rows))[::-1].astype(float)
        y[len(top):] -= 0.6  # gap between the two groups
        vals = np.array([row.value for row in rows], dtype=float)
        ax.barh(y, vals, color=cmap(norm(vals)), edgecolor="0.4", lw=0.4)
        labels = [f"{row.rank_type} {row.rank}: {shorten(row.vid, 26)} ({row.n_queries} q.)" for row in rows]
        ax.set_yticks(y, labels, fontsize=8)
        for yy, v in zip(y, vals):
            ax.text(v, yy, f" {v:+.3f} ", va="center", ha="left" if v >= 0 else "right", fontsize=7)
        zero_line(ax, sc)
        lo, hi = min(sc.lo, np.nanmin(vals)), max(sc.hi, np.nanmax(vals))
        pad = 0.18 * (hi - lo)
        ax.set_xlim(lo - pad if lo < 0 else lo, hi + pad)
        ax.set_xlabel("mean over layers of |video mean gate|" if str(layer) == "all"
                      else f"mean gate of the video {where}")
        ax.set_title(f"{gate_name(layer, kind)}: top {len(top)} / bottom {len(bot)}", fontsize=10, loc="left")
    scope = "all layers" if str(layer) == "all" else f"layer {layer}"
    what = "|mean gate| averaged over layers" if str(layer) == "all" else f"mean gate ({scope})"
    fig.suptitle(f"Videos with the highest and lowest {what} (each gate kind ranked separately)", fontsize=12)
    return save_png(fig, path)
