"""Raw fusion gates on disk: streamed, lossless float32, readable with numpy and pandas alone.

Layout of a gate store (``{run}/gates/``)::

    shard_00000.npz   np.savez (uncompressed), one per flush; keys
                      "{qid}/layers.{layer}.gate_{kind}" -> float32 gate array of query ``qid``
                      "__qids__" int64 (Q,), "__vids__" unicode (Q,), "__n_clips__" int64 (Q,)
                      (the queries of the shard in recorded order; lets a resumed writer rebuild the index)
    index.csv         qid, vid, n_clips, shard   (one row per query, recorded order)
    meta.json         gating_type, num_layers, hidden_dim, kinds, layers, n_queries, format_version,
                      shape_convention, gate_ranges, complete, extra

Shape convention (padding already excluded, T = valid clips of the query, D = hidden dim):
``global`` / ``legacy`` -> (1,) (one gate per query); ``clipwise`` -> (T,); ``elementwise`` -> (T, D).
Gate kinds are those of ``qd_detr.gates.GATE_KINDS``: ``mha`` and ``ffn`` in every layout, plus
``beta`` (the FiLM shift) in v2 FiLM layers. ``meta.json`` records each gate's declared range
(``gate_ranges``: {gate name: ``GateRange.as_dict()``}: tanh [-1, 1] for v1, sigmoid (0, scale),
scaled tanh [-|alpha|, |alpha|]); ``GateRun.gate_ranges`` reads them back, and a store written before
ranges were recorded reads as tanh [-1, 1] (``gate_analysis.ranges``).

Every file is written to a temporary name in the same folder and moved into place with
``os.replace``, so a crash never leaves a half-written shard, index or meta file under its final name.
``meta.json`` is written with ``complete: false`` when a writer starts and rewritten with
``complete: true`` by ``close()``; ``load_gate_run`` refuses incomplete stores.

Example::

    w = GateStoreWriter("outputs/run1", gating_type="clipwise", num_layers=4)
    for batch in batches:
        for qid, vid, gates in batch:          # gates[(layer, kind)] -> float32 array
            w.add(qid, vid, gates)
        w.flush()                              # one shard per batch; memory stays flat
    w.close()                                  # index.csv + meta.json
    run = load_gate_run("outputs/run1")
    run.gate(qid, 0, "mha")                    # (T,) float32
"""
import json
import os
import re
from collections import OrderedDict

import numpy as np
import pandas as pd

from qd_detr.gates import DEFAULT_KINDS, GATE_KINDS, gate_name
from qd_detr.io import TMP_PREFIX, write_csv, write_npz, write_text

from .gate_arrays import PER_CLIP_GATING_TYPES, SHAPE_CONVENTION, as_qid, check_gating_type, validate_gates
from .outputs import GATES_DIR, GATES_INDEX_FILE, GATES_META_FILE
from .ranges import as_range, ranges_as_dict, ranges_from_meta, resolve_ranges

# GATE_KINDS and gate_name are qd_detr.gates' (the store's key format uses them)
__all__ = ["GateStoreWriter", "GateRun", "load_gate_run", "iter_shard_queries", "FORMAT_VERSION", "GATE_KINDS",
           "gate_name"]

FORMAT_VERSION = 1
_SHARD_RE = re.compile(r"^shard_(\d{5,})\.npz$")


