"""Interventions on the fusion gates and the audio input: what each one is, and how it is applied to a
model and a dataset for one inference pass (``gate_analysis.ablation`` runs and compares them).

Interventions (``run_gate_analysis.py --ablate ...``), each a full re-run of inference:

- gate clamps ``zero`` (0: the branch is switched off), ``one`` (+1), ``minus_one`` (-1) and ``mean``
  (the dataset mean of that gate, from the main pass: clip-weighted mean of all values, per feature
  dim for elementwise gating), applied to the layers of each ``--ablate_layers`` item (``all`` or a
  layer index: one intervention per item) and to the gates of each ``--ablate_gates`` item (``mha``,
  ``ffn``, ``beta``, ``both`` = mha and ffn, ``all`` = every gate kind of the model). Named
  ``{value}@{layers}:{gates}``, e.g. ``zero@all:both`` (audio fully off in v1 and v2 without FiLM:
  with both gates 0 the fusion block never reads A), ``mean@1:mha``. With v2 FiLM the FFN branch is
  weighted by ``1 + g_ffn``: ``zero`` on ``ffn`` means weight 1 (not off; ``minus_one`` switches it off)
  and the shift ``beta`` also carries audio, so audio is fully off only with ``zero@all:all``.
  Implemented by forward hooks on ``fusion.fusion_layers[l].gating_function`` that replace its
  output ``(gate_mha, gate_ffn)`` with constants of the same shape, and for ``beta`` on its
  ``mlp_ffn_beta`` (the raw output is replaced by ``atanh(value / ffn_beta)``, so the block's own
  ``tanh(raw) * ffn_beta`` equals the value; only values inside the gate's range can be set)
  (``clamp_gates``); removing the hooks restores the model exactly (no parameter or buffer is touched).
- audio inputs ``audio_zero`` (every audio feature of the query set to 0; the two temporal-endpoint
  (TEF) columns, which encode clip position rather than sound, are kept) and ``audio_swap`` (the
  query's audio replaced by another video's: a seeded derangement of the distinct videos, so no video
  keeps its own audio; the source's clips are tiled cyclically when it is shorter and cut when
  longer; TEF columns kept). Implemented by ``AudioInterventionDataset``, which transforms each
  item's ``audio_feat`` before collation, so batched forwards and exact single re-runs see the same
  input.
"""
import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from qd_detr.engine import predict
from qd_detr.errors import ConfigError
from qd_detr.gates import DEFAULT_KINDS, GATE_KINDS, gate_name

__all__ = ["Intervention", "parse_interventions", "reference_intervention", "GATE_VALUES", "AUDIO_INTERVENTIONS",
           "GATE_SELECTIONS", "clamp_gates", "dataset_mean_gates", "swap_sources", "AudioInterventionDataset",
           "intervention_context", "run_intervention"]

GATE_VALUES = {"zero": 0.0, "one": 1.0, "minus_one": -1.0, "mean": None}
AUDIO_INTERVENTIONS = ("audio_zero", "audio_swap")
#: --ablate_gates items -> gate kinds; "all": every kind of the model (v1: as "both"; v2 FiLM: with beta)
GATE_SELECTIONS = {"mha": ("mha",), "ffn": ("ffn",), "beta": ("beta",), "both": ("mha", "ffn"), "all": None}


