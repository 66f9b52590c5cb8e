"""Declared gate ranges on the analysis side: what a gate's values can be and mean, thresholds relative
to that range, and colour conventions.

Each fusion layout declares its gates' ranges (``qd_detr.gates.GateRange``, from
``qd_detr.gates.fusion_gate_ranges``): tanh [-1, 1] (v1), sigmoid (0, scale) (v2 and diagstrip MHA
gates), scaled tanh [-|alpha|, |alpha|] (v2 FFN gate and FiLM shift ``beta``). They are stored as
``gate_ranges`` ({gate name: ``GateRange.as_dict()``}) in ``gates/meta.json`` and ``run.json``; a
store written before ranges were recorded has none, and its gates are read as tanh [-1, 1] (``TANH``).

Thresholds (``thresholds``), with m = the range magnitude max(|low|, |high|) and r = the reference
value (the gate's ``off`` value, 0; for the FiLM FFN gate also 0, which there means "branch weight 1",
not off: its off value -1 lies outside its range):

- positive:  g > r + 0.1 m (audio added; sigmoid gates: audio used);
- negative:  g < r - 0.1 m (audio subtracted); only where the range goes below it, so a sigmoid gate
  has no negative (suppressed) fraction;
- near zero: |g - r| <= 0.1 m (audio ignored; FiLM FFN gate: weight about 1);
- saturated: g > high - 0.05 m or g < low + 0.05 m (within 5% of the magnitude of a bound).

For tanh gates (m = 1, r = 0) these are the fixed numbers +-0.1, |g| <= 0.1 and |g| > 0.95. The
fractions 0.1 and 0.95 are the ``pos_threshold``, ``neg_threshold``, ``near_zero_threshold`` and
``saturation_threshold`` of ``GateStatsAccumulator``.

Colours: signed gates use a diverging red/blue scale centred on r (red = above, blue = below,
near-white = r); sigmoid gates use a sequential white-to-red scale from 0 to scale.
"""
import math
from dataclasses import dataclass

from qd_detr.gates import DEFAULT_KINDS, GATE_KINDS, GateRange, gate_name

__all__ = ["TANH", "DEFAULT_KINDS", "GateThresholds", "as_range", "resolve_ranges", "ranges_as_dict",
           "ranges_from_meta", "kind_range", "reference", "thresholds", "short_meaning",
           "describe_ranges", "range_key"]

#: The range of a v1 gate, assumed for stores and runs that declare none.
TANH = GateRange("tanh", -1.0, 1.0, off=0.0, formula="tanh(mlp)")


def as_range(obj):
    """A ``GateRange`` from a GateRange or its ``as_dict()`` (e.g. read from meta.json or run.json)."""
    if isinstance(obj, GateRange):
        return obj
    if isinstance(obj, dict):
        return GateRange(str(obj["activation"]), float(obj["low"]), float(obj["high"]),
                         off=float(obj.get("off", 0.0)), formula=str(obj.get("formula", "")),
                         film=bool(obj.get("film", False)), shift=bool(obj.get("shift", False)))
    raise TypeError(f"expected a GateRange or its dict, got {type(obj).__name__}")


def range_key(key):
    """(layer, kind) of a gate name ``layers.{l}.gate_{kind}`` or of a (layer, kind) tuple."""
    if isinstance(key, tuple):
        return int(key[0]), str(key[1])
    head, _, kind = str(key).rpartition(".gate_")
    return int(head.split(".")[-1]), kind


def resolve_ranges(gate_ranges, layers, kinds):
    """{(layer, kind): GateRange} for every layer x kind; ``gate_ranges`` maps gate names or (layer,
    kind) tuples to GateRange or dict; gates it does not name (or None) are ``TANH``."""
    given = {range_key(k): as_range(v) for k, v in (gate_ranges or {}).items()}
    return {(int(l), k): given.get((int(l), k), TANH) for l in layers for k in kinds}