class GateStoreWriter:
    """Stream per-query gates to ``{output_dir}/gates/`` as npz shards.

    Args:
        output_dir: run folder; the store goes to ``{output_dir}/gates/``.
        gating_type: "global" | "clipwise" | "elementwise" (also "legacy", "global_diagstrip_ssm": one gate per query).
        num_layers: number of fusion layers; layers are ``0..num_layers-1``.
        hidden_dim: feature dims D of elementwise gates (inferred from the first query when None).
        extra_meta: JSON-serialisable dict stored under ``meta["extra"]`` (checkpoint, split, ...).
        kinds: gate kinds per layer, in ``GATE_KINDS`` order (default ("mha", "ffn"); v2 FiLM adds "beta").
        gate_ranges: {gate name or (layer, kind): GateRange or its dict}, the declared ranges
            (``qd_detr.gates.fusion_gate_ranges``), stored in meta.json; gates not named are tanh [-1, 1].
        resume: pick up the complete shards already in the folder and append to them.
        overwrite: delete an existing store's files first (otherwise an existing store is an error).
        max_buffered_queries: if set, ``add`` flushes automatically once this many queries are buffered.

    ``add`` validates and buffers; ``flush`` writes the buffer as one shard (call it once per batch);
    ``close`` flushes and writes ``index.csv`` and ``meta.json``. A duplicated qid is a ValueError.
    Use as a context manager: on an exception the buffer is flushed but the store stays marked
    incomplete, so the run can be resumed with ``resume=True``.
    """

    def __init__(self, output_dir, gating_type, num_layers, hidden_dim=None, extra_meta=None, *,
                 kinds=DEFAULT_KINDS, gate_ranges=None, resume=False, overwrite=False, max_buffered_queries=None):
        if resume and overwrite:
            raise ValueError("resume=True and overwrite=True contradict each other; choose one")
        self.gating_type = check_gating_type(gating_type)
        if int(num_layers) < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.num_layers = int(num_layers)
        self.layers = list(range(self.num_layers))
        self.kinds = tuple(kinds)
        unknown = [k for k in self.kinds if k not in GATE_KINDS]
        if unknown or len(set(self.kinds)) != len(self.kinds):
            raise ValueError(f"kinds must be distinct gate kinds of {list(GATE_KINDS)}, got {list(self.kinds)}")
        self.gate_ranges = {gate_name(*key): rng for key, rng in
                            resolve_ranges(gate_ranges, self.layers, self.kinds).items()}
        if gating_type != "elementwise" and hidden_dim is not None:
            hidden_dim = int(hidden_dim)  # recorded for information only
        self.hidden_dim = None if hidden_dim is None else int(hidden_dim)
        self.extra_meta = dict(extra_meta or {})
        self.max_buffered_queries = max_buffered_queries
        self.run_dir = os.path.abspath(output_dir)
        self.dir = os.path.join(self.run_dir, GATES_DIR)
        os.makedirs(self.dir, exist_ok=True)
        self._buffer = []        # [(qid, vid, n_clips, gates)]
        self._index = []         # [(qid, vid, n_clips, shard_name)] of flushed queries
        self._seen = set()
        self._next_shard = 0
        self._closed = False
        existing = self._existing_files()
        if existing and not (resume or overwrite):
            raise FileExistsError(f"a gate store already exists in {self.dir}; pass resume=True to append to it "
                                  f"or overwrite=True to replace it")
        if overwrite:
            for p in existing:
                os.remove(p)
        elif resume:
            self._resume()
        self._write_meta(complete=False)

    # -- setup -----------------------------------------------------------------------------------
    def _existing_files(self):
        names = [n for n in os.listdir(self.dir)
                 if _SHARD_RE.match(n) or n in (GATES_INDEX_FILE, GATES_META_FILE) or n.startswith(TMP_PREFIX)]
        return [os.path.join(self.dir, n) for n in sorted(names)]

    def _resume(self):
        for n in os.listdir(self.dir):  # leftovers of a writer that died mid-write: never complete
            if n.startswith(TMP_PREFIX):
                os.remove(os.path.join(self.dir, n))
        meta_path = os.path.join(self.dir, GATES_META_FILE)
        if os.path.exists(meta_path):
            with open(meta_path) as fh:
                meta = json.load(fh)
            for key, mine in (("gating_type", self.gating_type), ("num_layers", self.num_layers),
                              ("kinds", list(self.kinds))):
                if meta.get(key) != mine:
                    raise ValueError(f"cannot resume the gate store in {self.dir}: it has {key}={meta.get(key)!r}, "
                                     f"this writer has {mine!r}")
            stored = ranges_from_meta(meta)
            if stored and any(as_range(stored.get(n, r)) != r for n, r in self.gate_ranges.items()):
                raise ValueError(f"cannot resume the gate store in {self.dir}: its gate_ranges differ from this "
                                 f"writer's (another checkpoint?)")
            if meta.get("hidden_dim") is not None:
                if self.hidden_dim is not None and meta["hidden_dim"] != self.hidden_dim:
                    raise ValueError(f"cannot resume the gate store in {self.dir}: hidden_dim {meta['hidden_dim']} "
                                     f"!= {self.hidden_dim}")
                self.hidden_dim = meta["hidden_dim"]
            self.extra_meta = {**meta.get("extra", {}), **self.extra_meta}
        for k, path in _list_shards(self.dir):
            for qid, vid, n_clips in _read_shard_index(path):
                if qid in self._seen:
                    raise ValueError(f"cannot resume: qid {qid} appears twice in {self.dir} (again in {path})")
                self._seen.add(qid)
                self._index.append((qid, vid, n_clips, os.path.basename(path)))
            self._next_shard = k + 1

    # -- writing ---------------------------------------------------------------------------------
    @property
    def n_queries(self):
        """Queries added so far (flushed, buffered and resumed)."""
        return len(self._seen)

    def add(self, qid, vid, gates, n_clips=None):
        """Buffer one query's gates ``{(layer, kind): array}`` (shapes per the module docstring).

        ``n_clips`` (valid clips T) is only needed for per-query gating types, whose gates do not
        reveal T; it is stored in ``index.csv`` (-1 when unknown).
        """
        if self._closed:
            raise RuntimeError(f"GateStoreWriter for {self.dir} is closed")
        qid = as_qid(qid)
        if qid in self._seen:
            raise ValueError(f"duplicated qid {qid}: already recorded in the gate store {self.dir}")
        where = f"qid {qid}"
        checked, t, self.hidden_dim = validate_gates(gates, self.gating_type, self.layers, self.kinds,
                                                      self.hidden_dim, where)
        if t is None:
            t = -1 if n_clips is None else int(n_clips)
        elif n_clips is not None and int(n_clips) != t:
            raise ValueError(f"{where}: n_clips={n_clips} but the gates cover {t} clips")
        self._seen.add(qid)
        self._buffer.append((qid, "" if vid is None else str(vid), t, checked))
        if self.max_buffered_queries and len(self._buffer) >= self.max_buffered_queries:
            self.flush()

    def flush(self):
        """Write the buffered queries as the next shard (atomically); no-op when the buffer is empty.

        Returns the shard path or None."""
        if not self._buffer:
            return None
        name = f"shard_{self._next_shard:05d}.npz"
        path = os.path.join(self.dir, name)
        arrays = {"__qids__": np.array([b[0] for b in self._buffer], dtype=np.int64),
                  "__vids__": np.array([b[1] for b in self._buffer], dtype=np.str_),
                  "__n_clips__": np.array([b[2] for b in self._buffer], dtype=np.int64)}
        for qid, _, _, gates in self._buffer:
            for (layer, kind), arr in gates.items():
                arrays[f"{qid}/{gate_name(layer, kind)}"] = arr
        write_npz(path, arrays)  # big: not fsynced, left to the OS
        self._index.extend((qid, vid, t, name) for qid, vid, t, _ in self._buffer)
        self._buffer = []
        self._next_shard += 1
        return path

    def _write_meta(self, complete):
        meta = {
            "format": "avigate-gates gate store",
            "format_version": FORMAT_VERSION,
            "complete": bool(complete),
            "gating_type": self.gating_type,
            "num_layers": self.num_layers,
            "layers": self.layers,
            "kinds": list(self.kinds),
            "hidden_dim": self.hidden_dim,
            "n_queries": len(self._index) if complete else None,
            "n_shards": self._next_shard,
            "dtype": "float32",
            "key_format": "{qid}/layers.{layer}.gate_{kind}",
            "shape_convention": SHAPE_CONVENTION[self.gating_type],
            "gate_ranges": ranges_as_dict(self.gate_ranges),
            "extra": self.extra_meta,
        }
        write_text(os.path.join(self.dir, GATES_META_FILE), json.dumps(meta, indent=2, default=str) + "\n")

    def close(self):
        """Flush, then write ``index.csv`` and the complete ``meta.json``; returns the store folder."""
        if self._closed:
            return self.dir
        self.flush()
        index = pd.DataFrame(self._index, columns=["qid", "vid", "n_clips", "shard"])
        index = index.astype({"qid": np.int64, "n_clips": np.int64})
        write_csv(index, os.path.join(self.dir, GATES_INDEX_FILE))
        self._write_meta(complete=True)
        self._closed = True
        return self.dir

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.flush()  # keep what is complete; the store stays incomplete and resumable
            self._closed = True
        return False


