"""What audio causally changes: interventions on the fusion gates and the audio input, per query,
measured with the task's own metrics; and the effective contribution of each gated branch.

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

Every comparison is ablated minus baseline (the main pass), per query and overall:
``ablation.csv`` and ``ablation_overall.csv`` (columns in ``CSV_COLUMNS``). For audio-off
interventions a negative delta means audio helped that query; a positive one that audio hurt it.

Effective contribution (``--contributions``): the recorder (``GateRecorder(...,
capture_contributions=True)``) gives, per query, layer and clip, ``||g_mha * a|| / ||V||`` and
``||g_ffn * ffn1(norm2 z)|| / ||z||`` (v2 FiLM: ``(1 + g_ffn)`` and ``||g_beta|| / ||z||`` for the
shift); ``ContributionWriter`` streams them with the raw gate into
``gate_contributions.csv`` during the main pass (resumable with the run).
"""
import contextlib
import csv
import math
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from qd_detr.errors import ConfigError
from qd_detr.eval import per_query_metrics
from qd_detr.inference import evaluate, predict
from qd_detr.postprocess import write_jsonl

from .ranges import DEFAULT_KINDS
from .store import GATE_KINDS, atomic_write_csv, gate_name

__all__ = ["Intervention", "parse_interventions", "GATE_VALUES", "AUDIO_INTERVENTIONS", "clamp_gates",
           "intervention_context", "AudioInterventionDataset", "swap_sources", "dataset_mean_gates",
           "run_intervention", "compare_predictions", "overall_effects", "run_ablation", "reference_intervention",
           "ContributionWriter", "load_contributions", "contribution_summary", "contrib_layer_table", "plot_ablation", "plot_contributions",
           "CSV_COLUMNS", "PLOT_FILES", "QUERY_METRICS", "BRIEF_METRICS"]

GATE_VALUES = {"zero": 0.0, "one": 1.0, "minus_one": -1.0, "mean": None}
AUDIO_INTERVENTIONS = ("audio_zero", "audio_swap")
#: --ablate_gates items -> gate kinds; "all": every kind of the model (v1: as "both"; v2 FiLM: with beta)
GATE_SELECTIONS = {"mha": ("mha",), "ffn": ("ffn",), "beta": ("beta",), "both": ("mha", "ffn"), "all": None}
#: per-query metrics of ``qd_detr.eval.per_query_metrics`` compared per intervention
QUERY_METRICS = ("top1_iou", "r1_05", "r1_07", "mr_ap", "hl_hit1_verygood", "hl_ap_verygood")
#: official brief metrics compared in ablation_overall.csv
BRIEF_METRICS = ("MR-full-mAP", "MR-full-mAP@0.5", "MR-full-mAP@0.75", "MR-full-R1@0.5", "MR-full-R1@0.7",
                 "HL-min-VeryGood-mAP", "HL-min-VeryGood-Hit1")
ABLATION_DIR = "ablation"  # ablated predictions, one JSONL per intervention
CONTRIBUTIONS_FILE = "gate_contributions.csv"
CONTRIBUTIONS_PARTIAL = "gate_contributions.partial.csv"

_INTERVENTION_DOC = {
    "intervention": "Intervention name: '{value}@{layers}:{gates}' for gate clamps (e.g. 'zero@all:both'), "
                    "'audio_zero' or 'audio_swap' for audio inputs.",
    "target": "'gates' (gate outputs replaced) or 'audio' (audio input replaced).",
    "value": "zero | one | minus_one | mean (gates; mean = the gate's dataset mean from the main pass) or "
             "audio_zero | audio_swap.",
    "layers": "Clamped fusion layers: 'all' or one layer index ('' for audio interventions).",
    "gates": "Clamped gates: 'mha', 'ffn', 'beta', 'mha+ffn' or 'mha+ffn+beta' ('' for audio interventions).",
}
_METRIC_DOC = {
    "top1_iou": "IoU of the top-1 predicted window with its best GT window (official R1 definition)",
    "r1_05": "R1@0.5 hit (1 if top1_iou >= 0.5)",
    "r1_07": "R1@0.7 hit (1 if top1_iou >= 0.7)",
    "mr_ap": "per-query MR AP averaged over IoU 0.5:0.05:0.95, percent",
    "hl_hit1_verygood": "saliency HIT@1 at VeryGood (100 if an annotator scored the top-saliency clip >= 4)",
    "hl_ap_verygood": "per-query highlight AP at VeryGood, percent",
}


