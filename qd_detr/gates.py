"""Gate capture: forward hooks on the modules that produce the fusion gates.

One recorder serves every fusion layout (``AVIGATEFusionCustom`` and the older ``AVIGATEFusion``):
it hooks each fusion layer's ``gating_function`` (whose output is exactly ``(gate_mha, gate_ffn)``),
and the fusion module itself to learn the video mask and to close each forward pass. Nothing is
added to the model's parameters or state dict, and the model's math is untouched.

Per forward pass and batch element ``i`` (id ``ids[i]``, ``T_i = video_mask[i].sum()`` valid clips)
the recorder emits a ``GateRecord`` whose ``gates[(layer, kind)]`` (kind ``"mha"``, ``"ffn"`` and, for
v2 FiLM layers, ``"beta"``) is a float32 numpy copy: global -> (1,), clipwise -> (T_i,), elementwise
-> (T_i, D). Padded clips are excluded; a global gate is stored once. The FiLM shift ``g_beta`` is
computed inside the block from ``gating_function.mlp_ffn_beta``; the recorder hooks that MLP and
applies the gating function's own ``beta_from_raw``, so it records exactly what the block adds. The
recorder checks that every gating hook fired exactly once per fusion forward and raises
``GateCaptureError`` otherwise.

Every layout declares the values its gates can take (``GateRange``, ``fusion_gate_ranges``): tanh
[-1, 1]; sigmoid (0, scale); scaled tanh [-|alpha|, |alpha|]. Analyses read thresholds and colour
scales from these declarations instead of assuming tanh.

With ``capture_contributions=True`` it also hooks the branch outputs and records, per layer and
clip, the effective contribution of each gated branch relative to the stream it is added to:
``||g_mha * a||_2 / ||V||_2`` and ``||g_ffn * ffn1(norm2 z)||_2 / ||z||_2`` (norms over features).

Dotted names (``layers.{l}.gate_{kind}``) are used alike in code, CSV values and plot titles.
"""
import contextlib
import itertools
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from .config import PER_CLIP_GATING_TYPES
from .extensions import SAMPLE_COMPARISON_PLOT, load_extension
from .io import write_json

__all__ = ["GATE_KINDS", "DEFAULT_KINDS", "GATE_SHAPES", "ALL_LAYERS", "gate_name", "GateRange", "GateRecord", "GateRecorder",
           "GateCaptureError", "GateTrackingMixin", "fusion_gating_type", "fusion_num_layers", "fusion_gate_kinds",
           "fusion_gate_ranges"]

#: Every gate kind, in this order everywhere: ``mha`` (audio cross-attention branch), ``ffn`` (FFN
#: branch), ``beta`` (the v2 FiLM shift).
GATE_KINDS = ("mha", "ffn", "beta")
#: The kinds of every layout without FiLM (and of a store that does not say).
DEFAULT_KINDS = ("mha", "ffn")
#: Shape of one query's gate array per gating type (``qd_detr.config``), padding excluded:
#: T = valid clips of the query, D = hidden dim.
GATE_SHAPES = {
    "global": "(1,): one gate per query",
    "legacy": "(1,): one gate per query",
    "global_diagstrip_ssm": "(1,): one gate per query",
    "clipwise": "(T,): one gate per valid clip, padding excluded",
    "elementwise": "(T, D): one gate per valid clip and feature dim, padding excluded",
}


#: The layer label of a value over all fusion layers in tables and names (``layers.all.gate_mha``).
ALL_LAYERS = "all"


def gate_name(layer, kind):
    """The dotted name of a gate, used alike in code, CSV values and plot titles: ``layers.{layer}.gate_{kind}``."""
    return f"layers.{layer}.gate_{kind}"