def _list_shards(store_dir):
    shards = []
    for n in os.listdir(store_dir):
        m = _SHARD_RE.match(n)
        if m:
            shards.append((int(m.group(1)), os.path.join(store_dir, n)))
    return sorted(shards)


def _read_shard_index(path):
    try:
        with np.load(path) as z:
            qids, vids, n_clips = z["__qids__"], z["__vids__"], z["__n_clips__"]
    except Exception as e:  # noqa: BLE001 - re-raised with the path
        raise ValueError(f"gate shard {path} is unreadable ({type(e).__name__}: {e})") from e
    return [(int(q), str(v), int(t)) for q, v, t in zip(qids, vids, n_clips)]


def iter_shard_queries(output_dir):
    """Yield ``(qid, vid, n_clips, gates)`` from every complete shard, in recorded order, without
    requiring a closed store (used to rebuild statistics when an interrupted run is resumed)."""
    store_dir = os.path.join(os.path.abspath(output_dir), GATES_DIR)
    if not os.path.isdir(store_dir):
        return
    pattern = re.compile(r"^(-?\d+)/layers\.(\d+)\.gate_(\w+)$")
    for _, path in _list_shards(store_dir):
        with np.load(path) as z:
            gates = {}
            for key in z.files:
                m = pattern.match(key)
                if m:
                    gates.setdefault(int(m.group(1)), {})[(int(m.group(2)), m.group(3))] = z[key]
            for qid, vid, n_clips in zip(z["__qids__"], z["__vids__"], z["__n_clips__"]):
                yield int(qid), str(vid), int(n_clips), gates[int(qid)]