def _metric_columns():
    cols = {}
    for m, doc in _METRIC_DOC.items():
        cols[f"base_{m}"] = f"Baseline (main pass) {doc}; empty without labels."
        cols[f"ablated_{m}"] = "The same under the intervention."
        cols[f"delta_{m}"] = f"ablated_{m} - base_{m} (< 0: the intervention hurt this query)."
    return cols


#: Every CSV written by this module: {file name: {column: description}}.
CSV_COLUMNS = {
    "ablation.csv": {
        "qid": "QVHighlights query id.",
        "vid": "Video id of the query.",
        **_INTERVENTION_DOC,
        "audio_source_vid": "audio_swap: the video whose audio the query received ('' otherwise).",
        "top1_window_iou_vs_base": "IoU between the baseline and the ablated top-1 window (1 = unchanged; "
                                   "label-free).",
        "saliency_mean_abs_change": "Mean over valid clips of |ablated - baseline| predicted saliency "
                                    "(label-free; 0 = unchanged).",
        **_metric_columns(),
    },
    "ablation_overall.csv": {
        **_INTERVENTION_DOC,
        "metric": "An official brief metric (e.g. 'MR-full-mAP'), a per-query metric averaged over queries "
                  "('mean_top1_iou', ...), or a label-free change: 'frac_top1_window_changed' (fraction of "
                  "queries whose top-1 window moved), 'mean_saliency_abs_change'.",
        "baseline": "Value of the main pass (0 for the label-free changes).",
        "ablated": "Value under the intervention.",
        "delta": "ablated - baseline.",
        "n_queries": "Queries the value is computed over.",
        "n_improved": "Per-query metrics: queries with delta > 0 (empty otherwise).",
        "n_worsened": "Per-query metrics: queries with delta < 0 (empty otherwise).",
        "n_unchanged": "Per-query metrics: queries with delta == 0 (empty otherwise).",
    },
    CONTRIBUTIONS_FILE: {
        "qid": "QVHighlights query id.",
        "vid": "Video id of the query.",
        "layer": "Fusion layer index (0-based).",
        "gate": "'mha' (audio branch: contribution ||g_mha * a|| / ||V||), 'ffn' (FFN branch: "
                "||g_ffn * ffn1(norm2 z)|| / ||z||; v2 FiLM: (1 + g_ffn) instead of g_ffn) or 'beta' (v2 FiLM "
                "shift: ||g_beta|| / ||z||).",
        "name": "Dotted gate name 'layers.{layer}.gate_{gate}'.",
        "clip": "Clip index t (0-based; valid clips only).",
        "n_clips": "Valid clips T of the query.",
        "gate_value": "The raw gate at this clip (global: the query's gate; elementwise: mean over dims).",
        "gate_abs": "Mean |gate| over dims (elementwise); |gate_value| otherwise.",
        "contribution": "Effective contribution: L2 norm over features of the gated branch output divided by "
                        "the L2 norm of the residual stream it is added to (0 = adds nothing).",
    },
}
PLOT_FILES = {
    "overall": "ablation_overall.png",
    "per_query": "ablation_per_query.png",
    "heatmap": "ablation_heatmap.png",
    "contributions": "contributions.png",
    "contribution_layers": "contribution_layers.png",
}


# -- interventions --------------------------------------------------------------------------------
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


# -- comparison -----------------------------------------------------------------------------------
def _iou(a, b):
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = max(a[1], b[1]) - min(a[0], b[0])
    return inter / union if union > 0 else float(a[:2] == b[:2])


def _metrics_by_qid(lines, records):
    labelled = [r for r in records if r.get("relevant_windows")]
    if not labelled or not lines:
        return {}
    return {row["qid"]: row for row in per_query_metrics(lines, labelled)}


