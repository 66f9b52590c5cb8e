"""Figures of the training monitor's evolution table (``gate_analysis.evolution``): how the gates evolve over
epochs, per layer or per tracked query, for one or several runs (``EVOLUTION_PLOTS``)."""
import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator

from qd_detr.errors import DataError
from qd_detr.gates import GATE_KINDS

from .evolution import EVOLUTION_PLOTS, evolution_value_ranges, read_gate_evolution, summarize_gate_evolution
from .figures import plt, save_png

__all__ = ["plot_gate_evolution"]


def _save(fig, path):
    """PNG at 110 dpi, tight bounding box (the evolution figures' format)."""
    return save_png(fig, path, dpi=110, bbox_inches="tight")


def _kinds(df):
    """The gate kinds of ``df`` in ``GATE_KINDS`` order, unknown kinds after them."""
    present = list(dict.fromkeys(df["gate"].astype(str)))
    return [k for k in GATE_KINDS if k in present] + [k for k in present if k not in GATE_KINDS]


def _kind_lim(value_range, kind, data=()):
    """(lo, hi, signed): y limits of ``kind``: its range (``(lo, hi)`` or ``{kind: (lo, hi)}``; tanh
    [-1, 1] when absent) with a 2% margin, widened to ``data`` outside it; ``signed``: 0 lies inside
    the range (a zero line is drawn)."""
    lo, hi = value_range.get(kind, (-1.0, 1.0)) if isinstance(value_range, dict) else value_range
    signed = lo < 0 < hi
    d = np.asarray(data, dtype=float)
    d = d[np.isfinite(d)]
    if d.size:
        lo, hi = min(lo, float(d.min())), max(hi, float(d.max()))
    pad = 0.02 * (hi - lo)
    return lo - pad, hi + pad, signed


def _plot_by_layer(df, path, value_range):
    """Per gate kind: mean (± std band for one run) and std of all tracked values, one line per layer."""
    s = summarize_gate_evolution(df)
    kinds, layers, runs = _kinds(s), sorted(s["layer"].unique()), list(dict.fromkeys(s["run"]))
    styles = ["-", "--", ":", "-."]
    cmap = plt.get_cmap("viridis")
    fig, axes = plt.subplots(len(kinds), 2, figsize=(11, 3.2 * len(kinds)), squeeze=False)
    for r, kind in enumerate(kinds):
        ax_m, ax_s = axes[r]
        for ri, run in enumerate(runs):
            for li, layer in enumerate(layers):
                sel = s[(s["gate"] == kind) & (s["layer"] == layer) & (s["run"] == run)].sort_values("epoch")
                if sel.empty:
                    continue
                color = cmap(li / max(1, len(layers) - 1) * 0.85)
                label = f"layers.{layer}.gate_{kind}" + (f" [{run}]" if len(runs) > 1 else "")
                x, m, sd = sel["epoch"].to_numpy(), sel["mean"].to_numpy(), sel["std"].to_numpy()
                ax_m.plot(x, m, styles[ri % len(styles)], marker="o", ms=3, color=color, label=label)
                if len(runs) == 1:
                    ax_m.fill_between(x, m - sd, m + sd, color=color, alpha=0.15, lw=0)
                ax_s.plot(x, sd, styles[ri % len(styles)], marker="o", ms=3, color=color, label=label)
        sel = s[s["gate"] == kind]
        lo, hi, signed = _kind_lim(value_range, kind,
                                   np.concatenate([sel["mean"] - sel["std"], sel["mean"] + sel["std"]]))
        ax_m.set_ylim(lo, hi)
        if signed:
            ax_m.axhline(0, color="0.3", lw=0.8, zorder=0)
        ax_m.set_title(f"gate_{kind}: mean over all values" + (" (band: ± std)" if len(runs) == 1 else ""))
        ax_s.set_ylim(0, max((hi - lo) / 2, float(sel["std"].max()) * 1.05 if len(sel) else 0))
        ax_s.set_title(f"gate_{kind}: std over all values")
        for ax in (ax_m, ax_s):
            ax.set_xlabel("epoch (completed)")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        ax_s.legend(fontsize=7, loc="best")
    fig.suptitle(f"Gate evolution per layer ({int(s.groupby(['run', 'epoch'])['n_queries'].max().max())} "
                 "tracked queries)")
    fig.tight_layout()
    return _save(fig, path)


