"""Shared plotting helpers of every gate figure: atomic PNG writing, deterministic subsampling, colour
maps, norms and axis limits that follow each gate's declared range, labels, and gate sources for the
per-clip views. Importing this module selects the Agg backend; figures are never shown.

Colour convention (``Scale``, ``panel_scale``, ``cmap_norm``): ``gate_ranges`` maps gate names (or
``(layer, kind)``) to ``qd_detr.gates.GateRange``; tanh [-1, 1] when none is declared. Signed gates
(tanh, scaled tanh, FiLM) use ``RdBu_r`` centred on their reference value (red = audio added, blue =
audio subtracted); sigmoid gates a white-to-red scale from 0 to their scale; an explicit
``value_range`` (``(lo, hi)`` or ``{kind: (lo, hi)}``) replaces the declared limits (diverging around 0
when it lies inside, viridis otherwise). NaN (padding) is drawn grey (``PAD_COLOR``). Effects and
differences (an intervention's change of a metric, a correlation) never use the gate colours: they use
``EFFECT_CMAP`` (``PuOr``; purple = better / higher, orange = worse / lower, ``effect_colors``), so red
and blue always mean a gate value.

Ticks: where matplotlib places an axis's ticks itself, ``save_png`` allows at most ``MAX_TICK_BINS``
intervals (``cap_auto_ticks``; matplotlib allows 9), so gate axes on [-1, 1] show steps of 0.5.

Text check (``check_figure_text``): with the environment variable ``AVIGATE_CHECK_FIGURE_TEXT`` set
(``1``: raise ``FigureTextError``; ``warn``: a warning), ``save_png`` draws every figure before writing it
and checks that each drawn text (titles, axis and tick labels, legend and colour-bar texts, annotations)
lies inside the written image and inside the axes that clip it (1.5 px tolerance); the texts it saw are
kept in ``CHECKED_TEXTS`` ({path: [(role, text)]}, for tests of titles).
"""
import math
import os
import warnings
from collections import namedtuple
from functools import partial

import matplotlib

matplotlib.use("Agg")  # before pyplot is imported (here or anywhere)
import numpy as np  # noqa: E402
from matplotlib import colors as mcolors  # noqa: E402
from matplotlib import ticker as mticker  # noqa: E402
from matplotlib.transforms import Bbox  # noqa: E402

from qd_detr.gates import GATE_KINDS, GateRange  # noqa: E402

from . import ranges as R  # noqa: E402

__all__ = ["plt", "DPI", "LAYOUT", "PAD_COLOR", "KIND_COLOR", "KIND_LABEL", "EFFECT_CMAP", "effect_colors",
           "save_png", "MAX_TICK_BINS", "CappedAutoLocator", "cap_auto_ticks", "subsample_indices",
           "CHECK_TEXT_ENV", "CHECKED_TEXTS", "FigureText", "FigureTextError",
           "figure_texts", "clipped_texts", "check_figure_text", "text_width", "wrap_text", "legend_columns",
           "Scale", "panel_scale", "union_scale", "same_scale", "range_limits", "ranges_by_gate", "all_tanh",
           "cmap_norm", "value_label", "colorbar", "value_lim", "zero_line", "near_zero_band", "kind_label",
           "kind_short_label", "kind_order", "kinds_in", "layers_in", "shorten", "heatmap_height",
           "MappingSource", "gate_source", "query_label"]

KIND_LABEL = {"mha": "MHA gate (audio cross-attention branch)", "ffn": "FFN gate (FFN branch)",
              "beta": "FiLM shift gate_beta (added to the FFN output)"}
KIND_COLOR = {"mha": "tab:purple", "ffn": "tab:green", "beta": "tab:orange"}
PAD_COLOR = "#b3b3b3"  # NaN / padding: neutral grey, distinct from the near-white of g ~ 0
DPI = 100
LAYOUT = "constrained"
#: Most intervals between the major ticks that matplotlib places itself (its own limit is 9): a [-1, 1]
#: gate axis keeps its 0.5 steps; every tick is a few artists that each layout pass and the draw recompute,
#: so fewer ticks are most of what makes a panel cheaper to draw (``cap_auto_ticks``).
MAX_TICK_BINS = 6
#: Diverging colormap of effects and differences (purple = better / higher, orange = worse / lower); never
#: the gate colormap (``RdBu_r``: red = audio added, blue = audio subtracted).
EFFECT_CMAP = "PuOr"
_TMP_PREFIX = ".tmp-"


