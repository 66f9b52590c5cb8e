"""Watch fusion gates evolve during training: periodic captures on fixed queries, evolution table and plots.

Use it in your own training loop::

    from gate_analysis.monitor import GateMonitor, plot_gate_evolution

    monitor = GateMonitor(model, val_batches, out_dir="runs/x/gate_monitor", every=5)
    monitor.capture(0)                # optional: the untrained model as epoch_0
    for epoch in range(n_epochs):     # 0-based, as in the original train.py
        train_one_epoch(...)
        monitor.step(epoch)           # after epochs 5, 10, ... (when (epoch + 1) % every == 0)
    plot_gate_evolution(["runs/x/gate_monitor"], "runs/x/evolution.png")

``val_batches`` is what you iterate for validation: a ``DataLoader`` over ``QVHighlightsDataset`` with
``qd_detr.dataset.collate`` (yields ``(metas, inputs)``, metas carrying ``qid``/``vid``), or any
re-iterable of such pairs, or of dicts ``{"qids": [...], **model_kwargs}`` (optional ``"vids"``).
``"targets"`` entries are ignored. A one-shot iterator is materialised once. Use the same queries
every time (a ``shuffle=False`` loader, or ``GateMonitor.from_dataset``); each capture runs them all.

A capture (``capture(n)``, or ``step`` when due): the model goes to eval mode, gates are recorded by
a private ``qd_detr.gates.GateRecorder`` (a tracking recorder the user enabled is paused, so its
``gate_history`` gets nothing), the batches run under ``torch.no_grad`` on the model's device, the
recorder is removed and the previous train/eval mode is restored. Then ``out_dir/epoch_{n}/`` gets
the raw gates (``gates/``), the statistics CSVs and, with ``plots=True``, the figures of
``gate_analysis.plots.plot_all`` (``plots/``), all through ``gate_analysis.sink.GateSink``. The folder is written under a temporary
name and renamed when complete, so a crash never leaves a half-written ``epoch_{n}``. Finally
``out_dir/gate_evolution.csv`` (``EVOLUTION_COLUMNS``: one row per epoch x query x layer x gate) and
the figures ``evolution_layers.png`` / ``evolution_queries.png`` are rewritten from every
``epoch_{n}`` folder.

``n`` is the number of completed training epochs: ``step(epoch)`` with the 0-based epoch index
captures ``epoch_{epoch + 1}``.

TensorBoard: with ``writer=SummaryWriter(log_dir)`` (``torch.utils.tensorboard``) each capture also
writes, at step ``n``, one histogram per gate (``gates/layers.{l}.gate_{kind}``: the capture's pooled gate
values, padding excluded) and the clip-weighted statistics of ``gate_stats_per_layer.csv``
(``gates/layers.{l}.gate_{kind}/mean``, ``/std``, ``/frac_positive``, ...), see
``gate_analysis.tensorboard_log``; the writer is flushed after each capture and never closed here::

    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter("runs/x/tensorboard_log")
    monitor = GateMonitor(model, val_batches, out_dir="runs/x/gate_monitor", every=5, writer=writer)
"""
import os
import shutil
import sys

from qd_detr.engine import run_batches
from qd_detr.errors import ConfigError, DataError
from qd_detr.gates import fusion_gate_kinds, fusion_gate_ranges, fusion_gating_type, fusion_num_layers
from qd_detr.io import atomic_directory

from .evolution import (
    EVOLUTION_COLUMNS,
    EVOLUTION_FILE,
    EVOLUTION_PLOTS,
    epoch_dir_name,
    epoch_dirs,
    evolution_value_ranges,
    read_gate_evolution,
    summarize_gate_evolution,
    write_gate_evolution,
)
from .lazy import lazy_attributes
from .sink import GateSink
from .tensorboard_log import check_writer, write_gate_summaries

# the evolution names are re-exported: the monitor's documented interface (see gate_analysis.evolution)
__all__ = ["GateMonitor", "DatasetBatches", "read_gate_evolution", "summarize_gate_evolution", "write_gate_evolution",
           "EVOLUTION_COLUMNS", "EVOLUTION_FILE", "EVOLUTION_PLOTS", "epoch_dir_name", "evolution_value_ranges"]



