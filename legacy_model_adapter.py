"""Analyse models trained before gate tracking existed: rebuild them unchanged, with gate tracking.

    from legacy_model_adapter import load_legacy_model_with_gate_tracking, adapt_legacy_model

    model = load_legacy_model_with_gate_tracking("results/run/model_best.ckpt")   # a checkpoint
    model, opt, report = load_legacy_model_with_gate_tracking(path, return_details=True)
    ours = adapt_legacy_model(my_trained_model)                                  # an in-memory model

    ours.fusion.set_current_sample_id(qids)      # one id per batch element
    ours(**batch)
    ours.fusion.print_gate_summary()

Both rebuild this project's equivalent with every weight loaded strictly (no layer is copied into
another, no weight is invented, no dummy model), then prove it: every tensor equals the source
(``torch.equal``) and, on a ragged probe batch, outputs and fused video features with tracking on
equal the reference (checkpoint: the same weights with no hook; in-memory: the given model) within
1e-6. ``report["legacy_adapter"]`` (checkpoint) or the report itself (in-memory) holds the proof.
The implementation: ``gate_analysis.legacy`` (the checkpoint loader), ``gate_analysis.adapter``
(in-memory models), ``gate_analysis.equivalence`` (the proof), ``gate_analysis.compat`` (the
compatibility report), ``qd_detr.keys`` (the key table) and ``qd_detr.checkpoint`` (reading once).
"""
from gate_analysis.adapter import adapt_legacy_model
from gate_analysis.compat import check_compatibility
from gate_analysis.equivalence import TOLERANCE, EquivalenceError
from gate_analysis.legacy import load_legacy_model_with_gate_tracking
from qd_detr.checkpoint import inspect_checkpoint
from qd_detr.errors import IncompatibleModelError
from qd_detr.keys import FUSION_SCOPE_PREFIX, KEY_RENAMES, KEY_TABLE, classify_keys

__all__ = ["load_legacy_model_with_gate_tracking", "adapt_legacy_model", "check_compatibility",
           "inspect_checkpoint", "classify_keys", "IncompatibleModelError", "EquivalenceError", "KEY_RENAMES",
           "KEY_TABLE", "FUSION_SCOPE_PREFIX", "TOLERANCE"]