class _Pyplot:
    """``matplotlib.pyplot``, imported when a figure is first made (its import is most of matplotlib's, and a
    process that only hands figures to others never needs it)."""

    def __getattr__(self, name):
        import matplotlib.pyplot as pyplot
        return getattr(pyplot, name)


#: ``matplotlib.pyplot`` (Agg backend), imported on first use.
plt = _Pyplot()


# -- labels ---------------------------------------------------------------------------------------
def kind_label(kind, rng=None):
    """Panel label of a gate kind; ``rng`` (the kind's GateRange) marks the FiLM FFN gate."""
    if kind == "ffn" and rng is not None and rng.film:
        return "FFN gate (FiLM: FFN branch weight 1 + g)"
    return KIND_LABEL.get(kind, f"{kind} gate")


def kind_short_label(kind, rng=None):
    """A short panel label: ``gate_{kind}`` and its branch."""
    if kind == "ffn" and rng is not None and rng.film:
        return "gate_ffn (FiLM: weight 1 + g)"
    return {"mha": "gate_mha (audio branch)", "ffn": "gate_ffn (FFN branch)",
            "beta": "gate_beta (FiLM shift)"}.get(kind, f"gate_{kind}")


def kind_order(kind):
    """Sort key of a gate kind: the order of ``GATE_KINDS`` (mha, ffn, beta), unknown kinds last."""
    return GATE_KINDS.index(kind) if kind in GATE_KINDS else len(GATE_KINDS)


def kinds_in(df):
    """The gate kinds of a statistics frame (column ``gate``), in ``kind_order``."""
    kinds = list(dict.fromkeys(df["gate"].astype(str)))
    return sorted(kinds, key=kind_order)


def layers_in(df):
    """The sorted integer layers of a statistics frame (column ``layer``; ``"all"`` left out)."""
    return sorted({int(l) for l in df["layer"] if str(l) != "all"})


# -- scales and colours --------------------------------------------------------------------------
def range_limits(value_range, kind=None):
    """(lo, hi) of ``kind``; for a per-kind dict without ``kind``, the union of the ranges."""
    if isinstance(value_range, Scale):
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


class Scale:
    """Axis limits and colour convention of one panel: ``lo``/``hi``; ``centre`` (diverging red/blue
    around it) or None (sequential); ``rng``/``kind``: the declared GateRange it follows (or None)."""

    def __init__(self, lo, hi, centre=None, rng=None, kind=None):
        self.lo, self.hi, self.centre, self.rng, self.kind = float(lo), float(hi), centre, rng, kind

    @property
    def diverging(self):
        """True for a red/blue scale around ``centre``."""
        return self.centre is not None

    def __eq__(self, other):
        return isinstance(other, Scale) and (self.lo, self.hi, self.centre, self.rng) == (
            other.lo, other.hi, other.centre, other.rng)

    def __hash__(self):
        return hash((self.lo, self.hi, self.centre, self.rng))


def ranges_by_gate(gate_ranges):
    """{(layer, kind): GateRange} of ``gate_ranges`` (names or tuples, GateRange or dict), or {}."""
    return {R.range_key(k): R.as_range(v) for k, v in (gate_ranges or {}).items()}


def panel_scale(value_range=None, kind=None, gate_ranges=None, layer=None):
    """The ``Scale`` of a panel of gate ``kind`` (of ``layer``, or every layer when None).

    With declared ranges (``gate_ranges``) and no explicit ``value_range``: limits = the declared range,
    diverging around the reference value for signed gates, sequential 0..scale for sigmoid gates. An
    explicit ``value_range`` sets the limits; then the scale is diverging around 0 when it lies inside."""
    if isinstance(value_range, Scale):
        return value_range
    ranges = ranges_by_gate(gate_ranges)
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
        return Scale(lo, hi, centre, rng, kind)
    lo, hi = range_limits(value_range, kind)
    return Scale(lo, hi, 0.0 if lo < 0 < hi else None, None, kind)


