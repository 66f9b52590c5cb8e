"""QD-DETR with AVIGATE audio-visual fusion, rebuilt to load the original research checkpoints.

Main entry points: ``load_checkpoint`` (rebuild a trained model strictly from its checkpoint),
``build_model`` (a model from options), the dataset in ``qd_detr.dataset``, the batch -> forward ->
capture loop in ``qd_detr.engine`` (predictions, metrics, gates into a sink), the command lines
``qd_detr.inference``, ``qd_detr.eval`` and ``qd_detr.train``. The package never imports the analysis
package ``gate_analysis`` (see ``qd_detr.extensions``).
"""
import importlib

from .config import make_options
from .errors import CheckpointError, ConfigError, DataError, NoFusionError, ToolkitError

__all__ = ["load_checkpoint", "LoadedCheckpoint", "build_model", "QDDETR", "make_options", "ToolkitError",
           "CheckpointError", "ConfigError", "DataError", "NoFusionError"]

#: Names of the modules that import torch, imported when first read: ``import qd_detr`` (and the command
#: lines' argument parsing, e.g. ``--help``) stays light.
_LAZY = {"load_checkpoint": "checkpoint", "LoadedCheckpoint": "checkpoint", "QDDETR": "model", "build_model": "model"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
