"""Legacy model support: make a trained QD-DETR + AVIGATE model trackable without changing it, and prove it.

A *legacy model* was trained before gate tracking existed: a checkpoint written by the research code
(``AVIGATEFusionCustom`` of the avigate_custom branch, or the older one-layer ``AVIGATEFusion`` of the
avigate branch), or an in-memory model whose fusion module has no tracking. Both entry points rebuild
this project's equivalent, load every weight strictly and then prove the result:

- weights: every tensor of the rebuilt model ``torch.equal``s the source tensor under its mapped key;
- outputs: on a deterministic probe batch with ragged video and text lengths (so padding is
  exercised), all model outputs and the fused video features of the *tracked* model equal the
  reference. For a checkpoint the reference is the same weights run with no hook attached (in both
  batching modes); for an in-memory model it is the user's model itself. A difference above
  ``TOLERANCE`` is an error.

Keys are mapped by a small declarative table: ``qd_detr.checkpoint.KEY_RENAMES`` (``module.``,
``avigate_fusion.``) plus ``FUSION_SCOPE_PREFIX`` for the state dict of a bare fusion module; then
every key must match a pattern of ``KEY_TABLE``, which also tells the layout. Nothing is copied from
one layer to another, no missing weight is filled in, and there is no fallback model.

Also here: the compatibility check behind ``test_legacy_model.py`` (``check_compatibility``) and the
step-by-step guide behind ``legacy_model_guide.py`` (``run_guide``).
"""
import argparse
import datetime
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

from qd_detr.checkpoint import (
    KEY_RENAMES,
    describe_state_dict,
    infer_options,
    load_checkpoint,
    normalize_state_dict,
    read_checkpoint,
    split_checkpoint,
    strict_load,
)
from qd_detr.config import FUSION_VARIANTS, GATING_TYPES, fusion_layout, make_options, options_from_opt_json
from qd_detr.errors import CheckpointError, ConfigError, DataError, ToolkitError
from qd_detr.gates import fusion_gate_kinds
from qd_detr.model import BATCHING_MODES, NoFusionError

__all__ = ["load_legacy_model_with_gate_tracking", "adapt_legacy_model", "inspect_checkpoint",
           "classify_keys", "make_probe_batch", "check_compatibility", "format_report", "run_guide",
           "exit_code_for", "IncompatibleModelError", "EquivalenceError", "KEY_TABLE", "KEY_RENAMES",
           "FUSION_SCOPE_PREFIX", "LAYOUT_DESCRIPTIONS", "TOLERANCE", "PROBE_LENGTHS", "PROBE_TEXT_LENGTHS"]

TOLERANCE = 1e-6
PROBE_LENGTHS = (12, 7, 3)        # video clips per probe sample: one full, two padded
PROBE_TEXT_LENGTHS = (6, 4, 2)    # text tokens per probe sample
PROBE_SEED = 0
PROBE_IDS = ("probe_0", "probe_1", "probe_2")


class IncompatibleModelError(CheckpointError):
    """The model was read, but it cannot be made trackable without changing it (reason in the message)."""


class EquivalenceError(IncompatibleModelError):
    """The rebuilt, tracked model does not reproduce the original's outputs."""


def exit_code_for(exc):
    """Exit code of the legacy tools: 1 for an incompatible model, 2 for unreadable or bad input."""
    return 1 if isinstance(exc, (IncompatibleModelError, NoFusionError)) else 2


# ------------------------------------------------------------------------------------------------
# Key table
# ------------------------------------------------------------------------------------------------

# A bare fusion module's state dict (``fusion_layers.0...``) gets the model-level prefix.
FUSION_SCOPE_PREFIX = "fusion."

LAYOUT_DESCRIPTIONS = {
    "custom": "AVIGATEFusionCustom (avigate_custom branch, its gate-analysis descendants, the v2 gate "
              "refinement and diagstrip-ssm branches)",
    "avigate": "the older AVIGATEFusion (avigate branch: own projections, cross-attention, global gates)",
    "concat": "audio concatenated to video, no fusion module",
    "video_only": "video only, no audio and no fusion module",
}
_ALL = ("custom", "avigate", "concat", "video_only")
_WB = r"\.(weight|bias)"
_MHA = r"\.(in_proj_weight|in_proj_bias|out_proj\.(weight|bias))"
_LAYER = r"fusion\.fusion_layers\.\d+\."

# (group, layouts whose state dicts hold such keys, full-match pattern on the mapped key)
KEY_TABLE = tuple((group, layouts, re.compile(pattern)) for group, layouts, pattern in (
    ("qd_detr heads", _ALL, r"global_rep_(token|pos)|query_embed\.weight|class_embed" + _WB
     + r"|span_embed\.layers\.\d+" + _WB + r"|saliency_proj[12]" + _WB
     + r"|contrastive_align_projection_(query|txt|vid)" + _WB
     + r"|txt_position_embed\.(position_embeddings\.weight|LayerNorm" + _WB + ")"),
    ("text projection", _ALL, r"input_txt_proj\.\d+\.(LayerNorm|net\.1)" + _WB),
    ("transformer", _ALL, r"transformer\.(t2v_encoder|encoder)\.(layers\.\d+\.(self_attn" + _MHA
     + r"|(linear[12]|norm[12])" + _WB + r"|activation\.weight)|norm" + _WB + ")"),
    ("transformer", _ALL, r"transformer\.decoder\.(layers\.\d+\.((sa_(qcontent|qpos|kcontent|kpos|v)"
     r"|ca_(qcontent|qpos|kcontent|kpos|v|qpos_sine))_proj|(self_attn|cross_attn)\.out_proj|linear[12]"
     r"|norm[123])" + _WB + r"|layers\.\d+\.activation\.weight|norm" + _WB
     + r"|(query_scale|ref_point_head|bbox_embed|ref_anchor_head)\.layers\.\d+" + _WB + ")"),
    ("video projection", ("custom", "concat", "video_only"), r"input_vid_proj\.\d+\.(LayerNorm|net\.1)" + _WB),
    ("audio projection", ("custom",), r"input_aud_proj\.\d+\.(LayerNorm|net\.1)" + _WB),
    ("custom fusion audio branch", ("custom",), _LAYER + r"(a_proj|out_proj)" + _WB),
    ("older fusion projections", ("avigate",), r"fusion\.(video_proj|audio_proj)" + _WB),
    ("older fusion cross-attention", ("avigate",), _LAYER + r"cross_attention" + _MHA),
    ("fusion blocks", ("custom", "avigate"), _LAYER + r"(gating_function\.mlp_(mha|ffn)\.[02]" + _WB
     + r"|(ffn[12]\.[02]|norm[1-4])" + _WB + r"|self_attention" + _MHA + ")"),
    ("v2 gate refinement", ("custom",), _LAYER + r"(gating_function\.(mha_bias|mha_scale|ffn_alpha|ffn_beta)"
     r"|gating_function\.mlp_ffn_beta\.[02]" + _WB + r"|delta_norm_(mha|ffn)" + _WB + ")"),
    ("diagstrip SSM gate", ("custom",), _LAYER + r"gating_function\.ssm_gate\.(encoder\.net\.\d+|norm"
     r"|mlp_(mha|ffn)\.[02])" + _WB),
))


# A layout is only found when one of its own groups is present (shared groups alone tell nothing).
LAYOUT_MARKERS = {
    "custom": ("audio projection", "custom fusion audio branch"),
    "avigate": ("older fusion projections", "older fusion cross-attention"),
    "concat": ("video projection",),
    "video_only": ("video projection",),
}


@dataclass
class KeyClassification:
    groups: dict
    unmatched: list
    layout: str            # custom, avigate, "concat or video_only" or "undetermined"

    def as_dict(self):
        return {"groups": dict(self.groups), "unmatched": list(self.unmatched), "layout": self.layout}


def classify_keys(keys, label="weights"):
    """Match every key against ``KEY_TABLE``; the layouts all matched keys agree on give the layout.

    Keys of two different layouts in one state dict are an ``IncompatibleModelError``.
    """
    groups, unmatched = {}, []
    candidates, witness = set(_ALL), None
    for key in keys:
        for group, layouts, pattern in KEY_TABLE:
            if pattern.fullmatch(key):
                groups[group] = groups.get(group, 0) + 1
                narrowed = candidates & set(layouts)
                if not narrowed:
                    raise IncompatibleModelError(
                        f"{label}: keys of different layouts are mixed: {key!r} ({group}) cannot be in the "
                        f"same model as {witness!r}")
                if narrowed != candidates:
                    candidates, witness = narrowed, key
                break
        else:
            unmatched.append(key)
    candidates = {name for name in candidates if any(g in groups for g in LAYOUT_MARKERS[name])}
    if len(candidates) == 1:
        layout = next(iter(candidates))
    elif candidates == {"concat", "video_only"}:
        layout = "concat or video_only"
    else:
        layout = "undetermined"
    return KeyClassification(groups, unmatched, layout)


def _unknown_keys_text(classification, total):
    shown = ", ".join(classification.unmatched[:10])
    more = f" (+{len(classification.unmatched) - 10} more)" if len(classification.unmatched) > 10 else ""
    return (f"{len(classification.unmatched)} of {total} weight keys match no known layout (custom AVIGATE "
            f"fusion, older AVIGATE fusion, audio concatenation, video only); keys that matched nothing: "
            f"{shown}{more}")


_CORE_GROUPS = ("qd_detr heads", "text projection", "transformer")


# ------------------------------------------------------------------------------------------------
# Reading a checkpoint
# ------------------------------------------------------------------------------------------------

