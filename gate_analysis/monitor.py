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
the raw gates (``gates/``), the statistics CSVs of ``gate_analysis.stats`` and, with ``plots=True``,
the figures of ``gate_analysis.plots.plot_all`` (``plots/``). The folder is written under a temporary
name and renamed when complete, so a crash never leaves a half-written ``epoch_{n}``. Finally
``out_dir/gate_evolution.csv`` (``EVOLUTION_COLUMNS``: one row per epoch x query x layer x gate) and
the figures ``evolution_layers.png`` / ``evolution_queries.png`` are rewritten from every
``epoch_{n}`` folder.

``n`` is the number of completed training epochs: ``step(epoch)`` with the 0-based epoch index
captures ``epoch_{epoch + 1}``.
"""
import inspect
import json
import os
import re
import shutil
import sys

import numpy as np
import pandas as pd
import torch

from qd_detr.errors import ConfigError, DataError
from qd_detr.gates import (
    GATE_KINDS,
    GateRecorder,
    fusion_gate_kinds,
    fusion_gate_ranges,
    fusion_gating_type,
    fusion_num_layers,
)

from .ranges import TANH, as_range, kind_range, ranges_from_meta
from .stats import CSV_FILES, GateStatsAccumulator, write_stats_csvs
from .store import GateStoreWriter, atomic_write_csv, load_gate_run

__all__ = ["GateMonitor", "DatasetBatches", "read_gate_evolution", "summarize_gate_evolution",
           "plot_gate_evolution", "write_gate_evolution", "EVOLUTION_COLUMNS", "EVOLUTION_FILE",
           "EVOLUTION_PLOTS", "epoch_dir_name", "evolution_value_ranges"]

#: Columns of ``gate_evolution.csv`` with a one-sentence description each.
EVOLUTION_COLUMNS = {
    "epoch": "Completed training epochs when the gates were captured (0 = before training).",
    "qid": "QVHighlights query id.",
    "layer": "Fusion layer index (0-based).",
    "gate": "Gate kind: 'mha' (audio cross-attention branch), 'ffn' (FFN branch) or 'beta' (v2 FiLM shift).",
    "name": "Dotted gate name 'layers.{layer}.gate_{gate}'.",
    "mean": "Mean of the query's gate values (over valid clips, and dims for elementwise gating).",
    "std": "Population std (ddof=0) of the query's gate values.",
    "min": "Smallest gate value of the query.",
    "max": "Largest gate value of the query.",
    "n_values": "Number of gate values of the query (1 global, T clipwise, T*D elementwise).",
}
EVOLUTION_FILE = "gate_evolution.csv"
EVOLUTION_PLOTS = {"layer": "evolution_layers.png", "query": "evolution_queries.png"}
_EPOCH_RE = re.compile(r"^epoch_(\d+)$")
_TMP_PREFIX = ".tmp-"
_PER_QUERY_CSV = CSV_FILES["per_query"]


def epoch_dir_name(epoch):
    """``epoch_{n}`` (no zero padding; readers sort numerically)."""
    return f"epoch_{int(epoch)}"


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
        from qd_detr.dataset import collate
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


def _to_device(kwargs, device):
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in kwargs.items()}


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
    """

    def __init__(self, model, batches, out_dir, every=5, plots=True, evolution_plots=True, top_n=10,
                 overwrite=False, resume=False, progress=False):
        if resume and overwrite:
            raise ConfigError("GateMonitor: overwrite=True and resume=True contradict each other")
        if int(every) < 1:
            raise ConfigError(f"GateMonitor: every must be a positive number of epochs, got {every}")
        fusion = getattr(model, "fusion", None)
        if fusion is None or not hasattr(fusion, "fusion_layers"):
            from qd_detr.model import NoFusionError
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
        self._neg_kwarg = "compute_neg" in inspect.signature(model.forward).parameters
        os.makedirs(self.out_dir, exist_ok=True)
        existing = _epoch_dirs(self.out_dir)
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
        """Run every batch once with gate recording; returns ``[(qid, vid, GateRecord), ...]``."""
        model, fusion = self.model, self.fusion
        device = next(model.parameters()).device
        records, pending = [], {}

        def sink(recs):
            for rec in recs:
                records.append((rec.sample_id, pending.get(rec.sample_id, ""), rec))

        was_training = model.training
        user_recorder = getattr(fusion, "_gate_recorder", None)  # tracking the user enabled: paused
        if user_recorder is not None:
            user_recorder.detach()
        recorder = GateRecorder(fusion, sink)
        batches = self.batches
        if self.progress:
            from tqdm import tqdm
            batches = tqdm(batches, desc="gate monitor", file=sys.stderr, unit="batch", leave=False)
        try:
            model.eval()
            recorder.attach()
            with torch.no_grad():
                for batch in batches:
                    qids, vids, kwargs = _split_batch(batch)
                    pending.update(zip(qids, vids))
                    recorder.set_ids(qids)
                    if self._neg_kwarg:
                        kwargs["compute_neg"] = False
                    model(**_to_device(kwargs, device))
        finally:
            recorder.detach()
            if user_recorder is not None:
                user_recorder.attach()
            model.train(was_training)
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
        ``epoch_{epoch}`` folder is replaced. Returns {"dir", "csv", "plots", "evolution",
        "evolution_plots"}."""
        records = self.record()
        final = os.path.join(self.out_dir, epoch_dir_name(epoch))
        tmp = os.path.join(self.out_dir, f"{_TMP_PREFIX}{os.getpid()}-{epoch_dir_name(epoch)}")
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        layers = list(range(self.num_layers))
        try:
            kinds = fusion_gate_kinds(self.fusion)
            ranges = fusion_gate_ranges(self.fusion)  # as trained so far (v2 scale, alpha, beta move)
            writer = GateStoreWriter(tmp, self.gating_type, self.num_layers, hidden_dim=self.hidden_dim, kinds=kinds,
                                     gate_ranges=ranges,
                                     extra_meta={"epoch": int(epoch), "source": "gate_analysis.monitor"})
            acc = GateStatsAccumulator(self.gating_type, layers, kinds=kinds, gate_ranges=ranges)
            for qid, vid, rec in records:
                writer.add(qid, vid, rec.gates, n_clips=rec.n_clips)
                acc.update(qid, rec.gates, vid=vid, n_clips=rec.n_clips)
            writer.close()
            csvs = write_stats_csvs(acc, tmp, top_n=self.top_n)
            plot_paths = []
            if self.plots:
                from .plots import plot_all
                run = load_gate_run(tmp)
                try:
                    plot_paths = plot_all(acc, run, tmp, top_n=self.top_n)
                finally:
                    run.close()
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                shutil.rmtree(tmp)
        rel = lambda p: os.path.join(final, os.path.relpath(p, tmp))  # noqa: E731
        out = {"dir": final, "csv": {k: rel(p) for k, p in csvs.items()}, "plots": [rel(p) for p in plot_paths]}
        out.update(self.write_evolution())
        return out

    def write_evolution(self):
        """Rewrite ``gate_evolution.csv`` and the evolution figures from every ``epoch_{n}`` folder."""
        df = read_gate_evolution([self.out_dir])
        path = write_gate_evolution(df, os.path.join(self.out_dir, EVOLUTION_FILE))
        plots = []
        if self.evolution_plots:
            value_range = evolution_value_ranges([self.out_dir])
            for by, name in EVOLUTION_PLOTS.items():
                plots.append(plot_gate_evolution(df, os.path.join(self.out_dir, name), by=by, value_range=value_range))
        return {"evolution": path, "evolution_plots": plots}


# ------------------------------------------------------------------------------------------ reading
def _epoch_dirs(folder):
    """[(epoch, path)] of the complete ``epoch_{n}`` subfolders of ``folder``, sorted by epoch."""
    out = []
    for name in os.listdir(folder):
        m = _EPOCH_RE.match(name)
        path = os.path.join(folder, name)
        if m and os.path.isdir(path):
            out.append((int(m.group(1)), path))
    return sorted(out)


def _read_epoch_dir(path, epoch):
    csv = os.path.join(path, _PER_QUERY_CSV)
    if not os.path.isfile(csv):
        raise DataError(f"{path}: no {_PER_QUERY_CSV}; not a gate capture folder")
    try:
        q = pd.read_csv(csv)
    except (OSError, ValueError) as exc:
        raise DataError(f"{csv}: cannot read ({exc})") from None
    missing = {"qid", "layer", "gate", "name", "mean", "std", "min", "max", "count"} - set(q.columns)
    if missing:
        raise DataError(f"{csv}: missing column(s) {sorted(missing)}")
    df = pd.DataFrame({"epoch": np.int64(epoch), "qid": q["qid"].astype(np.int64),
                       "layer": q["layer"].astype(np.int64), "gate": q["gate"].astype(str),
                       "name": q["name"].astype(str), "mean": q["mean"].astype(float), "std": q["std"].astype(float),
                       "min": q["min"].astype(float), "max": q["max"].astype(float),
                       "n_values": q["count"].astype(np.int64)})
    return df


def _sources(path):
    """[(epoch, folder)] for an ``epoch_{n}`` folder, a monitor folder, or a folder with ``gate_monitor/``."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise DataError(f"{path}: gate evolution folder not found")
    m = _EPOCH_RE.match(os.path.basename(path))
    if m:
        return [(int(m.group(1)), path)]
    found = _epoch_dirs(path)
    if not found and os.path.isdir(os.path.join(path, "gate_monitor")):
        found = _epoch_dirs(os.path.join(path, "gate_monitor"))
    if not found:
        raise DataError(f"{path}: holds no epoch_N gate capture folders")
    return found


