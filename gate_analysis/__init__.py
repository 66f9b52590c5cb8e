"""Analysis of QD-DETR / AVIGATE fusion gates: a streamed raw-gate store, statistics and plots.

Data flow: recorder (``qd_detr.gates``) -> ``GateSink``: ``GateStoreWriter`` (raw float32 gates on disk)
and ``GateStatsAccumulator`` (streamed statistics) -> ``write_stats_csvs`` / ``gate_analysis.plots``.
Gates are named ``(layer, kind)`` / ``layers.{layer}.gate_{kind}`` everywhere.

Importing this package does not import matplotlib: the plotting names (``plot_all`` and the
``plot_*`` functions) are loaded from ``gate_analysis.plots`` on first access.
"""
from qd_detr.gates import GATE_KINDS, gate_name

from .gate_arrays import GATING_TYPES
from .lazy import lazy_attributes
from .sink import GateSink
from .stats import QUERY_STAT_NAMES, GateStatsAccumulator, accumulate_gate_run
from .stats_csv import CSV_COLUMNS, CSV_FILES, write_stats_csvs
from .store import GateRun, GateStoreWriter, load_gate_run

_PLOT_NAMES = ("plot_all", "plot_layer_distributions", "plot_query_layer_heatmap", "plot_query_clip_heatmap",
               "plot_dim_profile", "plot_layer_evolution", "plot_sample_comparison", "plot_rankings",
               "PLOT_FILES", "select_compare_qids")

__all__ = ["GateSink", "GateStoreWriter", "GateRun", "load_gate_run", "gate_name", "GATE_KINDS", "GATING_TYPES",
           "GateStatsAccumulator", "accumulate_gate_run", "write_stats_csvs", "CSV_COLUMNS", "CSV_FILES",
           "QUERY_STAT_NAMES", *_PLOT_NAMES]


def __dir__():
    return sorted(set(globals()) | set(_PLOT_NAMES))


__getattr__ = lazy_attributes(__name__, "gate_analysis.plots", _PLOT_NAMES)