@dataclass
class CheckpointContents:
    """What a checkpoint file holds, read without building a model."""
    path: str
    size: int
    format: str
    meta: dict
    state_dict: dict          # keys mapped with KEY_RENAMES
    renames: list
    keys: KeyClassification
    info: dict                # describe_state_dict
    opt: object = None        # options stated by the checkpoint or its opt.json (final dims), else None
    options_source: str = None
    raw_opt_type: str = None

    def stated_gating_type(self):
        """(gating type, where it comes from), or (None, reason) when only the user can tell."""
        layout = self.keys.layout
        if layout == "avigate":
            return "global", "layout (the older AVIGATEFusion has global gates only)"
        if layout != "custom":
            return None, "no fusion module"
        if self.opt is not None and getattr(self.opt, "gating_type", None):
            return self.opt.gating_type, self.options_source
        if self.info.get("gating_shape") == "elementwise":
            return "elementwise", "weight shapes (the gating MLP outputs one gate per feature)"
        return None, GATING_AMBIGUITY

    def summary(self):
        gating, source = self.stated_gating_type()
        return {"path": self.path, "size_bytes": self.size, "format": self.format,
                "entries": self.meta.get("entries"), "epoch": self.meta.get("epoch"),
                "options_found": self.opt is not None, "options_source": self.options_source,
                "opt_type": self.raw_opt_type, "n_tensors": len(self.state_dict),
                "key_renames": [list(r) for r in self.renames], "layout_from_keys": self.keys.layout,
                "stated_gating_type": gating, "gating_type_source": source}


GATING_AMBIGUITY = ("not stated: global and clipwise gating have identical weight names and shapes (the "
                    "gating MLP ends in one output either way; only the forward pass differs: one gate per "
                    "video or one per clip), so the weights cannot tell them apart")


def _check_magic(path):
    """A file that is neither a zip archive (torch.save) nor a pickle is not a checkpoint at all
    (safe loading would otherwise call it a refused pickle)."""
    if os.path.isfile(path):
        with open(path, "rb") as fh:
            head = fh.read(4)
        if head and not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (neither a zip archive nor a "
                                  f"pickle; the file starts with {head!r})")


def inspect_checkpoint(path, trust_pickle=False):
    """Read ``path`` safely and classify its keys; no model is built.

    Raises ``CheckpointError`` when the file cannot be read as a checkpoint (unreadable input) and
    ``IncompatibleModelError`` when it is read but its weights are of an unsupported kind.
    """
    path = os.fspath(path)
    _check_magic(path)
    obj = read_checkpoint(path, trust_pickle=trust_pickle)
    raw_sd, raw_opt, fmt, meta = split_checkpoint(obj, path)
    try:
        sd, renames = normalize_state_dict(raw_sd)
        info = describe_state_dict(sd)
    except CheckpointError as exc:
        raise IncompatibleModelError(str(exc)) from None
    keys = classify_keys(sd, label=path)
    opt, source = None, None
    opt_json = os.path.join(os.path.dirname(os.path.abspath(path)), "opt.json")
    if raw_opt is not None:
        opt = make_options(**(vars(raw_opt) if isinstance(raw_opt, argparse.Namespace) else raw_opt))
        source = "checkpoint['opt']"
    elif os.path.isfile(opt_json):
        opt, source = options_from_opt_json(opt_json), opt_json
    return CheckpointContents(path=os.path.abspath(path), size=os.path.getsize(path), format=fmt, meta=meta,
                              state_dict=sd, renames=renames, keys=keys, info=info, opt=opt,
                              options_source=source,
                              raw_opt_type=type(raw_opt).__name__ if raw_opt is not None else None)


# ------------------------------------------------------------------------------------------------
# Probe batch and comparisons
# ------------------------------------------------------------------------------------------------

def make_probe_batch(v_feat_dim, t_feat_dim, a_feat_dim=None, lengths=PROBE_LENGTHS,
                     text_lengths=PROBE_TEXT_LENGTHS, seed=PROBE_SEED, device="cpu"):
    """Deterministic model inputs with ragged lengths, laid out as the collate function does.

    Feature rows are L2-normalised (audio non-negative, like PANN); padded rows are zero; masks are
    float with 1 = valid.
    """
    g = torch.Generator().manual_seed(seed)

    def stream(dim, lens, nonneg=False):
        x = torch.randn(len(lens), max(lens), dim, generator=g)
        x = x.abs() if nonneg else x
        x = x / (x.norm(dim=-1, keepdim=True) + 1e-5)
        mask = (torch.arange(max(lens))[None, :] < torch.tensor(lens)[:, None]).float()
        return (x * mask[..., None]).to(device), mask.to(device)

    batch = {}
    batch["src_txt"], batch["src_txt_mask"] = stream(int(t_feat_dim), text_lengths)
    batch["src_vid"], batch["src_vid_mask"] = stream(int(v_feat_dim), lengths)
    if a_feat_dim:
        batch["src_aud"], batch["src_aud_mask"] = stream(int(a_feat_dim), lengths, nonneg=True)
    return batch


def _flatten(out, prefix=""):
    if torch.is_tensor(out):
        return {prefix or "output": out}
    items = {}
    if isinstance(out, dict):
        for k, v in out.items():
            items.update(_flatten(v, f"{prefix}/{k}" if prefix else str(k)))
    elif isinstance(out, (list, tuple)):
        for i, v in enumerate(out):
            items.update(_flatten(v, f"{prefix}/{i}" if prefix else str(i)))
    return items


def _max_abs_diff(a, b):
    if tuple(a.shape) != tuple(b.shape):
        return math.inf
    if a.numel() == 0:
        return 0.0
    return float((a.detach().double() - b.detach().double()).abs().max())


def _num(x):
    return x if math.isfinite(x) else str(x)


def _compare(reference, candidate, fused_ref, fused_got, required=("pred_logits", "pred_spans", "saliency_scores")):
    ref, got = _flatten(reference), _flatten(candidate)
    missing = [k for k in required if k not in ref or k not in got]
    if missing:
        raise IncompatibleModelError(f"model outputs lack {', '.join(missing)}; cannot compare outputs")
    diffs = {k: _max_abs_diff(ref[k], got[k]) for k in ref if k in got}
    if fused_ref is not None:
        diffs["fused_video_features"] = _max_abs_diff(fused_ref, fused_got)
    worst = max(diffs.values(), key=lambda d: (math.isnan(d), d))
    return {"max_abs_diff": _num(worst), "passed": bool(worst <= TOLERANCE),
            "diffs": {k: _num(v) for k, v in diffs.items()},
            "not_compared": sorted(set(ref) ^ set(got))}


def _hook_count(module):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in module.modules())


def _gating_modules(fusion):
    return [block.gating_function for block in fusion.fusion_layers]


class _OutputCatcher:
    """Temporary forward hooks keeping the last output of some modules (removed on exit)."""

    def __init__(self, modules):
        self.modules, self.outputs, self.handles = list(modules), {}, []

    def __enter__(self):
        for i, m in enumerate(self.modules):
            self.handles.append(m.register_forward_hook(lambda mod, a, out, i=i: self.outputs.__setitem__(i, out)))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        return False


def _shape(t):
    return list(t.shape)


def _check_gate_records(history, ids, lengths, gating_type, num_layers, hidden, raw_outputs):
    """Per layer and kind: module output shape and recorded per-sample shapes; raise when inconsistent."""
    layers = []
    for layer in range(num_layers):
        raw = raw_outputs.get(layer)
        first = history.get(ids[0])
        kinds = ("mha", "ffn") + (("beta",) if first is not None and (layer, "beta") in first.gates else ())
        for k, kind in enumerate(kinds):  # mha, ffn: the gating function's outputs; beta: the FiLM shift
            shapes = []
            for sid, n in zip(ids, lengths):
                rec = history.get(sid)
                if rec is None or (layer, kind) not in rec.gates:
                    raise IncompatibleModelError(f"gate tracking recorded nothing for layer {layer} {kind} "
                                                 f"of probe sample {sid}")
                g = rec.gates[(layer, kind)]
                want = (n,) if gating_type == "clipwise" else (n, hidden) if gating_type == "elementwise" else (1,)
                if tuple(g.shape) != want or rec.n_clips != n:
                    raise IncompatibleModelError(
                        f"layer {layer} {kind}: recorded gate of shape {tuple(g.shape)} for {n} valid clips; "
                        f"expected {want} for {gating_type} gating")
                if not bool(torch.isfinite(torch.from_numpy(g)).all()):
                    raise IncompatibleModelError(f"layer {layer} {kind}: non-finite gate values on the probe")
                shapes.append(list(g.shape))
            layers.append({"layer": layer, "kind": kind,
                           "module_output_shape": (_shape(raw[k]) if raw is not None and k < len(raw) else
                                                   "FiLM shift, computed in the block"),
                           "recorded_shapes": shapes})
    return layers


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------

def _verify_weights(model, state_dict, label):
    """torch.equal of every model tensor against the source tensor under the same (mapped) key."""
    own = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    missing = sorted(set(state_dict) - set(own))
    extra = sorted(set(own) - set(state_dict))
    different = [k for k in own if k in state_dict
                 and not (own[k].dtype == state_dict[k].dtype and torch.equal(own[k], state_dict[k].cpu()))]
    if missing or extra or different:
        raise IncompatibleModelError(f"{label}: rebuilt weights differ from the source: "
                                     f"{len(different)} changed {different[:5]}, {len(missing)} not loaded "
                                     f"{missing[:5]}, {len(extra)} not in the source {extra[:5]}")
    return {"compared": len(own), "identical": len(own),
            "method": "torch.equal (same dtype) per key, rebuilt model vs the source weights"}


def _probe_dims(opt):
    audio = fusion_layout(opt) != "video_only"
    return dict(v_feat_dim=opt.v_feat_dim, t_feat_dim=opt.t_feat_dim, a_feat_dim=opt.a_feat_dim if audio else None)


def _probe_description(probe):
    return {"batch_size": len(PROBE_LENGTHS), "video_clips": list(PROBE_LENGTHS),
            "text_tokens": list(PROBE_TEXT_LENGTHS), "seed": PROBE_SEED,
            "padded_samples": sum(n < max(PROBE_LENGTHS) for n in PROBE_LENGTHS),
            "input_shapes": {k: _shape(v) for k, v in probe.items()}}


def _encode(model, probe):
    return model.encode_video(probe["src_vid"], probe["src_vid_mask"], probe.get("src_aud"), probe.get("src_aud_mask"))


