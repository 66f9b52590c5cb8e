"""Public face of the gate-analysis library.

    from gate_analysis_utils import GateAnalyzer, load_gate_run

    fusion = model.avigate_fusion
    fusion.enable_gate_tracking()
    for qids, batch in my_batches:
        fusion.set_current_sample_id(qids)        # one id per batch element
        model(**batch)
    GateAnalyzer(fusion).analyze_all_samples("out/my_analysis")   # CSVs, plots, raw gates

    run = load_gate_run("out/my_analysis")        # or any run_gate_analysis.py output folder
    run.gate(qid, layer=0, kind="mha")            # global (1,), clipwise (T,), elementwise (T, D); kinds mha, ffn, beta
    run.gate_range(0, "mha")                      # its declared range (GateRange: tanh, sigmoid, scaled_tanh)
    run.frame()                                   # tidy pandas view
"""
import os

from gate_analysis.sink import GateSink
from gate_analysis.stats import GateStatsAccumulator
from gate_analysis.stats_csv import CSV_COLUMNS, write_stats_csvs
from gate_analysis.store import GateRun, load_gate_run
from qd_detr.gates import fusion_gate_kinds, fusion_gate_ranges, fusion_gating_type, fusion_num_layers

__all__ = ["GateAnalyzer", "load_gate_run", "GateRun", "GateStatsAccumulator", "write_stats_csvs", "CSV_COLUMNS"]


class GateAnalyzer:
    """Analyse what a fusion module's gate tracking recorded (``fusion.gate_history``).

    Sample ids that are all integers (QVHighlights qids) are kept; otherwise samples are numbered
    0..N-1 in recording order and the original ids are kept as the ``vid`` column.
    """

    def __init__(self, fusion_module):
        self.fusion = fusion_module
        self.gating_type = fusion_gating_type(fusion_module)
        self.layers = list(range(fusion_num_layers(fusion_module)))

    def _records(self):
        records = list(getattr(self.fusion, "gate_history", {}).values())
        if not records:
            raise ValueError("no gates recorded: call enable_gate_tracking() and run the model first")
        return records

    def _keyed(self):
        records = self._records()
        integer = all(isinstance(r.sample_id, int) and not isinstance(r.sample_id, bool) for r in records)
        for i, rec in enumerate(records):
            yield (rec.sample_id, "", rec) if integer else (i, str(rec.sample_id), rec)

    def analyze_all_samples(self, output_dir, top_n=10, plots=True, compare_qids=None, overwrite=False):
        """Write raw gates (gates/), gate_*.csv and plots/ into ``output_dir``; return the paths.
        An earlier analysis in ``output_dir`` is replaced only with ``overwrite=True``."""
        os.makedirs(output_dir, exist_ok=True)
        sink = GateSink(output_dir, self.gating_type, len(self.layers), overwrite=overwrite,
                        hidden_dim=getattr(self.fusion, "hidden_dim", None), kinds=fusion_gate_kinds(self.fusion),
                        gate_ranges=fusion_gate_ranges(self.fusion))
        for qid, vid, rec in self._keyed():
            sink.add(qid, vid, rec.gates, n_clips=rec.n_clips)
        sink.close()
        paths = {"gates": sink.gates_dir}
        paths.update(sink.write_csvs(top_n=top_n))
        if plots:
            paths["plots"] = sink.plot(compare_qids=compare_qids)
        return paths
