"""Safe checkpoint loading, strict key matching and the load report.

Formats accepted:
- the original training checkpoint ``{"model", "optimizer"?, "lr_scheduler"?, "epoch", "opt"}`` where
  ``opt`` is an ``argparse.Namespace`` (the architecture is rebuilt from it);
- the same without ``opt`` (or a bare state dict) with an ``opt.json`` beside the file (its
  ``v_feat_dim`` lacks the +2 of the temporal features, which is added);
- a bare state dict without options: what shapes can tell is inferred, the rest (gating type of a
  global/clipwise model, attention head counts, feature split of a concatenation model) must be given.

Loading uses ``torch.load(weights_only=True)`` with ``argparse.Namespace`` allow-listed (the only
non-tensor type these checkpoints legitimately hold besides ``torch.device``, which torch allows);
full unpickling only with ``trust_pickle=True``. Every key must match: missing, unexpected or
mis-shaped keys are an error that lists them.
"""
import argparse
import hashlib
import os
import pickle
import re
from typing import NamedTuple

import torch

from .config import (
    ARCH_OPTIONS,
    GATING_TYPES,
    TOOLKIT_OPTIONS,
    V2_OPTIONS,
    fusion_layout,
    fusion_variant,
    gate_options,
    has_tef,
    make_options,
    options_from_opt_json,
)
from .errors import CheckpointError, ConfigError
from .model import build_model
from .research_options import classify_saved_options

__all__ = ["load_checkpoint", "LoadedCheckpoint", "read_checkpoint", "normalize_state_dict", "KEY_RENAMES",
           "describe_state_dict", "infer_options", "strict_load", "resolve_device", "file_sha256", "SAFE_GLOBALS"]

SAFE_GLOBALS = [argparse.Namespace]

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


class LoadedCheckpoint(NamedTuple):
    model: torch.nn.Module
    opt: argparse.Namespace
    report: dict


def resolve_device(device):
    """``"auto"`` -> cuda when available, else cpu; anything else as given."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was requested but CUDA is not available on this machine")
    return device


def file_sha256(path, chunk=1 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


# What torch.save writes: a zip archive (the default since torch 1.6) or a legacy pickle (protocol >= 2).
_CHECKPOINT_MAGIC = (b"PK\x03\x04", b"\x80")
# Refusals of safe loading that mean "the file holds objects" (not "the bytes are not a pickle").
_REFUSAL = re.compile(r"GLOBAL|Unsupported class|Can only build|unrecognized function|add_safe_globals|allowlist",
                      re.IGNORECASE)


def _file_head(path):
    try:
        with open(path, "rb") as fh:
            return fh.read(8)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the checkpoint file ({exc.strerror or exc})") from None


def read_checkpoint(path, trust_pickle=False):
    """``torch.load`` with the safety policy above; every failure is a one-line CheckpointError."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: checkpoint file not found")
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a directory, expected a checkpoint file")
    head = _file_head(path)
    if not head:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (the file is empty: 0 bytes)")
    looks_like_checkpoint = head.startswith(_CHECKPOINT_MAGIC)
    try:
        if trust_pickle:
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if looks_like_checkpoint and not trust_pickle and (found or _REFUSAL.search(_unpickler_detail(text))):
            what = f"a pickled object of type {found.group(1)}" if found else "pickled objects"
            raise CheckpointError(
                f"{path}: refused to load {what}, which safe loading does not allow (arbitrary code "
                "could run); if you trust this file, rerun with --trust_checkpoint") from None
        raise _unreadable(path, head, exc) from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, ImportError, ModuleNotFoundError,
            TypeError, KeyError, IndexError, UnicodeDecodeError, MemoryError, OverflowError) as exc:
        raise _unreadable(path, head, exc) from None


def _unpickler_detail(text):
    """The reason inside torch's long 'Weights only load failed' message (its 'WeightsUnpickler error')."""
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\s*\n|$)", text, re.DOTALL)
    return found.group(1).strip() if found else text