def _tracked_run(model, probe, run):
    """Run ``run()`` with the fusion's gate tracking on; returns (result, gate history, raw gate outputs)."""
    fusion = model.fusion if hasattr(model, "encode_video") else model
    fusion.enable_gate_tracking()
    fusion.clear_gate_history()
    try:
        with _OutputCatcher(_gating_modules(fusion)) as raw:
            result = run(fusion)
        return result, dict(fusion.gate_history), raw.outputs
    finally:
        fusion.disable_gate_tracking()
        fusion.clear_gate_history()


def _prove_checkpoint_equivalence(model, opt):
    """Outputs and fused features with tracking on vs the same weights with no hook, in both batching modes."""
    probe = make_probe_batch(**_probe_dims(opt), device=next(model.parameters()).device)
    fusion = model.fusion
    initial = model.batching
    modes, gates = {}, None
    try:
        for mode in BATCHING_MODES:
            model.set_batching(mode)
            hooks = _hook_count(model)
            if hooks:
                raise IncompatibleModelError(f"the rebuilt model already has {hooks} hook(s); no clean reference")
            with torch.no_grad():
                ref_out, ref_fused = model(**probe), _encode(model, probe)

            def run(f):
                with torch.no_grad():
                    f.set_current_sample_id(list(PROBE_IDS))
                    out = model(**probe)
                    f.set_current_sample_id(list(PROBE_IDS))
                    return out, _encode(model, probe)

            (out, fused), history, raw = _tracked_run(model, probe, run)
            modes[mode] = _compare(ref_out, out, ref_fused, fused)
            if mode == initial:
                gates = _check_gate_records(history, PROBE_IDS, PROBE_LENGTHS, fusion.gating_type,
                                            len(fusion.fusion_layers), model.hidden_dim, raw)
    finally:
        model.set_batching(initial)
    worst = max((m["max_abs_diff"] for m in modes.values()), key=lambda d: (isinstance(d, str), d))
    return {"reference": "the checkpoint's weights run with no hook attached",
            "candidate": "the same model with gate tracking enabled",
            "tolerance": TOLERANCE, "probe": _probe_description(probe), "modes": modes,
            "max_abs_diff": worst, "passed": all(m["passed"] for m in modes.values())}, gates


def _summary_line(adapter):
    eq = adapter["equivalence"]
    return (f"legacy adapter: {adapter['layout']} layout, {adapter['gating_type']} gating "
            f"({adapter['gating_type_source']}); {adapter['weights']['identical']}/{adapter['weights']['compared']} "
            f"tensors identical to the source; outputs and fused features with tracking equal the reference "
            f"(max abs diff {eq['max_abs_diff']:.3g} <= {TOLERANCE:g}) on a {eq['probe']['batch_size']}-sample "
            f"ragged probe")


def _load_checked(contents, gating_type, device, trust_pickle, options):
    """load_checkpoint with the adapter's error classification."""
    path, unknown = contents.path, None
    if contents.keys.unmatched:
        unknown = _unknown_keys_text(contents.keys, len(contents.state_dict))
        if not all(g in contents.keys.groups for g in _CORE_GROUPS):
            raise IncompatibleModelError(f"{path}: {unknown}")
    try:
        return load_checkpoint(path, device=device, trust_pickle=trust_pickle, gating_type=gating_type,
                               options=options)
    except CheckpointError as exc:
        raise IncompatibleModelError(f"{exc}" + (f"; {unknown}" if unknown else "")) from None
    except ConfigError:
        if unknown:
            raise IncompatibleModelError(f"{path}: {unknown}") from None
        raise


def _no_fusion_error(path, layout):
    return NoFusionError(f"{path}: the model ({LAYOUT_DESCRIPTIONS.get(layout, layout)}) has no fusion module, "
                         "so no gates to analyse")


def _adapt_loaded(contents, model, opt, report, t0):
    """The proof for a strictly loaded checkpoint model; returns the report's ``legacy_adapter`` block."""
    weights = _verify_weights(model, contents.state_dict, contents.path)
    equivalence, gates = _prove_checkpoint_equivalence(model, opt)
    if not equivalence["passed"]:
        raise EquivalenceError(f"{contents.path}: outputs with gate tracking differ from the untracked model "
                               f"(max abs diff {equivalence['max_abs_diff']}, tolerance {TOLERANCE:g})")
    adapter = {
        "source": "checkpoint", "layout": report["layout"],
        "layout_description": LAYOUT_DESCRIPTIONS.get(report["layout"]),
        "gating_type": report["gating_type"], "gating_type_source": report["gating_type_source"],
        "key_renames": [list(r) for r in contents.renames],
        "key_groups": dict(contents.keys.groups), "unmatched_keys": list(contents.keys.unmatched),
        "n_parameters": report["n_parameters"], "weights": weights, "equivalence": equivalence,
        "gates": {"gating_type": report["gating_type"], "layers": gates,
                  "per_sample_shape": _per_sample_shape(report["gating_type"])},
        "gate_tracking": "enabled on model.fusion",
        "seconds": round(time.time() - t0, 3),
    }
    adapter["summary"] = _summary_line(adapter)
    return adapter


def _per_sample_shape(gating_type):
    return {"global": "(1,) one gate per query", "global_diagstrip_ssm": "(1,) one gate per query",
            "clipwise": "(T,) one gate per valid clip",
            "elementwise": "(T, hidden) one gate per valid clip and feature"}[gating_type]


def load_legacy_model_with_gate_tracking(model_path, gating_type=None, device="auto", trust_pickle=False,
                                         return_details=False, options=None):
    """Rebuild a checkpoint strictly, prove it unchanged, and return it with gate tracking enabled.

    ``gating_type`` is checked against the checkpoint's options (a conflict is an error naming both)
    and is required when the checkpoint states none and its weights cannot tell (global vs clipwise).
    ``options``: extra options for a bare state dict (e.g. ``{"nheads": 8, "fusion_n_heads": 4}``).
    Returns the model, or ``(model, opt, report)`` with ``return_details``; the report is
    ``load_checkpoint``'s plus a ``legacy_adapter`` block holding the proof.
    """
    t0 = time.time()
    contents = inspect_checkpoint(model_path, trust_pickle=trust_pickle)
    model, opt, report = _load_checked(contents, gating_type, device, trust_pickle, options)
    if model.fusion is None:
        raise _no_fusion_error(contents.path, model.layout)
    report["legacy_adapter"] = _adapt_loaded(contents, model, opt, report, t0)
    model.fusion.enable_gate_tracking()
    return (model, opt, report) if return_details else model


# ------------------------------------------------------------------------------------------------
# In-memory models
# ------------------------------------------------------------------------------------------------

def _child(module, name):
    return module._modules.get(name) if isinstance(module, nn.Module) else None


def _describe_object(model):
    """(inner module, kind "model"/"fusion", fusion module or None, fusion attribute name, wrapper name)."""
    wrapper = None
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        wrapper, model = type(model).__name__, model.module
    if not isinstance(model, nn.Module):
        raise IncompatibleModelError(f"expected a torch.nn.Module, got a {type(model).__name__}")
    for name in ("fusion", "avigate_fusion"):
        fusion = _child(model, name)
        if fusion is not None:
            return model, "model", fusion, name, wrapper
    if isinstance(_child(model, "fusion_layers"), nn.ModuleList):
        return model, "fusion", model, None, wrapper
    if _child(model, "transformer") is not None and _child(model, "input_txt_proj") is not None:
        return model, "model", None, None, wrapper
    raise IncompatibleModelError(
        f"{type(model).__name__}: neither a QD-DETR model (with a .fusion or .avigate_fusion module) nor a "
        "fusion module (with .fusion_layers)")


def _declared_gating(fusion):
    for obj in (fusion, _child(_child(fusion, "fusion_layers")[0], "gating_function")):
        value = getattr(obj, "gating_type", None) if obj is not None else None
        if isinstance(value, str):
            return value, f"{type(obj).__name__}.gating_type"
    return None, None


def _observed_gating(gate, n_out):
    """Gating type from what the module's gating function returned on the probe."""
    if n_out > 1:
        return "elementwise"
    if gate.dim() == 2 or gate.shape[1] == 1:
        return "global"
    # the gate_analysis branch returns global gates expanded to (B, L, hidden)
    flat = gate.reshape(gate.shape[0], -1)
    return "global" if bool((flat == flat[:, :1]).all()) else "clipwise"


def _heads(module):
    return getattr(module, "num_heads", None) if isinstance(module, nn.MultiheadAttention) else None


def _module_config(user, fusion, layout, sd, options=None):
    """Options the user's modules state through attributes (what shapes cannot tell).

    ``options``: values given by the caller; they fill what no attribute holds and must agree with
    what one does. Returns ({option: value}, {option: source}).
    """
    given, where = {}, {}

    def put(key, value, source):
        if value is not None:
            given[key], where[key] = value, source

    block = fusion.fusion_layers[0]
    put("fusion_n_heads", _heads(_child(block, "self_attention")), "fusion_layers[0].self_attention.num_heads")
    transformer = _child(user, "transformer")
    if transformer is not None:
        nhead = getattr(transformer, "nhead", None)
        if nhead is None:
            nhead = next((m.num_heads for m in transformer.modules() if isinstance(m, nn.MultiheadAttention)), None)
        put("nheads", nhead, "transformer.nhead")
        drop = next((m.p for m in transformer.modules() if isinstance(m, nn.Dropout)), None)
        put("dropout", drop, "first nn.Dropout of the transformer")
    for attr in ("use_txt_pos", "aux_loss", "max_v_l", "span_loss_type"):
        value = getattr(user, attr, None)
        if isinstance(value, (bool, int, str)):
            put(attr, value, f"{type(user).__name__}.{attr}")
    proj = _child(user, "input_txt_proj")
    try:
        put("input_dropout", float(proj[0].net[0].p), "input_txt_proj[0].net[0].p")
    except (AttributeError, IndexError, TypeError):
        pass
    if layout == "avigate":
        heads = _heads(_child(block, "cross_attention"))
        if heads is not None and heads != 8:
            raise IncompatibleModelError(f"the older AVIGATEFusion layout has 8 attention heads; this module "
                                         f"has {heads}")
    if layout == "custom":
        values, sources = _gate_config(fusion, sd, options or {})
        given.update(values)
        where.update(sources)
    for key, value in (options or {}).items():
        if key in given and given[key] != value:
            raise ConfigError(f"option {key}={value!r} was given but the module has {key}={given[key]!r} "
                              f"({where[key]})")
        if key not in given:
            given[key], where[key] = value, "given (options)"
    return given, where


