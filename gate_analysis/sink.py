"""The one path from recorded gates to an analysis folder, used by the main job (``gate_analysis.pipeline``),
the training monitor (``gate_analysis.monitor``) and ``GateAnalyzer``.

Every query's gates ``{(layer, kind): array}`` (global (1,), clipwise (T,), elementwise (T, D), padding
excluded) go to four places at once: the raw-gate store (``gates/``, one shard per ``flush``), the
streamed statistics (``GateStatsAccumulator``), the report explorer's gate lanes (``LaneAccumulator``)
and, given the JSONL records, the ground-truth accumulator. ``finish`` closes the store, writes the
statistics CSVs and draws the figures from the closed store (``gate_analysis.plots.plot_all``)::

    sink = GateSink(out, "clipwise", num_layers=4, kinds=("mha", "ffn"))
    for qid, vid, record in recorded:            # e.g. qd_detr.gates.GateRecord
        sink.add(qid, vid, record.gates, n_clips=record.n_clips)
    sink.flush()                                 # once per batch: memory stays flat
    csvs, plots = sink.finish(top_n=10)
"""
import os

from qd_detr.gates import DEFAULT_KINDS

from .ground_truth import GroundTruthAccumulator
from .outputs import GATES_DIR
from .report_explore import LaneAccumulator
from .stats import GateStatsAccumulator
from .stats_csv import write_stats_csvs
from .store import GateStoreWriter, iter_shard_queries, load_gate_run

__all__ = ["GateSink", "plot_gate_store"]


def plot_gate_store(acc, output_dir, compare_qids=None, top_n=None, more=None):
    """Draw ``plot_all`` for the closed gate store in ``output_dir`` with the statistics ``acc``, then
    ``more(gate_run)`` (further figures; returns their paths). ``top_n``: queries per ranking figure
    (plot_all's default when None). Returns the written paths."""
    from .plots import plot_all
    run = load_gate_run(output_dir)
    try:
        kwargs = {} if top_n is None else {"top_n": top_n}
        paths = plot_all(acc, run, output_dir, compare_qids=compare_qids, **kwargs)
        return paths + (more(run) if more is not None else [])
    finally:
        run.close()


class GateSink:
    """Recorded gates -> gate store + statistics (+ ground truth) -> CSVs -> figures (module docstring).

    Args:
        output_dir: the analysis folder (the store goes to ``{output_dir}/gates/``).
        gating_type, num_layers, hidden_dim, kinds, gate_ranges, extra_meta, resume, overwrite: as
            ``GateStoreWriter`` (``kinds`` and ``gate_ranges`` also configure the statistics).
        records: JSONL records; when given, labelled queries also feed a ``GroundTruthAccumulator``
            (``ground_truth``), else ``ground_truth`` is None.
    Attributes ``store`` (GateStoreWriter), ``stats`` (GateStatsAccumulator), ``lanes`` (LaneAccumulator, for
    ``report.write_report``), ``ground_truth``.
    """

    def __init__(self, output_dir, gating_type, num_layers, *, kinds=DEFAULT_KINDS, gate_ranges=None,
                 hidden_dim=None, extra_meta=None, records=None, resume=False, overwrite=False):
        self.output_dir = output_dir
        layers = list(range(int(num_layers)))
        self.store = GateStoreWriter(output_dir, gating_type, num_layers, hidden_dim=hidden_dim, resume=resume,
                                     overwrite=overwrite, kinds=kinds, gate_ranges=gate_ranges, extra_meta=extra_meta)
        self.stats = GateStatsAccumulator(gating_type, layers, kinds=kinds, gate_ranges=gate_ranges)
        self.lanes = LaneAccumulator(gating_type, layers, self.store.kinds)
        self.ground_truth = None if records is None else GroundTruthAccumulator(records, gating_type, layers, kinds)

    @property
    def gates_dir(self):
        return os.path.join(self.output_dir, GATES_DIR)

    def add(self, qid, vid, gates, n_clips=None):
        """Store one query's gates and add them to the statistics (and ground truth)."""
        self.store.add(qid, vid, gates, n_clips=n_clips)
        self._account(qid, vid, gates, n_clips)

    def _account(self, qid, vid, gates, n_clips):
        self.stats.update(qid, gates, vid=vid, n_clips=n_clips)
        self.lanes.add(qid, vid, gates)
        if self.ground_truth is not None:
            self.ground_truth.add("gate", qid, gates, n_clips=n_clips)

    def restore(self):
        """Add the queries of the complete shards already in the store (a resumed run) to the statistics
        and ground truth, in recorded order; returns their qids (a set)."""
        stored = set()
        for qid, vid, n_clips, gates in iter_shard_queries(self.output_dir):
            self._account(qid, vid, gates, n_clips)
            stored.add(qid)
        return stored

    def flush(self):
        """Write the buffered queries as one shard (call once per batch)."""
        return self.store.flush()

    def close(self):
        """Close the store (index.csv and the complete meta.json); returns the store folder."""
        return self.store.close()

    def write_csvs(self, top_n=10):
        """The statistics CSVs (``gate_analysis.stats_csv``) into the folder; returns {key: path}."""
        return write_stats_csvs(self.stats, self.output_dir, top_n=top_n)

    def plot(self, compare_qids=None, top_n=None, more=None):
        """``plot_gate_store`` for this sink's (closed) store; returns the written paths."""
        return plot_gate_store(self.stats, self.output_dir, compare_qids=compare_qids, top_n=top_n, more=more)

    def start_plots(self, compare_qids=None, more=None, pool=None):
        """The figures drawn in the background (``background.PlotJob``; in ``pool``, a ``FigurePool``, when
        given) while the caller goes on."""
        from .background import PlotJob
        return PlotJob(self.stats, self.output_dir, compare_qids, more=more, pool=pool)

    def finish(self, top_n=10, plots=True, compare_qids=None, plot_top_n=None):
        """Close the store, write the CSVs and (``plots``) draw the figures; returns ({key: csv path}, [png paths])."""
        self.close()
        csvs = self.write_csvs(top_n=top_n)
        return csvs, (self.plot(compare_qids=compare_qids, top_n=plot_top_n) if plots else [])