def union_scale(scales):
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
        return Scale(lo, hi, centre, rng, kinds.pop() if len(kinds) == 1 else None)
    return Scale(lo, hi, 0.0 if lo < 0 < hi and any(s.diverging for s in scales) else None)


def same_scale(value_range, kinds, gate_ranges=None):
    """True when every kind of ``kinds`` gets the same ``Scale`` (panels may share an axis)."""
    return len({panel_scale(value_range, k, gate_ranges) for k in kinds}) == 1


def cmap_norm(value_range, kind=None):
    """(cmap, norm, diverging) for gate values: ``RdBu_r`` around the scale's centre (signed gates),
    white-to-red from 0 to scale for declared sigmoid gates, viridis for other ranges without 0 inside."""
    sc = panel_scale(value_range, kind)
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


def value_label(value_range, what="gate value", kind=None):
    """Colour-bar / axis label of gate values: ``what`` and the meaning of the scale."""
    sc = panel_scale(value_range, kind)
    if sc.rng is not None:
        return f"{what}\n({R.short_meaning(sc.rng, sc.kind)})"
    if sc.diverging:
        return f"{what} (+ audio added, − suppressed, 0 ignored)"
    return f"{what} (range [{sc.lo:g}, {sc.hi:g}])"


def colorbar(fig, mappable, ax, value_range, what="gate value", kind=None, label=None):
    """A colour bar beside ``ax`` labelled by ``value_label`` (or ``label``), its lines wrapped to fit the
    bar's length (about the figure height less titles and axis labels); returns it."""
    cb = fig.colorbar(mappable, ax=ax, fraction=0.04, pad=0.02)
    label = value_label(value_range, what, kind) if label is None else label
    size = 8 if label.count("\n") > 1 else 9
    room = max(fig.get_figheight() * fig.dpi - 110, 120)
    cb.set_label(wrap_text(fig, label, size, room), fontsize=size)
    return cb


def value_lim(ax, value_range, data=(), axis="y", kind=None):
    """Axis limits = the gate range (2% margin), widened to include ``data`` outside it."""
    lo, hi = range_limits(panel_scale(value_range, kind), kind)
    d = np.asarray([v for v in np.ravel(np.asarray(data, dtype=float)) if np.isfinite(v)])
    if d.size:
        lo, hi = min(lo, float(d.min())), max(hi, float(d.max()))
    pad = 0.02 * (hi - lo)
    (ax.set_ylim if axis == "y" else ax.set_xlim)(lo - pad, hi + pad)


def zero_line(ax, value_range, axis="x", kind=None):
    """A line at the scale's centre (0: the gate's off value; FiLM FFN gate: weight 1), diverging only."""
    sc = panel_scale(value_range, kind)
    if sc.diverging:
        (ax.axvline if axis == "x" else ax.axhline)(sc.centre, color="0.3", lw=0.8, zorder=0)


def near_zero_band(sc, near_zero):
    """(lo, hi) of the near-zero band of a panel (|g - r| <= near_zero * m, clipped to the range), or None."""
    if not near_zero:
        return None
    if sc.rng is None:
        return (-near_zero, near_zero) if sc.diverging else None
    r, m = R.reference(sc.rng), sc.rng.magnitude or 1.0
    lo, hi = max(r - near_zero * m, sc.lo), min(r + near_zero * m, sc.hi)
    return (lo, hi) if lo < hi else None


# -- text sizes -----------------------------------------------------------------------------------
def text_width(fig, text, fontsize):
    """Width in display pixels of one line ``text`` at ``fontsize`` points, as ``fig`` renders it."""
    from matplotlib.font_manager import FontProperties
    renderer = fig.canvas.get_renderer()
    w, _, _ = renderer.get_text_width_height_descent(text, FontProperties(size=fontsize), ismath=False)
    return w