def _layer_value(fusion, path, attr):
    """``attr`` of the module at ``path`` (child names) in every fusion layer: (value, source) or (None, None).

    Our rebuild uses one value for all layers, so layers that disagree are an IncompatibleModelError.
    """
    found = []
    for block in fusion.fusion_layers:
        obj = block
        for name in path:
            obj = _child(obj, name)
        value = getattr(obj, attr, None) if obj is not None else None
        found.append(value)
    if all(v is None for v in found):
        return None, None
    if any(v != found[0] for v in found):
        raise IncompatibleModelError(f"fusion layers differ in {'.'.join(path + (attr,))} ({found}); the rebuilt "
                                     "fusion has one value for every layer")
    return found[0], f"fusion_layers[*].{'.'.join(path + (attr,))}"


def _ssm_dilations(fusion):
    """Dilations of the SSM gate's 3-tap encoder convolutions in every layer: (list, source) or (None, None)."""
    found = []
    for block in fusion.fusion_layers:
        encoder = _child(_child(_child(block, "gating_function"), "ssm_gate"), "encoder")
        if encoder is None:
            return None, None
        found.append([int(m.dilation[0]) for m in encoder.modules()
                      if isinstance(m, nn.Conv1d) and m.kernel_size[0] == 3])
    if any(d != found[0] for d in found):
        raise IncompatibleModelError(f"fusion layers differ in their SSM dilations ({found}); the rebuilt fusion "
                                     "has one value for every layer")
    return found[0], "fusion_layers[*].gating_function.ssm_gate.encoder Conv1d(kernel 3).dilation"


def _gate_config(fusion, sd, options):
    """Gate options of a custom fusion that its weights cannot (fully) tell, read from module attributes.

    v2: ``mha_gate_temp`` (``gating_function.mha_temp``, a float), ``ffn_gate_film`` (``ffn_film``,
    checked against the ``ffn_beta`` weights). diagstrip SSM: band width and video branch (checked
    against the weight shapes), channels (weights), dilations (the encoder's convolutions) and
    ``diag_subtract``. What no attribute holds comes from ``options``, else it is a ConfigError.
    Returns ({option: value}, {option: source}).
    """
    info = describe_state_dict(sd)
    values, sources = {}, {}

    def put(key, value, source, weights=None, weights_source=None):
        if value is None and key in options:
            value, source = options[key], "given (options)"
        if value is None:
            value, source = weights, weights_source
        if weights is not None and value != weights:
            raise IncompatibleModelError(f"{source} says {key}={value!r} but the weights have {weights!r} "
                                         f"({weights_source})")
        if value is not None:
            values[key] = value
            sources[key] = source if weights is None or source == weights_source else \
                f"{source}, agrees with the {weights_source}"

    if info["variant_from_weights"] == "v2":
        temp, where = _layer_value(fusion, ("gating_function",), "mha_temp")
        put("mha_gate_temp", None if temp is None else float(temp), where)
        if "mha_gate_temp" not in values:
            raise ConfigError("v2 gating: the sigmoid temperature is no weight and no gating function has an "
                              "mha_temp attribute; pass options={'mha_gate_temp': T}, the value it was trained with")
        film, where = _layer_value(fusion, ("gating_function",), "ffn_film")
        if film is None:
            film, where = _layer_value(fusion, (), "ffn_film")
        put("ffn_gate_film", None if film is None else bool(film), where, bool(info["film"]),
            "weights (gating_function.ffn_beta " + ("present)" if info["film"] else "absent)"))
    elif info["variant_from_weights"] == "diagstrip":
        shapes, gate = info["ssm"], ("gating_function", "ssm_gate")
        width, where = _layer_value(fusion, gate, "band_width")
        put("ssm_band_width", None if width is None else int(width), where, shapes["band_width"],
            "weights (ssm_gate.encoder.net.0 has 2w+1 input channels)")
        put("ssm_enc_channels", None, None, shapes["enc_channels"], "weights (ssm_gate.encoder.net.0 output channels)")
        video, where = _layer_value(fusion, gate, "use_video_branch")
        put("ssm_use_video_branch", None if video is None else int(bool(video)), where,
            int(shapes["use_video_branch"]), "weights (ssm_gate.norm is 2C wide with the video branch, C without)")
        dilations, where = _ssm_dilations(fusion)
        if dilations is None:
            dilations, where = _layer_value(fusion, gate, "dilations")
        put("ssm_dilations", None if dilations is None else [int(d) for d in dilations], where)
        if "ssm_dilations" not in values:
            raise ConfigError("the SSM gate's dilations change no weight shape and no encoder convolution was "
                              "found; pass options={'ssm_dilations': [...]}")
        if len(values["ssm_dilations"]) != shapes["n_dilations"]:
            raise IncompatibleModelError(f"the SSM gate has {shapes['n_dilations']} dilated convolutions but "
                                         f"{len(values['ssm_dilations'])} dilations were found "
                                         f"({sources['ssm_dilations']})")
        sub, where = _layer_value(fusion, gate, "diag_subtract")
        put("ssm_diag_subtract", None if sub is None else float(sub), where)
        if "ssm_diag_subtract" not in values:
            raise ConfigError("the SSM gate's diag_subtract is no weight and no ssm_gate has a diag_subtract "
                              "attribute; pass options={'ssm_diag_subtract': X}")
    return values, sources


def _set_batching(module, mode):
    if hasattr(module, "set_batching"):
        module.set_batching(mode)
    else:
        for m in module.modules():
            if hasattr(m, "batch_invariant"):
                m.batch_invariant = mode == "query"


def _run_user(user, kind, fusion, probe):
    """The user's model on the probe: (outputs, fused features, first gating output)."""
    gating = _child(fusion.fusion_layers[0], "gating_function")
    with torch.no_grad(), _OutputCatcher([fusion] + ([gating] if gating is not None else [])) as caught:
        out = user(**probe) if kind == "model" else \
            user(probe["src_vid"], probe["src_aud"], video_mask=probe["src_vid_mask"], audio_mask=probe["src_aud_mask"])
    fused = caught.outputs.get(0)
    if isinstance(fused, (tuple, list)):
        fused = fused[0]
    gate = caught.outputs.get(1)
    if isinstance(gate, (tuple, list)):
        gate = gate[0]
    return out, fused, gate


def _build_own(kind, layout, sd, opt_given, gating_type, label):
    """Our equivalent (model or fusion module) from the mapped state dict, strictly loaded.

    The custom fusion's variant and gate options come from ``opt_given`` as in a checkpoint's options
    (``qd_detr.config.fusion_variant`` / ``gate_options``: v2 or ``ssm_*`` options).
    """
    from qd_detr.avigate import AVIGATEFusion
    from qd_detr.avigate_custom import AVIGATEFusionCustom
    from qd_detr.config import SSM_OPTIONS, V2_OPTIONS, fusion_variant, gate_options
    from qd_detr.model import build_model
    info = describe_state_dict(sd)
    if kind == "model":
        given = dict(opt_given)
        if layout == "custom":
            given["gating_type"] = gating_type
        opt = infer_options(sd, info, given, label)
        own = build_model(opt)
        strict_load(own, sd, label)
        return own, opt
    inner = {k[len(FUSION_SCOPE_PREFIX):]: v for k, v in sd.items()}
    hidden = int(inner["fusion_layers.0.norm1.weight"].shape[0])
    heads, n_layers = opt_given.get("fusion_n_heads", 8), info["fusion_layers"]
    variant_opts = {k: v for k, v in opt_given.items() if k in V2_OPTIONS or k in SSM_OPTIONS}
    if layout == "custom":
        spec = argparse.Namespace(gating_type=gating_type, **variant_opts)
        try:
            variant, (kwargs, _) = fusion_variant(spec), gate_options(spec)
            own = AVIGATEFusionCustom(hidden, hidden, hidden, n_heads=heads, num_layers=n_layers,
                                      gating_type=gating_type, variant=variant, **kwargs)
        except ValueError as exc:
            raise ConfigError(f"{label}: {exc}") from None
        dims = dict(v_feat_dim=hidden, a_feat_dim=hidden)
    else:
        dims = dict(v_feat_dim=int(inner["video_proj.weight"].shape[1]),
                    a_feat_dim=int(inner["audio_proj.weight"].shape[1]))
        own = AVIGATEFusion(dims["v_feat_dim"], dims["a_feat_dim"], hidden, n_heads=heads, num_layers=n_layers)
    strict_load(own, inner, label)
    opt = argparse.Namespace(layout=layout, gating_type=gating_type, fusion_layers=n_layers,
                             fusion_n_heads=heads, hidden_dim=hidden, t_feat_dim=None, **dims, **variant_opts)
    return own, opt