def ranges_as_dict(ranges):
    """{gate name: GateRange.as_dict()} (JSON-ready, as in the load report), in layer, kind order."""
    items = sorted(((range_key(k), as_range(v)) for k, v in (ranges or {}).items()),
                   key=lambda kv: (kv[0][0], _kind_order(kv[0][1])))
    return {gate_name(l, k): r.as_dict() for (l, k), r in items}


def ranges_from_meta(meta):
    """{gate name: GateRange} recorded in a meta.json / run.json dict ({} when it has none)."""
    return {k: as_range(v) for k, v in ((meta or {}).get("gate_ranges") or {}).items()}


def _kind_order(kind):
    return GATE_KINDS.index(kind) if kind in GATE_KINDS else len(GATE_KINDS)


def kind_range(ranges, kind):
    """One GateRange covering every layer's range of ``kind`` (bounds: the union); ``ranges`` is
    {(layer, kind) or name: GateRange}. ``TANH`` when ``kind`` has none."""
    found = [as_range(v) for k, v in (ranges or {}).items() if range_key(k)[1] == kind]
    if not found:
        return TANH
    first = found[0]
    if all(r == first for r in found):
        return first
    return GateRange(first.activation, min(r.low for r in found), max(r.high for r in found), off=first.off,
                     formula=first.formula if all(r.formula == first.formula for r in found) else "",
                     film=first.film, shift=first.shift)


def reference(rng):
    """The value thresholds and colour scales are centred on: ``off`` (0), and 0 for the FiLM FFN gate
    (branch weight 1; its off value -1 is outside its range)."""
    return 0.0 if rng.film else float(rng.off)


@dataclass(frozen=True)
class GateThresholds:
    """Absolute thresholds of one gate (see the module docstring); ``positive``/``negative`` are NaN
    when the gate cannot reach them (a sigmoid gate has no negative fraction)."""
    positive: float
    negative: float
    near_low: float
    near_high: float
    sat_low: float
    sat_high: float

    @property
    def has_positive(self):
        return not math.isnan(self.positive)

    @property
    def has_negative(self):
        return not math.isnan(self.negative)


def thresholds(rng, pos=0.1, neg=-0.1, near=0.1, saturation=0.95):
    """``GateThresholds`` of ``rng`` from fractions of its magnitude (defaults: the module docstring)."""
    m = rng.magnitude if rng.magnitude > 0 else 1.0
    r = reference(rng)
    p, n = r + pos * m, r + neg * m
    margin = (1.0 - saturation) * m
    return GateThresholds(positive=p if p < rng.high else math.nan, negative=n if n > rng.low else math.nan,
                          near_low=r - near * m, near_high=r + near * m,
                          sat_low=rng.low + margin, sat_high=rng.high - margin)


def _g(v):
    return f"{v:.3g}"


def short_meaning(rng, kind=None):
    """A colour-bar sized version of ``GateRange.meaning`` (at most two short lines)."""
    if kind == "beta":
        return "FiLM shift: red +, blue −, white none"
    if rng.film:
        return "g = 0: weight 1, not off;\nred: weight > 1, blue: < 1"
    if rng.activation == "sigmoid":
        bound = rng.high if rng.high > 0 else rng.low
        return f"sequential 0 to {_g(bound)}: white 0 =\naudio ignored, dark = fully used"
    return "red: audio added, blue: subtracted"


def describe_ranges(ranges):
    """Lines ``gate_{kind} (layers ...): meaning`` grouping the layers whose ranges read alike;
    ``ranges`` is {(layer, kind) or name: GateRange}."""
    groups = {}
    for key, rng in ranges.items():
        layer, kind = range_key(key)
        groups.setdefault((kind, as_range(rng).meaning()), []).append(layer)
    lines = []
    for (kind, text), layers in sorted(groups.items(), key=lambda kv: (_kind_order(kv[0][0]), min(kv[1]))):
        which = "layer" if len(layers) == 1 else "layers"
        lines.append(f"gate_{kind} ({which} {', '.join(map(str, sorted(layers)))}): {text}")
    return lines