def _run_labels(roots):
    """Short unique labels for run folders: the shortest unique path suffixes."""
    parts = [os.path.normpath(r).split(os.sep) for r in roots]
    depth = 1
    while True:
        labels = [os.sep.join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(set(map(tuple, parts))) or depth >= max(len(p) for p in parts):
            return labels
        depth += 1


def read_gate_evolution(paths):
    """The evolution table of one or several runs.

    Args:
        paths: a path or a list of paths, each an ``epoch_{n}`` folder, a monitor folder holding
            ``epoch_{n}`` folders, a training results folder holding ``gate_monitor/``, or a
            ``gate_evolution.csv`` file. Several ``epoch_{n}`` folders of the same parent form one run.
    Returns:
        DataFrame with ``run`` (short label of the run folder) and ``EVOLUTION_COLUMNS``, sorted by
        run, epoch, qid, layer, gate (mha first).
    Raises:
        DataError: a path is missing, holds no captures, or one run repeats an epoch.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = list(paths)
    if not paths:
        raise DataError("read_gate_evolution: no paths given")
    groups = {}  # run root -> [(epoch, folder or csv)]
    for p in paths:
        p = os.fspath(p)
        if os.path.isfile(p):
            groups.setdefault(os.path.abspath(p), []).append((None, os.path.abspath(p)))
            continue
        src = _sources(p)
        groups.setdefault(os.path.dirname(src[0][1]), []).extend(src)  # epoch folders of one parent: one run
    roots = list(groups)
    labels = _run_labels([os.path.dirname(r) if os.path.isfile(r) else r for r in roots])
    frames = []
    for root, label in zip(roots, labels):
        entries = groups[root]
        if entries[0][0] is None:  # a gate_evolution.csv
            df = pd.read_csv(root)
            missing = set(EVOLUTION_COLUMNS) - set(df.columns)
            if missing:
                raise DataError(f"{root}: missing column(s) {sorted(missing)}")
            df = df[list(EVOLUTION_COLUMNS)]
        else:
            epochs = [e for e, _ in entries]
            dup = sorted({e for e in epochs if epochs.count(e) > 1})
            if dup:
                raise DataError(f"{root}: epoch(s) {dup} given more than once")
            df = pd.concat([_read_epoch_dir(path, e) for e, path in entries], ignore_index=True)
        df.insert(0, "run", label)
        frames.append(df)
    df = pd.concat(frames, ignore_index=True)
    df["_kind"] = df["gate"].map({k: i for i, k in enumerate(GATE_KINDS)}).fillna(len(GATE_KINDS))
    run_order = {label: i for i, label in enumerate(labels)}
    df["_run"] = df["run"].map(run_order)
    df = df.sort_values(["_run", "epoch", "qid", "layer", "_kind"], kind="stable").drop(columns=["_kind", "_run"])
    return df.reset_index(drop=True)


def evolution_value_ranges(paths):
    """{kind: (lo, hi)}: the union over epochs and layers of the gate ranges recorded in the ``gates/meta.json``
    of the captures under ``paths`` (as ``read_gate_evolution`` finds them); tanh [-1, 1] for kinds or
    captures that record none."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    found = {}
    for p in paths:
        p = os.fspath(p)
        sources = [] if os.path.isfile(p) else _sources(p)
        for _, folder in sources:
            meta_path = os.path.join(folder, "gates", "meta.json")
            meta = {}
            if os.path.isfile(meta_path):
                with open(meta_path) as fh:
                    meta = json.load(fh)
            declared = ranges_from_meta(meta)
            for kind in meta.get("kinds", ["mha", "ffn"]):
                rng = kind_range({k: as_range(v) for k, v in declared.items()}, kind) if declared else TANH
                lo, hi = found.get(kind, (rng.low, rng.high))
                found[kind] = (min(lo, rng.low), max(hi, rng.high))
    return found or {"mha": (-1.0, 1.0), "ffn": (-1.0, 1.0)}


def write_gate_evolution(df, path):
    """Write the ``EVOLUTION_COLUMNS`` of ``df`` to ``path`` atomically (floats ``%.9g``)."""
    return atomic_write_csv(df[list(EVOLUTION_COLUMNS)], path, float_format="%.9g")


def summarize_gate_evolution(df):
    """Per run x epoch x layer x gate over the tracked queries.

    Columns: run, epoch, layer, gate, name, n_queries, n_values, ``mean`` / ``std`` (all gate values
    pooled, population std, recovered exactly from per-query mean, std and count),
    ``query_mean`` / ``query_std`` (mean and population std of the per-query means), min, max.
    """
    d = df.copy()
    if "run" not in d:
        d.insert(0, "run", "")
    d["_w"] = d["n_values"].astype(float)
    d["_s"] = d["mean"] * d["_w"]
    d["_ss"] = (d["std"] ** 2 + d["mean"] ** 2) * d["_w"]
    keys = ["run", "epoch", "layer", "gate", "name"]
    g = d.groupby(keys, sort=False)
    out = g.agg(n_queries=("qid", "size"), n_values=("n_values", "sum"), _s=("_s", "sum"), _ss=("_ss", "sum"),
                query_mean=("mean", "mean"), query_std=("mean", lambda x: float(np.std(x, ddof=0))),
                min=("min", "min"), max=("max", "max")).reset_index()
    n = out["n_values"].astype(float)
    out["mean"] = out["_s"] / n
    out["std"] = np.sqrt(np.maximum(out["_ss"] / n - out["mean"] ** 2, 0.0))
    cols = keys + ["n_queries", "n_values", "mean", "std", "query_mean", "query_std", "min", "max"]
    return out[cols]


# ------------------------------------------------------------------------------------------ plots
def _save(fig, path):
    from .plots import _save as save_png
    return save_png(fig, path, dpi=110, bbox_inches="tight")


def _kinds(df):
    present = list(dict.fromkeys(df["gate"].astype(str)))
    return [k for k in GATE_KINDS if k in present] + [k for k in present if k not in GATE_KINDS]


def _kind_lim(value_range, kind, data=()):
    """(lo, hi, signed): y limits of ``kind``: its range (``(lo, hi)`` or ``{kind: (lo, hi)}``; tanh
    [-1, 1] when absent) with a 2% margin, widened to ``data`` outside it; ``signed``: 0 lies inside
    the range (a zero line is drawn)."""
    lo, hi = value_range.get(kind, (-1.0, 1.0)) if isinstance(value_range, dict) else value_range
    signed = lo < 0 < hi
    d = np.asarray(data, dtype=float)
    d = d[np.isfinite(d)]
    if d.size:
        lo, hi = min(lo, float(d.min())), max(hi, float(d.max()))
    pad = 0.02 * (hi - lo)
    return lo - pad, hi + pad, signed


def _plot_by_layer(df, path, value_range):
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    s = summarize_gate_evolution(df)
    kinds, layers, runs = _kinds(s), sorted(s["layer"].unique()), list(dict.fromkeys(s["run"]))
    styles = ["-", "--", ":", "-."]
    cmap = plt.get_cmap("viridis")
    fig, axes = plt.subplots(len(kinds), 2, figsize=(11, 3.2 * len(kinds)), squeeze=False)
    for r, kind in enumerate(kinds):
        ax_m, ax_s = axes[r]
        for ri, run in enumerate(runs):
            for li, layer in enumerate(layers):
                sel = s[(s["gate"] == kind) & (s["layer"] == layer) & (s["run"] == run)].sort_values("epoch")
                if sel.empty:
                    continue
                color = cmap(li / max(1, len(layers) - 1) * 0.85)
                label = f"layers.{layer}.gate_{kind}" + (f" [{run}]" if len(runs) > 1 else "")
                x, m, sd = sel["epoch"].to_numpy(), sel["mean"].to_numpy(), sel["std"].to_numpy()
                ax_m.plot(x, m, styles[ri % len(styles)], marker="o", ms=3, color=color, label=label)
                if len(runs) == 1:
                    ax_m.fill_between(x, m - sd, m + sd, color=color, alpha=0.15, lw=0)
                ax_s.plot(x, sd, styles[ri % len(styles)], marker="o", ms=3, color=color, label=label)
        sel = s[s["gate"] == kind]
        lo, hi, signed = _kind_lim(value_range, kind,
                                   np.concatenate([sel["mean"] - sel["std"], sel["mean"] + sel["std"]]))
        ax_m.set_ylim(lo, hi)
        if signed:
            ax_m.axhline(0, color="0.3", lw=0.8, zorder=0)
        ax_m.set_title(f"gate_{kind}: mean over all values" + (" (band: ± std)" if len(runs) == 1 else ""))
        ax_s.set_ylim(0, max((hi - lo) / 2, float(sel["std"].max()) * 1.05 if len(sel) else 0))
        ax_s.set_title(f"gate_{kind}: std over all values")
        for ax in (ax_m, ax_s):
            ax.set_xlabel("epoch (completed)")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        ax_s.legend(fontsize=7, loc="best")
    fig.suptitle(f"Gate evolution per layer ({int(s.groupby(['run', 'epoch'])['n_queries'].max().max())} "
                 "tracked queries)")
    fig.tight_layout()
    return _save(fig, path)


def _plot_by_query(df, path, value_range, max_queries):
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    kinds, layers = _kinds(df), sorted(df["layer"].unique())
    runs = list(dict.fromkeys(df["run"])) if "run" in df else [""]
    qids = list(dict.fromkeys(df["qid"]))
    if len(qids) > max_queries:
        keep = np.unique(np.linspace(0, len(qids) - 1, max_queries).round().astype(int))
        qids = [qids[i] for i in keep]
    cmap = plt.get_cmap("tab20")
    styles = ["-", "--", ":", "-."]
    fig, axes = plt.subplots(len(kinds), len(layers), figsize=(3.6 * len(layers) + 1.5, 3.0 * len(kinds)),
                             squeeze=False, sharey="row")
    for r, kind in enumerate(kinds):
        for c, layer in enumerate(layers):
            ax = axes[r][c]
            for ri, run in enumerate(runs):
                sub = df[(df["gate"] == kind) & (df["layer"] == layer)]
                if "run" in df:
                    sub = sub[sub["run"] == run]
                for qi, qid in enumerate(qids):
                    sel = sub[sub["qid"] == qid].sort_values("epoch")
                    if sel.empty:
                        continue
                    ax.plot(sel["epoch"], sel["mean"], styles[ri % len(styles)], marker="o", ms=2.5, lw=1,
                            color=cmap(qi % 20), label=f"qid {qid}" if (r, c, ri) == (0, len(layers) - 1, 0) else None)
            lo, hi, signed = _kind_lim(value_range, kind, df.loc[df["gate"] == kind, "mean"])
            ax.set_ylim(lo, hi)
            if signed:
                ax.axhline(0, color="0.3", lw=0.8, zorder=0)
            ax.set_title(f"layers.{layer}.gate_{kind}", fontsize=9)
            ax.set_xlabel("epoch (completed)")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
    for r in range(len(kinds)):
        axes[r][0].set_ylabel("mean gate of the query")
    handles, labels = axes[0][-1].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="center right", fontsize=7, frameon=False)
    note = "" if len(runs) < 2 else f"; line styles: {', '.join(f'{s} {r}' for s, r in zip(styles, runs))}"
    fig.suptitle(f"Per-query mean gate over epochs ({len(qids)} queries{note})")
    fig.tight_layout(rect=(0, 0, 0.88, 1))
    return _save(fig, path)