@dataclass(frozen=True)
class GateRange:
    """The values one gate can take and what they mean.

    ``activation``: "tanh" [-1, 1], "sigmoid" (0, scale) or "scaled_tanh" [-|alpha|, |alpha|];
    ``low``/``high``: the bounds; ``off``: the value at which the gated branch adds nothing (0, or -1
    for a FiLM FFN gate, whose branch is scaled by 1 + g); ``film``: True for that FiLM FFN gate;
    ``formula``: how the layer computes it, with its trained constants.
    """
    activation: str
    low: float
    high: float
    off: float = 0.0
    formula: str = ""
    film: bool = False
    shift: bool = False

    @property
    def signed(self):
        """True when the gate can be negative."""
        return self.low < 0.0

    @property
    def magnitude(self):
        """The largest |g| the gate can reach."""
        return max(abs(self.low), abs(self.high))

    def meaning(self):
        """One sentence: what small and large values of this gate mean."""
        lo, hi = f"{self.low:.3g}", f"{self.high:.3g}"
        if self.shift:
            return (f"FiLM shift in [{lo}, {hi}] added to the FFN output of every clip: 0 = no shift; the sign is "
                    "the direction of the shift")
        if self.film:
            return (f"FiLM FFN gate g in [{lo}, {hi}], branch weight 1 + g: g = 0 means weight 1 (the FFN branch "
                    "used as is), not off; > 0 amplified, < 0 damped")
        if self.activation == "sigmoid":
            bound = f"{(self.high if self.high > 0 else self.low):.3g}"
            sign = "never negative" if self.high > 0 else "never positive"
            return f"sigmoid between 0 and {bound}, {sign}: near 0 = audio ignored, near {bound} = fully used"
        name = "tanh" if self.activation == "tanh" else "scaled tanh"
        return f"{name} in [{lo}, {hi}]: > 0 audio added, < 0 audio subtracted, near 0 = audio ignored"

    def as_dict(self):
        return {"activation": self.activation, "low": self.low, "high": self.high, "off": self.off,
                "film": self.film, "shift": self.shift, "formula": self.formula, "meaning": self.meaning()}


class GateCaptureError(RuntimeError):
    """The hooks did not fire as the fusion module's structure requires."""


@dataclass
class GateRecord:
    """Gates of one batch element: ``gates[(layer, kind)]`` float32 arrays, padding excluded."""
    sample_id: object
    n_clips: int
    gates: dict = field(default_factory=dict)
    contributions: dict = field(default_factory=dict)  # (layer, kind) -> (T,) float32, optional


def fusion_gating_type(fusion):
    return getattr(fusion, "gating_type", None) or fusion.fusion_layers[0].gating_function.gating_type


def fusion_num_layers(fusion):
    return len(fusion.fusion_layers)


def fusion_gate_kinds(fusion):
    """The gate kinds the fusion module applies, in ``GATE_KINDS`` order (same for every layer)."""
    found = {k for block in fusion.fusion_layers for k in getattr(block.gating_function, "gate_kinds", DEFAULT_KINDS)}
    return tuple(k for k in GATE_KINDS if k in found)


def fusion_gate_ranges(fusion):
    """{gate_name(layer, kind): GateRange} for every gate of every layer (constants as trained)."""
    out = {}
    for idx, block in enumerate(fusion.fusion_layers):
        ranges = block.gating_function.gate_ranges() if hasattr(block.gating_function, "gate_ranges") else {
            "mha": GateRange("tanh", -1.0, 1.0, formula="tanh(mlp)"),
            "ffn": GateRange("tanh", -1.0, 1.0, formula="tanh(mlp)")}
        for kind, rng in ranges.items():
            out[gate_name(idx, kind)] = rng
    return out


def _to_numpy(t):
    return t.detach().to(device="cpu", dtype=torch.float32).numpy()