def compare_predictions(intervention, base_lines, ablated_lines, records, base_metrics=None, source_vid=None):
    """One ``ablation.csv`` row per query (dict per CSV_COLUMNS) comparing ablated with baseline lines."""
    ablated = {line["qid"]: line for line in ablated_lines}
    base_metrics = _metrics_by_qid(base_lines, records) if base_metrics is None else base_metrics
    abl_metrics = _metrics_by_qid(ablated_lines, records)
    rows = []
    for line in base_lines:
        qid = line["qid"]
        other = ablated[qid]
        b_sal = np.asarray(line["pred_saliency_scores"], dtype=np.float64)
        a_sal = np.asarray(other["pred_saliency_scores"], dtype=np.float64)
        row = {"qid": qid, "vid": line["vid"], **intervention.describe(),
               "audio_source_vid": (source_vid or {}).get(str(line["vid"]), ""),
               "top1_window_iou_vs_base": _iou(line["pred_relevant_windows"][0][:2],
                                               other["pred_relevant_windows"][0][:2]),
               "saliency_mean_abs_change": float(np.abs(a_sal - b_sal).mean()) if b_sal.size else float("nan")}
        bm, am = base_metrics.get(qid, {}), abl_metrics.get(qid, {})
        for m in QUERY_METRICS:
            b, a = bm.get(m), am.get(m)
            row[f"base_{m}"] = np.nan if b is None else float(b)
            row[f"ablated_{m}"] = np.nan if a is None else float(a)
            row[f"delta_{m}"] = row[f"ablated_{m}"] - row[f"base_{m}"]
        rows.append(row)
    return pd.DataFrame(rows, columns=list(CSV_COLUMNS["ablation.csv"]))


def overall_effects(intervention, per_query, base_brief=None, ablated_brief=None):
    """``ablation_overall.csv`` rows of one intervention (a DataFrame)."""
    desc = intervention.describe()
    rows = []
    n = len(per_query)
    for key in BRIEF_METRICS:
        if base_brief and ablated_brief and key in base_brief and key in ablated_brief:
            b, a = float(base_brief[key]), float(ablated_brief[key])
            rows.append({**desc, "metric": key, "baseline": b, "ablated": a, "delta": round(a - b, 6),
                         "n_queries": n})
    for m in QUERY_METRICS:
        d = per_query[f"delta_{m}"].to_numpy(float)
        ok = np.isfinite(d)
        if not ok.any():
            continue
        rows.append({**desc, "metric": f"mean_{m}", "baseline": float(per_query.loc[ok, f"base_{m}"].mean()),
                     "ablated": float(per_query.loc[ok, f"ablated_{m}"].mean()), "delta": float(d[ok].mean()),
                     "n_queries": int(ok.sum()), "n_improved": int((d[ok] > 0).sum()),
                     "n_worsened": int((d[ok] < 0).sum()), "n_unchanged": int((d[ok] == 0).sum())})
    changed = float((per_query["top1_window_iou_vs_base"] < 1).mean()) if n else float("nan")
    sal = float(per_query["saliency_mean_abs_change"].mean()) if n else float("nan")
    rows.append({**desc, "metric": "frac_top1_window_changed", "baseline": 0.0, "ablated": changed,
                 "delta": changed, "n_queries": n})
    rows.append({**desc, "metric": "mean_saliency_abs_change", "baseline": 0.0, "ablated": sal, "delta": sal,
                 "n_queries": n})
    return pd.DataFrame(rows, columns=list(CSV_COLUMNS["ablation_overall.csv"]))