def _greedy_lines(fig, words, fontsize, limit):
    lines, cur = [], ""
    for w in words:
        trial = f"{cur} {w}" if cur else w
        if cur and text_width(fig, trial, fontsize) > limit:
            lines.append(cur)
            cur = w
        else:
            cur = trial
    return lines + [cur]


def wrap_text(fig, text, fontsize, max_px):
    """``text`` with every line wider than ``max_px`` pixels (at ``fontsize``) broken between words into
    the fewest lines of about equal width."""
    out = []
    for line in text.split("\n"):
        width = text_width(fig, line, fontsize)
        words = line.split(" ")
        if width <= max_px or len(words) < 2:
            out.append(line)
            continue
        best = _greedy_lines(fig, words, fontsize, max_px)
        for n in range(2, len(best)):
            trial = _greedy_lines(fig, words, fontsize, min(max_px, 1.1 * width / n))
            if len(trial) <= n:
                best = trial
                break
        else:
            balanced = _greedy_lines(fig, words, fontsize, min(max_px, 1.1 * width / len(best)))
            best = balanced if len(balanced) <= len(best) else best
        out += best
    return "\n".join(out)


def legend_columns(fig, labels, fontsize, max_cols=None, width_px=None):
    """The most legend columns (at most ``max_cols``) whose entries fit in ``width_px`` (default: the
    figure's width less margins) at ``fontsize``; at least 1."""
    labels = [str(lbl) for lbl in labels]
    if not labels:
        return 1
    em = fontsize * fig.dpi / 72
    width_px = (fig.get_figwidth() * fig.dpi - 2 * em) if width_px is None else width_px
    widths = [text_width(fig, lbl, fontsize) + 4.8 * em for lbl in labels]  # handle, pad, column spacing
    for ncol in range(min(max_cols or len(labels), len(labels)), 1, -1):
        rows, large = divmod(len(labels), ncol)  # matplotlib fills columns first, the first ``large`` longer
        sizes = [rows + 1] * large + [rows] * (ncol - large)
        starts = np.cumsum([0] + sizes)
        if sum(max(widths[a:b]) for a, b in zip(starts[:-1], starts[1:]) if b > a) <= width_px:
            return ncol
    return 1


def all_tanh(gate_ranges):
    """True when every declared range is plain tanh [-1, 1] (also when none is declared)."""
    return all(r == R.TANH for r in ranges_by_gate(gate_ranges).values())


def effect_colors(values):
    """Bar colours of effects: ``EFFECT_CMAP``'s purple for values > 0 (better / higher), its orange for
    values < 0 (worse / lower), grey for 0 and NaN."""
    cmap = plt.get_cmap(EFFECT_CMAP)
    better, worse = cmap(0.85), cmap(0.15)
    return [better if v > 0 else (worse if v < 0 else "0.6") for v in np.asarray(values, dtype=float)]


# -- text check ------------------------------------------------------------------------------------
#: Environment variable that turns the text check of ``save_png`` on (``1``: raise, ``warn``: warn).
CHECK_TEXT_ENV = "AVIGATE_CHECK_FIGURE_TEXT"
#: Texts seen by the check while it is on: {path: [(role, text), ...]} in drawing order.
CHECKED_TEXTS = {}
_TEXT_TOL_PX = 1.5

#: A drawn text of a figure: ``role`` (suptitle, title, axis label, tick label, legend, annotation, figure
#: text), ``text``, ``bbox`` (display pixels) and ``clip`` (the display box it is clipped to, or None).
FigureText = namedtuple("FigureText", ["role", "text", "bbox", "clip"])


class FigureTextError(RuntimeError):
    """A figure has text outside the written image or cut by the axes that clips it."""


def _clip_box(t):
    """Display box that clips text ``t`` when it is drawn (clip box and clip path intersected), or None."""
    if not t.get_clip_on():
        return None
    boxes = []
    if t.get_clip_box() is not None:
        boxes.append(t.get_clip_box())
    path = t.get_clip_path()
    if path is not None:
        boxes.append(path.get_fully_transformed_path().get_extents())
    box = None
    for b in boxes:
        box = b if box is None else Bbox.intersection(box, b)
        if box is None:
            return Bbox.null()
    return box