class GateRecorder:
    """Attach hooks to a fusion module and pass one ``GateRecord`` list per forward to ``sink``.

    Use as a context manager or call ``attach()``/``detach()``. ``set_ids(ids)`` names the next
    forward's batch elements (a list: one id per element; a scalar with batch size 1); without ids,
    elements are named ``auto_{n}``.
    """

    def __init__(self, fusion, sink, capture_contributions=False):
        self.fusion = fusion
        self.sink = sink
        self.capture_contributions = capture_contributions
        self.gating_type = fusion_gating_type(fusion)
        self.num_layers = fusion_num_layers(fusion)
        self.kinds = fusion_gate_kinds(fusion)
        self._film = [hasattr(block.gating_function, "mlp_ffn_beta") and getattr(block.gating_function, "ffn_film", False)
                      for block in fusion.fusion_layers]
        self._handles = []
        self._paused = False
        self._pending_ids = None
        self._auto = itertools.count()
        self._reset()

    # -- lifecycle -------------------------------------------------------------------------------
    def attach(self):
        if self._handles:
            return self
        f = self.fusion
        self._handles.append(f.register_forward_pre_hook(self._on_fusion_start, with_kwargs=True))
        self._handles.append(f.register_forward_hook(self._on_fusion_end))
        for idx, block in enumerate(f.fusion_layers):
            self._handles.append(block.gating_function.register_forward_hook(self._gate_hook(idx)))
            if self._film[idx]:
                self._handles.append(block.gating_function.mlp_ffn_beta.register_forward_hook(self._beta_hook(idx)))
            if self.capture_contributions:
                self._handles.extend(self._contribution_hooks(idx, block))
        return self

    def detach(self):
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self):
        return self.attach()

    def __exit__(self, *exc):
        self.detach()
        return False

    def set_ids(self, ids):
        self._pending_ids = ids

    @contextlib.contextmanager
    def paused(self):
        """Forwards inside this block are audited but not recorded (e.g. exact re-runs)."""
        self._paused, previous = True, self._paused
        try:
            yield self
        finally:
            self._paused = previous

    # -- hooks -----------------------------------------------------------------------------------
    def _reset(self):
        self._active = False
        self._mask = None
        self._gates = {}
        self._fired = [0] * self.num_layers
        self._fired_beta = [0] * self.num_layers
        self._beta = {}
        self._branch = {}

    def _on_fusion_start(self, module, args, kwargs):
        self._reset()  # also discards what a forward that raised midway left behind
        self._active = True
        mask = kwargs.get("video_mask", args[2] if len(args) > 2 else None)
        video = kwargs.get("video_feat", args[0] if args else None)
        self._shape = tuple(video.shape[:2])
        self._mask = None if mask is None else mask.detach()

    def _gate_hook(self, idx):
        def hook(module, args, output):
            if not self._active:
                raise GateCaptureError(f"{gate_name(idx, 'mha')}: gating function ran outside a fusion forward")
            self._fired[idx] += 1
            self._gates[idx] = output
        return hook

    def _beta_hook(self, idx):
        gating = self.fusion.fusion_layers[idx].gating_function

        def hook(module, args, output):
            if not self._active:
                raise GateCaptureError(f"{gate_name(idx, 'beta')}: FiLM shift ran outside a fusion forward")
            self._fired_beta[idx] += 1
            beta = gating.beta_from_raw(output)  # the block's own formula on the same raw output
            self._beta[idx] = beta.unsqueeze(-1) if gating.gating_type == "global" else beta
        return hook

    def _contribution_hooks(self, idx, block):
        def save(key, use_input=False):
            def hook(module, args, output):
                value = args[0] if use_input else (output[0] if isinstance(output, tuple) else output)
                self._branch[(idx, key)] = value.detach()
            return hook
        handles = [block.register_forward_pre_hook(lambda m, a: self._branch.__setitem__((idx, "V"), a[0].detach())),
                   block.norm2.register_forward_pre_hook(
                       lambda m, a: self._branch.__setitem__((idx, "z"), a[0].detach()))]
        branch = block.out_proj if hasattr(block, "out_proj") else block.cross_attention
        if hasattr(block, "delta_norm_mha"):  # v2: the gates scale the normalised deltas
            branch = block.delta_norm_mha
            handles.append(block.delta_norm_ffn.register_forward_hook(save("ffn")))
        else:
            handles.append(block.ffn1.register_forward_hook(save("ffn")))
        handles.append(branch.register_forward_hook(save("mha")))
        return handles

    def _on_fusion_end(self, module, args, output):
        try:
            if self._fired != [1] * self.num_layers:
                raise GateCaptureError(f"gate hooks fired {self._fired} times per layer in one fusion forward; "
                                       f"expected exactly once for each of {self.num_layers} layers")
            expected_beta = [int(f) for f in self._film]
            if self._fired_beta != expected_beta:
                raise GateCaptureError(f"FiLM shift hooks fired {self._fired_beta} times per layer in one fusion "
                                       f"forward; expected {expected_beta}")
            records = None if self._paused else self._build_records()
        finally:
            self._active = False
        if records is not None:
            self.sink(records)

    # -- records ---------------------------------------------------------------------------------
    def _ids(self, batch):
        ids, self._pending_ids = self._pending_ids, None
        if ids is None:
            return [f"auto_{next(self._auto)}" for _ in range(batch)]
        if isinstance(ids, (list, tuple)):
            if len(ids) != batch:
                raise GateCaptureError(f"{len(ids)} sample ids given for a batch of {batch}")
            return list(ids)
        if batch == 1:
            return [ids]
        return [f"{ids}/{i}" for i in range(batch)]

    def _build_records(self):
        batch, length = self._shape
        if self._mask is None:
            lengths = np.full(batch, length, dtype=np.int64)
        else:
            lengths = _to_numpy(self._mask.sum(dim=1)).round().astype(np.int64)
        ids = self._ids(batch)
        records = [GateRecord(sample_id=ids[i], n_clips=int(lengths[i])) for i in range(batch)]
        per_clip = self.gating_type in PER_CLIP_GATING_TYPES
        for layer in range(self.num_layers):
            gates = list(zip(("mha", "ffn"), self._gates[layer]))
            if self._film[layer]:
                gates.append(("beta", self._beta[layer]))
            for kind, gate in gates:
                arr = _to_numpy(gate)
                if per_clip:
                    if self.gating_type == "clipwise":
                        arr = arr[..., 0]  # [B, L]
                    for i, rec in enumerate(records):
                        rec.gates[(layer, kind)] = arr[i, :lengths[i]].copy()
                else:
                    flat = arr.reshape(batch, -1)[:, :1]  # [B, 1]: [B,1,1] custom, [B,1] legacy
                    for i, rec in enumerate(records):
                        rec.gates[(layer, kind)] = flat[i].copy()
            if self.capture_contributions:
                self._add_contributions(layer, records, lengths)
        return records

    def _add_contributions(self, layer, records, lengths):
        g_mha, g_ffn = self._gates[layer]
        if g_mha.dim() == 2:  # legacy [B, 1]
            g_mha, g_ffn = g_mha.unsqueeze(-1), g_ffn.unsqueeze(-1)
        z_norm = self._branch[(layer, "z")].norm(dim=-1)
        ffn_weight = (1 + g_ffn) if self._film[layer] else g_ffn  # FiLM scales the FFN delta by 1 + g
        ratios = {
            "mha": (g_mha * self._branch[(layer, "mha")]).norm(dim=-1) / self._branch[(layer, "V")].norm(dim=-1),
            "ffn": (ffn_weight * self._branch[(layer, "ffn")]).norm(dim=-1) / z_norm,
        }
        if self._film[layer]:
            shift = self._beta[layer].expand_as(self._branch[(layer, "z")])
            ratios["beta"] = shift.norm(dim=-1) / z_norm
        for kind, ratio in ratios.items():
            arr = _to_numpy(ratio)  # [B, L]
            for i, rec in enumerate(records):
                rec.contributions[(layer, kind)] = arr[i, :lengths[i]].copy()