def _unreadable(path, head, exc):
    if not head.startswith(_CHECKPOINT_MAGIC):
        return CheckpointError(f"{path}: not a readable PyTorch checkpoint (neither a zip archive nor a pickle; "
                               f"the file starts with {head[:4]!r})")
    return CheckpointError(f"{path}: not a readable PyTorch checkpoint, possibly truncated or corrupt "
                           f"({_first_line(exc)})")


def _first_line(exc):
    """``Type: first sentence`` of an exception's message, at most ~200 characters, on one line."""
    text = str(exc).strip()
    if isinstance(exc, pickle.UnpicklingError):
        text = _unpickler_detail(text)
    text = " ".join(text.split())
    text = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0]
    if len(text) > 200:
        text = text[:200].rsplit(" ", 1)[0] + " ..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _is_state_dict(obj):
    return isinstance(obj, dict) and obj and all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items())


def split_checkpoint(obj, path):
    """(state_dict, opt or None, format name, metadata) from whatever ``torch.load`` returned."""
    if _is_state_dict(obj):
        return obj, None, "bare state dict", {}
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if key in obj and _is_state_dict(obj[key]):
                opt = obj.get("opt")
                if opt is not None and not isinstance(opt, (argparse.Namespace, dict)):
                    raise CheckpointError(f"{path}: 'opt' entry is a {type(opt).__name__}, "
                                          "expected argparse.Namespace or dict")
                meta = {"entries": sorted(str(k) for k in obj), "epoch": obj.get("epoch")}
                fmt = "training checkpoint" if key == "model" else f"checkpoint ('{key}' entry)"
                return obj[key], opt, fmt, meta
        raise CheckpointError(f"{path}: contains no model weights (entries: {', '.join(map(str, list(obj)[:8]))}; "
                              "expected 'model' or a state dict)")
    if isinstance(obj, torch.nn.Module):
        raise CheckpointError(f"{path}: holds a whole pickled model object; save model.state_dict() instead")
    raise CheckpointError(f"{path}: contains no model weights (a {type(obj).__name__})")


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
    """What the weights alone tell about the architecture (see SPEC 6.1)."""
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


def infer_options(sd, info, given, path):
    """Options for a bare state dict: shapes where they tell, ``given`` for the rest."""
    need = []

    def dim(key, axis=0):
        return int(sd[key].shape[axis]) if key in sd else None

    opt = make_options(
        hidden_dim=info["hidden_dim"], enc_layers=info["enc_layers"], dec_layers=info["dec_layers"],
        n_input_proj=info["n_input_proj"] or 2, num_queries=dim("query_embed.weight"),
        dim_feedforward=dim("transformer.encoder.layers.0.linear1.weight"),
        max_q_l=dim("txt_position_embed.position_embeddings.weight") or 32,
        t_feat_dim=dim("input_txt_proj.0.LayerNorm.weight"),
        span_loss_type="l1" if dim("span_embed.layers.2.weight") == 2 else "ce",
        contrastive_align_loss="contrastive_align_projection_query.weight" in sd,
        contrastive_hdim=dim("contrastive_align_projection_query.weight") or 64,
        fusion_layers=info["fusion_layers"] or 4,
    )
    layout = info["layout"]
    if layout == "custom":
        opt.use_avigate_custom, opt.a_feat_dir = True, given.get("a_feat_dir", "<audio>")
        opt.v_feat_dim, opt.a_feat_dim = dim("input_vid_proj.0.LayerNorm.weight"), dim("input_aud_proj.0.LayerNorm.weight")
        if info["gating_shape"] in ("elementwise", "global_diagstrip_ssm"):
            opt.gating_type = info["gating_shape"]
        elif "gating_type" not in given:
            need.append("gating_type (global and clipwise weights have identical names and shapes, so the "
                        "weights cannot tell them apart; pass --gating_type global or --gating_type clipwise)")
        if "fusion_n_heads" not in given:
            need.append("fusion_n_heads (the number of fusion attention heads changes no weight shape; "
                        "pass --fusion_n_heads N)")
        if info["variant_from_weights"] == "v2":
            opt.ffn_gate_film = info["film"]
            if "mha_gate_temp" not in given:
                need.append("mha_gate_temp (v2 gating: the sigmoid temperature is not a weight; pass "
                            "--mha_gate_temp T, the value the model was trained with)")
        if info["gating_shape"] == "global_diagstrip_ssm":
            ssm = info["ssm"]
            opt.ssm_band_width, opt.ssm_enc_channels = ssm["band_width"], ssm["enc_channels"]
            opt.ssm_use_video_branch = int(ssm["use_video_branch"])
            for key, flag in (("ssm_dilations", "--ssm_dilations D1 D2 ..."), ("ssm_diag_subtract", "--ssm_diag_subtract X")):
                if key not in given:
                    need.append(f"{key} (the SSM gate's {key[4:]} changes no weight shape; pass {flag})")
    elif layout == "avigate":
        opt.use_avigate, opt.a_feat_dir = True, given.get("a_feat_dir", "<audio>")
        opt.v_feat_dim, opt.a_feat_dim = dim("fusion.video_proj.weight", 1), dim("fusion.audio_proj.weight", 1)
    elif layout == "concat or video_only":
        total = dim("input_vid_proj.0.LayerNorm.weight")
        if "a_feat_dim" in given:
            opt.a_feat_dir = given.get("a_feat_dir", "<audio>")
            opt.v_feat_dim = total - int(given["a_feat_dim"])
        else:
            opt.v_feat_dim = total
    else:
        raise CheckpointError(f"{path}: fusion weights of an unknown layout")
    if "nheads" not in given:
        need.append("nheads (the number of transformer attention heads changes no weight shape; pass --nheads N)")
    if need:
        raise ConfigError(f"{path}: a bare state dict without options; cannot infer " + "; ".join(need)
                          + ". Put the training opt.json beside the checkpoint, or give these options")
    for key, value in given.items():
        setattr(opt, key, value)
    return opt