def run_ablation(model, dataset, batches, device, interventions, base_lines, output_dir=None, gate_means=None,
                 seed=0, progress=False, num_workers=0, base_brief=None, log=None):
    """Run every intervention and compare it with ``base_lines`` (the main pass, dataset order).

    Returns ``(per_query_df, overall_df, info)``; with ``output_dir`` also writes ``ablation.csv``,
    ``ablation_overall.csv`` and ``ablation/{name}.jsonl`` (ablated predictions). ``info`` holds
    seconds and the ablated brief metrics per intervention."""
    import time
    records = dataset.records
    base_metrics = _metrics_by_qid(base_lines, records)
    if base_brief is None:
        base_brief = (evaluate(base_lines, records) or {}).get("brief")
    per_query, overall, info = [], [], {}
    for iv in interventions:
        t0 = time.time()
        lines, source = run_intervention(model, dataset, batches, device, iv, gate_means, seed, progress, num_workers)
        metrics = evaluate(lines, records)
        brief = (metrics or {}).get("brief")
        pq = compare_predictions(iv, base_lines, lines, records, base_metrics, source)
        per_query.append(pq)
        overall.append(overall_effects(iv, pq, base_brief, brief))
        info[iv.name] = {"seconds": round(time.time() - t0, 2), "metrics_brief": brief}
        if output_dir is not None:
            folder = os.path.join(output_dir, ABLATION_DIR)
            os.makedirs(folder, exist_ok=True)
            write_jsonl(os.path.join(folder, _safe_name(iv.name) + ".jsonl"), lines)
        if log is not None:
            key = "MR-full-mAP"
            if brief and base_brief and key in brief:
                log(f"  ablation {iv.name}: {key} {base_brief[key]} -> {brief[key]} "
                    f"({brief[key] - base_brief[key]:+.2f})")
            else:
                log(f"  ablation {iv.name}: done")
    pq = pd.concat(per_query, ignore_index=True) if per_query else pd.DataFrame(columns=list(CSV_COLUMNS["ablation.csv"]))
    ov = pd.concat(overall, ignore_index=True) if overall else pd.DataFrame(
        columns=list(CSV_COLUMNS["ablation_overall.csv"]))
    if output_dir is not None:
        atomic_write_csv(pq, os.path.join(output_dir, "ablation.csv"), float_format="%.9g")
        atomic_write_csv(ov, os.path.join(output_dir, "ablation_overall.csv"), float_format="%.9g")
    return pq, ov, info


def _safe_name(name):
    return "".join(c if c.isalnum() or c in "-_.+" else "_" for c in name)


# -- effective contribution -----------------------------------------------------------------------
class ContributionWriter:
    """Stream per-clip effective contributions (with the raw gate) of recorded queries to CSV.

    Rows go to ``gate_contributions.partial.csv`` as each forward is recorded; ``finish()`` moves
    the file to ``gate_contributions.csv``. With ``keep_qids`` (a resumed run) rows of other queries
    left by the interrupted run are dropped first, so the result equals an uninterrupted run's rows."""

    COLUMNS = list(CSV_COLUMNS[CONTRIBUTIONS_FILE])

    def __init__(self, output_dir, keep_qids=None):
        self.path = os.path.join(output_dir, CONTRIBUTIONS_PARTIAL)
        self.final = os.path.join(output_dir, CONTRIBUTIONS_FILE)
        if keep_qids is not None and os.path.exists(self.path):
            self._filter(set(keep_qids))
        elif os.path.exists(self.path):
            os.remove(self.path)
        fresh = not os.path.exists(self.path)
        self._fh = open(self.path, "a", newline="")
        self._csv = csv.writer(self._fh, lineterminator="\n")
        if fresh:
            self._csv.writerow(self.COLUMNS)

    def _filter(self, keep):
        kept = []
        with open(self.path, newline="") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            for row in reader:
                if len(row) == len(self.COLUMNS) and row[-1] != "" and int(row[0]) in keep:
                    kept.append(row)
        with open(self.path, "w", newline="") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(header or self.COLUMNS)
            w.writerows(kept)

    def add(self, record, vid):
        """Write the rows of one ``GateRecord`` (needs ``record.contributions``)."""
        if not record.contributions:
            raise ValueError("the recorder was not created with capture_contributions=True")
        t = record.n_clips
        vid = str(vid)
        if any(ch in vid for ch in ',"\n\r'):
            vid = '"' + vid.replace('"', '""') + '"'
        lines = []
        for (layer, kind), contrib in sorted(record.contributions.items()):
            g = np.asarray(record.gates[(layer, kind)], dtype=np.float64)
            if g.ndim == 2:  # elementwise (T, D)
                value, absval = g.mean(axis=1), np.abs(g).mean(axis=1)
            elif g.size == 1:  # global
                value = np.full(t, g.reshape(-1)[0])
                absval = np.abs(value)
            else:
                value, absval = g, np.abs(g)
            head = f"{record.sample_id},{vid},{layer},{kind},{gate_name(layer, kind)},"
            lines.extend(f"{head}{clip},{t},{v:.9g},{a:.9g},{c:.9g}\n" for clip, (v, a, c) in
                         enumerate(zip(value.tolist(), absval.tolist(), np.asarray(contrib, np.float64).tolist())))
        self._fh.write("".join(lines))
        self._fh.flush()

    def close(self):
        if not self._fh.closed:
            self._fh.close()

    def finish(self):
        """Close and move the streamed rows to ``gate_contributions.csv``; returns its path."""
        self.close()
        os.replace(self.path, self.final)
        return self.final