class GateTrackingMixin:
    """The tracking API users call on ``model.avigate_fusion`` (kept from the predecessor's API).

    Records live in ``gate_history`` (sample id -> ``GateRecord``; a repeated id keeps the latest).
    For whole datasets use ``run_gate_analysis.py``, which streams gates to disk instead.
    """

    def enable_gate_tracking(self, capture_contributions=False):
        """Start recording every forward pass (eval or train mode, with or without grad)."""
        self.disable_gate_tracking()
        if not hasattr(self, "gate_history"):
            self.gate_history = {}
        self._gate_recorder = GateRecorder(self, self._keep_records, capture_contributions).attach()
        return self

    def disable_gate_tracking(self):
        recorder = getattr(self, "_gate_recorder", None)
        if recorder is not None:
            recorder.detach()
        self._gate_recorder = None
        return self

    @property
    def gate_tracking_enabled(self):
        return getattr(self, "_gate_recorder", None) is not None

    @contextlib.contextmanager
    def gate_tracking_paused(self):
        """Forwards inside the block add nothing to ``gate_history`` (a no-op when tracking is off)."""
        recorder = getattr(self, "_gate_recorder", None)
        if recorder is not None:
            recorder.detach()
        try:
            yield self
        finally:
            if recorder is not None:
                recorder.attach()

    def set_current_sample_id(self, sample_id):
        """Name the batch elements of the next forward: one id per element (a list), or one id."""
        if not self.gate_tracking_enabled:
            raise RuntimeError("gate tracking is off: call enable_gate_tracking() first")
        self._gate_recorder.set_ids(sample_id)

    def clear_gate_history(self):
        self.gate_history = {}

    def _keep_records(self, records):
        for rec in records:
            self.gate_history.pop(rec.sample_id, None)
            self.gate_history[rec.sample_id] = rec

    def _records(self, sample_id=None):
        history = getattr(self, "gate_history", {})
        if sample_id is None:
            return list(history.values())
        if sample_id not in history:
            raise KeyError(f"no gates recorded for sample id {sample_id!r}")
        return [history[sample_id]]

    def get_gate_statistics(self, sample_id=None):
        """{"layers.{l}.gate_{kind}": {count, mean, std, min, max, median, n_samples}} over the
        valid values of one sample, or of every recorded sample when ``sample_id`` is None."""
        records = self._records(sample_id)
        stats = {}
        for layer in range(fusion_num_layers(self)):
            for kind in fusion_gate_kinds(self):
                values = [r.gates[(layer, kind)].reshape(-1) for r in records if (layer, kind) in r.gates]
                if not values:
                    continue
                v = np.concatenate(values).astype(np.float64)
                stats[gate_name(layer, kind)] = dict(
                    count=int(v.size), mean=float(v.mean()), std=float(v.std()), min=float(v.min()),
                    max=float(v.max()), median=float(np.median(v)), n_samples=len(records))
        return stats

    def print_gate_summary(self, sample_id=None):
        stats = self.get_gate_statistics(sample_id)
        who = "all samples" if sample_id is None else f"sample {sample_id}"
        print(f"Gate summary ({fusion_gating_type(self)} gating, {who}):")
        for name, s in stats.items():
            print(f"  {name:<18} mean {s['mean']:+.4f}  std {s['std']:.4f}  "
                  f"min {s['min']:+.4f}  max {s['max']:+.4f}  n={s['count']}")
        return stats

    def compare_samples_gates(self, sample_ids, save_dir):
        """Write ``gate_comparison.png`` (per-layer gates of the given samples) into ``save_dir``.

        Drawn by the analysis package (``qd_detr.extensions.SAMPLE_COMPARISON_PLOT``, imported now);
        a ConfigError says so when it is not importable."""
        plot_sample_comparison = load_extension(SAMPLE_COMPARISON_PLOT, "compare_samples_gates (a plot)")
        mapping = {sid: self._records(sid)[0].gates for sid in sample_ids}
        os.makedirs(save_dir, exist_ok=True)
        ranges = {name: rng.as_dict() for name, rng in fusion_gate_ranges(self).items()}
        return plot_sample_comparison(mapping, list(sample_ids), os.path.join(save_dir, "gate_comparison.png"),
                                      gate_ranges=ranges)

    def save_gate_analysis(self, save_dir, sample_id=None):
        """Write ``gate_statistics_{sample_id or 'all'}.json`` and a comparison plot; return the paths."""
        os.makedirs(save_dir, exist_ok=True)
        tag = "all" if sample_id is None else str(sample_id)
        path = os.path.join(save_dir, f"gate_statistics_{tag}.json")
        write_json(path, {"gating_type": fusion_gating_type(self), "sample_id": sample_id,
                          "statistics": self.get_gate_statistics(sample_id)}, indent=2, default=str)
        ids = [r.sample_id for r in self._records(sample_id)][:20]
        return {"statistics": path, "plot": self.compare_samples_gates(ids, save_dir) if ids else None}
