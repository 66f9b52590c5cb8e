"""The equivalence proof: a rebuilt, tracked model computes exactly what the source computed.

- weights: every tensor of the rebuilt model ``torch.equal``s the source tensor under its mapped key
  (``verify_weights``);
- outputs: on a deterministic probe batch with ragged video and text lengths (so padding is
  exercised), all model outputs and the fused video features of the *tracked* model equal the
  reference (``compare_outputs``); a difference above ``TOLERANCE`` fails. For a checkpoint the
  reference is the same weights run with no hook attached, in both batching modes
  (``prove_checkpoint``); the in-memory adapter compares with the user's model itself;
- gate records: tracking recorded one gate per probe sample, layer and kind, of the shape the gating
  type implies, all finite (``check_gate_records``).
"""
import math
import time

import torch

from qd_detr.config import fusion_layout
from qd_detr.errors import IncompatibleModelError
from qd_detr.keys import LAYOUT_DESCRIPTIONS
from qd_detr.model import BATCHING_MODES

__all__ = ["TOLERANCE", "PROBE_LENGTHS", "PROBE_TEXT_LENGTHS", "PROBE_SEED", "PROBE_IDS", "EquivalenceError",
           "make_probe_batch", "probe_dims", "describe_probe", "flatten_outputs", "max_abs_diff", "compare_outputs",
           "OutputCatcher", "hook_count", "tracked_run", "check_gate_records", "verify_weights",
           "per_sample_shape", "proof_summary", "prove_checkpoint_equivalence", "prove_checkpoint"]

TOLERANCE = 1e-6
PROBE_LENGTHS = (12, 7, 3)        # video clips per probe sample: one full, two padded
PROBE_TEXT_LENGTHS = (6, 4, 2)    # text tokens per probe sample
PROBE_SEED = 0
PROBE_IDS = ("probe_0", "probe_1", "probe_2")


class EquivalenceError(IncompatibleModelError):
    """The rebuilt, tracked model does not reproduce the original's outputs."""


# ------------------------------------------------------------------------------------------------
# Probe batch and comparisons
# ------------------------------------------------------------------------------------------------

def make_probe_batch(v_feat_dim, t_feat_dim, a_feat_dim=None, lengths=PROBE_LENGTHS,
                     text_lengths=PROBE_TEXT_LENGTHS, seed=PROBE_SEED, device="cpu"):
    """Deterministic model inputs with ragged lengths, laid out as the collate function does.

    Returns ``src_txt`` (B, max text length, t_feat_dim), ``src_vid`` (B, max clips, v_feat_dim),
    ``src_aud`` (B, max clips, a_feat_dim) when ``a_feat_dim``, and a float ``*_mask`` (B, length) per
    stream with 1 = valid. Feature rows are L2-normalised (audio non-negative, like PANN); padded rows
    are zero.
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


def probe_dims(opt):
    """``make_probe_batch``'s feature dimensions for a model built from ``opt`` (no audio for video_only)."""
    audio = fusion_layout(opt) != "video_only"
    return dict(v_feat_dim=opt.v_feat_dim, t_feat_dim=opt.t_feat_dim, a_feat_dim=opt.a_feat_dim if audio else None)


def describe_probe(probe):
    """The probe batch for a report: sizes, lengths, seed and input shapes."""
    return {"batch_size": len(PROBE_LENGTHS), "video_clips": list(PROBE_LENGTHS),
            "text_tokens": list(PROBE_TEXT_LENGTHS), "seed": PROBE_SEED,
            "padded_samples": sum(n < max(PROBE_LENGTHS) for n in PROBE_LENGTHS),
            "input_shapes": {k: list(v.shape) for k, v in probe.items()}}


def flatten_outputs(out, prefix=""):
    """Nested model outputs (dicts, lists, tensors) as ``{"a/b/0": tensor}``."""
    if torch.is_tensor(out):
        return {prefix or "output": out}
    items = {}
    if isinstance(out, dict):
        for k, v in out.items():
            items.update(flatten_outputs(v, f"{prefix}/{k}" if prefix else str(k)))
    elif isinstance(out, (list, tuple)):
        for i, v in enumerate(out):
            items.update(flatten_outputs(v, f"{prefix}/{i}" if prefix else str(i)))
    return items


def max_abs_diff(a, b):
    """Largest absolute difference in float64; inf when the shapes differ."""
    if tuple(a.shape) != tuple(b.shape):
        return math.inf
    if a.numel() == 0:
        return 0.0
    return float((a.detach().double() - b.detach().double()).abs().max())


def _num(x):
    return x if math.isfinite(x) else str(x)


def compare_outputs(reference, candidate, fused_ref, fused_got,
                    required=("pred_logits", "pred_spans", "saliency_scores")):
    """Every output both runs have (and the fused video features when given), within ``TOLERANCE``.

    Returns ``{"max_abs_diff", "passed", "diffs": {output: diff}, "not_compared": [outputs of one run]}``
    (non-finite diffs as strings); a missing ``required`` output is an IncompatibleModelError.
    """
    ref, got = flatten_outputs(reference), flatten_outputs(candidate)
    missing = [k for k in required if k not in ref or k not in got]
    if missing:
        raise IncompatibleModelError(f"model outputs lack {', '.join(missing)}; cannot compare outputs")
    diffs = {k: max_abs_diff(ref[k], got[k]) for k in ref if k in got}
    if fused_ref is not None:
        diffs["fused_video_features"] = max_abs_diff(fused_ref, fused_got)
    worst = max(diffs.values(), key=lambda d: (math.isnan(d), d))
    return {"max_abs_diff": _num(worst), "passed": bool(worst <= TOLERANCE),
            "diffs": {k: _num(v) for k, v in diffs.items()},
            "not_compared": sorted(set(ref) ^ set(got))}


