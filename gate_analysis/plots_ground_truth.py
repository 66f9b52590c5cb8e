"""Figures of the ground-truth analysis (``gate_analysis.ground_truth``): per-query AUROC and Spearman
distributions, mean inside vs outside the relevant windows, the across-queries relation with the fraction
of relevant clips, and gates along the video of a few labelled queries (``GROUND_TRUTH_PLOTS``)."""
import os

import numpy as np

from qd_detr.gates import GATE_KINDS, gate_name

from .figures import (
    KIND_COLOR,
    LAYOUT,
    kind_label,
    legend_columns,
    panel_scale,
    plt,
    save_png,
    subsample_indices,
    value_lim,
    zero_line,
)
from .gate_arrays import PER_CLIP_GATING_TYPES, per_clip_values
from .ground_truth import MEASURES, accumulate_ground_truth, clip_labels
from .outputs import GROUND_TRUTH_PLOTS, PLOTS_DIR
from .rank_stats import spearman

__all__ = ["plot_ground_truth", "plot_examples"]


def plot_ground_truth(per_query, overall, output_dir, records=None, gate_run=None, contributions=None,
                      n_examples=4, across=None, gate_ranges=None, figures=None):
    """Figures of ``GROUND_TRUTH_PLOTS`` (those that apply); returns the written paths. ``across``: the
    accumulator's ``across_queries()`` when at hand (else computed from records, gate run, contributions);
    ``n_examples=0`` leaves out the examples figure (``plot_examples``). Gate axes follow the declared
    ``gate_ranges`` (default: the gate run's; tanh [-1, 1] without either). ``figures``: only these keys of
    ``GROUND_TRUTH_PLOTS`` (default: all; e.g. one per process that draws)."""
    if gate_ranges is None:
        gate_ranges = getattr(gate_run, "gate_ranges", None)
    out = os.path.join(output_dir, PLOTS_DIR)
    os.makedirs(out, exist_ok=True)
    paths = []
    wanted = set(GROUND_TRUTH_PLOTS if figures is None else figures)
    measures = [m for m in MEASURES if len(per_query) and (per_query["measure"] == m).any()]
    if measures and "distributions" in wanted:
        paths.append(_plot_distributions(per_query, measures, os.path.join(out, GROUND_TRUTH_PLOTS["distributions"])))
    if measures and "inside_outside" in wanted:
        paths.append(_plot_inside_outside(per_query, measures, os.path.join(out, GROUND_TRUTH_PLOTS["inside_outside"]),
                                          gate_ranges))
    if "across_queries" in wanted:
        if across is None and records is not None and (gate_run is not None or contributions is not None):
            across = accumulate_ground_truth(records, gate_run, contributions).across_queries()
        if across is not None:
            paths.append(_plot_across_queries(across, os.path.join(out, GROUND_TRUTH_PLOTS["across_queries"]),
                                              gate_ranges))
    if n_examples and records is not None and gate_run is not None and "examples" in wanted:
        paths += plot_examples(records, gate_run, output_dir, n_examples)
    return paths


def plot_examples(records, gate_run, output_dir, n_examples=4):
    """``GROUND_TRUTH_PLOTS["examples"]``: gates along the video of a few labelled queries (clipwise and
    elementwise runs); returns the written paths. Needs no table, so it can be drawn early."""
    if gate_run.gating_type not in PER_CLIP_GATING_TYPES:
        return []
    out = os.path.join(output_dir, PLOTS_DIR)
    os.makedirs(out, exist_ok=True)
    p = _plot_examples(records, gate_run, n_examples, os.path.join(out, GROUND_TRUTH_PLOTS["examples"]))
    return [p] if p else []


def _layer_color(i):
    """Colour of the ``i``-th layer (8 colours, cycled)."""
    return ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive",
            "tab:cyan")[i % 8]


def _positions(per_query):
    """The (layer, kind) gates of a per-query table, by layer then kind order."""
    keys = sorted({(int(l), k) for l, k in zip(per_query["layer"], per_query["gate"])},
                  key=lambda t: (t[0], GATE_KINDS.index(t[1]) if t[1] in GATE_KINDS else 9))
    return keys