@dataclass(frozen=True)
class Intervention:
    """One intervention. ``layers``: tuple of layer indices (None = all); ``gates``: kinds clamped;
    ``model_kinds``: the gate kinds the model has (they decide whether clamping to zero removes audio)."""
    value: str
    layers: tuple = None
    gates: tuple = DEFAULT_KINDS
    model_kinds: tuple = DEFAULT_KINDS

    @property
    def target(self):
        return "audio" if self.value in AUDIO_INTERVENTIONS else "gates"

    @property
    def layers_label(self):
        if self.target == "audio":
            return ""
        return "all" if self.layers is None else "+".join(map(str, self.layers))

    @property
    def gates_label(self):
        return "" if self.target == "audio" else "+".join(self.gates)

    @property
    def gates_token(self):
        if set(self.gates) == set(DEFAULT_KINDS):
            return "both"
        return "all" if set(self.gates) == set(GATE_KINDS) else "+".join(self.gates)

    @property
    def name(self):
        if self.target == "audio":
            return self.value
        return f"{self.value}@{self.layers_label}:{self.gates_token}"

    @property
    def audio_off(self):
        """True when the intervention removes audio (so ablated - baseline < 0 means audio helped)."""
        return self.value in AUDIO_INTERVENTIONS or (self.value == "zero" and self.layers is None
                                                      and set(self.gates) == set(self.model_kinds))

    def describe(self):
        return {"intervention": self.name, "target": self.target, "value": self.value,
                "layers": self.layers_label, "gates": self.gates_label}


def parse_interventions(values, layer_specs=("all",), gate_specs=("both",), num_layers=None, kinds=DEFAULT_KINDS):
    """Interventions for ``--ablate VALUES --ablate_layers LAYER_SPECS --ablate_gates GATE_SPECS``.

    Gate values expand over every layer spec x gate spec; audio interventions appear once. ``kinds``:
    the model's gate kinds. Raises ConfigError for unknown names, layer indices outside
    ``0..num_layers-1`` and gate kinds the model does not have."""
    kinds = tuple(kinds)
    values, layer_specs, gate_specs = list(values or []), list(layer_specs or ["all"]), list(gate_specs or ["both"])
    known = list(GATE_VALUES) + list(AUDIO_INTERVENTIONS)
    for v in values:
        if v not in known:
            raise ConfigError(f"--ablate: unknown intervention {v!r}; choose from {', '.join(known)}")
    layer_sel = []
    for spec in layer_specs:
        if str(spec) == "all":
            layer_sel.append(None)
            continue
        try:
            layer = int(spec)
        except ValueError:
            raise ConfigError(f"--ablate_layers: expected 'all' or a layer index, got {spec!r}") from None
        if layer < 0 or (num_layers is not None and layer >= num_layers):
            raise ConfigError(f"--ablate_layers: layer {layer} does not exist; the model has {num_layers} fusion "
                              f"layers (0..{num_layers - 1})")
        layer_sel.append((layer,))
    for spec in gate_specs:
        if spec not in GATE_SELECTIONS:
            raise ConfigError(f"--ablate_gates: expected {', '.join(GATE_SELECTIONS)}, got {spec!r}")
        missing = [k for k in (GATE_SELECTIONS[spec] or ()) if k not in kinds]
        if missing:
            raise ConfigError(f"--ablate_gates {spec}: the model has no {', '.join(missing)} gate "
                              f"(its gates: {', '.join(kinds)})")
    out = []
    for v in dict.fromkeys(values):
        if v in AUDIO_INTERVENTIONS:
            out.append(Intervention(v, model_kinds=kinds))
            continue
        for layers in dict.fromkeys(layer_sel):
            for spec in dict.fromkeys(gate_specs):
                out.append(Intervention(v, layers, GATE_SELECTIONS[spec] or kinds, model_kinds=kinds))
    return list(dict.fromkeys(out))


def reference_intervention(interventions):
    """The intervention that best means "audio off" (for plots and the performance link), or None."""
    order = sorted(interventions, key=lambda iv: (not iv.audio_off, iv.target != "gates", iv.value != "audio_zero"))
    return order[0] if order else None


def _replace(gate, value):
    if isinstance(value, torch.Tensor):
        return value.to(dtype=gate.dtype, device=gate.device).expand_as(gate).clone()
    return torch.full_like(gate, float(value))


