"""QD-DETR with AVIGATE audio-visual fusion, rebuilt to load the original research checkpoints.

Main entry points: ``load_checkpoint`` (rebuild a trained model strictly from its checkpoint),
``build_model`` (a model from options), the dataset in ``qd_detr.dataset``, the batch -> forward ->
capture loop in ``qd_detr.engine`` (predictions, metrics, gates into a sink), the command lines
``qd_detr.inference``, ``qd_detr.eval`` and ``qd_detr.train``. The package never imports the analysis
package ``gate_analysis`` (see ``qd_detr.extensions``).
"""
from .checkpoint import LoadedCheckpoint, load_checkpoint
from .config import make_options
from .errors import CheckpointError, ConfigError, DataError, NoFusionError, ToolkitError
from .model import QDDETR, build_model

__all__ = ["load_checkpoint", "LoadedCheckpoint", "build_model", "QDDETR", "make_options", "ToolkitError",
           "CheckpointError", "ConfigError", "DataError", "NoFusionError"]