def _resolve_in_memory_gating(layout, fusion, sd, gating_type, observed_gate):
    """(gating type, source) from the argument, the module's attributes, its weights and its observed behaviour.

    The diagstrip SSM gate (``gating_function.ssm_gate.*``, no gating MLP of its own) is told by its
    weights; its [B, 1, 1] gates are observed as global.
    """
    if layout == "avigate":
        if gating_type not in (None, "global"):
            raise ConfigError(f"gating_type {gating_type} conflicts with the model's layout (the older AVIGATEFusion "
                              "has global gates only)")
        return "global", "layout (the older AVIGATEFusion has global gates only)"
    g0 = f"{FUSION_SCOPE_PREFIX}fusion_layers.0.gating_function."
    ssm = g0 + "ssm_gate.norm.weight" in sd
    n_out = 1 if ssm else int(sd[g0 + "mlp_mha.2.weight"].shape[0])
    observed = _observed_gating(observed_gate, n_out) if observed_gate is not None else None
    if ssm and observed == "global":
        observed = "global_diagstrip_ssm"
    declared, where = _declared_gating(fusion)
    if gating_type is not None and gating_type not in GATING_TYPES:
        raise ConfigError(f"gating_type {gating_type!r} is not one of {', '.join(GATING_TYPES)}")
    probe_source = "the gating function's output shape on the probe"
    weights = ("global_diagstrip_ssm", "weights (gating_function.ssm_gate.*: the diagstrip SSM gate)") if ssm else \
        (None, None)
    evidence = [(v, s) for v, s in ((declared, where), weights, (observed, probe_source)) if v is not None]
    for value, source in evidence:
        if gating_type is not None and value != gating_type:
            raise ConfigError(f"gating_type {gating_type} conflicts with the model's gating type {value} ({source})")
    for (value, source), (other, other_source) in zip(evidence, evidence[1:]):
        if value != other:
            raise IncompatibleModelError(f"the module's gating type is {value} by {source} but {other} by "
                                         f"{other_source}")
    if gating_type is not None:
        return gating_type, "given" + (f", agrees with {evidence[0][1]}" if evidence else "")
    if evidence:
        return evidence[0]
    raise ConfigError(f"cannot tell the gating type: {GATING_AMBIGUITY}; pass gating_type")


_READINGS = {"v1": "v1 (tanh MHA gate)", "diagstrip": "diagstrip (sigmoid MHA gate)", "v2": "v2 (gate refinement)"}


def _declared_variant(fusion, given):
    """(variant, source) the module's ``variant`` attribute (our own modules) or given ``ssm_*`` options state."""
    from qd_detr.config import FUSION_VARIANTS, SSM_OPTIONS
    block = fusion.fusion_layers[0]
    for obj in (fusion, block, _child(block, "gating_function")):
        value = getattr(obj, "variant", None) if obj is not None else None
        if isinstance(value, str) and value in FUSION_VARIANTS:
            return value, f"{type(obj).__name__}.variant"
    if any(k in given for k in SSM_OPTIONS):
        return "diagstrip", "ssm_* options"
    return None, None


def _variant_readings(layout, fusion, sd, gating, given):
    """The readings to prove: ([(variant, options for _build_own)], source or None when outputs decide,
    (declared variant, its source)).

    The weights tell v2 (``mha_bias``/``mha_scale``/``ffn_alpha``) and the diagstrip SSM gate. Plain
    ``global`` gating of v1 (tanh MHA gate) and of diagstrip (sigmoid) have the same keys, shapes and
    attributes: both are tried, v1 first, and the outputs decide. Clipwise and elementwise gating
    compute alike in both, so one reading is proved.
    """
    from qd_detr.config import SSM_OPTIONS
    if layout != "custom":
        return [(None, given)], None, (None, None)
    from_weights = describe_state_dict(sd)["variant_from_weights"]
    declared = _declared_variant(fusion, given)
    if from_weights in ("v2", "diagstrip"):
        if declared[0] not in (None, from_weights):
            raise IncompatibleModelError(f"the module says fusion variant {declared[0]} ({declared[1]}) but its "
                                         f"weights are of the {from_weights} variant")
        what = "mha_bias/mha_scale/ffn_alpha: the v2 gate refinement" if from_weights == "v2" else \
            "ssm_gate.*: the diagstrip SSM gate"
        return [(from_weights, given)], f"weights (gating_function.{what})", declared
    if declared[0] == "v2":
        raise IncompatibleModelError(f"the module says fusion variant v2 ({declared[1]}) but its weights lack the "
                                     "v2 gate parameters (gating_function.mha_bias/mha_scale/ffn_alpha)")
    # the diagstrip reading is built from ssm_* options (at the branch's defaults where not given), as the
    # diagstrip branch saves them; they mark the variant and change nothing else outside the SSM gate
    readings = {"v1": {k: v for k, v in given.items() if k not in SSM_OPTIONS},
                "diagstrip": {**{k: (list(v) if isinstance(v, list) else v) for k, v in SSM_OPTIONS.items()}, **given}}
    if gating == "global":
        return [(v, readings[v]) for v in ("v1", "diagstrip")], None, declared
    variant = declared[0] or "v1"
    source = (f"{declared[1]}; " if declared[0] else "no v2 or SSM gate weights; ") + \
        f"v1 and diagstrip compute {gating} gating alike"
    return [(variant, readings[variant])], source, declared


def _prove_own(own, kind, probe, ref_out, ref_fused):
    """Our module with tracking vs the user's outputs, per batching mode: ({mode: comparison}, {mode: gates})."""
    own_fusion = own.fusion if kind == "model" else own
    modes, gates = {}, {}
    for mode in BATCHING_MODES:
        _set_batching(own, mode)

        def run(f):
            with torch.no_grad(), _OutputCatcher([own_fusion]) as caught:
                f.set_current_sample_id(list(PROBE_IDS))
                out = own(**probe) if kind == "model" else own(
                    probe["src_vid"], probe["src_aud"], video_mask=probe["src_vid_mask"],
                    audio_mask=probe["src_aud_mask"])
            return out, caught.outputs.get(0)

        (out, fused), own_history, raw = _tracked_run(own, probe, run)
        required = ("pred_logits", "pred_spans", "saliency_scores") if kind == "model" else ()
        modes[mode] = _compare(ref_out, out, ref_fused, fused, required=required)
        gates[mode] = (own_history, raw)
    return modes, gates


def _diffs_text(modes):
    return ", ".join(f"{m} batching {modes[m]['max_abs_diff']}" for m in BATCHING_MODES)


def _variant_outcome(tried, source, declared, label):
    """(variant, source) after the proof; outputs decide between readings, a declared variant must agree."""
    variant = tried[-1]["variant"]
    if source is None:  # told by outputs
        parts = [f"the {t['reading']} reading " + ("reproduces the given model" if t["passed"] else "differs")
                 + f" (max abs diff {t['max_abs_diff']})" for t in reversed(tried)]
        source = "outputs on the probe: " + "; ".join(parts)
        if declared[0] is not None and declared[0] != variant:
            raise IncompatibleModelError(f"{label}: the module says fusion variant {declared[0]} ({declared[1]}) "
                                         f"but its outputs match the {tried[-1]['reading']} reading")
        if declared[0] is not None:
            source += f"; agrees with {declared[1]}"
    return variant, source


