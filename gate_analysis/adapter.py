"""The in-memory adapter: rebuild a trained model object as this project's trackable equivalent, and prove it.

``adapt_legacy_model`` reads what the user's module states (``module_attributes``), runs it on the
ragged probe, resolves its gating type and fusion variant (``variant_readings``), builds our module
from its state dict with every weight loaded strictly (``build_own``) and proves that our module with
gate tracking reproduces the user's outputs and fused features (``gate_analysis.equivalence``).
The user's model is left unchanged.
"""
import argparse
import time

import torch

from qd_detr.avigate import AVIGATEFusion
from qd_detr.avigate_custom import AVIGATEFusionCustom
from qd_detr.checkpoint import strict_load
from qd_detr.config import FUSION_VARIANTS, SSM_OPTIONS, V2_OPTIONS, fusion_variant, gate_options
from qd_detr.errors import CheckpointError, ConfigError, IncompatibleModelError, NoFusionError
from qd_detr.gates import fusion_gate_kinds, fusion_gate_ranges
from qd_detr.keys import (
    FUSION_SCOPE_PREFIX,
    LAYOUT_DESCRIPTIONS,
    classify_keys,
    describe_state_dict,
    normalize_state_dict,
    unknown_keys_text,
)
from qd_detr.model import BATCHING_MODES, build_model
from qd_detr.weight_options import infer_options

from .equivalence import (
    PROBE_IDS,
    PROBE_LENGTHS,
    TOLERANCE,
    EquivalenceError,
    OutputCatcher,
    check_gate_records,
    compare_outputs,
    describe_probe,
    make_probe_batch,
    per_sample_shape,
    probe_dims,
    proof_summary,
    tracked_run,
    verify_weights,
)
from .module_attributes import child_module, describe_object, module_options
from .variant_readings import READINGS, resolve_gating, variant_outcome, variant_readings

__all__ = ["adapt_legacy_model", "build_own", "run_user", "prove_own", "set_batching"]


def set_batching(module, mode):
    """Our model's ``set_batching``, or for a bare fusion module the ``batch_invariant`` flag of its blocks."""
    if hasattr(module, "set_batching"):
        module.set_batching(mode)
    else:
        for m in module.modules():
            if hasattr(m, "batch_invariant"):
                m.batch_invariant = mode == "query"


def run_user(user, kind, fusion, probe):
    """The user's model on the probe: (outputs, fused features, first gating output)."""
    gating = child_module(fusion.fusion_layers[0], "gating_function")
    with torch.no_grad(), OutputCatcher([fusion] + ([gating] if gating is not None else [])) as caught:
        out = user(**probe) if kind == "model" else \
            user(probe["src_vid"], probe["src_aud"], video_mask=probe["src_vid_mask"], audio_mask=probe["src_aud_mask"])
    fused = caught.outputs.get(0)
    if isinstance(fused, (tuple, list)):
        fused = fused[0]
    gate = caught.outputs.get(1)
    if isinstance(gate, (tuple, list)):
        gate = gate[0]
    return out, fused, gate


def build_own(kind, layout, sd, opt_given, gating_type, label):
    """Our equivalent (model or fusion module) from the mapped state dict, strictly loaded.

    The custom fusion's variant and gate options come from ``opt_given`` as in a checkpoint's options
    (``qd_detr.config.fusion_variant`` / ``gate_options``: v2 or ``ssm_*`` options).
    """
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


def prove_own(own, kind, probe, ref_out, ref_fused):
    """Our module with tracking vs the user's outputs, per batching mode: ({mode: comparison}, {mode: gates})."""
    own_fusion = own.fusion if kind == "model" else own
    modes, gates = {}, {}
    for mode in BATCHING_MODES:
        set_batching(own, mode)

        def run(f):
            with torch.no_grad(), OutputCatcher([own_fusion]) as caught:
                f.set_current_sample_id(list(PROBE_IDS))
                out = own(**probe) if kind == "model" else own(
                    probe["src_vid"], probe["src_aud"], video_mask=probe["src_vid_mask"],
                    audio_mask=probe["src_aud_mask"])
            return out, caught.outputs.get(0)

        (out, fused), own_history, raw = tracked_run(own, probe, run)
        required = ("pred_logits", "pred_spans", "saliency_scores") if kind == "model" else ()
        modes[mode] = compare_outputs(ref_out, out, ref_fused, fused, required=required)
        gates[mode] = (own_history, raw)
    return modes, gates


