"""The gate evolution table of training-monitor captures: ``epoch_{n}`` folders (each a gate analysis of
the monitored queries after n completed epochs) -> ``gate_evolution.csv`` (``EVOLUTION_COLUMNS``: one row
per epoch x query x layer x gate), its per-layer summary and the gate ranges the captures declare.
"""
import json
import os
import re

import numpy as np
import pandas as pd

from qd_detr.errors import DataError
from qd_detr.gates import GATE_KINDS
from qd_detr.io import write_csv

from .outputs import EVOLUTION_FILE, EVOLUTION_PLOTS, GATES_DIR, GATES_META_FILE, STATS_CSV_FILES
from .ranges import TANH, as_range, kind_range, ranges_from_meta

__all__ = ["EVOLUTION_COLUMNS", "EVOLUTION_FILE", "EVOLUTION_PLOTS", "epoch_dir_name", "epoch_dirs",
           "read_gate_evolution", "summarize_gate_evolution", "write_gate_evolution", "evolution_value_ranges"]

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
_EPOCH_RE = re.compile(r"^epoch_(\d+)$")
_PER_QUERY_CSV = STATS_CSV_FILES["per_query"]


def epoch_dir_name(epoch):
    """``epoch_{n}`` (no zero padding; readers sort numerically)."""
    return f"epoch_{int(epoch)}"


def epoch_dirs(folder):
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
    found = epoch_dirs(path)
    if not found and os.path.isdir(os.path.join(path, "gate_monitor")):
        found = epoch_dirs(os.path.join(path, "gate_monitor"))
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
            meta_path = os.path.join(folder, GATES_DIR, GATES_META_FILE)
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
    return write_csv(df[list(EVOLUTION_COLUMNS)], path, float_format="%.9g")


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
