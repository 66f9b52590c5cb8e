"""How an in-memory model gates: its gating type and fusion variant, from every piece of evidence.

Evidence: the ``gating_type`` argument, the module's attributes, its weights and what its gating
function returned on the probe; they must agree. Plain ``global`` gating of the v1 (tanh MHA gate)
and diagstrip (sigmoid) branches cannot be told apart from keys, shapes or attributes, so both
readings are proved and the outputs decide (``variant_readings``, ``variant_outcome``).
"""
from qd_detr.config import FUSION_VARIANTS, GATING_TYPES, SSM_OPTIONS
from qd_detr.errors import ConfigError, IncompatibleModelError
from qd_detr.keys import FUSION_SCOPE_PREFIX, GATING_AMBIGUITY, describe_state_dict

from .module_attributes import child_module

__all__ = ["declared_gating", "observed_gating", "resolve_gating", "READINGS", "declared_variant",
           "variant_readings", "variant_outcome"]


def declared_gating(fusion):
    """(gating type, source) a ``gating_type`` attribute of the fusion or its first gating function states."""
    for obj in (fusion, child_module(child_module(fusion, "fusion_layers")[0], "gating_function")):
        value = getattr(obj, "gating_type", None) if obj is not None else None
        if isinstance(value, str):
            return value, f"{type(obj).__name__}.gating_type"
    return None, None


def observed_gating(gate, n_out):
    """Gating type from what the module's gating function returned on the probe."""
    if n_out > 1:
        return "elementwise"
    if gate.dim() == 2 or gate.shape[1] == 1:
        return "global"
    # the gate_analysis branch returns global gates expanded to (B, L, hidden)
    flat = gate.reshape(gate.shape[0], -1)
    return "global" if bool((flat == flat[:, :1]).all()) else "clipwise"


def resolve_gating(layout, fusion, sd, gating_type, observed_gate):
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
    observed = observed_gating(observed_gate, n_out) if observed_gate is not None else None
    if ssm and observed == "global":
        observed = "global_diagstrip_ssm"
    declared, where = declared_gating(fusion)
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


# the readings of a custom fusion, in words
READINGS = {"v1": "v1 (tanh MHA gate)", "diagstrip": "diagstrip (sigmoid MHA gate)", "v2": "v2 (gate refinement)"}


def declared_variant(fusion, given):
    """(variant, source) the module's ``variant`` attribute (our own modules) or given ``ssm_*`` options state."""
    block = fusion.fusion_layers[0]
    for obj in (fusion, block, child_module(block, "gating_function")):
        value = getattr(obj, "variant", None) if obj is not None else None
        if isinstance(value, str) and value in FUSION_VARIANTS:
            return value, f"{type(obj).__name__}.variant"
    if any(k in given for k in SSM_OPTIONS):
        return "diagstrip", "ssm_* options"
    return None, None


def variant_readings(layout, fusion, sd, gating, given):
    """The readings to prove: ([(variant, options for ``build_own``)], source or None when outputs decide,
    (declared variant, its source)).

    The weights tell v2 (``mha_bias``/``mha_scale``/``ffn_alpha``) and the diagstrip SSM gate. Plain
    ``global`` gating of v1 (tanh MHA gate) and of diagstrip (sigmoid) have the same keys, shapes and
    attributes: both are tried, v1 first, and the outputs decide. Clipwise and elementwise gating
    compute alike in both, so one reading is proved.
    """
    if layout != "custom":
        return [(None, given)], None, (None, None)
    from_weights = describe_state_dict(sd)["variant_from_weights"]
    declared = declared_variant(fusion, given)
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


def variant_outcome(tried, source, declared, label):
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