def diffs_text(modes):
    """Each batching mode's worst difference, for an error message."""
    return ", ".join(f"{m} batching {modes[m]['max_abs_diff']}" for m in BATCHING_MODES)


def _mapped_state_dict(user, kind, label):
    """(state dict with model-level keys, renames applied, key classification) of a module with a fusion."""
    raw_sd = {k: v.detach() for k, v in user.state_dict().items()}
    scoped = {FUSION_SCOPE_PREFIX + k: v for k, v in raw_sd.items()} if kind == "fusion" else raw_sd
    try:
        sd, renames = normalize_state_dict(scoped)
        describe_state_dict(sd)
    except CheckpointError as exc:
        raise IncompatibleModelError(f"{label}: {exc}") from None
    keys = classify_keys(sd, label)
    if keys.unmatched:
        raise IncompatibleModelError(f"{label}: {unknown_keys_text(keys, len(sd))}")
    if keys.layout not in ("custom", "avigate"):
        raise NoFusionError(f"{label}: the model has no fusion module, so no gates to analyse")
    return sd, renames, keys


def _user_probe_dims(kind, layout, sd, given, label):
    """Feature dimensions of the probe for the user's model (or bare fusion module, which takes no text)."""
    if kind == "model":
        placeholders = {"gating_type": "global", "fusion_n_heads": 8, "nheads": 8}  # dims only
        return probe_dims(infer_options(sd, describe_state_dict(sd), {**placeholders, **given}, label))
    hidden = int(sd["fusion.fusion_layers.0.norm1.weight"].shape[0])
    raw = layout == "avigate"  # the older layout projects raw features itself
    return dict(v_feat_dim=sd["fusion.video_proj.weight"].shape[1] if raw else hidden, t_feat_dim=1,
                a_feat_dim=sd["fusion.audio_proj.weight"].shape[1] if raw else hidden)


def _prove_readings(readings, kind, layout, sd, gating, label, device, probe, reference, order):
    """Build and prove each reading until one reproduces ``reference`` (outputs, fused features).

    Returns (tried readings, own module, its options, per-mode comparisons, per-mode gates, the batching
    mode kept or None when no reading reproduces the user's model).
    """
    tried = []
    for variant, reading_given in readings:
        try:
            own, opt = build_own(kind, layout, sd, reading_given, gating, label)
        except CheckpointError as exc:
            raise IncompatibleModelError(str(exc)) from None
        own.to(device).eval()
        modes, gates = prove_own(own, kind, probe, *reference)
        chosen = next((m for m in order if modes[m]["passed"]), None)
        best = modes[chosen] if chosen else min(modes.values(), key=lambda m: (isinstance(m["max_abs_diff"], str),
                                                                               m["max_abs_diff"]))
        tried.append({"variant": variant, "reading": READINGS.get(variant, variant), "passed": chosen is not None,
                      "max_abs_diff": best["max_abs_diff"], "batching": chosen})
        if chosen is not None:
            break
    return tried, own, opt, modes, gates, chosen


def _not_reproduced(label, tried, modes):
    if len(tried) > 1:
        return EquivalenceError(
            f"{label}: the rebuilt model does not reproduce the given model under either reading of its plain "
            f"global gating (both tried: " + "; ".join(f"{t['reading']}: max abs diff {t['max_abs_diff']}"
                                                       for t in tried)
            + f"; tolerance {TOLERANCE:g}); its forward pass differs from the known layouts")
    return EquivalenceError(
        f"{label}: the rebuilt model does not reproduce the given model (max abs diff {diffs_text(modes)}"
        f"; tolerance {TOLERANCE:g}); its forward pass differs from the known layouts")


