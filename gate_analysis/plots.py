"""Every gate figure. Each function draws one figure, writes one PNG atomically (temp file in the same
folder + ``os.replace``), closes the figure and returns the path. Backend Agg (set at import); never
``plt.show``.

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
import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import colors as mcolors  # noqa: E402
from matplotlib.collections import PolyCollection  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from qd_detr.gates import GateRange  # noqa: E402

from . import ranges as R  # noqa: E402
from .store import GATE_KINDS, PER_CLIP_GATING_TYPES, gate_name  # noqa: E402

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
KIND_LABEL = {"mha": "MHA gate (audio cross-attention branch)", "ffn": "FFN gate (FFN branch)",
              "beta": "FiLM shift gate_beta (added to the FFN output)"}

KIND_COLOR = {"mha": "tab:purple", "ffn": "tab:green", "beta": "tab:orange"}
PAD_COLOR = "#b3b3b3"  # NaN / padding: neutral grey, distinct from the near-white of g ~ 0
DPI = 100
LAYOUT = "constrained"
_TMP_PREFIX = ".tmp-"


# -- helpers -------------------------------------------------------------------------------------
def _kind_label(kind, rng=None):
    """Panel label of a gate kind; ``rng`` (the kind's GateRange) marks the FiLM FFN gate."""
    if kind == "ffn" and rng is not None and rng.film:
        return "FFN gate (FiLM: FFN branch weight 1 + g)"
    return KIND_LABEL.get(kind, f"{kind} gate")


def _kind_short(kind, rng=None):
    """A short panel label: ``gate_{kind}`` and its branch."""
    if kind == "ffn" and rng is not None and rng.film:
        return "gate_ffn (FiLM: weight 1 + g)"
    return {"mha": "gate_mha (audio branch)", "ffn": "gate_ffn (FFN branch)",
            "beta": "gate_beta (FiLM shift)"}.get(kind, f"gate_{kind}")


def _kind_key(kind):
    return GATE_KINDS.index(kind) if kind in GATE_KINDS else len(GATE_KINDS)


def _kinds_in(df):
    kinds = list(dict.fromkeys(df["gate"].astype(str)))
    return sorted(kinds, key=_kind_key)


def _layers_in(df):
    return sorted({int(l) for l in df["layer"] if str(l) != "all"})


def _value_range(value_range, kind=None):
    """(lo, hi) of ``kind``; for a per-kind dict without ``kind``, the union of the ranges."""
    if isinstance(value_range, _Scale):
        return (value_range.lo, value_range.hi)
    if value_range is None:
        return (-1.0, 1.0)
    if isinstance(value_range, dict):
        if kind is None:
            los, his = zip(*value_range.values())
            return (float(min(los)), float(max(his)))
        lo, hi = value_range.get(kind, (-1.0, 1.0))
        return (float(lo), float(hi))
    return (float(value_range[0]), float(value_range[1]))


class _Scale:
    """Axis limits and colour convention of one panel: ``lo``/``hi``; ``centre`` (diverging red/blue
    around it) or None (sequential); ``rng``/``kind``: the declared GateRange it follows (or None)."""

    def __init__(self, lo, hi, centre=None, rng=None, kind=None):
        self.lo, self.hi, self.centre, self.rng, self.kind = float(lo), float(hi), centre, rng, kind

    @property
    def diverging(self):
        return self.centre is not None

    def __eq__(self, other):
        return isinstance(other, _Scale) and (self.lo, self.hi, self.centre, self.rng) == (
            other.lo, other.hi, other.centre, other.rng)

    def __hash__(self):
        return hash((self.lo, self.hi, self.centre, self.rng))


def _ranges_of(gate_ranges):
    """{(layer, kind): GateRange} of ``gate_ranges`` (names or tuples, GateRange or dict), or {}."""
    return {R.range_key(k): R.as_range(v) for k, v in (gate_ranges or {}).items()}


def _scale(value_range=None, kind=None, gate_ranges=None, layer=None):
    """The ``_Scale`` of a panel of gate ``kind`` (of ``layer``, or every layer when None).

    With declared ranges (``gate_ranges``) and no explicit ``value_range``: limits = the declared range,
    diverging around the reference value for signed gates, sequential 0..scale for sigmoid gates. An
    explicit ``value_range`` sets the limits; then the scale is diverging around 0 when it lies inside."""
    if isinstance(value_range, _Scale):
        return value_range
    ranges = _ranges_of(gate_ranges)
    rng = None
    if kind is not None and ranges:
        if layer is not None and str(layer) != "all" and (int(layer), kind) in ranges:
            rng = ranges[(int(layer), kind)]
        elif any(k == kind for _, k in ranges):
            rng = R.kind_range({key: r for key, r in ranges.items() if key[1] == kind}, kind)
    if value_range is None and rng is not None:
        lo, hi = rng.low, rng.high
        if not lo < hi:
            lo, hi = lo - 0.5, hi + 0.5
        centre = R.reference(rng) if rng.signed and lo < R.reference(rng) < hi else None
        return _Scale(lo, hi, centre, rng, kind)
    lo, hi = _value_range(value_range, kind)
    return _Scale(lo, hi, 0.0 if lo < 0 < hi else None, None, kind)


def _union_scale(scales):
    """One scale covering ``scales``: the same convention when they share one (e.g. sigmoid gates of
    different scales), else diverging around 0 when any is diverging and 0 lies inside."""
    scales = list(scales)
    if len(set(scales)) == 1:
        return scales[0]
    lo, hi = min(s.lo for s in scales), max(s.hi for s in scales)
    rngs = [s.rng for s in scales]
    kinds = {s.kind for s in scales}
    if all(r is not None for r in rngs) and len({(r.activation, r.film, r.off) for r in rngs}) == 1:
        r = rngs[0]
        rng = GateRange(r.activation, lo, hi, off=r.off, film=r.film)
        centre = R.reference(rng) if rng.signed and lo < R.reference(rng) < hi else None
        return _Scale(lo, hi, centre, rng, kinds.pop() if len(kinds) == 1 else None)
    return _Scale(lo, hi, 0.0 if lo < 0 < hi and any(s.diverging for s in scales) else None)


def _same_range(value_range, kinds, gate_ranges=None):
    return len({_scale(value_range, k, gate_ranges) for k in kinds}) == 1


def _cmap_norm(value_range, kind=None):
    """(cmap, norm, diverging) for gate values: ``RdBu_r`` around the scale's centre (signed gates),
    white-to-red from 0 to scale for declared sigmoid gates, viridis for other ranges without 0 inside."""
    sc = _scale(value_range, kind)
    lo, hi = sc.lo, sc.hi
    if sc.diverging:
        cmap = plt.get_cmap("RdBu_r")
        c = sc.centre
        norm = mcolors.Normalize(lo, hi) if math.isclose(c - lo, hi - c) else mcolors.TwoSlopeNorm(c, lo, hi)
    elif sc.rng is not None and sc.rng.activation == "sigmoid":
        cmap = plt.get_cmap("Reds" if hi > 0 else "Reds_r")
        norm = mcolors.Normalize(lo, hi)
    else:
        cmap = plt.get_cmap("viridis")
        norm = mcolors.Normalize(lo, hi)
    return cmap.with_extremes(bad=PAD_COLOR), norm, sc.diverging


def _value_label(value_range, what="gate value", kind=None):
    sc = _scale(value_range, kind)
    if sc.rng is not None:
        return f"{what}\n({R.short_meaning(sc.rng, sc.kind)})"
    if sc.diverging:
        return f"{what} (+ audio added, − suppressed, 0 ignored)"
    return f"{what} (range [{sc.lo:g}, {sc.hi:g}])"


def _colorbar(fig, mappable, ax, value_range, what="gate value", kind=None):
    cb = fig.colorbar(mappable, ax=ax, fraction=0.04, pad=0.02)
    label = _value_label(value_range, what, kind)
    cb.set_label(label, fontsize=8 if label.count("\n") > 1 else 9)
    return cb


def _value_lim(ax, value_range, data=(), axis="y", kind=None):
    """Axis limits = the gate range (2% margin), widened to include ``data`` outside it."""
    lo, hi = _value_range(_scale(value_range, kind), kind)
    d = np.asarray([v for v in np.ravel(np.asarray(data, dtype=float)) if np.isfinite(v)])
    if d.size:
        lo, hi = min(lo, float(d.min())), max(hi, float(d.max()))
    pad = 0.02 * (hi - lo)
    (ax.set_ylim if axis == "y" else ax.set_xlim)(lo - pad, hi + pad)


def _zero_line(ax, value_range, axis="x", kind=None):
    """A line at the scale's centre (0: the gate's off value; FiLM FFN gate: weight 1), diverging only."""
    sc = _scale(value_range, kind)
    if sc.diverging:
        (ax.axvline if axis == "x" else ax.axhline)(sc.centre, color="0.3", lw=0.8, zorder=0)


def _near_band(sc, near_zero):
    """(lo, hi) of the near-zero band of a panel (|g - r| <= near_zero * m, clipped to the range), or None."""
    if not near_zero:
        return None
    if sc.rng is None:
        return (-near_zero, near_zero) if sc.diverging else None
    r, m = R.reference(sc.rng), sc.rng.magnitude or 1.0
    lo, hi = max(r - near_zero * m, sc.lo), min(r + near_zero * m, sc.hi)
    return (lo, hi) if lo < hi else None


def _all_tanh(gate_ranges):
    return all(r == R.TANH for r in _ranges_of(gate_ranges).values())


def _save(fig, path, dpi=DPI, **savefig_kwargs):
    """Write ``fig`` to ``path`` as PNG via a temp file + os.replace; always close the figure."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f"{_TMP_PREFIX}{os.getpid()}-{os.path.basename(path)}")
    try:
        if fig.get_layout_engine() is not None and "bbox_inches" not in savefig_kwargs:
            # savefig would run the layout engine twice (a layout draw, then the real draw): run it once
            # and freeze the positions (pixel-identical PNGs, ~20% faster)
            fig.draw_without_rendering()
            fig.set_layout_engine(None)
        fig.savefig(tmp, format="png", dpi=dpi, pil_kwargs={"compress_level": 1}, **savefig_kwargs)  # fast encode
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _subsample(n, max_n):
    """Deterministic, evenly spaced indices (first and last included) when n > max_n."""
    if n <= max_n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, max_n).round().astype(int))


def _short(s, n=22):
    s = str(s)
    return s if len(s) <= n else s[:n - 1] + "…"


class _MappingSource:
    """Adapter giving a ``{id: {(layer, kind): array}}`` mapping the GateRun interface used here."""

    def __init__(self, mapping, gating_type=None, vids=None, gate_ranges=None):
        self._gates = {}
        for qid, g in mapping.items():
            g = getattr(g, "gates", g)  # accept GateRecord-like objects
            self._gates[qid] = {k: np.asarray(v, dtype=np.float32) for k, v in g.items()}
        self.qids = list(self._gates)
        self.vids = {q: (vids or {}).get(q, "") for q in self.qids}
        keys = set().union(*[set(g) for g in self._gates.values()]) if self._gates else set()
        self.layers = sorted({l for l, _ in keys})
        self.kinds = tuple(sorted({k for _, k in keys}, key=lambda k: (_kind_key(k), k)))
        self.gate_ranges = dict(gate_ranges or {})
        arrays = [a for g in self._gates.values() for a in g.values()]
        if gating_type is not None:
            self.gating_type = gating_type
        elif any(a.ndim == 2 for a in arrays):
            self.gating_type = "elementwise"
        elif any(a.ndim == 1 and a.size != 1 for a in arrays):
            self.gating_type = "clipwise"
        else:
            self.gating_type = "global"

    def gates(self, qid):
        if qid not in self._gates:
            more = "..." if len(self.qids) > 10 else ""
            raise KeyError(f"no gates for sample {qid!r}; known: {self.qids[:10]}{more}")
        return self._gates[qid]


def _source(obj):
    if hasattr(obj, "gates") and hasattr(obj, "qids") and hasattr(obj, "gating_type"):
        return obj
    if isinstance(obj, dict):
        return _MappingSource(obj)
    raise TypeError(f"expected a GateRun or a mapping {{qid: {{(layer, kind): array}}}}, got {type(obj).__name__}")


def _per_clip(arr):
    """(T,) per-clip values: clipwise as is, elementwise averaged over dims."""
    a = np.asarray(arr, dtype=np.float64)
    return a.mean(axis=1) if a.ndim == 2 else a.reshape(-1)


def _query_label(src, qid, n=18):
    vid = src.vids.get(qid, "") if hasattr(src, "vids") else ""
    prefix = f"qid {qid}" if isinstance(qid, (int, np.integer)) else str(qid)
    return f"{prefix} ({_short(vid, n)})" if vid else prefix


def _heatmap_height(n_rows):
    return min(max(0.14 * n_rows + 2.2, 3.6), 11)


# -- figures -------------------------------------------------------------------------------------
def plot_layer_distributions(histograms_df, query_stats_df, path, value_range=None, gating_type=None,
                             near_zero=0.1, gate_ranges=None):
    """Per layer (rows) and gate kind (columns): the exact histogram of all gate values (fraction of
    values per bin, bars coloured by value; out-of-range and NaN counts written in the panel), and a
    bottom row with violins (+ points when few) of the per-query mean gate per layer. Each panel's x axis
    is its histogram's range; colours follow the declared ``gate_ranges``; the grey band marks the
    near-zero values (``near_zero`` times the range magnitude around the reference value)."""
    h = histograms_df
    if len(h) == 0:
        raise ValueError("plot_layer_distributions: the histograms frame is empty (no queries accumulated)")
    kinds, layers = _kinds_in(h), _layers_in(h)
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
            sc = _scale(value_range, kind, gate_ranges, layer)
            own = (float(b["bin_left"].min()), float(b["bin_right"].max())) if len(b) else (sc.lo, sc.hi)
            if own != (sc.lo, sc.hi):
                inside = sc.diverging and own[0] < sc.centre < own[1]
                centre = sc.centre if inside else (0.0 if sc.rng is None and own[0] < 0 < own[1] else None)
                sc = _Scale(own[0], own[1], centre, sc.rng, kind)
            cmap, norm, _ = _cmap_norm(sc)
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
            band = _near_band(sc, near_zero)
            if band is not None:
                ax.axvspan(*band, color="0.9", zorder=0)
                any_band = True
            _zero_line(ax, sc)
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
        sc = _scale(value_range, kind, gate_ranges)
        _zero_line(ax, sc, axis="y")
        _value_lim(ax, sc, np.concatenate(data) if data else [])
        ax.set_xticks(layers)
        ax.set_xlabel("fusion layer")
        ax.set_ylabel("per-query mean gate")
        n_q = max((d.size for d in data), default=0)
        ax.set_title(f"{_kind_label(kind, sc.rng)}: per-query mean, {n_q:,} queries" if len(kinds) < 3 else
                     f"{_kind_short(kind, sc.rng)}: per-query mean, {n_q:,} queries", fontsize=10, loc="left")
    gt = f" ({gating_type} gating)" if gating_type else ""
    band = ""
    if any_band and (not gate_ranges or _all_tanh(gate_ranges)):
        band = f"\ngrey band: near zero (|g| ≤ {near_zero:g}, audio ignored)"
    elif any_band:
        film = any(r.film for r in _ranges_of(gate_ranges).values())
        band = (f"\ngrey band: near zero, |g| ≤ {near_zero:.0%} of the gate's range (audio ignored"
                + ("; FiLM FFN gate: weight ≈ 1, not off" if film else "") + ")")
    fig.suptitle(f"Gate value distributions per layer{gt}\nexact histograms over all values "
                 f"(bars coloured by value) and per-query means{band}", fontsize=12)
    return _save(fig, path)


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
    """Queries x layers heatmap of the per-query mean gate, one panel per gate kind (shared colour
    scale when the kinds share a range; a kind's scale covers its layers' declared ranges). qids label
    the rows when at most 60 are shown; above ``max_queries`` an evenly spaced subset (recorded order)
    is drawn and the title says so."""
    if len(query_stats_df) == 0:
        raise ValueError("plot_query_layer_heatmap: the query_stats frame is empty")
    kinds, layers = _kinds_in(query_stats_df), _layers_in(query_stats_df)
    mats = {k: _query_matrix(query_stats_df, k, layers) for k in kinds}
    n_total = len(mats[kinds[0]][1])
    idx = _subsample(n_total, max_queries)
    n = idx.size
    scales = {k: _scale(value_range, k, gate_ranges) for k in kinds}
    shared = len(set(scales.values())) == 1
    width = 2.2 + 1.1 * len(layers) * len(kinds) + (1.5 if shared else 1.5 * len(kinds))
    fig, axes = plt.subplots(1, len(kinds), layout=LAYOUT, figsize=(width, _heatmap_height(n)), squeeze=False,
                             sharey=True)
    for j, kind in enumerate(kinds):
        m, qids = mats[kind]
        ax = axes[0, j]
        cmap, norm, _ = _cmap_norm(scales[kind])
        im = ax.imshow(m[idx], aspect="auto", interpolation="nearest", cmap=cmap, norm=norm)
        ax.set_xticks(range(len(layers)), [str(l) for l in layers])
        ax.set_xlabel("fusion layer")
        ax.set_title(_kind_label(kind, scales[kind].rng).replace(" (", "\n("), fontsize=10)
        if j == 0:
            if n <= 60:
                ax.set_yticks(range(n), [f"qid {qids[i]}" for i in idx], fontsize=7)
                ax.set_ylabel("query")
            else:
                ax.set_ylabel(f"queries (row = one query, recorded order; {n:,} rows)")
                ax.set_yticks([])
        if not shared:
            _colorbar(fig, im, ax, scales[kind], f"mean gate_{kind}")
    if shared:
        _colorbar(fig, im, axes[0, :].tolist(), scales[kinds[0]], "mean gate of the query")
    note = (f"\n{n:,} of {n_total:,} queries shown (evenly spaced, recorded order)" if n < n_total
            else f" ({n_total:,} queries)")
    fig.suptitle(f"Mean gate per query and layer{note}", fontsize=11)
    return _save(fig, path)


def plot_query_clip_heatmap(gate_run, layer, kind, path, qids=None, max_queries=100, value_range=None,
                            gate_ranges=None):
    """Queries x clips heatmap of one gate (``layers.{layer}.gate_{kind}``) for clipwise or
    elementwise gating (elementwise averaged over the D dims). Clips beyond a video's end are NaN and
    drawn grey. ``qids``: rows to show (default: up to ``max_queries`` evenly spaced queries). Colours
    follow the gate's declared range (``gate_ranges``, default: the gate run's)."""
    src = _source(gate_run)
    if gate_ranges is None:
        gate_ranges = getattr(src, "gate_ranges", None)
    if src.gating_type not in PER_CLIP_GATING_TYPES:
        raise ValueError(f"plot_query_clip_heatmap needs clipwise or elementwise gates; this run has "
                         f"{src.gating_type!r} gating (one gate per query)")
    requested = list(src.qids if qids is None else qids)
    chosen = [requested[i] for i in _subsample(len(requested), max_queries)]
    if not chosen:
        raise ValueError("plot_query_clip_heatmap: no queries to plot")
    get = src.gate if hasattr(src, "gate") else (lambda q, l, k: src.gates(q)[(l, k)])
    rows = [_per_clip(get(q, layer, kind)) for q in chosen]
    t_max = max(r.size for r in rows)
    m = np.full((len(rows), max(t_max, 1)), np.nan)  # NaN = padding (no such clip)
    for i, r in enumerate(rows):
        m[i, :r.size] = r
    sc = _scale(value_range, kind, gate_ranges, layer)
    cmap, norm, _ = _cmap_norm(sc)
    n = len(rows)
    fig, ax = plt.subplots(layout=LAYOUT, figsize=(min(max(0.12 * t_max + 3.5, 7.5), 16), _heatmap_height(n)))
    im = ax.imshow(m, aspect="auto", interpolation="nearest", cmap=cmap, norm=norm)
    ax.set_xlabel("clip index t (2-second clips)")
    if n <= 60:
        ax.set_yticks(range(n), [_query_label(src, q) for q in chosen], fontsize=7)
        ax.set_ylabel("query")
    else:
        ax.set_yticks([])
        ax.set_ylabel(f"queries (row = one query; {n:,} rows)")
    _colorbar(fig, im, ax, sc)
    ax.legend(handles=[Patch(facecolor=PAD_COLOR, label="no clip (video shorter)")], loc="upper right",
              fontsize=8, framealpha=0.9)
    how = " (mean over feature dims)" if src.gating_type == "elementwise" else ""
    note = f"{n:,} of {len(requested):,} queries (evenly spaced)" if n < len(requested) else f"{n:,} queries"
    ax.set_title(f"{gate_name(layer, kind)}: gate per clip{how}, {src.gating_type} gating; {note}", fontsize=11)
    return _save(fig, path)


def plot_dim_profile(dim_stats_df, path, value_range=None, gate_ranges=None):
    """Elementwise gates: per feature dimension, mean ± std over all valid clips of all queries; one
    panel per layer (rows) and gate kind (columns; y axis: the kind's declared range)."""
    if len(dim_stats_df) == 0:
        raise ValueError("plot_dim_profile: no per-dimension statistics (only elementwise gating has them)")
    kinds, layers = _kinds_in(dim_stats_df), _layers_in(dim_stats_df)
    fig, axes = plt.subplots(len(layers), len(kinds), layout=LAYOUT, squeeze=False, sharex=True,
                             sharey=_same_range(value_range, kinds, gate_ranges),
                             figsize=(6.5 * len(kinds), 2.1 * len(layers) + 1.2))
    for j, kind in enumerate(kinds):
        sc = _scale(value_range, kind, gate_ranges)
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
            _zero_line(ax, sc, axis="y")
            _value_lim(ax, sc, band)
            ax.set_title(gate_name(layer, kind), fontsize=10, loc="left")
            if j == 0:
                ax.set_ylabel("gate value")
            if i == len(layers) - 1:
                ax.set_xlabel("feature dimension d")
    axes[0, -1].legend(loc="upper right", fontsize=8)
    n_values = int(dim_stats_df["n_values"].iloc[0])
    fig.suptitle(f"Elementwise gates per feature dimension: mean ± std over {n_values:,} valid clips "
                 f"(all queries)", fontsize=12)
    return _save(fig, path)


def plot_layer_evolution(layer_stats_df, path, value_range=None, gate_ranges=None):
    """Across layers (x = layer): (1) mean gate ± std and (2) std, for each gate kind, query-weighted
    (solid) and clip-weighted (dashed); (3) clip-weighted fractions of values that are negative /
    near zero / positive per layer and kind (stacked; they sum to 1 unless there are NaN values;
    thresholds relative to each gate's declared range, and no negative part for sigmoid gates)."""
    ls = layer_stats_df
    if len(ls) == 0:
        raise ValueError("plot_layer_evolution: the layer_stats frame is empty")
    kinds, layers = _kinds_in(ls), _layers_in(ls)
    fig, axes = plt.subplots(1, 3, layout=LAYOUT, figsize=(17, 4.8))
    style = {"query": dict(ls="-", marker="o"), "clip": dict(ls="--", marker="s")}
    extent = []
    for k_i, kind in enumerate(kinds):
        for w_i, weighting in enumerate(("query", "clip")):
            d = ls[(ls["gate"] == kind) & (ls["weighting"] == weighting)].sort_values("layer")
            if not len(d):
                continue
            x = d["layer"].to_numpy(float) + (w_i - 0.5) * 0.08 + (k_i - 0.5) * 0.02
            lbl = f"gate_{kind}, {weighting}-weighted"
            axes[0].errorbar(x, d["mean"], yerr=d["std"], color=KIND_COLOR.get(kind), capsize=3, label=lbl,
                             **style[weighting])
            axes[1].plot(d["layer"], d["std"], color=KIND_COLOR.get(kind), label=lbl, **style[weighting])
            extent += list(d["mean"] - d["std"]) + list(d["mean"] + d["std"])
    sc = _union_scale([_scale(value_range, k, gate_ranges) for k in kinds])
    _zero_line(axes[0], sc, axis="y")
    _value_lim(axes[0], sc, extent)
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
    ranges = _ranges_of(gate_ranges).values()
    plain = not gate_ranges or _all_tanh(gate_ranges)
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
    fig.suptitle("Gates across fusion layers (query-weighted: each query counts once; clip-weighted: all values)",
                 fontsize=12)
    return _save(fig, path)


def plot_sample_comparison(gate_run_or_mapping, qids, path, value_range=None, max_samples=10, gate_ranges=None):
    """Selected queries side by side: per-layer mean gate (one panel per gate kind); for clipwise and
    elementwise gating also the per-clip gate profile of every layer (elementwise: mean over dims,
    ± std over dims when at most 3 queries are shown). Axes follow the declared ``gate_ranges``
    (default: the gate run's)."""
    src = _source(gate_run_or_mapping)
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
            ax.plot(layers, means, marker="o", color=colors(c % 10), label=_query_label(src, q))
        sc = _scale(value_range, kind, gate_ranges)
        _zero_line(ax, sc, axis="y")
        _value_lim(ax, sc, all_means)
        ax.set_xticks(layers)
        ax.set_xlabel("fusion layer")
        ax.set_ylabel("mean gate of the query")
        ax.set_title(f"{_kind_label(kind, sc.rng)}: mean per layer", fontsize=10, loc="left")
        for i, layer in enumerate(layers if per_clip else []):
            ax = axes[i + 1, j]
            values = []
            for c, q in enumerate(shown):
                arr = np.asarray(gates[q][(layer, kind)], dtype=np.float64)
                y = _per_clip(arr)
                values.append(y)
                ax.plot(np.arange(y.size), y, color=colors(c % 10), lw=1.1)
                if arr.ndim == 2 and len(shown) <= 3:  # spread over dims; too cluttered for more queries
                    sd = arr.std(axis=1)
                    ax.fill_between(np.arange(y.size), y - sd, y + sd, color=colors(c % 10), alpha=0.12, lw=0)
            sc = _scale(value_range, kind, gate_ranges, layer)
            _zero_line(ax, sc, axis="y")
            _value_lim(ax, sc, np.concatenate(values))
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
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(shown), 5), fontsize=9, frameon=False)
    note = f" (first {len(shown)} of {len(qids)} requested)" if len(shown) < len(qids) else ""
    fig.suptitle(f"Gate comparison of selected queries, {src.gating_type} gating{note}", fontsize=12)
    return _save(fig, path)