def _walk_texts(artist, role, out, seen):
    """Append (role, Text) for every drawn, non-empty text under ``artist`` (a hidden artist hides its
    children; ticks outside the axis' view interval are not drawn)."""
    from matplotlib.axes import Axes
    from matplotlib.axis import Axis, Tick
    from matplotlib.figure import Figure
    from matplotlib.legend import Legend
    from matplotlib.text import Text
    if id(artist) in seen or not artist.get_visible():
        return
    seen.add(id(artist))
    if isinstance(artist, Text):
        if artist.get_text().strip():
            out.append((role or "text", artist))
        return
    children = artist.get_children()
    if isinstance(artist, Axis):
        lo, hi = sorted(artist.get_view_interval())
        eps = 1e-9 * max(1.0, abs(hi - lo))
        children = [c for c in children if not isinstance(c, Tick) or lo - eps <= c.get_loc() <= hi + eps]
    for c in children:
        sub = role
        if isinstance(artist, Axis):
            sub = "axis label" if c is artist.label else "tick label"
        elif isinstance(c, Legend):
            sub = "legend"
        elif isinstance(artist, Axes) and isinstance(c, Text):
            titles = {artist.get_title(loc) for loc in ("left", "center", "right")}
            sub = "annotation" if c in artist.texts or c.get_text() not in titles else "title"
        elif isinstance(artist, Figure) and isinstance(c, Text):
            sub = "suptitle" if c.get_text() == artist.get_suptitle() else "figure text"
        _walk_texts(c, sub, out, seen)


def figure_texts(fig, renderer=None):
    """Every text a draw of ``fig`` shows, as ``FigureText`` (extents at the figure's dpi); the figure must
    have been drawn (``fig.draw_without_rendering()``) so that tick labels are in place."""
    renderer = renderer or fig.canvas.get_renderer()
    found = []
    _walk_texts(fig, None, found, set())
    texts = []
    for role, t in found:
        bb = t.get_window_extent(renderer)
        if not np.all(np.isfinite(bb.get_points())):
            continue  # not drawn (NaN position)
        texts.append(FigureText(role, t.get_text(), bb, _clip_box(t)))
    return texts


def clipped_texts(texts, bounds, tol=_TEXT_TOL_PX):
    """Descriptions of the ``texts`` (``FigureText``) that stick out of ``bounds`` (the written image, a
    display Bbox) or out of the box that clips them, by more than ``tol`` pixels."""
    def outside(bb, box):
        over = {"left": box.x0 - bb.x0, "right": bb.x1 - box.x1, "bottom": box.y0 - bb.y0, "top": bb.y1 - box.y1}
        return {side: px for side, px in over.items() if px > tol}

    problems = []
    for ft in texts:
        label = f"{ft.role} {shorten(ft.text.replace(chr(10), ' / '), 60)!r}"
        out = outside(ft.bbox, bounds)
        if out:
            problems.append(f"{label} extends beyond the image ({', '.join(f'{s} by {px:.0f} px' for s, px in out.items())})")
        elif ft.clip is not None and ft.bbox.width > 0:
            cut = outside(ft.bbox, ft.clip)
            if cut:
                problems.append(f"{label} is cut by its axes ({', '.join(f'{s} by {px:.0f} px' for s, px in cut.items())})")
    return problems


def check_figure_text(fig, path=None, drawn=False, bbox_inches=None, pad_inches=None):
    """Check that every drawn text of ``fig`` lies in the image ``savefig`` would write (the figure, or its
    tight bounding box with ``bbox_inches="tight"``) and inside the axes that clip it; raises
    ``FigureTextError`` naming ``path`` and each offending text. ``drawn``: the figure was just drawn at
    its final layout (else it is drawn here). Returns the ``FigureText`` list."""
    if not drawn:
        fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    texts = figure_texts(fig, renderer)
    bounds = fig.bbox
    if bbox_inches == "tight":
        pad = matplotlib.rcParams["savefig.pad_inches"] if pad_inches is None else pad_inches
        bounds = fig.get_tightbbox(renderer).padded(pad).transformed(fig.dpi_scale_trans)
    problems = clipped_texts(texts, bounds)
    if problems:
        name = os.path.basename(os.fspath(path)) if path is not None else "figure"
        more = f"; and {len(problems) - 6} more" if len(problems) > 6 else ""
        raise FigureTextError(f"{name}: clipped text: " + "; ".join(problems[:6]) + more)
    return texts


