"""Reading a checkpoint once, inspecting it without a model, and rebuilding it strictly, with the load report.

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
mis-shaped keys are an error that lists them. ``inspect_checkpoint`` reads the file and classifies
its keys (``qd_detr.keys``) without building a model; ``load_checkpoint`` takes its result instead of
a path, so a checked load reads the file once.
"""
import argparse
import os
import pickle
import re
from dataclasses import dataclass
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
from .errors import CheckpointError, ConfigError, IncompatibleModelError
from .io import file_sha256
from .keys import (
    GATING_AMBIGUITY,
    KEY_RENAMES,
    KeyClassification,
    classify_keys,
    describe_state_dict,
    normalize_state_dict,
)
from .model import build_model
from .research_options import classify_saved_options
from .weight_options import check_options_against_weights, infer_options

# KEY_RENAMES, normalize_state_dict, describe_state_dict (qd_detr.keys) and infer_options (qd_detr.weight_options):
# re-exported for existing importers
__all__ = ["load_checkpoint", "LoadedCheckpoint", "read_checkpoint", "split_checkpoint", "inspect_checkpoint",
           "CheckpointContents", "infer_options", "strict_load", "resolve_device", "file_sha256", "SAFE_GLOBALS",
           "IMPLEMENTED_OPTIONS", "KEY_RENAMES", "normalize_state_dict", "describe_state_dict"]

SAFE_GLOBALS = [argparse.Namespace]

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


def _saved_options(raw_opt, opt_json):
    """The options a checkpoint states: its ``opt`` entry, else ``opt.json`` beside it, else None."""
    if raw_opt is not None:
        return make_options(**(vars(raw_opt) if isinstance(raw_opt, argparse.Namespace) else raw_opt))
    if os.path.isfile(opt_json):
        return options_from_opt_json(opt_json)
    return None


def _opt_json_beside(path):
    return os.path.join(os.path.dirname(os.path.abspath(path)), "opt.json")


# ------------------------------------------------------------------------------------------------
# Inspection without a model
# ------------------------------------------------------------------------------------------------

@dataclass
class CheckpointContents:
    """What a checkpoint file holds, read without building a model (``load_checkpoint`` accepts it)."""
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
    raw_opt: object = None    # the checkpoint's own 'opt' entry (Namespace or dict), else None

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


def _check_magic(path):
    """A file that is neither a zip archive (torch.save) nor a pickle is not a checkpoint at all
    (safe loading would otherwise call it a refused pickle)."""
    if os.path.isfile(path):
        with open(path, "rb") as fh:
            head = fh.read(4)
        if head and not head.startswith(_CHECKPOINT_MAGIC):
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (neither a zip archive nor a "
                                  f"pickle; the file starts with {head!r})")


def inspect_checkpoint(path, trust_pickle=False):
    """Read ``path`` safely and classify its keys; no model is built. Returns a ``CheckpointContents``.

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
    opt_json = _opt_json_beside(path)
    opt = _saved_options(raw_opt, opt_json)
    source = None if opt is None else "checkpoint['opt']" if raw_opt is not None else opt_json
    return CheckpointContents(path=os.path.abspath(path), size=os.path.getsize(path), format=fmt, meta=meta,
                              state_dict=sd, renames=renames, keys=keys, info=info, opt=opt,
                              options_source=source,
                              raw_opt_type=type(raw_opt).__name__ if raw_opt is not None else None,
                              raw_opt=raw_opt)


# ------------------------------------------------------------------------------------------------
# Options and the strict rebuild
# ------------------------------------------------------------------------------------------------


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

    ``path``: a checkpoint file, or the ``CheckpointContents`` that ``inspect_checkpoint`` returned for
    it (the file is then not read again; ``trust_pickle`` applied when it was read).
    ``gating_type``: checked against the checkpoint's options (a conflict is an error) and required
    when they do not say it. ``options``: a dict supplying options a bare state dict cannot tell
    (e.g. ``{"nheads": 8, "fusion_n_heads": 8}``); a value that contradicts saved options is an error.
    The model is returned in eval mode on ``device`` with the given ``batching`` semantics.
    """
    options = dict(options or {})
    if isinstance(path, CheckpointContents):
        contents = path
        path, raw_opt, fmt, meta = contents.path, contents.raw_opt, contents.format, contents.meta
        sd, renames, info = contents.state_dict, contents.renames, contents.info
    else:
        path = os.fspath(path)
        obj = read_checkpoint(path, trust_pickle=trust_pickle)
        raw_sd, raw_opt, fmt, meta = split_checkpoint(obj, path)
        sd, renames = normalize_state_dict(raw_sd)
        info = describe_state_dict(sd)
    opt_json = _opt_json_beside(path)
    opt = _saved_options(raw_opt, opt_json)
    if raw_opt is not None:
        source = "checkpoint['opt']"
    elif opt is not None:
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
    check_options_against_weights(opt, info, path)
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
