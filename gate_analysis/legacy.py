"""Legacy model loaders: rebuild a checkpoint trained before gate tracking existed, unchanged, with tracking.

A *legacy model* was trained before gate tracking existed: a checkpoint written by the research code
(``AVIGATEFusionCustom`` of the avigate_custom branch, or the older one-layer ``AVIGATEFusion`` of the
avigate branch). ``load_legacy_model_with_gate_tracking`` reads the file once
(``qd_detr.checkpoint.inspect_checkpoint``), rebuilds this project's equivalent with every weight
loaded strictly (``load_inspected``) and proves the result (``gate_analysis.equivalence``). Nothing is
copied from one layer to another, no missing weight is filled in, and there is no fallback model.

The rest of the legacy support lives beside it: the key table in ``qd_detr.keys``, the proof in
``gate_analysis.equivalence``, in-memory models in ``gate_analysis.adapter``, the compatibility report
in ``gate_analysis.compat`` and the interactive guide in ``gate_analysis.guide``. The names user code
imported from this module before the split are re-exported here.
"""
import time

from qd_detr.checkpoint import inspect_checkpoint, load_checkpoint
from qd_detr.errors import CheckpointError, ConfigError, IncompatibleModelError, NoFusionError
from qd_detr.keys import (
    CORE_GROUPS,
    FUSION_SCOPE_PREFIX,
    KEY_RENAMES,
    KEY_TABLE,
    LAYOUT_DESCRIPTIONS,
    classify_keys,
    unknown_keys_text,
)

from .adapter import adapt_legacy_model
from .equivalence import (
    PROBE_LENGTHS,
    PROBE_TEXT_LENGTHS,
    TOLERANCE,
    EquivalenceError,
    make_probe_batch,
    prove_checkpoint,
)

__all__ = ["load_legacy_model_with_gate_tracking", "load_inspected", "no_fusion_error",
           # re-exported: defined in qd_detr.keys, qd_detr.checkpoint, gate_analysis.adapter / .equivalence
           "adapt_legacy_model", "inspect_checkpoint", "classify_keys", "make_probe_batch",
           "IncompatibleModelError", "EquivalenceError", "KEY_TABLE", "KEY_RENAMES", "FUSION_SCOPE_PREFIX",
           "LAYOUT_DESCRIPTIONS", "TOLERANCE", "PROBE_LENGTHS", "PROBE_TEXT_LENGTHS"]


def load_inspected(contents, gating_type=None, device="auto", options=None):
    """``load_checkpoint`` of an inspected checkpoint, with the legacy tools' error classification.

    ``contents``: ``inspect_checkpoint``'s result (the file is not read again). Keys that match no
    layout make a load failure (or a checkpoint without the QD-DETR core) an IncompatibleModelError
    naming them; any other CheckpointError becomes an IncompatibleModelError too.
    Returns ``LoadedCheckpoint(model, opt, report)``.
    """
    path, unknown = contents.path, None
    if contents.keys.unmatched:
        unknown = unknown_keys_text(contents.keys, len(contents.state_dict))
        if not all(g in contents.keys.groups for g in CORE_GROUPS):
            raise IncompatibleModelError(f"{path}: {unknown}")
    try:
        return load_checkpoint(contents, device=device, gating_type=gating_type, options=options)
    except CheckpointError as exc:
        raise IncompatibleModelError(f"{exc}" + (f"; {unknown}" if unknown else "")) from None
    except ConfigError:
        if unknown:
            raise IncompatibleModelError(f"{path}: {unknown}") from None
        raise


def no_fusion_error(path, layout):
    """The error for a model without a fusion module (no gates to analyse)."""
    return NoFusionError(f"{path}: the model ({LAYOUT_DESCRIPTIONS.get(layout, layout)}) has no fusion module, "
                         "so no gates to analyse")


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
    model, opt, report = load_inspected(contents, gating_type, device, options)
    if model.fusion is None:
        raise no_fusion_error(contents.path, model.layout)
    report["legacy_adapter"] = prove_checkpoint(contents, model, opt, report, t0)
    model.fusion.enable_gate_tracking()
    return (model, opt, report) if return_details else model