# -- writing -------------------------------------------------------------------------------------
class CappedAutoLocator(mticker.AutoLocator):
    """matplotlib's default tick locator with at most ``max_bins`` intervals: as many as the axis has room
    for (its tick space at the current layout), never more than ``max_bins``."""

    def __init__(self, max_bins=MAX_TICK_BINS):
        super().__init__()
        self.max_bins = int(max_bins)

    def tick_values(self, vmin, vmax):
        room = self.axis.get_tick_space() if self.axis is not None else self.max_bins
        self.set_params(nbins=max(1, min(room, self.max_bins)))
        try:
            return super().tick_values(vmin, vmax)
        finally:
            self.set_params(nbins="auto")


def cap_auto_ticks(fig, max_bins=MAX_TICK_BINS):
    """Give every axis of ``fig`` whose major ticks matplotlib places by default (an unchanged
    ``AutoLocator``) a ``CappedAutoLocator``; ticks a figure set itself are left alone."""
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            loc = axis.get_major_locator()
            if type(loc) is mticker.AutoLocator and getattr(loc, "_nbins", None) == "auto":
                axis.set_major_locator(CappedAutoLocator(max_bins))


def _run_layout(fig):
    """What ``Figure.draw`` does before drawing: every axes' aspect and locator applied, then the layout
    engine run (the positions the real draw uses), without drawing any artist."""
    if not fig.axes:
        return
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        for a in [ax] + [c for c in ax.get_children() if hasattr(c, "apply_aspect")]:
            locator = a.get_axes_locator()
            a.apply_aspect(locator(a, renderer) if locator else None)
    try:
        fig.get_layout_engine().execute(fig)
    except ValueError:  # as Figure.draw: the layout does not fit (the figure keeps its positions)
        pass


def _freeze_titles(fig):
    """Keep every axes title where matplotlib first puts it (``y = 1`` in axes units, the title pad above the
    axes) instead of placing it again in each layout pass and in the draw (each placement recomputes every
    sibling's y ticks). That placement only ever raises a title above x tick labels or an x label on top
    of the axes, or above a y offset text: none of the first two exist in the figure when this freezes
    anything, and ``_offset_text_shown`` tells after the layout whether to undo it. Returns the axes
    frozen (none where matplotlib has no ``_autotitlepos``)."""
    axes = [a for ax in fig.axes for a in (ax, *ax.child_axes)]  # with secondary axes (e.g. layer names on top)
    if not all(hasattr(ax, "_autotitlepos") for ax in axes) or any(
            ax.xaxis.get_ticks_position() in ("top", "unknown") or ax.xaxis.get_label_position() == "top"
            for ax in axes):
        return []
    frozen = [ax for ax in fig.axes if ax._autotitlepos]
    for ax in frozen:
        ax._autotitlepos = False
    return frozen


def _thaw_titles(axes):
    """Let matplotlib place the titles of ``axes`` again (undo ``_freeze_titles``)."""
    for ax in axes:
        ax._autotitlepos = True


def _offset_text_shown(fig):
    """Whether a y axis of ``fig`` shows an offset text (e.g. ``1e-5``) after the layout."""
    return any(ax.yaxis.offsetText.get_visible() and ax.yaxis.offsetText.get_text() for ax in fig.axes)