def _resolve_store_dir(output_dir):
    path = os.path.abspath(os.fspath(output_dir))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no gate store: {path} does not exist")
    for cand in (os.path.join(path, GATES_DIR), path):
        if os.path.isfile(os.path.join(cand, GATES_META_FILE)):
            return cand
    raise FileNotFoundError(f"no gate store in {path}: expected {os.path.join(path, GATES_DIR, GATES_META_FILE)} "
                            f"(or meta.json directly in {path})")


class GateRun:
    """Read access to a closed gate store. Shards are opened lazily (a few kept open).

    Attributes: ``qids`` (list of int, recorded order), ``vids`` ({qid: vid}), ``n_clips``
    ({qid: T}, -1 when unknown for per-query gating), ``layers``, ``kinds``, ``gating_type``,
    ``hidden_dim``, ``gate_ranges`` ({gate name: GateRange} from meta.json; tanh [-1, 1] for gates
    of a store that records none), ``meta`` (dict of meta.json), ``path`` (the ``gates/`` folder).
    """

    def __init__(self, store_dir, max_open_shards=4):
        self.path = store_dir
        meta_path = os.path.join(store_dir, GATES_META_FILE)
        with open(meta_path) as fh:
            try:
                self.meta = json.load(fh)
            except json.JSONDecodeError as e:
                raise ValueError(f"gate store meta file {meta_path} is not valid JSON: {e}") from e
        if not self.meta.get("complete"):
            raise ValueError(f"gate store {store_dir} is incomplete: its writer was not closed. Reopen it with "
                             f"GateStoreWriter(..., resume=True) and call close() to finish it")
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"gate store {store_dir} has format_version {self.meta.get('format_version')!r}; "
                             f"this code reads version {FORMAT_VERSION}")
        index_path = os.path.join(store_dir, GATES_INDEX_FILE)
        if not os.path.isfile(index_path):
            raise ValueError(f"gate store {store_dir} is incomplete: {index_path} is missing")
        index = pd.read_csv(index_path, dtype={"qid": np.int64, "vid": str, "n_clips": np.int64, "shard": str},
                            keep_default_na=False)
        if list(index.columns) != ["qid", "vid", "n_clips", "shard"]:
            raise ValueError(f"{index_path} has columns {list(index.columns)}; expected qid, vid, n_clips, shard")
        if self.meta.get("n_queries") != len(index):
            raise ValueError(f"gate store {store_dir} is inconsistent: meta.json says {self.meta.get('n_queries')} "
                             f"queries, index.csv lists {len(index)}")
        missing = sorted({s for s in index["shard"] if not os.path.isfile(os.path.join(store_dir, s))})
        if missing:
            raise FileNotFoundError(f"gate store {store_dir} is incomplete: shard files {missing} are missing")
        self.gating_type = self.meta["gating_type"]
        self.layers = [int(l) for l in self.meta["layers"]]
        self.kinds = tuple(self.meta["kinds"])
        self.hidden_dim = self.meta.get("hidden_dim")
        self.gate_ranges = {gate_name(*key): rng for key, rng in
                            resolve_ranges(ranges_from_meta(self.meta), self.layers, self.kinds).items()}
        self.qids = [int(q) for q in index["qid"]]
        self.vids = dict(zip(self.qids, index["vid"].astype(str)))
        self.n_clips = dict(zip(self.qids, (int(t) for t in index["n_clips"])))
        self._shard_of = dict(zip(self.qids, index["shard"].astype(str)))
        self._open = OrderedDict()
        self._max_open = max(1, int(max_open_shards))

    def __repr__(self):
        return (f"GateRun({self.path!r}, gating_type={self.gating_type!r}, n_queries={len(self.qids)}, "
                f"layers={self.layers}, kinds={list(self.kinds)})")

    def __len__(self):
        return len(self.qids)

    @staticmethod
    def _qid(qid):
        """A qid as the store keys it (an int): ``5000``, ``np.int64(5000)`` and ``"5000"`` are the same query."""
        if isinstance(qid, str) and qid.strip().lstrip("-").isdigit():
            return int(qid)
        return int(qid) if isinstance(qid, np.integer) else qid

    def __contains__(self, qid):
        return self._qid(qid) in self._shard_of

    # -- access ----------------------------------------------------------------------------------
    def _shard(self, name):
        z = self._open.get(name)
        if z is None:
            z = np.load(os.path.join(self.path, name))  # lazy NpzFile: arrays are read on access
            self._open[name] = z
            while len(self._open) > self._max_open:
                self._open.popitem(last=False)[1].close()
        else:
            self._open.move_to_end(name)
        return z

    def _check(self, qid, layer=None, kind=None):
        qid = None if qid is None else self._qid(qid)
        if qid is not None and qid not in self._shard_of:
            raise KeyError(f"qid {qid!r} is not in the gate run {self.path} ({len(self.qids)} queries)")
        if layer is not None and layer not in self.layers:
            raise KeyError(f"layer {layer!r} is not in the gate run {self.path} (layers {self.layers})")
        if kind is not None and kind not in self.kinds:
            raise KeyError(f"gate kind {kind!r} is not in the gate run {self.path} (kinds {list(self.kinds)})")

    def gate_range(self, layer, kind):
        """The declared ``GateRange`` of ``layers.{layer}.gate_{kind}``."""
        self._check(None, layer, kind)
        return self.gate_ranges[gate_name(layer, kind)]

    def gate(self, qid, layer, kind):
        """float32 gates of one query: global (1,), clipwise (T,), elementwise (T, D)."""
        self._check(qid, layer, kind)
        qid = self._qid(qid)
        return self._shard(self._shard_of[qid])[f"{qid}/{gate_name(layer, kind)}"]

    def gates(self, qid):
        """``{(layer, kind): array}`` of one query."""
        self._check(qid)
        qid = self._qid(qid)
        z = self._shard(self._shard_of[qid])
        return {(l, k): z[f"{qid}/{gate_name(l, k)}"] for l in self.layers for k in self.kinds}

    def iter_queries(self, qids=None):
        """Yield ``(qid, vid, gates_dict)`` in recorded order (or in the order of ``qids``)."""
        for qid in (self.qids if qids is None else qids):
            self._check(qid)
            qid = self._qid(qid)
            yield qid, self.vids[qid], self.gates(qid)

    def frame(self, qids=None, reduce_dims=False):
        """Tidy DataFrame, one row per gate value.

        Columns: qid (int), vid (str), layer (int), gate ("mha", "ffn", "beta"), name ("layers.0.gate_mha"),
        clip (clip index; -1 for per-query gating), dim (feature dim; -1 unless elementwise),
        value (float64, exact copy of the stored float32). With ``reduce_dims=True`` elementwise
        gates are averaged over dims (float64 mean) to one row per clip (dim = -1).
        Rows are ordered by query (recorded order), layer, gate kind, clip, dim. Elementwise
        without ``reduce_dims`` is T*D rows per gate: pass ``qids`` for big runs.
        """
        cols = {c: [] for c in ("qid", "layer", "gate", "clip", "dim", "value")}
        vids = []
        for qid, vid, gates in self.iter_queries(qids):
            for (layer, kind), arr in gates.items():
                a = np.asarray(arr, dtype=np.float64)
                if a.ndim == 2 and reduce_dims:
                    a = a.mean(axis=1)
                if a.ndim == 2:
                    t, d = a.shape
                    clip, dim = np.repeat(np.arange(t), d), np.tile(np.arange(d), t)
                elif self.gating_type in PER_CLIP_GATING_TYPES:
                    clip, dim = np.arange(a.size), np.full(a.size, -1)
                else:
                    clip, dim = np.full(a.size, -1), np.full(a.size, -1)
                n = a.size
                cols["qid"].append(np.full(n, qid, dtype=np.int64))
                cols["layer"].append(np.full(n, layer, dtype=np.int64))
                cols["gate"].append(np.full(n, kind, dtype=object))
                cols["clip"].append(clip.astype(np.int64))
                cols["dim"].append(dim.astype(np.int64))
                cols["value"].append(a.reshape(-1))
                vids.append((n, vid))
        if not cols["qid"]:
            return pd.DataFrame({"qid": pd.Series(dtype=np.int64), "vid": pd.Series(dtype=str),
                                 "layer": pd.Series(dtype=np.int64), "gate": pd.Series(dtype=str),
                                 "name": pd.Series(dtype=str), "clip": pd.Series(dtype=np.int64),
                                 "dim": pd.Series(dtype=np.int64), "value": pd.Series(dtype=np.float64)})
        out = {k: np.concatenate(v) for k, v in cols.items()}
        df = pd.DataFrame({
            "qid": out["qid"],
            "vid": np.concatenate([np.full(n, v, dtype=object) for n, v in vids]),
            "layer": out["layer"],
            "gate": out["gate"],
        })
        df["vid"] = df["vid"].astype(str)
        df["gate"] = df["gate"].astype(str)
        df["name"] = "layers." + df["layer"].astype(str) + ".gate_" + df["gate"]
        df["clip"] = out["clip"]
        df["dim"] = out["dim"]
        df["value"] = out["value"]
        return df

    # -- lifecycle -------------------------------------------------------------------------------
    def close(self):
        while self._open:
            self._open.popitem()[1].close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def load_gate_run(output_dir, max_open_shards=4):
    """Open the gate store of a run: ``output_dir`` is the run folder (containing ``gates/``) or the
    ``gates/`` folder itself. Raises FileNotFoundError when there is no store, ValueError when it is
    incomplete or inconsistent; both messages name the path."""
    return GateRun(_resolve_store_dir(output_dir), max_open_shards=max_open_shards)