@contextlib.contextmanager
def clamp_gates(fusion, values):
    """Within the block, every forward uses fixed gates.

    ``values``: ``{(layer, kind): float or tensor broadcastable to the gate}`` (e.g. a (D,) per-dim mean
    for elementwise gates); kinds ``mha``, ``ffn`` and, for v2 FiLM layers, ``beta`` (a value strictly
    inside its range (-|ffn_beta|, |ffn_beta|): it is set through the raw output of ``mlp_ffn_beta``).
    Hooks are prepended, so a ``GateRecorder`` attached to the same model records the clamped
    (effective) gates. On exit every hook is removed: the model is exactly as before (no parameter,
    buffer or attribute is changed)."""
    by_layer = {}
    for (layer, kind), v in values.items():
        if kind not in GATE_KINDS:
            raise ValueError(f"unknown gate kind {kind!r}")
        if not 0 <= layer < len(fusion.fusion_layers):
            raise ValueError(f"layer {layer} does not exist (fusion has {len(fusion.fusion_layers)} layers)")
        if isinstance(v, np.ndarray):
            v = torch.from_numpy(np.asarray(v, dtype=np.float32))
        if kind == "beta":
            v = _raw_beta(fusion.fusion_layers[layer].gating_function, layer, v)
        by_layer.setdefault(layer, {})[kind] = v

    def make_hook(fixed):
        def hook(module, args, output):
            g_mha, g_ffn = output
            return (_replace(g_mha, fixed["mha"]) if "mha" in fixed else g_mha,
                    _replace(g_ffn, fixed["ffn"]) if "ffn" in fixed else g_ffn)
        return hook

    def beta_hook(raw):
        def hook(module, args, output):
            return _replace(output, raw)
        return hook

    handles = []
    try:
        for layer, fixed in sorted(by_layer.items()):
            gf = fusion.fusion_layers[layer].gating_function
            if "mha" in fixed or "ffn" in fixed:
                handles.append(gf.register_forward_hook(make_hook(fixed), prepend=True))
            if "beta" in fixed:
                handles.append(gf.mlp_ffn_beta.register_forward_hook(beta_hook(fixed["beta"]), prepend=True))
        yield fusion
    finally:
        for h in handles:
            h.remove()


def _raw_beta(gating_function, layer, value):
    """The raw ``mlp_ffn_beta`` output whose FiLM shift ``tanh(raw) * ffn_beta`` equals ``value``."""
    if not (getattr(gating_function, "ffn_film", False) and hasattr(gating_function, "mlp_ffn_beta")):
        raise ValueError(f"{gate_name(layer, 'beta')}: layer {layer} has no FiLM shift (not a v2 FiLM layer)")
    scale = float(gating_function.ffn_beta.detach())
    v = torch.as_tensor(value, dtype=torch.float64)
    ratio = v / scale if scale != 0 else torch.where(v == 0, 0.0, torch.inf)
    if not bool((ratio.abs() < 1).all()):
        raise ConfigError(f"{gate_name(layer, 'beta')} can only be set inside its range (-{abs(scale):.4g}, "
                          f"{abs(scale):.4g}) (tanh(raw) * ffn_beta); got {value}")
    return torch.atanh(ratio).to(torch.float32)


def dataset_mean_gates(acc):
    """{(layer, kind): mean} from a ``GateStatsAccumulator``: the clip-weighted mean of all values
    (a float), or for elementwise gating the per-dim mean (a float32 (D,) array)."""
    means = {}
    dims = acc.dim_stats()
    if len(dims):
        for (layer, kind), sel in dims.groupby(["layer", "gate"], sort=False):
            means[(int(layer), kind)] = sel.sort_values("dim")["mean"].to_numpy(np.float32)
        return means
    ls = acc.layer_stats()
    for _, row in ls[ls["weighting"] == "clip"].iterrows():
        means[(int(row["layer"]), row["gate"])] = float(row["mean"])
    return means