def load_contributions(path_or_dir):
    """``gate_contributions.csv`` as a DataFrame (a run folder or the file itself)."""
    path = path_or_dir
    if os.path.isdir(path):
        path = os.path.join(path, CONTRIBUTIONS_FILE)
    return pd.read_csv(path, dtype={"vid": str}, keep_default_na=False, na_values=[""])


def contribution_summary(contrib):
    """Per query x layer x gate: mean gate, mean |gate| and mean / median / max contribution."""
    g = contrib.groupby(["qid", "layer", "gate"], sort=False)
    out = g.agg(vid=("vid", "first"), n_clips=("n_clips", "first"), gate_mean=("gate_value", "mean"),
                gate_abs_mean=("gate_abs", "mean"), contribution_mean=("contribution", "mean"),
                contribution_median=("contribution", "median"), contribution_max=("contribution", "max"))
    out = out.reset_index()
    out["name"] = [gate_name(l, k) for l, k in zip(out["layer"], out["gate"])]
    return out


# -- plots ----------------------------------------------------------------------------------------
def plot_ablation(per_query, overall, output_dir, max_queries=60, max_panels=10, kinds=DEFAULT_KINDS):
    """Figures of ``PLOT_FILES`` for the ablation results; returns the written paths. ``kinds``: the
    model's gate kinds (a clamp to zero removes audio only when it covers all of them)."""
    from . import plots as P
    plt = P.plt
    out = os.path.join(output_dir, "plots")
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
                             layout=P.LAYOUT, squeeze=False, sharey=True)
    for ax, key in zip(axes[0], keys):
        sel = overall[overall["metric"] == key].set_index("intervention").reindex(names)
        d = sel["delta"].to_numpy(float)
        colors = ["tab:red" if v < 0 else "tab:blue" for v in np.nan_to_num(d)]
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
    fig.suptitle("Effect of each intervention on the run's metrics (red: worse than baseline)", fontsize=12)
    paths.append(P._save(fig, os.path.join(out, PLOT_FILES["overall"])))

    # 2. per-query deltas, sorted, one panel per intervention (audio-off ones first): which queries audio
    #    helps and hurts
    metric = "top1_iou" if per_query["delta_top1_iou"].notna().any() else None
    col = f"delta_{metric}" if metric else "saliency_mean_abs_change"
    first = per_query.drop_duplicates("intervention").set_index("intervention")
    off = {n: _is_audio_off(first.loc[n], kinds) for n in names}
    shown = sorted(names, key=lambda n: not off[n])[:max_panels]
    ncol = min(2, len(shown))
    nrow = math.ceil(len(shown) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(7 * ncol, 2.8 * nrow + 0.8), layout=P.LAYOUT, squeeze=False)
    for ax, name in zip(axes.flat, shown):
        sel = per_query[per_query["intervention"] == name].sort_values(col, kind="stable")
        d = sel[col].to_numpy(float)
        colors = ["tab:red" if v < 0 else ("tab:blue" if v > 0 else "0.6") for v in d]
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
    fig.suptitle("Per-query effect of each intervention (red: worse under it; for audio-off interventions "
                 f"red = audio helped the query){more}", fontsize=11)
    paths.append(P._save(fig, os.path.join(out, PLOT_FILES["per_query"])))

    # 3. heatmap queries x interventions
    hm_col = "delta_mr_ap" if per_query["delta_mr_ap"].notna().any() else "saliency_mean_abs_change"
    mat = per_query.pivot_table(index="qid", columns="intervention", values=hm_col, sort=False)[names]
    if len(mat) > max_queries:
        mat = mat.iloc[P._subsample(len(mat), max_queries)]
    lim = max(float(np.nanmax(np.abs(mat.to_numpy()))) if np.isfinite(mat.to_numpy()).any() else 0, 1e-6)
    fig, ax = plt.subplots(figsize=(min(0.9 * len(names) + 4, 16), P._heatmap_height(len(mat))), layout=P.LAYOUT)
    cmap = plt.get_cmap("RdBu").with_extremes(bad=P.PAD_COLOR)
    im = ax.imshow(mat.to_numpy(float), aspect="auto", cmap=cmap, vmin=-lim, vmax=lim, interpolation="nearest")
    ax.set_xticks(np.arange(len(names)), names, rotation=40, ha="right", fontsize=8 if len(names) <= 14 else 6)
    ax.set_yticks(np.arange(len(mat)), [f"qid {q}" for q in mat.index], fontsize=7)
    cb = fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    cb.set_label("Δ per-query MR AP (ablated − base, points)" if hm_col == "delta_mr_ap" else "mean |Δ saliency|")
    ax.set_title("Per-query change under each intervention (red: worse, blue: better)", fontsize=11)
    paths.append(P._save(fig, os.path.join(out, PLOT_FILES["heatmap"])))
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
    from . import plots as P
    plt = P.plt
    out = os.path.join(output_dir, "plots")
    os.makedirs(out, exist_ok=True)
    layers = sorted(contrib["layer"].unique())
    kinds = [k for k in GATE_KINDS if k in set(contrib["gate"])]
    fig, axes = plt.subplots(len(kinds), len(layers), figsize=(3.4 * len(layers) + 1.5, 3.2 * len(kinds) + 0.8),
                             layout=P.LAYOUT, squeeze=False, sharey="row")
    for i, kind in enumerate(kinds):
        for j, layer in enumerate(layers):
            ax = axes[i, j]
            sc = P._scale(value_range, kind, gate_ranges, layer)
            cmap, norm, _ = P._cmap_norm(sc)
            sel = contrib[(contrib["layer"] == layer) & (contrib["gate"] == kind)]
            idx = P._subsample(len(sel), max_points)
            x = sel["gate_value"].to_numpy(float)[idx]
            y = sel["contribution"].to_numpy(float)[idx]
            ax.scatter(x, y, s=5, c=x, cmap=cmap, norm=norm, alpha=0.6, edgecolors="none")
            P._value_lim(ax, sc, x, axis="x")
            P._zero_line(ax, sc, axis="x")
            med = float(np.nanmedian(sel["contribution"])) if len(sel) else float("nan")
            ax.set_title(f"{gate_name(layer, kind)}\nmedian contribution {med:.3g}", fontsize=9, loc="left")
            ax.set_xlabel("raw gate value")
            if j == 0:
                ax.set_ylabel("||gated branch|| / ||residual||")
            ax.set_ylim(bottom=0)
    fig.suptitle("Raw gate vs effective contribution per clip (a large gate on a small branch adds little)",
                 fontsize=11)
    paths = [P._save(fig, os.path.join(out, PLOT_FILES["contributions"]))]

    summ = contrib_layer_table(contrib)
    fig, ax = plt.subplots(figsize=(6.5, 4), layout=P.LAYOUT)
    for k, kind in enumerate(kinds):
        s = summ[summ["gate"] == kind]
        x = s["layer"].to_numpy(float) + (k - (len(kinds) - 1) / 2) * 0.15
        ax.errorbar(x, s["median"], yerr=[s["median"] - s["p25"], s["p75"] - s["median"]], fmt="o-",
                    color=P.KIND_COLOR.get(kind), label=P._kind_short(kind, P._scale(None, kind, gate_ranges).rng),
                    capsize=3)
    ax.set_xticks(layers)
    ax.set_xlabel("fusion layer")
    ax.set_ylabel("effective contribution (median, IQR over clips)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax.set_title("Effective contribution of each gated branch per layer", fontsize=11)
    paths.append(P._save(fig, os.path.join(out, PLOT_FILES["contribution_layers"])))
    return paths


def contrib_layer_table(contrib):
    """Per layer x gate: median, p25, p75 and mean of the per-clip contribution and the mean gate."""
    g = contrib.groupby(["layer", "gate"], sort=True)
    out = g["contribution"].agg(median="median", p25=lambda s: s.quantile(0.25), p75=lambda s: s.quantile(0.75),
                                mean="mean").reset_index()
    out["gate_mean"] = g["gate_value"].mean().to_numpy()
    order = [GATE_KINDS.index(k) if k in GATE_KINDS else len(GATE_KINDS) for k in out["gate"]]
    return out.assign(_k=order).sort_values(["layer", "_k"], kind="stable").drop(columns="_k").reset_index(drop=True)
