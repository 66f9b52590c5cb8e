"""State-dict keys: the declarative renames, the key table of every known layout, and what weights tell.

Keys are mapped by ``KEY_RENAMES`` (``module.``, ``avigate_fusion.``), plus ``FUSION_SCOPE_PREFIX`` for
the state dict of a bare fusion module; then every key must match a pattern of ``KEY_TABLE``, which
also tells the layout (``classify_keys``). ``describe_state_dict`` reads what the weight shapes tell
about the architecture (hidden size, layer counts, gating shape, fusion variant, SSM gate shapes).
Nothing is copied from one layer to another and no missing weight is filled in.
"""
import re
from dataclasses import dataclass

from .errors import CheckpointError, IncompatibleModelError

__all__ = ["KEY_RENAMES", "normalize_state_dict", "describe_state_dict", "UNSUPPORTED_MARKERS", "KEY_TABLE",
           "LAYOUTS", "LAYOUT_MARKERS", "LAYOUT_DESCRIPTIONS", "FUSION_SCOPE_PREFIX", "CORE_GROUPS",
           "GATING_AMBIGUITY", "KeyClassification", "classify_keys", "unknown_keys_text", "IncompatibleModelError"]


# ------------------------------------------------------------------------------------------------
# Renames and what the weights tell
# ------------------------------------------------------------------------------------------------

# Declarative key renames applied before matching: (prefix found, prefix expected).
KEY_RENAMES = (
    ("module.", ""),                   # nn.DataParallel / DistributedDataParallel
    ("avigate_fusion.", "fusion."),    # the attribute name the predecessor's scripts assumed
)

# Keys of variants this toolkit does not implement; found in a state dict they are named in the error.
UNSUPPORTED_MARKERS = (
    (re.compile(r"^umt_fusion\.|^fusion\.(audio_encoder|video_encoder)"), "the UMT fusion"),
)
_G0 = "fusion.fusion_layers.0.gating_function."

GATING_AMBIGUITY = ("not stated: global and clipwise gating have identical weight names and shapes (the "
                    "gating MLP ends in one output either way; only the forward pass differs: one gate per "
                    "video or one per clip), so the weights cannot tell them apart")


def normalize_state_dict(state_dict):
    """Apply ``KEY_RENAMES``; returns (new state dict, list of (rule, count) applied)."""
    out, applied = {}, {}
    for key, value in state_dict.items():
        new = key
        for old_prefix, new_prefix in KEY_RENAMES:
            if new.startswith(old_prefix):
                new = new_prefix + new[len(old_prefix):]
                applied[f"{old_prefix}* -> {new_prefix}*"] = applied.get(f"{old_prefix}* -> {new_prefix}*", 0) + 1
        if new in out:
            raise CheckpointError(f"two keys map to {new!r} after renaming prefixes")
        out[new] = value
    return out, sorted(applied.items())


def _count(keys, pattern):
    found = {int(m.group(1)) for k in keys for m in [re.match(pattern, k)] if m}
    return max(found) + 1 if found else 0


def describe_state_dict(sd):
    """What the weights alone tell about the architecture (see SPEC 6.1).

    Returns a dict: ``hidden_dim``, ``layout`` (custom, avigate, "unknown fusion" or "concat or
    video_only"), for the custom layout ``gating_shape``, ``variant_from_weights``, ``film`` and
    ``ssm`` (diagstrip), and the layer counts ``fusion_layers``, ``enc_layers``, ``dec_layers``,
    ``n_input_proj``. Keys of an unsupported variant are a CheckpointError.
    """
    keys = list(sd)
    for pattern, name in UNSUPPORTED_MARKERS:
        hits = [k for k in keys if pattern.search(k)]
        if hits:
            raise CheckpointError(f"weights belong to {name}, which this toolkit does not support "
                                  f"(e.g. key {hits[0]!r})")
    info = {"hidden_dim": sd["global_rep_token"].shape[0] if "global_rep_token" in sd else None}
    if "fusion.fusion_layers.0.a_proj.weight" in sd:
        info["layout"] = "custom"
        width = sd[_G0 + "mlp_mha.2.weight"].shape[0] if _G0 + "mlp_mha.2.weight" in sd else None
        if _G0 + "ssm_gate.norm.weight" in sd:
            info["gating_shape"] = "global_diagstrip_ssm"
            info["variant_from_weights"] = "diagstrip"
            info["ssm"] = _ssm_shapes(sd, keys)
        else:
            info["gating_shape"] = "elementwise" if width and width > 1 else "global or clipwise"
            info["variant_from_weights"] = "v2" if _G0 + "mha_bias" in sd else "v1 or diagstrip"
        info["film"] = _G0 + "ffn_beta" in sd
    elif "fusion.video_proj.weight" in sd:
        info["layout"] = "avigate"
        info["gating_shape"] = "global"
    elif any(k.startswith("fusion.") for k in keys):
        info["layout"] = "unknown fusion"
    else:
        info["layout"] = "concat or video_only"
    info["fusion_layers"] = _count(keys, r"fusion\.fusion_layers\.(\d+)\.")
    info["enc_layers"] = _count(keys, r"transformer\.encoder\.layers\.(\d+)\.")
    info["dec_layers"] = _count(keys, r"transformer\.decoder\.layers\.(\d+)\.")
    info["n_input_proj"] = _count(keys, r"input_txt_proj\.(\d+)\.")
    return info