def _gate_values(intervention, num_layers, gate_means=None):
    layers = range(num_layers) if intervention.layers is None else intervention.layers
    values = {}
    for layer in layers:
        for kind in intervention.gates:
            if intervention.value == "mean":
                if gate_means is None or (layer, kind) not in gate_means:
                    raise ConfigError(f"{intervention.name}: no dataset mean for {gate_name(layer, kind)}")
                values[(layer, kind)] = gate_means[(layer, kind)]
            else:
                values[(layer, kind)] = GATE_VALUES[intervention.value]
    return values


def swap_sources(records, seed=0):
    """{vid: source vid} for ``audio_swap``: a seeded derangement of the distinct videos (a random order,
    each video taking the next one's audio), so no video keeps its own audio."""
    vids = sorted({str(r["vid"]) for r in records})
    if len(vids) < 2:
        raise ConfigError("audio_swap needs at least two different videos in the data "
                          f"(found {len(vids)})")
    order = [vids[i] for i in np.random.default_rng(seed).permutation(len(vids))]
    return {v: order[(i + 1) % len(order)] for i, v in enumerate(order)}


class AudioInterventionDataset(torch.utils.data.Dataset):
    """A view of a ``QVHighlightsDataset`` whose items carry transformed audio (see module docstring).

    ``mode``: "audio_zero" or "audio_swap"; ``seed`` picks the swap derangement. ``records`` and
    ``source_vid`` ({vid: source vid}, swap only) are exposed for reporting."""

    def __init__(self, base, mode, seed=0):
        if mode not in AUDIO_INTERVENTIONS:
            raise ValueError(f"unknown audio intervention {mode!r}")
        if getattr(base, "a_feat_dir", None) is None:
            raise ConfigError(f"{mode}: the dataset has no audio features")
        self.base, self.mode = base, mode
        self.records = base.records
        self.tef = 2 if getattr(base, "use_tef", False) else 0
        self.source_vid = swap_sources(base.records, seed) if mode == "audio_swap" else {}
        self._cache = {}

    def __len__(self):
        return len(self.base)

    def _source_audio(self, vid):
        if vid not in self._cache:
            self._cache = {vid: self.base.load_audio(vid)}  # (La, Da) without TEF; keep one
        return self._cache[vid]

    def __getitem__(self, index):
        item = self.base[index]
        inputs = dict(item["model_inputs"])
        audio = inputs["audio_feat"].clone()  # (T, Da + tef)
        raw = audio.shape[1] - self.tef
        if self.mode == "audio_zero":
            audio[:, :raw] = 0
        else:
            other = self._source_audio(self.source_vid[str(item["meta"]["vid"])])
            rows = torch.arange(audio.shape[0]) % other.shape[0]  # tile a shorter source cyclically
            audio[:, :raw] = other[rows, :raw]
        inputs["audio_feat"] = audio
        return {"meta": item["meta"], "model_inputs": inputs}


@contextlib.contextmanager
def intervention_context(model, dataset, intervention, gate_means=None, seed=0):
    """Yield the dataset to run ``intervention`` on, with the model's gates clamped as it requires."""
    if intervention.target == "audio":
        yield AudioInterventionDataset(dataset, intervention.value, seed=seed)
        return
    values = _gate_values(intervention, len(model.fusion.fusion_layers), gate_means)
    with clamp_gates(model.fusion, values):
        yield dataset


def run_intervention(model, dataset, batches, device, intervention, gate_means=None, seed=0, progress=False,
                     num_workers=0):
    """Submission lines (dataset order) of a full inference pass under ``intervention``, and the
    {vid: source vid} map of an audio swap ({} otherwise)."""
    with intervention_context(model, dataset, intervention, gate_means, seed) as ds:
        lines = predict(model, ds, batches, device, num_workers=num_workers, progress=progress,
                        desc=f"ablation {intervention.name}")
    return lines, getattr(ds, "source_vid", {})