def _plot_distributions(per_query, measures, path):
    """Box plots of the per-query AUROC and Spearman rho per gate, one row per measure."""
    keys = _positions(per_query)
    fig, axes = plt.subplots(len(measures), 2, figsize=(max(8, 0.9 * len(keys) + 5), 3.4 * len(measures) + 0.9),
                             layout=LAYOUT, squeeze=False)
    for i, measure in enumerate(measures):
        pq = per_query[per_query["measure"] == measure]
        panels = (("auroc_inside", 0.5, (0, 1), "AUROC inside vs outside"),
                  ("spearman_saliency", 0.0, (-1, 1), "Spearman rho with saliency"))
        for j, (stat, ref, lim, label) in enumerate(panels):
            ax = axes[i, j]
            data, pos, colors = [], [], []
            for x, (layer, kind) in enumerate(keys):
                v = pq[(pq["layer"] == layer) & (pq["gate"] == kind)][stat].to_numpy(float)
                v = v[np.isfinite(v)]
                data.append(v)
                pos.append(x)
                colors.append(KIND_COLOR.get(kind, "tab:gray"))
            ok = [k for k, d in enumerate(data) if d.size]
            if ok:
                bp = ax.boxplot([data[k] for k in ok], positions=[pos[k] for k in ok], widths=0.6, patch_artist=True,
                                showfliers=False)
                for k, box in zip(ok, bp["boxes"]):
                    box.set_facecolor(colors[k])
                    box.set_alpha(0.45)
                for k in ok:
                    jitter = (np.random.default_rng(k).random(data[k].size) - 0.5) * 0.3
                    ax.scatter(pos[k] + jitter, data[k], s=8, color="k", alpha=0.5, zorder=3)
            ax.axhline(ref, color="0.3", lw=0.8, ls="--")
            ax.set_ylim(lim[0] - 0.03, lim[1] + 0.03)
            ax.set_xticks(pos, [gate_name(l, k) for l, k in keys], rotation=35, ha="right", fontsize=8)
            ax.set_ylabel(f"per-query {label}")
            ax.set_title(f"{measure}: {label}", fontsize=10, loc="left")
    what = "gates and contributions" if "contribution" in measures else "gates"
    fig.suptitle(f"Do {what} follow the annotations? One point per labelled query\n"
                 "(dashed line: no relation, AUROC 0.5 / rho 0)", fontsize=11)
    return save_png(fig, path)


def _plot_inside_outside(per_query, measures, path, gate_ranges=None):
    """Per-query mean inside vs outside the relevant windows, one panel per measure x kind x layer."""
    keys = _positions(per_query)
    layers = sorted({l for l, _ in keys})
    kinds = [k for k in GATE_KINDS if any(kk == k for _, kk in keys)]
    fig, axes = plt.subplots(len(measures) * len(kinds), len(layers),
                             figsize=(3.2 * len(layers) + 1, 3.1 * len(measures) * len(kinds) + 0.8),
                             layout=LAYOUT, squeeze=False)
    r = 0
    for measure in measures:
        pq = per_query[per_query["measure"] == measure]
        for kind in kinds:
            for j, layer in enumerate(layers):
                ax = axes[r, j]
                sel = pq[(pq["layer"] == layer) & (pq["gate"] == kind)]
                x, y = sel["mean_outside"].to_numpy(float), sel["mean_inside"].to_numpy(float)
                ax.scatter(x, y, s=12, color=KIND_COLOR.get(kind, "tab:gray"), alpha=0.7)
                if measure == "gate":  # the gate's declared range (2% margin), widened to the data
                    sc = panel_scale(None, kind, gate_ranges, layer)
                    both = np.concatenate([x, y])
                    both = both[np.isfinite(both)]
                    lo, hi = (min(sc.lo, both.min()), max(sc.hi, both.max())) if both.size else (sc.lo, sc.hi)
                    lo, hi = lo - 0.02 * (hi - lo), hi + 0.02 * (hi - lo)
                else:
                    both = np.concatenate([x, y])
                    both = both[np.isfinite(both)]
                    lo, hi = 0.0, (float(both.max()) * 1.05 if both.size else 1.0) or 1.0
                ax.plot([lo, hi], [lo, hi], color="0.4", lw=0.8, ls="--")
                ax.set_xlim(lo, hi)
                ax.set_ylim(lo, hi)
                ax.set_aspect("equal", adjustable="box")
                above = int(np.sum(y > x))
                ax.set_title(f"{measure} {gate_name(layer, kind)}\n{above}/{len(sel)} queries higher inside",
                             fontsize=9, loc="left")
                ax.set_xlabel("mean outside windows")
                if j == 0:
                    ax.set_ylabel("mean inside windows")
            r += 1
    fig.suptitle("Per-query mean inside vs outside the relevant windows\n(above the diagonal: higher inside)",
                 fontsize=11)
    return save_png(fig, path)