def _check_against_weights(opt, info, path):
    layout = fusion_layout(opt)
    expected = {"custom": "custom", "avigate": "avigate"}.get(layout, "concat or video_only")
    if info["layout"] != expected:
        raise CheckpointError(f"{path}: options describe the {layout} layout but the weights are of the "
                              f"{info['layout']} layout")
    if layout == "custom":
        for shape in ("elementwise", "global_diagstrip_ssm"):
            if (opt.gating_type == shape) != (info["gating_shape"] == shape):
                raise CheckpointError(f"{path}: options say gating_type={opt.gating_type} but the gating weights "
                                      f"are {info['gating_shape']}-shaped")
        variant = fusion_variant(opt)
        from_weights = info["variant_from_weights"]
        if (variant == "v2") != (from_weights == "v2"):
            said = "v2 gate options (mha_gate_temp, ...)" if variant == "v2" else "no v2 gate options"
            raise CheckpointError(f"{path}: the options have {said} but the weights are of the "
                                  f"{'v2' if from_weights == 'v2' else 'v1/diagstrip'} gating layout "
                                  f"(v2 adds gating_function.mha_bias/mha_scale/ffn_alpha)")
        if variant == "v2" and bool(getattr(opt, "ffn_gate_film", False)) != info["film"]:
            raise CheckpointError(f"{path}: options say ffn_gate_film={getattr(opt, 'ffn_gate_film', False)} but the "
                                  f"weights {'have' if info['film'] else 'lack'} the FiLM shift (gating_function.ffn_beta)")
        if info.get("ssm"):
            ssm, (built, _) = info["ssm"], gate_options(opt)
            for key in ("band_width", "enc_channels", "use_video_branch"):
                if built["ssm"][key] != ssm[key]:
                    raise CheckpointError(f"{path}: options say ssm_{key}={built['ssm'][key]} but the SSM gate "
                                          f"weights have {key} {ssm[key]}")
            if len(built["ssm"]["dilations"]) != ssm["n_dilations"]:
                raise CheckpointError(f"{path}: options give {len(built['ssm']['dilations'])} SSM dilations "
                                      f"{list(built['ssm']['dilations'])} but the weights have {ssm['n_dilations']}")
        if int(opt.fusion_layers) != info["fusion_layers"]:
            raise CheckpointError(f"{path}: options say fusion_layers={opt.fusion_layers} but the weights have "
                                  f"{info['fusion_layers']} fusion layers")