# ------------------------------------------------------------------------------------------ batches
class DatasetBatches:
    """Re-iterable collated batches of selected queries of a ``QVHighlightsDataset``.

    Args:
        dataset: a ``qd_detr.dataset.QVHighlightsDataset``.
        qids: query ids to use (in this order), or None for the first ``n`` queries of the dataset.
        n: number of queries when ``qids`` is None.
        batch_size: queries per batch.
    Each iteration loads the features again and yields ``(metas, inputs)`` from ``collate``.
    """

    def __init__(self, dataset, qids=None, n=16, batch_size=32):
        from qd_detr.batching import collate
        self._collate = collate
        self.dataset = dataset
        position = {q: i for i, q in enumerate(dataset.qids)}
        if qids is None:
            if int(n) < 1:
                raise ConfigError(f"the number of monitored queries must be >= 1, got {n}")
            self.indices = list(range(min(int(n), len(dataset))))
        else:
            qids = list(qids)
            if not qids:
                raise ConfigError("no query ids given to monitor")
            missing = [q for q in qids if q not in position]
            if missing:
                raise ConfigError(f"monitored qid(s) {missing[:10]} are not in the validation data "
                                  f"({len(position)} queries)")
            if len(set(qids)) != len(qids):
                raise ConfigError("monitored qids contain duplicates")
            self.indices = [position[q] for q in qids]
        if int(batch_size) < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)

    @property
    def qids(self):
        return [self.dataset.qids[i] for i in self.indices]

    def __len__(self):
        return -(-len(self.indices) // self.batch_size)

    def __iter__(self):
        for start in range(0, len(self.indices), self.batch_size):
            chunk = self.indices[start:start + self.batch_size]
            yield self._collate([self.dataset[i] for i in chunk])


def _split_batch(batch):
    """(qids, vids, model kwargs) of one batch in any accepted form."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], dict):
        metas, inputs = batch
        qids = [m["qid"] for m in metas]
        vids = [m.get("vid", "") for m in metas]
    elif isinstance(batch, dict) and "qids" in batch:
        inputs = {k: v for k, v in batch.items() if k not in ("qids", "vids")}
        qids = list(batch["qids"])
        vids = list(batch.get("vids") or [""] * len(qids))
    else:
        raise TypeError("a monitored batch must be (metas, inputs) from qd_detr.dataset.collate or a dict "
                        f"with 'qids' and the model's keyword arguments, got {type(batch).__name__}")
    kwargs = {k: v for k, v in inputs.items() if k != "targets"}
    return [int(q) for q in qids], [str(v) for v in vids], kwargs


# ------------------------------------------------------------------------------------------ monitor
class GateMonitor:
    """Capture gates on fixed validation queries every ``every`` epochs (see the module docstring).

    Args:
        model: a ``QDDETR`` with a fusion module (``model.fusion``), called as ``model(**kwargs)``.
        batches: the validation batches (forms in the module docstring).
        out_dir: folder of the ``epoch_{n}`` analyses, the evolution table and plots (created).
        every: capture when ``(epoch + 1) % every == 0`` in ``step(epoch)``.
        plots: also draw the per-epoch figures (``plot_all``); evolution figures are always drawn
            unless ``evolution_plots=False``.
        top_n: queries per ranking in the per-epoch CSVs.
        overwrite: delete existing ``epoch_{n}`` folders in ``out_dir`` first; resume: keep them (to
            continue a run). Without either, existing epoch folders are an error.
        progress: a tqdm bar (stderr) over the batches of each capture.
        writer: a TensorBoard ``SummaryWriter`` (or None): each ``capture(n)`` also writes the gate
            histograms and statistics at step ``n`` (module docstring).
    """

    def __init__(self, model, batches, out_dir, every=5, plots=True, evolution_plots=True, top_n=10,
                 overwrite=False, resume=False, progress=False, writer=None):
        if resume and overwrite:
            raise ConfigError("GateMonitor: overwrite=True and resume=True contradict each other")
        if int(every) < 1:
            raise ConfigError(f"GateMonitor: every must be a positive number of epochs, got {every}")
        fusion = getattr(model, "fusion", None)
        if fusion is None or not hasattr(fusion, "fusion_layers"):
            from qd_detr.errors import NoFusionError
            raise NoFusionError("GateMonitor: the model has no audio-visual fusion module (model.fusion), "
                                "so there are no gates to monitor")
        self.model = model
        self.fusion = fusion
        self.gating_type = fusion_gating_type(fusion)
        self.num_layers = fusion_num_layers(fusion)
        self.hidden_dim = getattr(fusion, "hidden_dim", None)
        if iter(batches) is batches:  # a one-shot iterator: keep its batches for every capture
            batches = list(batches)
        self.batches = batches
        self.out_dir = os.path.abspath(out_dir)
        self.every = int(every)
        self.plots = bool(plots)
        self.evolution_plots = bool(evolution_plots)
        self.top_n = int(top_n)
        self.progress = bool(progress)
        self.writer = None if writer is None else check_writer(writer)
        os.makedirs(self.out_dir, exist_ok=True)
        existing = epoch_dirs(self.out_dir)
        if existing and not resume:
            if not overwrite:
                raise ConfigError(f"{self.out_dir}: already holds gate captures "
                                  f"({', '.join(epoch_dir_name(e) for e, _ in existing[:5])}); pass "
                                  "overwrite=True to replace them or resume=True to continue")
            for _, path in existing:
                shutil.rmtree(path)
            for name in (EVOLUTION_FILE, *EVOLUTION_PLOTS.values()):
                if os.path.exists(os.path.join(self.out_dir, name)):
                    os.remove(os.path.join(self.out_dir, name))

    @classmethod
    def from_dataset(cls, model, dataset, out_dir, every=5, qids=None, n=16, batch_size=32, **kwargs):
        """Monitor ``qids`` (or the first ``n`` queries) of a ``QVHighlightsDataset``."""
        return cls(model, DatasetBatches(dataset, qids=qids, n=n, batch_size=batch_size), out_dir, every=every,
                   **kwargs)

    def due(self, epoch):
        """True when ``step(epoch)`` (0-based epoch index) captures."""
        return (int(epoch) + 1) % self.every == 0

    def step(self, epoch):
        """Call after the 0-based training epoch ``epoch``; captures ``epoch_{epoch+1}`` when due.

        Returns the capture's paths (see ``capture``) or None."""
        if not self.due(epoch):
            return None
        return self.capture(int(epoch) + 1)

    # -- capture -----------------------------------------------------------------------------------
    def record(self):
        """Run every batch once with gate recording (``qd_detr.engine.run_batches``); returns
        ``[(qid, vid, GateRecord), ...]``."""
        records, vids = [], {}

        def sink(recs):
            records.extend((rec.sample_id, vids.get(rec.sample_id, ""), rec) for rec in recs)

        def batches():
            for batch in self.batches:
                qids, batch_vids, kwargs = _split_batch(batch)
                vids.update(zip(qids, batch_vids))
                yield qids, kwargs

        for _ in run_batches(self.model, batches(), sink=sink, progress=self.progress, desc="gate monitor"):
            pass
        seen = set()
        for qid, _, _ in records:
            if qid in seen:
                raise ValueError(f"GateMonitor: qid {qid} appears twice in the monitored batches")
            seen.add(qid)
        if not records:
            raise DataError("GateMonitor: the monitored batches are empty")
        return records

    def capture(self, epoch):
        """Record gates now and write ``epoch_{epoch}/`` plus the evolution table and figures.

        ``epoch`` is the number of completed training epochs (0 = untrained). An existing
        ``epoch_{epoch}`` folder is replaced. With a ``writer``, the gate summaries go to TensorBoard at
        step ``epoch`` once the folder is complete. Returns {"dir", "csv", "plots", "evolution",
        "evolution_plots", "tensorboard"} (``tensorboard``: what ``write_gate_summaries`` wrote, or None)."""
        records = self.record()
        final = os.path.join(self.out_dir, epoch_dir_name(epoch))
        with atomic_directory(final) as tmp:  # built under a temporary name, then moved onto epoch_{n}
            ranges = fusion_gate_ranges(self.fusion)  # as trained so far (v2 scale, alpha, beta move)
            sink = GateSink(tmp, self.gating_type, self.num_layers, hidden_dim=self.hidden_dim,
                            kinds=fusion_gate_kinds(self.fusion), gate_ranges=ranges,
                            extra_meta={"epoch": int(epoch), "source": "gate_analysis.monitor"})
            for qid, vid, rec in records:
                sink.add(qid, vid, rec.gates, n_clips=rec.n_clips)
            csvs, plot_paths = sink.finish(top_n=self.top_n, plots=self.plots, plot_top_n=self.top_n)
        rel = lambda p: os.path.join(final, os.path.relpath(p, tmp))  # noqa: E731
        out = {"dir": final, "csv": {k: rel(p) for k, p in csvs.items()}, "plots": [rel(p) for p in plot_paths],
               "tensorboard": None}
        if self.writer is not None:
            out["tensorboard"] = write_gate_summaries(self.writer, sink.stats, epoch)
            self.writer.flush()
            if out["tensorboard"]["skipped"]:
                print(f"warning: {epoch_dir_name(epoch)}: no TensorBoard histogram for "
                      f"{', '.join(out['tensorboard']['skipped'])} (NaN gate values)", file=sys.stderr)
        out.update(self.write_evolution())
        return out

    def write_evolution(self):
        """Rewrite ``gate_evolution.csv`` and the evolution figures from every ``epoch_{n}`` folder."""
        df = read_gate_evolution([self.out_dir])
        path = write_gate_evolution(df, os.path.join(self.out_dir, EVOLUTION_FILE))
        plots = []
        if self.evolution_plots:
            from .plots_evolution import plot_gate_evolution
            value_range = evolution_value_ranges([self.out_dir])
            for by, name in EVOLUTION_PLOTS.items():
                plots.append(plot_gate_evolution(df, os.path.join(self.out_dir, name), by=by, value_range=value_range))
        return {"evolution": path, "evolution_plots": plots}


# the figures live in gate_analysis.plots_evolution (matplotlib, imported on first use)
_PLOT_NAMES = ("plot_gate_evolution",)
__all__ += _PLOT_NAMES
__getattr__ = lazy_attributes(__name__, "gate_analysis.plots_evolution", _PLOT_NAMES)