def _plot_by_query(df, path, value_range, max_queries):
    """Per layer x gate kind: the mean gate of each tracked query over epochs."""
    kinds, layers = _kinds(df), sorted(df["layer"].unique())
    runs = list(dict.fromkeys(df["run"])) if "run" in df else [""]
    qids = list(dict.fromkeys(df["qid"]))
    if len(qids) > max_queries:
        keep = np.unique(np.linspace(0, len(qids) - 1, max_queries).round().astype(int))
        qids = [qids[i] for i in keep]
    cmap = plt.get_cmap("tab20")
    styles = ["-", "--", ":", "-."]
    fig, axes = plt.subplots(len(kinds), len(layers), figsize=(3.6 * len(layers) + 1.5, 3.0 * len(kinds)),
                             squeeze=False, sharey="row")
    for r, kind in enumerate(kinds):
        for c, layer in enumerate(layers):
            ax = axes[r][c]
            for ri, run in enumerate(runs):
                sub = df[(df["gate"] == kind) & (df["layer"] == layer)]
                if "run" in df:
                    sub = sub[sub["run"] == run]
                for qi, qid in enumerate(qids):
                    sel = sub[sub["qid"] == qid].sort_values("epoch")
                    if sel.empty:
                        continue
                    ax.plot(sel["epoch"], sel["mean"], styles[ri % len(styles)], marker="o", ms=2.5, lw=1,
                            color=cmap(qi % 20), label=f"qid {qid}" if (r, c, ri) == (0, len(layers) - 1, 0) else None)
            lo, hi, signed = _kind_lim(value_range, kind, df.loc[df["gate"] == kind, "mean"])
            ax.set_ylim(lo, hi)
            if signed:
                ax.axhline(0, color="0.3", lw=0.8, zorder=0)
            ax.set_title(f"layers.{layer}.gate_{kind}", fontsize=9)
            ax.set_xlabel("epoch (completed)")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
    for r in range(len(kinds)):
        axes[r][0].set_ylabel("mean gate of the query")
    handles, labels = axes[0][-1].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="center right", fontsize=7, frameon=False)
    note = "" if len(runs) < 2 else f"; line styles: {', '.join(f'{s} {r}' for s, r in zip(styles, runs))}"
    fig.suptitle(f"Per-query mean gate over epochs ({len(qids)} queries{note})")
    fig.tight_layout(rect=(0, 0, 0.88, 1))
    return _save(fig, path)


def plot_gate_evolution(paths_or_frame, out_path, by="layer", value_range=None, max_queries=20):
    """Draw how the gates evolve over epochs and write one PNG; returns its path.

    Args:
        paths_or_frame: paths for ``read_gate_evolution`` (one or several runs), or its DataFrame.
        out_path: PNG to write (atomically).
        by: ``"layer"``: per gate kind, the mean (with a ± std band for a single run) and the std of
            all tracked gate values, one line per layer (line style per run); ``"query"``: one panel
            per layer x gate kind, one line per tracked query (its mean gate), at most ``max_queries``
            queries (evenly subsampled).
        value_range: y limits of gate values: ``(lo, hi)`` or ``{kind: (lo, hi)}``; default: the gate
            ranges the captures declare (``evolution_value_ranges``; [-1, 1] for tanh gates and for a
            DataFrame). Axes widen to values outside.
    """
    if by not in EVOLUTION_PLOTS:
        raise ValueError(f"by must be one of {list(EVOLUTION_PLOTS)}, got {by!r}")
    df = paths_or_frame if isinstance(paths_or_frame, pd.DataFrame) else read_gate_evolution(paths_or_frame)
    if df.empty:
        raise DataError("plot_gate_evolution: the evolution table is empty")
    if "run" not in df:
        df = df.assign(run="")
    if value_range is None:
        value_range = (-1.0, 1.0) if isinstance(paths_or_frame, pd.DataFrame) else \
            evolution_value_ranges(paths_or_frame)
    elif not isinstance(value_range, dict):
        value_range = tuple(value_range)
    if by == "layer":
        return _plot_by_layer(df, out_path, value_range)
    return _plot_by_query(df, out_path, value_range, int(max_queries))