def plot_rankings(rankings_df, path, layer="all", value_range=None, gate_ranges=None):
    """Top and bottom queries by mean gate (horizontal bars, coloured by value on the gate's declared
    range), one panel per gate kind; ``layer="all"`` ranks by the mean over all layers (gate kinds
    never mixed)."""
    r = rankings_df[rankings_df["layer"].astype(str) == str(layer)]
    if len(r) == 0:
        raise ValueError(f"plot_rankings: no rankings for layer {layer!r}")
    kinds = _kinds_in(r)
    n_rows = max(len(r[r["gate"] == k]) for k in kinds)
    fig, axes = plt.subplots(1, len(kinds), layout=LAYOUT, figsize=(7.4 * len(kinds), 0.32 * n_rows + 2.4),
                             squeeze=False)
    where = "over all layers" if str(layer) == "all" else f"in layer {layer}"
    for j, kind in enumerate(kinds):
        ax = axes[0, j]
        sc = _scale(value_range, kind, gate_ranges, layer)
        cmap, norm, _ = _cmap_norm(sc)
        d = r[r["gate"] == kind]
        top = d[d["rank_type"] == "top"].sort_values("rank")
        bot = d[d["rank_type"] == "bottom"].sort_values("rank", ascending=False)  # lowest at the bottom
        rows = list(top.itertuples()) + list(bot.itertuples())
        y = np.arange(len(rows))[::-1].astype(float)
        y[len(top):] -= 0.6  # gap between the two groups
        vals = np.array([row.mean for row in rows], dtype=float)
        ax.barh(y, vals, color=cmap(norm(vals)), edgecolor="0.4", lw=0.4)
        labels = [f"{row.rank_type} {row.rank}: qid {row.qid}  {_short(row.vid, 26)}" for row in rows]
        ax.set_yticks(y, labels, fontsize=8)
        for yy, v in zip(y, vals):
            ax.text(v, yy, f" {v:+.3f} ", va="center", ha="left" if v >= 0 else "right", fontsize=7)
        _zero_line(ax, sc)
        lo, hi = min(sc.lo, np.nanmin(vals)), max(sc.hi, np.nanmax(vals))
        pad = 0.18 * (hi - lo)
        ax.set_xlim(lo - pad if lo < 0 else lo, hi + pad)
        ax.set_xlabel(f"mean gate of the query {where}")
        ax.set_title(f"{gate_name(layer, kind)}: top {len(top)} / bottom {len(bot)}", fontsize=10, loc="left")
    scope = "all layers" if str(layer) == "all" else f"layer {layer}"
    fig.suptitle(f"Queries with the highest and lowest mean gate ({scope}; each gate kind ranked separately)",
                 fontsize=12)
    return _save(fig, path)


def select_compare_qids(rankings_df, available=None, max_n=6):
    """Default queries for ``plot_sample_comparison``: the top-1 and bottom-1 query of every gate kind
    over all layers (then the next ranks), deduplicated, at most ``max_n``."""
    r = rankings_df[rankings_df["layer"].astype(str) == "all"]
    if not len(r):
        return []
    out = []
    for rank in range(1, int(r["rank"].max()) + 1):
        for kind in _kinds_in(r):
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
        src = _source(gate_run)
        if src.gating_type in PER_CLIP_GATING_TYPES:
            # read the selected queries once, reduced to per-clip values, for all layer x kind heatmaps
            chosen = [src.qids[i] for i in _subsample(len(src.qids), max_clip_heatmap_queries)]
            reduced = _MappingSource({q: {key: _per_clip(a) for key, a in src.gates(q).items()} for q in chosen},
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