def adapt_legacy_model(model, gating_type=None, enable_tracking=True, return_details=False, options=None):
    """Rebuild an in-memory trained model (or bare fusion module) as this project's trackable equivalent.

    ``model``: a QD-DETR-like module with ``.fusion`` or ``.avigate_fusion`` (optionally inside
    DataParallel), or a fusion module with ``.fusion_layers``, with the original attribute names.
    Its weights are loaded strictly into our module; what shapes cannot tell (gating type, head
    counts, flags, the v2 temperature and FiLM flag, the SSM gate's settings) is read from its
    attributes, and the gating type is cross-checked against what its gating function returns.
    ``options``: values no attribute holds (e.g. ``{"mha_gate_temp": 1.5}``); they must agree with
    the attributes. Our module must then reproduce the user's outputs and fused features on a ragged
    probe in one of our batching modes (the one kept). Plain global gating of the v1 (tanh) and
    diagstrip (sigmoid) branches cannot be told apart otherwise: both readings are tried and the one
    whose outputs match is kept. The user's model is left unchanged.
    Returns our module (tracking enabled), or ``(module, opt, report)`` with ``return_details``.
    """
    from qd_detr.config import FUSION_VARIANTS, SSM_OPTIONS, V2_OPTIONS
    from qd_detr.gates import fusion_gate_ranges
    t0 = time.time()
    user, kind, fusion, attr, wrapper = _describe_object(model)
    label = f"in-memory {type(user).__name__}"
    if fusion is None:
        raise NoFusionError(f"{label}: the model has no fusion module, so no gates to analyse")
    raw_sd = {k: v.detach() for k, v in user.state_dict().items()}
    scoped = {FUSION_SCOPE_PREFIX + k: v for k, v in raw_sd.items()} if kind == "fusion" else raw_sd
    try:
        sd, renames = normalize_state_dict(scoped)
        describe_state_dict(sd)
    except CheckpointError as exc:
        raise IncompatibleModelError(f"{label}: {exc}") from None
    keys = classify_keys(sd, label)
    if keys.unmatched:
        raise IncompatibleModelError(f"{label}: {_unknown_keys_text(keys, len(sd))}")
    layout = keys.layout
    if layout not in ("custom", "avigate"):
        raise NoFusionError(f"{label}: the model has no fusion module, so no gates to analyse")
    device = next(user.parameters()).device
    flags = {m: m.training for m in user.modules()}
    had_history = isinstance(getattr(fusion, "gate_history", None), dict)
    user_history = dict(fusion.gate_history) if had_history else None
    declared_mode = getattr(user, "batching", None)
    order = [declared_mode] if declared_mode in BATCHING_MODES else []
    order += [m for m in ("original", "query") if m not in order]
    user.eval()
    try:
        given, where = _module_config(user, fusion, layout, sd, options)
        if kind == "model":
            placeholders = {"gating_type": "global", "fusion_n_heads": 8, "nheads": 8}  # dims only
            dims_opt = infer_options(sd, describe_state_dict(sd), {**placeholders, **given}, label)
            dims = _probe_dims(dims_opt)
        else:
            hidden = int(sd["fusion.fusion_layers.0.norm1.weight"].shape[0])
            raw = layout == "avigate"  # the older layout projects raw features itself
            dims = dict(v_feat_dim=sd["fusion.video_proj.weight"].shape[1] if raw else hidden, t_feat_dim=1,
                        a_feat_dim=sd["fusion.audio_proj.weight"].shape[1] if raw else hidden)
        probe = make_probe_batch(**dims, device=device)
        ref_out, ref_fused, gate = _run_user(user, kind, fusion, probe)
        gating, gating_source = _resolve_in_memory_gating(layout, fusion, sd, gating_type, gate)
        readings, variant_source, declared = _variant_readings(layout, fusion, sd, gating, given)
        tried = []
        for variant, reading_given in readings:
            try:
                own, opt = _build_own(kind, layout, sd, reading_given, gating, label)
            except CheckpointError as exc:
                raise IncompatibleModelError(str(exc)) from None
            own.to(device).eval()
            modes, gates = _prove_own(own, kind, probe, ref_out, ref_fused)
            chosen = next((m for m in order if modes[m]["passed"]), None)
            best = modes[chosen] if chosen else min(modes.values(), key=lambda m: (isinstance(m["max_abs_diff"], str),
                                                                                   m["max_abs_diff"]))
            tried.append({"variant": variant, "reading": _READINGS.get(variant, variant), "passed": chosen is not None,
                          "max_abs_diff": best["max_abs_diff"], "batching": chosen})
            if chosen is not None:
                break
    finally:
        for m, flag in flags.items():
            m.train(flag)
        if had_history:  # a tracked user fusion must not keep the probe's records
            fusion.gate_history = user_history
    if chosen is None:
        if len(tried) > 1:
            raise EquivalenceError(
                f"{label}: the rebuilt model does not reproduce the given model under either reading of its plain "
                f"global gating (both tried: " + "; ".join(f"{t['reading']}: max abs diff {t['max_abs_diff']}"
                                                           for t in tried)
                + f"; tolerance {TOLERANCE:g}); its forward pass differs from the known layouts")
        raise EquivalenceError(
            f"{label}: the rebuilt model does not reproduce the given model (max abs diff {_diffs_text(modes)}"
            f"; tolerance {TOLERANCE:g}); its forward pass differs from the known layouts")
    variant, variant_source = _variant_outcome(tried, variant_source, declared, label) if layout == "custom" else \
        (None, None)
    _set_batching(own, chosen)
    own_fusion = own.fusion if kind == "model" else own
    weights = _verify_weights(own, sd if kind == "model" else
                              {k[len(FUSION_SCOPE_PREFIX):]: v for k, v in sd.items()}, label)
    own_history, raw = gates[chosen]
    n_layers = len(own_fusion.fusion_layers)
    layer_gates = _check_gate_records(own_history, PROBE_IDS, PROBE_LENGTHS, gating, n_layers,
                                      int(own_fusion.fusion_layers[0].norm1.weight.shape[0]), raw)
    kinds = fusion_gate_kinds(own_fusion)
    recorded = {(g["layer"], g["kind"]) for g in layer_gates}
    missing = [f"layer {i} {k}" for i in range(n_layers) for k in kinds if (i, k) not in recorded]
    if missing:
        raise IncompatibleModelError(f"{label}: gate tracking recorded no {', '.join(missing)} gate on the probe "
                                     f"(the fusion applies {', '.join(kinds)})")
    gate_opts = {k: {"value": given[k], "source": where[k]} for k in given if k in V2_OPTIONS or k in SSM_OPTIONS}
    report = {
        "source": label, "object": kind, "wrapper": wrapper, "fusion_attribute": attr, "layout": layout,
        "layout_description": LAYOUT_DESCRIPTIONS[layout], "gating_type": gating, "gating_type_source": gating_source,
        "fusion_variant": variant, "fusion_variant_description": FUSION_VARIANTS.get(variant),
        "fusion_variant_source": variant_source,
        "variant_readings": [{k: t[k] for k in ("variant", "reading", "passed", "max_abs_diff")} for t in tried],
        "gate_options": gate_opts,
        "options_from_module": {k: {"value": given[k], "source": where[k]} for k in given},
        "key_renames": [list(r) for r in renames], "key_groups": dict(keys.groups), "unmatched_keys": [],
        "n_tensors": len(sd), "n_parameters": int(sum(p.numel() for p in own.parameters())),
        "weights": weights,
        "equivalence": {"reference": "the given model (eval mode)", "candidate": "the rebuilt model with gate "
                        "tracking enabled", "tolerance": TOLERANCE, "probe": _probe_description(probe),
                        "modes": modes, "batching": chosen, "max_abs_diff": modes[chosen]["max_abs_diff"],
                        "passed": True},
        "gates": {"gating_type": gating, "kinds": list(kinds), "layers": layer_gates,
                  "per_sample_shape": _per_sample_shape(gating)},
        "gate_ranges": {k: r.as_dict() for k, r in fusion_gate_ranges(own_fusion).items()},
        "gate_tracking": "enabled" if enable_tracking else "off",
        "seconds": round(time.time() - t0, 3),
    }
    report["summary"] = _summary_line(report) + (
        f"; fusion variant {variant}" + (" (told by outputs)" if variant_source.startswith("outputs") else "")
        if variant else "")
    if enable_tracking:
        own_fusion.enable_gate_tracking()
    return (own, opt, report) if return_details else own


# ------------------------------------------------------------------------------------------------
# Compatibility check (test_legacy_model.py)
# ------------------------------------------------------------------------------------------------

_ARCH_REPORTED = ("hidden_dim", "enc_layers", "dec_layers", "nheads", "dim_feedforward", "num_queries",
                  "v_feat_dim", "t_feat_dim", "a_feat_dim", "use_avigate_custom", "use_avigate", "gating_type",
                  "fusion_layers", "fusion_n_heads", "eval_path", "v_feat_dirs", "t_feat_dir", "a_feat_dir")


def _jsonable(value):
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


def _real_batch(model, opt, model_path, data, batch_size):
    """One real batch through the tracked model; outputs compared with tracking off."""
    from qd_detr.dataset import collate, model_kwargs, move_to_device, read_jsonl
    from qd_detr.inference import build_dataset, resolve_feature_dirs
    records = read_jsonl(data["data_path"])
    dirs = resolve_feature_dirs(opt, model_path, data.get("v_feat_dirs"), data.get("t_feat_dir"),
                                data.get("a_feat_dir"))
    dataset = build_dataset(opt, records[:batch_size], dirs)
    metas, inputs = collate([dataset[i] for i in range(len(dataset))])
    inputs = move_to_device(model_kwargs(inputs), next(model.parameters()).device)
    qids = [m["qid"] for m in metas]
    fusion = model.fusion
    with torch.no_grad():
        fusion.disable_gate_tracking()
        plain = model(**inputs)
        fusion.enable_gate_tracking()
        fusion.clear_gate_history()
        fusion.set_current_sample_id(qids)
        tracked = model(**inputs)
    history = dict(fusion.gate_history)
    fusion.clear_gate_history()
    cmp = _compare(plain, tracked, None, None)
    gates = {}
    for qid in qids:
        rec = history[qid]
        gates[str(qid)] = {f"layers.{l}.gate_{k}": {"shape": list(g.shape), "mean": round(float(g.mean()), 6),
                                                   "min": round(float(g.min()), 6), "max": round(float(g.max()), 6)}
                           for l in range(len(fusion.fusion_layers)) for k in fusion_gate_kinds(fusion)
                           for g in [rec.gates[(l, k)]]}
    finite = all(bool(torch.isfinite(t).all()) for t in _flatten(tracked).values())
    return {"data_path": os.path.abspath(data["data_path"]), "feature_dirs": dirs, "qids": qids,
            "video_clips": [int(n) for n in inputs["src_vid_mask"].sum(1).tolist()],
            "text_tokens": [int(n) for n in inputs["src_txt_mask"].sum(1).tolist()],
            "output_shapes": {k: _shape(v) for k, v in _flatten(tracked).items() if "aux_outputs" not in k},
            "outputs_finite": finite, "max_abs_diff_tracking_on_vs_off": cmp["max_abs_diff"],
            "passed": cmp["passed"] and finite, "gates": gates}


def check_compatibility(model_path, gating_type=None, trust_pickle=False, device="auto", data=None, batch_size=4,
                        options=None, reproduction=None):
    """Run every check on a checkpoint; returns ``(report, exit_code)`` (0 compatible, 1 incompatible,
    2 unreadable or bad input). ``data``: optional dict with ``data_path`` and feature folder overrides;
    ``options``: what a bare state dict cannot tell (``{"nheads": 8, "fusion_n_heads": 8}``);
    ``reproduction``: ``{"original_predictions": FILE or None}`` to re-run the original run's predictions
    (``gate_analysis.reproduction``; DIFFERS is incompatible)."""
    report = {"model_path": os.path.abspath(os.fspath(model_path)), "compatible": False, "status": None,
              "reason": None, "stage": "read"}

    def fail(exc, stage):
        code = exit_code_for(exc)
        report.update(status="incompatible" if code == 1 else "unreadable or bad input", reason=str(exc),
                      stage=stage)
        return report, code

    try:
        contents = inspect_checkpoint(model_path, trust_pickle=trust_pickle)
    except ToolkitError as exc:
        return fail(exc, "read")
    report["checkpoint"] = contents.summary()
    report["options"] = ({k: _jsonable(getattr(contents.opt, k, None)) for k in _ARCH_REPORTED}
                         if contents.opt is not None else None)
    report["keys"] = contents.keys.as_dict()
    report["layout"] = contents.keys.layout
    try:
        report["stage"] = "load"
        t0 = time.time()
        model, opt, load_report = _load_checked(contents, gating_type, device, trust_pickle, options)
        report.update(layout=load_report["layout"], layout_description=LAYOUT_DESCRIPTIONS.get(load_report["layout"]),
                      fusion_variant=load_report.get("fusion_variant"),
                      fusion_variant_source=load_report.get("fusion_variant_source"),
                      gate_options=load_report.get("gate_options"), gate_ranges=load_report.get("gate_ranges"),
                      gating_type=load_report["gating_type"], gating_type_source=load_report["gating_type_source"],
                      fusion_layers=load_report["fusion_layers"], fusion_n_heads=load_report["fusion_n_heads"],
                      key_match=load_report["keys"], n_parameters=load_report["n_parameters"],
                      device=load_report["device"])
        if model.fusion is None:
            raise _no_fusion_error(contents.path, model.layout)
        report["stage"] = "prove"
        adapter = _adapt_loaded(contents, model, opt, load_report, t0)
        report.update(weights=adapter["weights"], equivalence=adapter["equivalence"], gates=adapter["gates"],
                      summary=adapter["summary"])
        model.fusion.enable_gate_tracking()
        if data and data.get("data_path"):
            report["stage"] = "data"
            report["real_batch"] = _real_batch(model, opt, model_path, data, batch_size)
            if not report["real_batch"]["passed"]:
                raise EquivalenceError("the real batch's outputs differ with gate tracking on, or are not finite")
        if reproduction is not None:  # proof against the original run's own predictions
            from .reproduction import check_reproduction
            report["stage"] = "reproduce"
            report["reproduction"] = check_reproduction(model, opt, model_path, data, **reproduction)
            if report["reproduction"]["status"] == "differs":
                raise EquivalenceError(report["reproduction"]["message"])
    except ToolkitError as exc:
        return fail(exc, report["stage"])
    report.update(compatible=True, status="compatible", stage="done")
    return report, 0