# Architecture options the rebuild implements (pre_norm only at False: build_model refuses True).
IMPLEMENTED_OPTIONS = frozenset(ARCH_OPTIONS) - {"pre_norm"}


def _check_saved_options(raw_opt, opt_json, path):
    """Classify the saved options against the research code's option table (``research_options``).

    Returns the classification (``unknown``: names the table does not know, listed in every report);
    an option known to change the forward that this toolkit does not implement is a ConfigError.
    Options our own ``train.py`` adds (``TOOLKIT_OPTIONS``) are known.
    """
    if raw_opt is not None:
        saved = vars(raw_opt) if isinstance(raw_opt, argparse.Namespace) else dict(raw_opt)
    elif os.path.isfile(opt_json):
        saved = vars(options_from_opt_json(opt_json))
    else:
        return {"unknown": [], "arch_not_implemented": []}
    found = classify_saved_options(saved, implemented=IMPLEMENTED_OPTIONS)
    found["unknown"] = [k for k in found["unknown"] if k not in TOOLKIT_OPTIONS]
    if found["arch_not_implemented"]:
        values = ", ".join(f"{k}={saved[k]!r}" for k in found["arch_not_implemented"])
        raise ConfigError(f"{path}: the saved options turn on architecture feature(s) this toolkit does not "
                          f"implement: {values}; the rebuilt model would compute something else")
    return found


def _variant_report(opt, layout, model):
    """Load-report entries on the fusion variant: which branch's math, the option values that are not
    weights (with where they came from) and every gate's declared range."""
    if layout != "custom":
        return {"fusion_variant": None, "gate_options": {}, "gate_ranges": _ranges(model)}
    variant = fusion_variant(opt)
    kwargs, sources = gate_options(opt)
    values = {}
    if variant == "v2":
        values = {"mha_gate_temp": kwargs["mha_temp"], "ffn_gate_film": kwargs["ffn_film"]}
    elif "ssm" in kwargs:
        ssm = kwargs["ssm"]
        values = {"ssm_band_width": ssm["band_width"], "ssm_enc_channels": ssm["enc_channels"],
                  "ssm_dilations": list(ssm["dilations"]), "ssm_diag_subtract": ssm["diag_subtract"],
                  "ssm_use_video_branch": int(ssm["use_video_branch"])}
    if variant == "v2":
        told_by = "v2 options in the saved options: " + ", ".join(k for k in V2_OPTIONS if hasattr(opt, k))
    elif variant == "diagstrip":
        told_by = "ssm_* options / gating type global_diagstrip_ssm"
    else:
        told_by = "no v2 or ssm_* options"
    return {"fusion_variant": variant, "fusion_variant_source": told_by,
            "gate_options": {k: {"value": v, "source": sources.get(k, "options")} for k, v in values.items()},
            "gate_ranges": _ranges(model)}


def _ranges(model):
    from .gates import fusion_gate_ranges
    return {} if model.fusion is None else {k: r.as_dict() for k, r in fusion_gate_ranges(model.fusion).items()}