def hook_count(module):
    """Forward, forward-pre and backward hooks on ``module`` and its children."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in module.modules())


class OutputCatcher:
    """Temporary forward hooks keeping the last output of some modules (``outputs[i]``; removed on exit)."""

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


def tracked_run(model, probe, run):
    """Run ``run(fusion)`` with the fusion's gate tracking on; returns (result, gate history, raw gate outputs).

    ``model``: a QD-DETR model (its ``.fusion`` is tracked) or a fusion module. Raw gate outputs: per
    layer, what its gating function returned. Tracking is off and the history empty afterwards.
    """
    fusion = model.fusion if hasattr(model, "encode_video") else model
    fusion.enable_gate_tracking()
    fusion.clear_gate_history()
    try:
        with OutputCatcher([block.gating_function for block in fusion.fusion_layers]) as raw:
            result = run(fusion)
        return result, dict(fusion.gate_history), raw.outputs
    finally:
        fusion.disable_gate_tracking()
        fusion.clear_gate_history()


def check_gate_records(history, ids, lengths, gating_type, num_layers, hidden, raw_outputs):
    """Per layer and kind: module output shape and recorded per-sample shapes; raise when inconsistent.

    A recorded gate is (1,) for global gating, (n,) clipwise, (n, hidden) elementwise for a sample of
    n valid clips. Returns ``[{"layer", "kind", "module_output_shape", "recorded_shapes"}]``.
    """
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
                           "module_output_shape": (list(raw[k].shape) if raw is not None and k < len(raw) else
                                                   "FiLM shift, computed in the block"),
                           "recorded_shapes": shapes})
    return layers


def verify_weights(model, state_dict, label):
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


def per_sample_shape(gating_type):
    """The shape of one sample's recorded gate, in words."""
    return {"global": "(1,) one gate per query", "global_diagstrip_ssm": "(1,) one gate per query",
            "clipwise": "(T,) one gate per valid clip",
            "elementwise": "(T, hidden) one gate per valid clip and feature"}[gating_type]


def proof_summary(adapter):
    """One line of an adapter report: layout, gating, weights and the probe's worst difference."""
    eq = adapter["equivalence"]
    return (f"legacy adapter: {adapter['layout']} layout, {adapter['gating_type']} gating "
            f"({adapter['gating_type_source']}); {adapter['weights']['identical']}/{adapter['weights']['compared']} "
            f"tensors identical to the source; outputs and fused features with tracking equal the reference "
            f"(max abs diff {eq['max_abs_diff']:.3g} <= {TOLERANCE:g}) on a {eq['probe']['batch_size']}-sample "
            f"ragged probe")


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------

def _encode(model, probe):
    return model.encode_video(probe["src_vid"], probe["src_vid_mask"], probe.get("src_aud"), probe.get("src_aud_mask"))


def prove_checkpoint_equivalence(model, opt):
    """Outputs and fused features with tracking on vs the same weights with no hook, in both batching modes.

    Returns (equivalence dict, gate records of the model's own batching mode).
    """
    probe = make_probe_batch(**probe_dims(opt), device=next(model.parameters()).device)
    fusion = model.fusion
    initial = model.batching
    modes, gates = {}, None
    try:
        for mode in BATCHING_MODES:
            model.set_batching(mode)
            hooks = hook_count(model)
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

            (out, fused), history, raw = tracked_run(model, probe, run)
            modes[mode] = compare_outputs(ref_out, out, ref_fused, fused)
            if mode == initial:
                gates = check_gate_records(history, PROBE_IDS, PROBE_LENGTHS, fusion.gating_type,
                                           len(fusion.fusion_layers), model.hidden_dim, raw)
    finally:
        model.set_batching(initial)
    worst = max((m["max_abs_diff"] for m in modes.values()), key=lambda d: (isinstance(d, str), d))
    return {"reference": "the checkpoint's weights run with no hook attached",
            "candidate": "the same model with gate tracking enabled",
            "tolerance": TOLERANCE, "probe": describe_probe(probe), "modes": modes,
            "max_abs_diff": worst, "passed": all(m["passed"] for m in modes.values())}, gates


def prove_checkpoint(contents, model, opt, report, t0):
    """The proof for a model strictly loaded from ``contents`` (``qd_detr.checkpoint.CheckpointContents``).

    ``report``: ``load_checkpoint``'s; ``t0``: ``time.time()`` when loading began. Returns the report's
    ``legacy_adapter`` block; outputs that differ are an EquivalenceError.
    """
    weights = verify_weights(model, contents.state_dict, contents.path)
    equivalence, gates = prove_checkpoint_equivalence(model, opt)
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
                  "per_sample_shape": per_sample_shape(report["gating_type"])},
        "gate_tracking": "enabled on model.fusion",
        "seconds": round(time.time() - t0, 3),
    }
    adapter["summary"] = proof_summary(adapter)
    return adapter