def _fmt_diff(value):
    return value if isinstance(value, str) else f"{value:.3g}"


def format_report(report):
    """The human-readable compatibility report (lines)."""
    lines = [f"Compatibility report for {report['model_path']}"]
    ck = report.get("checkpoint")
    if ck:
        lines.append(f"  format       {ck['format']} ({ck['size_bytes'] / 1e6:.1f} MB), entries "
                     f"{', '.join(ck['entries'] or []) or '-'}, epoch {ck['epoch']}")
        lines.append(f"  options      {ck['options_source'] or 'none stored (bare weights)'}")
        lines.append(f"  layout       {report.get('layout')}: {LAYOUT_DESCRIPTIONS.get(report.get('layout'), '')}")
        keys = report["keys"]
        groups = ", ".join(f"{g} {n}" for g, n in keys["groups"].items())
        lines.append(f"  keys         {ck['n_tensors']} tensors; {groups}; unmatched {len(keys['unmatched'])}; "
                     f"renames {ck['key_renames'] or 'none'}")
    if "key_match" in report:
        km = report["key_match"]
        lines.append(f"  strict load  {km['matched']} matched, {km['missing']} missing, {km['unexpected']} unexpected, "
                     f"{km['mis_shaped']} mis-shaped; {report['n_parameters']:,} parameters")
    if report.get("gating_type"):
        lines.append(f"  gating       {report['gating_type']} (from {report['gating_type_source']}); "
                     f"{report['fusion_layers']} fusion layers, {report['fusion_n_heads']} heads")
    if report.get("fusion_variant"):
        opts = "; ".join(f"{k} {v['value']} ({v['source']})" for k, v in (report.get("gate_options") or {}).items())
        lines.append(f"  variant      {report['fusion_variant']}: {FUSION_VARIANTS[report['fusion_variant']]}; "
                     f"told by {report['fusion_variant_source']}" + (f"; not in the weights: {opts}" if opts else ""))
    for name, rng in (report.get("gate_ranges") or {}).items():
        if name.startswith("layers.0."):
            lines.append(f"  range        {name}: {rng['formula']}; {rng['meaning']}")
    if "weights" in report:
        w = report["weights"]
        lines.append(f"  weights      {w['identical']}/{w['compared']} tensors identical to the checkpoint "
                     "(torch.equal)")
    if "equivalence" in report:
        eq = report["equivalence"]
        p = eq["probe"]
        modes = ", ".join(f"{m} {_fmt_diff(r['max_abs_diff'])}" for m, r in eq["modes"].items())
        lines.append(f"  probe        {p['batch_size']} samples, clips {p['video_clips']}, text {p['text_tokens']}: "
                     f"max abs diff tracked vs untracked: {modes} (tolerance {eq['tolerance']:g})")
    if "gates" in report:
        for g in report["gates"]["layers"]:
            lines.append(f"  gates        layer {g['layer']} {g['kind']}: module output {g['module_output_shape']}, "
                         f"recorded {g['recorded_shapes']}")
    rb = report.get("real_batch")
    if rb:
        lines.append(f"  real batch   qids {rb['qids']}, clips {rb['video_clips']}: outputs finite "
                     f"{rb['outputs_finite']}, max abs diff tracking on vs off "
                     f"{_fmt_diff(rb['max_abs_diff_tracking_on_vs_off'])}")
        first = rb["gates"][str(rb["qids"][0])]
        lines.append("  real gates   qid " + str(rb["qids"][0]) + ": "
                     + "; ".join(f"{k} {v['shape']} mean {v['mean']:+.4f}" for k, v in first.items()))
    if report.get("reproduction"):
        from .reproduction import format_reproduction
        lines += format_reproduction(report["reproduction"])
    if report["compatible"]:
        lines.append("COMPATIBLE: gates can be analysed, e.g. python run_gate_analysis.py --legacy_model "
                     f"--model_path {shlex.quote(report['model_path'])} --data_path ... --output_dir ...")
    elif report["status"] == "incompatible":
        lines.append(f"INCOMPATIBLE (at stage {report['stage']}): {report['reason']}")
    else:
        lines.append(f"NOT CHECKED ({report['status']}, at stage {report['stage']}): {report['reason']}")
    return lines


# ------------------------------------------------------------------------------------------------
# Interactive guide (legacy_model_guide.py)
# ------------------------------------------------------------------------------------------------

class _Asker:
    """Questions with defaults, validated at once; bad answers are asked again (interactive) or fatal."""

    def __init__(self, interactive, read=input, write=print, echo=False):
        self.interactive, self.read, self.write, self.echo = interactive, read, write, echo
        self.steps = 0

    def step(self, title):
        self.steps += 1
        self.write(f"Step {self.steps}: {title}")

    def ask(self, question, parse, default=None, given=None, flag=None, hint=None, show_default=True):
        if given is not None:
            try:
                return parse(given)
            except (ValueError, ToolkitError) as exc:
                if not self.interactive:
                    if isinstance(exc, ToolkitError):
                        raise
                    raise ConfigError(f"{flag} {given}: {exc}") from None
                self.write(f"  {flag} {given!r} cannot be used: {exc}")
        if not self.interactive:
            if default is None:
                raise ConfigError(f"{flag} is required with --non-interactive")
            try:
                return parse(default)
            except ValueError as exc:
                raise ConfigError(f"{flag} (default {default!r}): {exc}") from None
        if hint:
            self.step(hint)
        while True:
            shown = f" [{default}]" if show_default and default not in (None, "") else ""
            text = self.read(f"{question}{shown}: ").strip()
            if self.echo:  # answers piped on stdin: keep the transcript readable
                self.write(text)
            if not text:
                if default is None:
                    self.write("  an answer is needed here")
                    continue
                text = default
            try:
                return parse(text)
            except (ValueError, ToolkitError) as exc:
                self.write(f"  {exc}; please try again")

    def yes_no(self, question, default=False, given=None):
        if given is not None:
            return bool(given)
        if not self.interactive:
            return default

        def parse(text):
            t = text.strip().lower()
            if t in ("y", "yes"):
                return True
            if t in ("n", "no"):
                return False
            raise ValueError("answer y or n")
        return self.ask(question + (" [Y/n]" if default else " [y/N]"), parse, default="y" if default else "n",
                        show_default=False)


def _saved_path(path, ckpt_path):
    """A path saved in the checkpoint's options (relative to the training repo's root), found from the
    current folder, the checkpoint's folder or one of its two parents (results/<run>/ -> the repo root)."""
    if not path:
        return None
    ckpt_dir = os.path.dirname(os.path.abspath(ckpt_path))
    for base in ("", ckpt_dir, os.path.dirname(ckpt_dir), os.path.dirname(os.path.dirname(ckpt_dir))):
        cand = os.path.normpath(os.path.join(base, path)) if base else path
        if os.path.exists(cand):
            return cand
    return None


def _existing_dir(text, must_hold=None, what="folder"):
    path = os.path.expanduser(text)
    if not os.path.isdir(path):
        raise ValueError(f"{path}: {what} not found")
    if must_hold and not os.path.isfile(os.path.join(path, must_hold)):
        raise ValueError(f"{path}: has no {must_hold} (the {what} of the first query)")
    return path


def _guide_checkpoint(asker, args, state):
    def parse(text):
        path = os.path.expanduser(text)
        try:
            contents = inspect_checkpoint(path, trust_pickle=state["trust"])
        except CheckpointError as exc:
            if "--trust_checkpoint" in str(exc) and asker.interactive and not state["trust"] \
                    and not isinstance(exc, IncompatibleModelError):
                asker.write(f"  {exc}")
                if asker.yes_no("  Load it with full unpickling (only for a file you trust)?"):
                    state["trust"] = True
                    return parse(text)
            raise
        if contents.keys.layout not in ("custom", "avigate"):
            raise _no_fusion_error(path, contents.keys.layout)
        stated, source = contents.stated_gating_type()
        if stated is not None and args.gating_type not in (None, stated):
            raise ConfigError(f"{path}: --gating_type {args.gating_type} conflicts with the checkpoint's gating_type "
                              f"{stated} ({source})")
        return path, contents
    return asker.ask("Checkpoint file", parse, given=args.model_path, flag="--model_path",
                     hint="the trained checkpoint (model_best.ckpt / model_latest.ckpt of a training run)")


def _records_parse(text):
    from qd_detr.dataset import read_jsonl
    path = os.path.expanduser(text)
    records = read_jsonl(path)
    if not records:
        raise ValueError(f"{path}: no queries in this file")
    return path, records