def _ssm_shapes(sd, keys):
    """What the SSM gate's weights tell: band width, channels, number of dilations, video branch."""
    pre = _G0 + "ssm_gate."
    first = sd[pre + "encoder.net.0.weight"]  # [C, 2w+1, 1]
    convs = [k for k in keys if k.startswith(pre + "encoder.net.") and k.endswith(".weight")
             and sd[k].dim() == 3 and sd[k].shape[-1] == 3]
    channels, norm = int(first.shape[0]), int(sd[pre + "norm.weight"].shape[0])
    if norm not in (channels, 2 * channels):
        raise CheckpointError(f"SSM gate norm width {norm} is neither C={channels} nor 2C: the feature "
                              "cat(z_a, z_v, z_a - z_v) of diagstrip commit 87a994b is not supported")
    return {"band_width": (int(first.shape[1]) - 1) // 2, "enc_channels": channels, "n_dilations": len(convs),
            "use_video_branch": norm == 2 * channels}


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
LAYOUTS = ("custom", "avigate", "concat", "video_only")
_WB = r"\.(weight|bias)"
_MHA = r"\.(in_proj_weight|in_proj_bias|out_proj\.(weight|bias))"
_LAYER = r"fusion\.fusion_layers\.\d+\."

# (group, layouts whose state dicts hold such keys, full-match pattern on the mapped key)
KEY_TABLE = tuple((group, layouts, re.compile(pattern)) for group, layouts, pattern in (
    ("qd_detr heads", LAYOUTS, r"global_rep_(token|pos)|query_embed\.weight|class_embed" + _WB
     + r"|span_embed\.layers\.\d+" + _WB + r"|saliency_proj[12]" + _WB
     + r"|contrastive_align_projection_(query|txt|vid)" + _WB
     + r"|txt_position_embed\.(position_embeddings\.weight|LayerNorm" + _WB + ")"),
    ("text projection", LAYOUTS, r"input_txt_proj\.\d+\.(LayerNorm|net\.1)" + _WB),
    ("transformer", LAYOUTS, r"transformer\.(t2v_encoder|encoder)\.(layers\.\d+\.(self_attn" + _MHA
     + r"|(linear[12]|norm[12])" + _WB + r"|activation\.weight)|norm" + _WB + ")"),
    ("transformer", LAYOUTS, r"transformer\.decoder\.(layers\.\d+\.((sa_(qcontent|qpos|kcontent|kpos|v)"
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

# Groups every QD-DETR state dict holds; without them unknown keys are not a QD-DETR model at all.
CORE_GROUPS = ("qd_detr heads", "text projection", "transformer")


@dataclass
class KeyClassification:
    """Keys per ``KEY_TABLE`` group, the keys no pattern matched, and the layout they agree on."""
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
    candidates, witness = set(LAYOUTS), None
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


def unknown_keys_text(classification, total):
    """The message part naming the keys that matched no layout (first 10), of ``total`` keys."""
    shown = ", ".join(classification.unmatched[:10])
    more = f" (+{len(classification.unmatched) - 10} more)" if len(classification.unmatched) > 10 else ""
    return (f"{len(classification.unmatched)} of {total} weight keys match no known layout (custom AVIGATE "
            f"fusion, older AVIGATE fusion, audio concatenation, video only); keys that matched nothing: "
            f"{shown}{more}")