def strict_load(model, state_dict, path):
    """Load with every key matched; raise CheckpointError listing every mismatch."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shaped = [f"{k} {tuple(state_dict[k].shape)} != expected {tuple(own[k].shape)}"
              for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or shaped:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shaped)):
            if items:
                shown = ", ".join(items[:6]) + (f" (+{len(items) - 6} more)" if len(items) > 6 else "")
                parts.append(f"{len(items)} {label} key(s): {shown}")
        raise CheckpointError(f"{path}: weights do not match the architecture its options describe; "
                              + "; ".join(parts))
    model.load_state_dict(state_dict, strict=True)
    return {"matched": len(own), "missing": 0, "unexpected": 0, "mis_shaped": 0}


def load_checkpoint(path, device="cpu", trust_pickle=False, gating_type=None, options=None, batching="query"):
    """Rebuild a trained QD-DETR from ``path``; returns ``LoadedCheckpoint(model, opt, report)``.

    ``gating_type``: checked against the checkpoint's options (a conflict is an error) and required
    when they do not say it. ``options``: a dict supplying options a bare state dict cannot tell
    (e.g. ``{"nheads": 8, "fusion_n_heads": 8}``); a value that contradicts saved options is an error.
    The model is returned in eval mode on ``device`` with the given ``batching`` semantics.
    """
    path = os.fspath(path)
    options = dict(options or {})
    obj = read_checkpoint(path, trust_pickle=trust_pickle)
    raw_sd, raw_opt, fmt, meta = split_checkpoint(obj, path)
    sd, renames = normalize_state_dict(raw_sd)
    info = describe_state_dict(sd)
    opt_json = os.path.join(os.path.dirname(os.path.abspath(path)), "opt.json")
    if raw_opt is not None:
        opt = make_options(**(vars(raw_opt) if isinstance(raw_opt, argparse.Namespace) else raw_opt))
        source = "checkpoint['opt']"
    elif os.path.isfile(opt_json):
        opt = options_from_opt_json(opt_json)
        source = f"{opt_json} (v_feat_dim + 2 for TEF)" if has_tef(opt) else opt_json
    else:
        if gating_type is not None:
            options.setdefault("gating_type", gating_type)
        opt = infer_options(sd, info, options, path)
        source = "inferred from weight shapes" + (f" + given {sorted(options)}" if options else "")
    if raw_opt is not None or os.path.isfile(opt_json):
        for key, value in options.items():
            stated = getattr(opt, key, None)
            if stated is not None and stated != value:
                raise ConfigError(f"{path}: {key}={value} was given but the checkpoint's options say "
                                  f"{key}={stated} ({source})")
            setattr(opt, key, value)
    saved = _check_saved_options(raw_opt, opt_json, path)
    layout = fusion_layout(opt)
    gating_source = None
    if layout == "custom":
        stated = opt.gating_type
        if gating_type is not None and gating_type != stated:
            raise ConfigError(f"{path}: --gating_type {gating_type} conflicts with the checkpoint's "
                              f"gating_type {stated} ({source})")
        gating_source = source if raw_opt is not None or os.path.isfile(opt_json) else \
            ("weight shapes" if info.get("gating_shape") == "elementwise" and "gating_type" not in options else "given")
    elif layout == "avigate":
        if gating_type not in (None, "global"):
            raise ConfigError(f"{path}: --gating_type {gating_type} conflicts with the checkpoint's layout "
                              "(the older AVIGATEFusion has global gates only)")
        gating_source = "layout (AVIGATEFusion gates are global)"
    elif gating_type is not None:
        raise ConfigError(f"{path}: --gating_type {gating_type} given but the model has no fusion module "
                          f"(layout: {layout}), so it has no gates")
    if gating_type is not None and gating_type not in GATING_TYPES:
        raise ConfigError(f"--gating_type {gating_type!r} is not one of {', '.join(GATING_TYPES)}")
    _check_against_weights(opt, info, path)
    try:
        model = build_model(opt)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    keys = strict_load(model, sd, path)
    dev = resolve_device(device)
    model.to(dev).eval()
    model.set_batching(batching)
    report = {
        "path": os.path.abspath(path),
        "format": fmt,
        "entries": meta.get("entries"),
        "epoch": meta.get("epoch"),
        "options_source": source,
        "layout": layout,
        "gating_type": model.fusion.gating_type if model.fusion is not None else None,
        "gating_type_source": gating_source,
        "fusion_layers": len(model.fusion.fusion_layers) if model.fusion is not None else 0,
        "fusion_n_heads": model.fusion.fusion_layers[0].self_attention.num_heads if model.fusion is not None else None,
        **_variant_report(opt, layout, model),
        "unknown_options": saved["unknown"],
        "key_renames": renames,
        "keys": keys,
        "n_tensors": len(sd),
        "n_parameters": int(sum(p.numel() for p in model.parameters())),
        "device": str(dev),
        "batching": batching,
        "torch": torch.__version__,
    }
    return LoadedCheckpoint(model, opt, report)