def save_png(fig, path, dpi=DPI, close=True, **savefig_kwargs):
    """Write ``fig`` to ``path`` as PNG via a temp file + os.replace, then close the figure (``close=False``:
    keep it, e.g. to draw the next PNG into the same figure; a layout engine has then been replaced by the
    positions it computed). Axes whose ticks matplotlib places get at most ``MAX_TICK_BINS`` intervals
    (``cap_auto_ticks``). With ``CHECK_TEXT_ENV`` set, the text check runs first (``check_figure_text``;
    ``warn``: a warning instead of ``FigureTextError``) and the texts are recorded in
    ``CHECKED_TEXTS[path]``."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f"{_TMP_PREFIX}{os.getpid()}-{os.path.basename(path)}")
    check = os.environ.get(CHECK_TEXT_ENV, "").strip().lower()
    frozen = []
    try:
        drawn = False
        checking = check not in ("", "0", "no", "false")
        cap_auto_ticks(fig)
        if fig.get_layout_engine() is not None and "bbox_inches" not in savefig_kwargs:
            # savefig would draw twice (a draw without rendering for the layout, then the real draw), each
            # running the layout engine: run the layout once and freeze the positions, so the figure is
            # drawn once (pixel-identical PNGs); the titles are placed once, too (``_freeze_titles``)
            frozen = _freeze_titles(fig)
            layout = fig.draw_without_rendering if checking else partial(_run_layout, fig)  # the check: drawn texts
            layout()
            if frozen and _offset_text_shown(fig):  # a title may need to rise above it: matplotlib places them
                _thaw_titles(frozen)
                frozen = []
                layout()
            drawn = checking
            fig.set_layout_engine(None)
        if checking:
            try:
                texts = check_figure_text(fig, path, drawn, savefig_kwargs.get("bbox_inches"),
                                          savefig_kwargs.get("pad_inches"))
                CHECKED_TEXTS[path] = [(t.role, t.text) for t in texts]
            except FigureTextError as exc:
                if check != "warn":
                    raise
                warnings.warn(str(exc), stacklevel=2)
        fig.savefig(tmp, format="png", dpi=dpi, pil_kwargs={"compress_level": 1}, **savefig_kwargs)  # fast encode
        os.replace(tmp, path)
    finally:
        _thaw_titles(frozen)  # a figure kept open places its titles again when it is next drawn
        if close:
            plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def subsample_indices(n, max_n):
    """Deterministic, evenly spaced indices (first and last included) when n > max_n."""
    if n <= max_n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, max_n).round().astype(int))


def shorten(s, n=22):
    """``str(s)``, cut to ``n`` characters with an ellipsis."""
    s = str(s)
    return s if len(s) <= n else s[:n - 1] + "…"


def heatmap_height(n_rows):
    """Figure height in inches of a heatmap with ``n_rows`` rows (3.6 to 11)."""
    return min(max(0.14 * n_rows + 2.2, 3.6), 11)


# -- gate sources (per-clip views) ----------------------------------------------------------------
class MappingSource:
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
        self.kinds = tuple(sorted({k for _, k in keys}, key=lambda k: (kind_order(k), k)))
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
        """{(layer, kind): float32 array} of ``qid``; KeyError naming known ids."""
        if qid not in self._gates:
            more = "..." if len(self.qids) > 10 else ""
            raise KeyError(f"no gates for sample {qid!r}; known: {self.qids[:10]}{more}")
        return self._gates[qid]


def gate_source(obj):
    """``obj`` when it is a GateRun-like source (``gates``, ``qids``, ``gating_type``), a ``MappingSource``
    for a mapping ``{qid: {(layer, kind): array}}``; TypeError otherwise."""
    if hasattr(obj, "gates") and hasattr(obj, "qids") and hasattr(obj, "gating_type"):
        return obj
    if isinstance(obj, dict):
        return MappingSource(obj)
    raise TypeError(f"expected a GateRun or a mapping {{qid: {{(layer, kind): array}}}}, got {type(obj).__name__}")


def query_label(src, qid, n=18):
    """Row label of a query: ``qid {qid} ({vid})`` (vid shortened to ``n`` characters when known)."""
    vid = src.vids.get(qid, "") if hasattr(src, "vids") else ""
    prefix = f"qid {qid}" if isinstance(qid, (int, np.integer)) else str(qid)
    return f"{prefix} ({shorten(vid, n)})" if vid else prefix