def _plot_across_queries(df, path, gate_ranges=None):
    """``df``: ``GroundTruthAccumulator.across_queries()``."""
    measures = [m for m in MEASURES if (df["measure"] == m).any()]
    kinds = [k for k in GATE_KINDS if (df["gate"] == k).any()]
    fig, axes = plt.subplots(max(len(measures), 1), max(len(kinds), 1),
                             figsize=(5 * max(len(kinds), 1) + 1, 3.6 * max(len(measures), 1) + 0.6),
                             layout=LAYOUT, squeeze=False)
    layers = sorted(df["layer"].unique()) if len(df) else []
    for i, measure in enumerate(measures):
        for j, kind in enumerate(kinds):
            ax = axes[i, j]
            for c, layer in enumerate(layers):
                sel = df[(df["measure"] == measure) & (df["gate"] == kind) & (df["layer"] == layer)]
                rho, _, n = spearman(sel["frac"], sel["mean"])
                ax.scatter(sel["frac"], sel["mean"], s=14, alpha=0.75, color=_layer_color(c),
                           label=f"layer {layer} (rho {rho:+.2f}, n={n})")
            sc = panel_scale(None, kind, gate_ranges)
            if measure == "gate":
                value_lim(ax, sc, df.loc[(df["measure"] == "gate") & (df["gate"] == kind), "mean"])
                zero_line(ax, sc, axis="y")
            ax.set_xlabel("fraction of the video's clips that are relevant")
            ax.set_ylabel(f"query mean {measure}")
            ax.set_title(f"{measure}: {kind_label(kind, sc.rng)}", fontsize=10, loc="left")
            ax.legend(fontsize=7)
    what = " / ".join({"gate": "mean gate", "contribution": "mean effective contribution"}.get(m, f"mean {m}")
                      for m in measures) or "mean gate"
    fig.suptitle(f"Across queries: {what} vs how much of the video is relevant", fontsize=11)
    return save_png(fig, path)


_SHADE_LO, _SHADE_HI = 0.08, 0.5  # Greys positions of saliency 0 and 4 (the gate lines stay readable on both)


def _shade(saliency):
    """RGBA shade(s) of a relevant clip of ``saliency`` (0-4, scalar or array): darker for higher saliency."""
    return plt.get_cmap("Greys")(_SHADE_LO + (_SHADE_HI - _SHADE_LO) * np.asarray(saliency, dtype=float) / 4.0)


def _saliency_shades(inside, sal):
    """Shading of the relevant clips: (x ranges [(start, width)], RGBA colours), one per relevant clip, darker
    for a higher saliency (mean of the annotators' 0-4 scores); the shade of saliency 2 without scores."""
    idx = np.flatnonzero(inside)
    level = np.where(np.isnan(sal[idx]), 2.0, np.clip(np.nan_to_num(sal[idx]), 0.0, 4.0))
    return [(i - 0.5, 1.0) for i in idx], _shade(level)


def _plot_examples(records, gate_run, n_examples, path):
    """Per-clip gates of up to ``n_examples`` labelled queries, one line per layer; relevant clips shaded
    grey, darker for a higher saliency. None when no query is labelled."""
    from matplotlib.patches import Patch
    labelled = {r["qid"]: r for r in records if r.get("relevant_clip_ids")}
    candidates = [q for q in gate_run.qids if q in labelled]
    if not candidates:
        return None
    chosen = [candidates[i] for i in subsample_indices(len(candidates), n_examples)]
    kinds = list(gate_run.kinds)
    gate_ranges = getattr(gate_run, "gate_ranges", None)
    fig, axes = plt.subplots(len(chosen), len(kinds), figsize=(6.2 * len(kinds), 2.5 * len(chosen) + 0.8),
                             layout=LAYOUT, squeeze=False)
    has_saliency = False
    for i, qid in enumerate(chosen):
        gates = gate_run.gates(qid)
        for j, kind in enumerate(kinds):
            ax = axes[i, j]
            values = [per_clip_values(gates[(layer, kind)]) for layer in gate_run.layers]
            t = values[-1].size
            for c, (layer, v) in enumerate(zip(gate_run.layers, values)):
                ax.plot(np.arange(v.size), v, color=_layer_color(c), lw=1.2, label=f"layer {layer}")
            inside, sal = clip_labels(labelled[qid], t)
            has_saliency |= bool(np.isfinite(sal).any())
            sc = panel_scale(None, kind, gate_ranges)
            value_lim(ax, sc, np.concatenate(values))
            lo, hi = ax.get_ylim()
            xranges, shades = _saliency_shades(inside, sal)
            ax.broken_barh(xranges, (lo, hi - lo), facecolors=shades, lw=0, zorder=0)
            zero_line(ax, sc, axis="y")
            ax.set_xlim(-0.5, t - 0.5)
            ax.set_title(f"qid {qid}: {gate_name('*', kind)}", fontsize=9, loc="left")
            ax.set_ylabel("gate")
            if i == len(chosen) - 1:
                ax.set_xlabel("clip (2 s)")
    handles, _ = axes[0, 0].get_legend_handles_labels()
    if has_saliency:
        handles += [Patch(facecolor=_shade(s), label=f"saliency {s}") for s in (1, 2, 3, 4)]
        shading = "relevant clips shaded, darker = higher saliency (mean of 3 annotators, 0-4)"
    else:
        handles.append(Patch(facecolor=_shade(2), label="relevant clip"))
        shading = "relevant clips shaded grey"
    fig.legend(handles=handles, fontsize=8, loc="outside lower center", frameon=False,
               ncol=legend_columns(fig, [h.get_label() for h in handles], 8))
    fig.suptitle(f"Gates along the video of {len(chosen)} labelled queries, one line per layer; {shading}",
                 fontsize=11)
    return save_png(fig, path)
