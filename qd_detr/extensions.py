"""The analysis package, reached by name: ``qd_detr`` never imports ``gate_analysis``.

The model package stands alone (load, run, capture gates, train). Two conveniences use the analysis
package when it is installed beside it: the gate monitor of ``python -m qd_detr.train
--gate_monitor_every N`` and the comparison plot of the fusion modules' tracking API
(``compare_samples_gates``, ``save_gate_analysis``). Each is named here as ``"module:attribute"`` and
imported only when that feature runs, so importing any ``qd_detr`` module never loads
``gate_analysis``, and the dependency points one way (``gate_analysis`` imports ``qd_detr``).
"""
import importlib

from .errors import ConfigError

__all__ = ["GATE_MONITOR", "SAMPLE_COMPARISON_PLOT", "load_extension"]

#: ``GateMonitor`` class (``from_dataset``, ``capture``, ``step``, ``due``, ``out_dir``) used by
#: ``qd_detr.callbacks.GateMonitorCallback``.
GATE_MONITOR = "gate_analysis.monitor:GateMonitor"
#: ``plot_sample_comparison(gates_by_id, ids, path, gate_ranges=...) -> path`` used by the tracking API.
SAMPLE_COMPARISON_PLOT = "gate_analysis.plots:plot_sample_comparison"


def load_extension(spec, purpose):
    """The object named by ``spec`` (``"package.module:attribute"``), imported now.

    ``purpose`` names the feature in the error raised when the module cannot be imported.
    """
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{purpose} needs the analysis package ({module_name}), which cannot be imported "
                          f"({exc}); run from the repository root or put it on PYTHONPATH") from None
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise ConfigError(f"{purpose}: {module_name} has no {attribute}") from None