def _guide_data(asker, args, contents):
    opt = contents.opt
    saved = _saved_path(getattr(opt, "eval_path", None), contents.path) if opt is not None else None
    data_path, records = asker.ask("Annotation file (JSONL)", _records_parse, default=saved, given=args.data_path,
                                   flag="--data_path", hint="the queries to analyse (QVHighlights-style JSONL)")
    asker.write(f"  {len(records)} queries")
    first = records[0]
    audio = contents.keys.layout in ("custom", "avigate")
    hint = "feature folders (defaults: the ones saved in the checkpoint)"
    while True:
        sv = [_saved_path(d, contents.path) for d in (getattr(opt, "v_feat_dirs", None) or [])] if opt else []
        v_default = shlex.join(sv) if sv and all(sv) else None
        v_dirs = asker.ask("Video feature folders (space-separated, training order)", _video_dirs_parser(first),
                           default=v_default, given=shlex.join(args.v_feat_dirs) if args.v_feat_dirs else None,
                           flag="--v_feat_dirs", hint=hint)
        hint = None
        t_dir = asker.ask("Text feature folder",
                          lambda t: _existing_dir(t, f"qid{first['qid']}.npz", "text feature folder"),
                          default=_saved_path(getattr(opt, "t_feat_dir", None), contents.path) if opt else None,
                          given=args.t_feat_dir, flag="--t_feat_dir")
        a_dir = None
        if audio:
            a_dir = asker.ask("Audio feature folder",
                              lambda t: _existing_dir(t, f"{first['vid']}.npy", "audio feature folder"),
                              default=_saved_path(getattr(opt, "a_feat_dir", None), contents.path) if opt else None,
                              given=args.a_feat_dir, flag="--a_feat_dir")
        dirs = {"v_feat_dirs": v_dirs, "t_feat_dir": t_dir, "a_feat_dir": a_dir}
        if opt is None:
            return data_path, records, dirs
        try:
            from qd_detr.inference import build_dataset
            build_dataset(opt, records[:1], dirs)[0]
            return data_path, records, dirs
        except DataError as exc:
            if not asker.interactive:
                raise
            asker.write(f"  these folders do not fit the model: {exc}")
            args.v_feat_dirs = args.t_feat_dir = args.a_feat_dir = None


def _video_dirs_parser(first):
    def parse(text):
        dirs = [_existing_dir(d, f"{first['vid']}.npz", "video feature folder") for d in shlex.split(text)]
        if not dirs:
            raise ValueError("give at least one folder")
        return dirs
    return parse


def _guide_gating(asker, args, contents):
    stated, source = contents.stated_gating_type()
    if stated is not None:
        asker.write(f"  gating type: {stated} (from {source})")
        return None

    def parse(text):
        if text not in ("global", "clipwise"):
            raise ValueError("answer global or clipwise")
        return text
    return asker.ask("Gating type (global or clipwise)", parse, given=args.gating_type, flag="--gating_type",
                     hint=f"gating type ({GATING_AMBIGUITY}); give the --gating_type the model was trained with")


def _guide_analysis(asker, args, contents, records):
    n = len(records)

    def parse_count(text):
        if text.lower() in ("", "all"):
            return None
        if not text.isdigit():
            raise ValueError(f"expected a positive number, got {text!r}")
        value = int(text)
        if not 1 <= value <= n:
            raise ValueError(f"expected a number between 1 and {n}")
        return value
    max_samples = asker.ask(f"How many queries to analyse (all = {n})", parse_count, default="all",
                            given=str(args.max_samples) if args.max_samples is not None else None,
                            flag="--max_samples", hint="what to analyse")
    compare = None
    if not args.no_plots:
        known = {r["qid"] for r in records[:max_samples or n]}

        def parse_qids(text):
            if text.lower() in ("", "none", "top"):
                return None
            try:
                qids = [int(t) for t in text.replace(",", " ").split()]
            except ValueError:
                raise ValueError("give qids as whole numbers separated by spaces") from None
            bad = [q for q in qids if q not in known]
            if bad:
                raise ValueError(f"qid(s) {bad} are not among the analysed queries")
            return qids
        compare = asker.ask("Queries (qids) to compare in a plot (none = the top and bottom queries)", parse_qids,
                            default="none",
                            given=" ".join(map(str, args.compare_samples)) if args.compare_samples else None,
                            flag="--compare_samples")
    stem = os.path.splitext(os.path.basename(contents.path))[0]
    default_out = os.path.join("gate_analysis_results", f"{stem}_{datetime.datetime.now():%Y%m%d_%H%M%S}")
    state = {"overwrite": bool(args.overwrite)}

    def parse_out(text):
        path = os.path.expanduser(text)
        if os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f"{path}: exists and is not a folder")
        parent = os.path.dirname(os.path.abspath(path))
        while not os.path.isdir(parent):
            parent = os.path.dirname(parent)
        if not os.access(parent, os.W_OK):
            raise ValueError(f"{parent}: not writable")
        if os.path.isdir(path) and not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"{path}: output folder is not writable")
        if os.path.isdir(path) and os.listdir(path) and not state["overwrite"]:
            if not asker.interactive:
                raise ValueError("folder exists and is not empty; pass --overwrite to replace its results")
            if not asker.yes_no(f"  {path} is not empty. Replace its results?"):
                raise ValueError("choose another output folder")
            state["overwrite"] = True
        return path
    out = asker.ask("Output folder", parse_out, default=default_out, given=args.output_dir, flag="--output_dir")
    return max_samples, compare, out, state["overwrite"]


def _analysis_arguments(answers, args):
    a = ["--model_path", answers["model_path"], "--data_path", answers["data_path"],
         "--v_feat_dirs", *answers["dirs"]["v_feat_dirs"], "--t_feat_dir", answers["dirs"]["t_feat_dir"]]
    if answers["dirs"]["a_feat_dir"]:
        a += ["--a_feat_dir", answers["dirs"]["a_feat_dir"]]
    a += ["--output_dir", answers["output_dir"], "--legacy_model"]
    if answers["gating_type"]:
        a += ["--gating_type", answers["gating_type"]]
    if answers["max_samples"]:
        a += ["--max_samples", str(answers["max_samples"])]
    if answers["compare"]:
        a += ["--compare_samples", *map(str, answers["compare"])]
    if answers["overwrite"]:
        a.append("--overwrite")
    if answers["trust"]:
        a.append("--trust_checkpoint")
    for flag, value, default in (("--device", args.device, "auto"), ("--batching", args.batching, "query"),
                                 ("--batch_size", args.batch_size, None), ("--top_n", args.top_n, 10)):
        if value is not None and value != default:
            a += [flag, str(value)]
    for flag in ("no_plots", "skip_missing", "quiet"):
        if getattr(args, flag, False):
            a.append("--" + flag)
    return a


def _display_command(script, arguments):
    rel = os.path.relpath(script)
    shown = rel if not rel.startswith("..") else script
    return shlex.join(["python", shown, *arguments])


def _run_subprocess(cmd, out_dir, write):
    """Run the analysis; on failure or Ctrl-C remove an output folder that this run created."""
    created = not os.path.exists(out_dir)
    proc = subprocess.Popen(cmd)
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        # from a terminal the child got the same SIGINT; otherwise pass it on
        for action, timeout in ((None, 5), (lambda: proc.send_signal(signal.SIGINT), 30), (proc.kill, None)):
            if action is not None:
                action()
            try:
                proc.wait(timeout=timeout)
                break
            except subprocess.TimeoutExpired:
                continue
        code = 130
    if code != 0 and created and os.path.isdir(out_dir):
        shutil.rmtree(out_dir, ignore_errors=True)
        write(f"  removed the incomplete output folder {out_dir}")
    elif code != 0 and os.path.isdir(out_dir):
        write(f"  {out_dir} holds an incomplete run (its run.json says status 'running')")
    return code


def run_guide(args, script, read=input, write=print):
    """The guide's steps; ``args`` carries the run_gate_analysis.py flags given on the command line.

    Returns the exit code. EOFError and KeyboardInterrupt propagate to the caller (the script).
    """
    try:
        echo = read is input and not args.non_interactive and not sys.stdin.isatty()
    except (AttributeError, ValueError, OSError):
        echo = False
    asker = _Asker(not args.non_interactive, read=read, write=write, echo=echo)
    write("Gate analysis of a trained (legacy) QD-DETR + AVIGATE checkpoint: the guide asks for the checkpoint, "
          "the data and what to analyse, checks that the model loads unchanged, then runs the analysis.")
    state = {"trust": bool(args.trust_checkpoint)}
    model_path, contents = _guide_checkpoint(asker, args, state)
    summary = contents.summary()
    write(f"  {summary['format']}, epoch {summary['epoch']}, {summary['n_tensors']} tensors; layout "
          f"{contents.keys.layout}: {LAYOUT_DESCRIPTIONS[contents.keys.layout]}")
    data_path, records, dirs = _guide_data(asker, args, contents)
    gating = _guide_gating(asker, args, contents)
    max_samples, compare, out_dir, overwrite = _guide_analysis(asker, args, contents, records)
    answers = dict(model_path=model_path, data_path=data_path, dirs=dirs, gating_type=gating, output_dir=out_dir,
                   max_samples=max_samples, compare=compare, overwrite=overwrite, trust=state["trust"])
    arguments = _analysis_arguments(answers, args)
    command = _display_command(script, arguments)
    if args.no_run or not asker.yes_no("Run the compatibility check and the analysis now?", default=True):
        write("Nothing was run. The equivalent command:")
        write(command)
        return 0
    asker.step("compatibility check (loads the weights strictly, proves outputs unchanged with tracking on)")
    report, code = check_compatibility(model_path, gating_type=gating, trust_pickle=state["trust"],
                                       device=args.device or "auto",
                                       data={"data_path": data_path, **dirs}, batch_size=2)
    for line in format_report(report)[1:]:
        write(line)
    if code != 0:
        print(f"{'incompatible' if code == 1 else 'error'}: {report['reason']}", file=sys.stderr)
        write("The analysis was not run. After fixing the problem, the command would be:")
        write(command)
        return code
    asker.step("gate analysis (run_gate_analysis.py --legacy_model)")
    sys.stdout.flush()
    code = _run_subprocess([sys.executable, script, *arguments], out_dir, write)
    if code == 130:
        raise KeyboardInterrupt
    write("The analysis finished." if code == 0 else f"The analysis failed (exit code {code}).")
    write("Equivalent non-interactive command:")
    write(command)
    return code