def plot_gate_evolution(paths_or_frame, out_path, by="layer", value_range=None, max_queries=20):
    """Draw how the gates evolve over epochs and write one PNG; returns its path.

    Args:
        paths_or_frame: paths for ``read_gate_evolution`` (one or several runs), or its DataFrame.
        out_path: PNG to write (atomically).
        by: ``"layer"``: per gate kind, the mean (with a ± std band for a single run) and the std of
            all tracked gate values, one line per layer (line style per run); ``"query"``: one panel
            per layer x gate kind, one line per tracked query (its mean gate), at most ``max_queries``
            queries (evenly subsampled).
        value_range: y limits of gate values: ``(lo, hi)`` or ``{kind: (lo, hi)}``; default: the gate
            ranges the captures declare (``evolution_value_ranges``; [-1, 1] for tanh gates and for a
            DataFrame). Axes widen to values outside.
    """
    if by not in EVOLUTION_PLOTS:
        raise ValueError(f"by must be one of {list(EVOLUTION_PLOTS)}, got {by!r}")
    import matplotlib
    matplotlib.use("Agg")
    df = paths_or_frame if isinstance(paths_or_frame, pd.DataFrame) else read_gate_evolution(paths_or_frame)
    if df.empty:
        raise DataError("plot_gate_evolution: the evolution table is empty")
    if "run" not in df:
        df = df.assign(run="")
    if value_range is None:
        value_range = (-1.0, 1.0) if isinstance(paths_or_frame, pd.DataFrame) else \
            evolution_value_ranges(paths_or_frame)
    elif not isinstance(value_range, dict):
        value_range = tuple(value_range)
    if by == "layer":
        return _plot_by_layer(df, out_path, value_range)
    return _plot_by_query(df, out_path, value_range, int(max_queries))