def _recorded_gates(own_fusion, history, raw, gating, label):
    """The gate records of the kept mode, checked; every gate kind the fusion applies must be recorded."""
    n_layers = len(own_fusion.fusion_layers)
    layer_gates = check_gate_records(history, PROBE_IDS, PROBE_LENGTHS, gating, n_layers,
                                     int(own_fusion.fusion_layers[0].norm1.weight.shape[0]), raw)
    kinds = fusion_gate_kinds(own_fusion)
    recorded = {(g["layer"], g["kind"]) for g in layer_gates}
    missing = [f"layer {i} {k}" for i in range(n_layers) for k in kinds if (i, k) not in recorded]
    if missing:
        raise IncompatibleModelError(f"{label}: gate tracking recorded no {', '.join(missing)} gate on the probe "
                                     f"(the fusion applies {', '.join(kinds)})")
    return layer_gates, kinds


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
    t0 = time.time()
    user, kind, fusion, attr, wrapper = describe_object(model)
    label = f"in-memory {type(user).__name__}"
    if fusion is None:
        raise NoFusionError(f"{label}: the model has no fusion module, so no gates to analyse")
    sd, renames, keys = _mapped_state_dict(user, kind, label)
    layout = keys.layout
    device = next(user.parameters()).device
    flags = {m: m.training for m in user.modules()}
    had_history = isinstance(getattr(fusion, "gate_history", None), dict)
    user_history = dict(fusion.gate_history) if had_history else None
    declared_mode = getattr(user, "batching", None)
    order = [declared_mode] if declared_mode in BATCHING_MODES else []
    order += [m for m in ("original", "query") if m not in order]
    user.eval()
    try:
        given, where = module_options(user, fusion, layout, sd, options)
        probe = make_probe_batch(**_user_probe_dims(kind, layout, sd, given, label), device=device)
        ref_out, ref_fused, gate = run_user(user, kind, fusion, probe)
        gating, gating_source = resolve_gating(layout, fusion, sd, gating_type, gate)
        readings, variant_source, declared = variant_readings(layout, fusion, sd, gating, given)
        tried, own, opt, modes, gates, chosen = _prove_readings(readings, kind, layout, sd, gating, label, device,
                                                                probe, (ref_out, ref_fused), order)
    finally:
        for m, flag in flags.items():
            m.train(flag)
        if had_history:  # a tracked user fusion must not keep the probe's records
            fusion.gate_history = user_history
    if chosen is None:
        raise _not_reproduced(label, tried, modes)
    variant, variant_source = variant_outcome(tried, variant_source, declared, label) if layout == "custom" else \
        (None, None)
    set_batching(own, chosen)
    own_fusion = own.fusion if kind == "model" else own
    weights = verify_weights(own, sd if kind == "model" else
                             {k[len(FUSION_SCOPE_PREFIX):]: v for k, v in sd.items()}, label)
    layer_gates, kinds = _recorded_gates(own_fusion, *gates[chosen], gating, label)
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
                        "tracking enabled", "tolerance": TOLERANCE, "probe": describe_probe(probe),
                        "modes": modes, "batching": chosen, "max_abs_diff": modes[chosen]["max_abs_diff"],
                        "passed": True},
        "gates": {"gating_type": gating, "kinds": list(kinds), "layers": layer_gates,
                  "per_sample_shape": per_sample_shape(gating)},
        "gate_ranges": {k: r.as_dict() for k, r in fusion_gate_ranges(own_fusion).items()},
        "gate_tracking": "enabled" if enable_tracking else "off",
        "seconds": round(time.time() - t0, 3),
    }
    report["summary"] = proof_summary(report) + (
        f"; fusion variant {variant}" + (" (told by outputs)" if variant_source.startswith("outputs") else "")
        if variant else "")
    if enable_tracking:
        own_fusion.enable_gate_tracking()
    return (own, opt, report) if return_details else own
