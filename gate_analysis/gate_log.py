"""Gate logs of the research code (``junhanjeong/QD-DETR-exp``, ``inference.py --gate_log``): read, check, write.

The format, as the original capture writes it (``gate_logs_<split>_N<all|count>.jsonl``): one JSON object
per query, in evaluation order, lines joined by newlines (the last line has none)::

    {"qid": 5000, "vid": "...", "layer_gates": [{"gate_mha": G, "gate_ffn": G}, ...], "gating_type": "clipwise"}

``layer_gates`` holds one entry per fusion layer, in order; G is the gating function's effective output
for the query (float32 values as JSON numbers), trimmed to the T valid clips: ``[[g]]`` for per-query
gating (``global``, ``global_diagstrip_ssm``), T x 1 for ``clipwise``, T x D for ``elementwise``.

Two optional keys, written by ``export_gate_log`` only where the original schema cannot carry a value
(the research code's ``visualize_gate_logs.py`` ignores them): ``gate_beta`` in each layer's entry (the
v2 FiLM shift, which the original capture does not record) and a top-level ``n_clips`` (the valid clips
T of a per-query gate, which its ``[[g]]`` does not show). A log without them is exported byte for byte
as the original wrote it.

``GateLogReader`` streams a log (a few GB for elementwise val logs) and refuses, with a ``DataError``
naming the file and line: a truncated last line, malformed JSON, a missing key, an unknown gating type,
layer counts, kinds or shapes that differ between or within records, duplicated qids.
"""
import json
import os
import sys
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from qd_detr.config import PER_QUERY_GATING_TYPES, STORED_GATING_TYPES
from qd_detr.errors import DataError
from qd_detr.gates import GATE_KINDS, gate_name
from qd_detr.io import atomic_write

from .store import load_gate_run

__all__ = ["LOG_KEYS", "RECORD_KEYS", "GateLogLayout", "GateLogEntry", "GateLogReader", "log_record",
           "write_gate_log", "export_gate_log"]

#: Gate kind -> its key in a layer's entry (``gate_beta``: written by ``export_gate_log`` only).
LOG_KEYS = {"mha": "gate_mha", "ffn": "gate_ffn", "beta": "gate_beta"}
#: The keys of every record, in the original capture's order.
RECORD_KEYS = ("qid", "vid", "layer_gates", "gating_type")
_KIND_OF = {v: k for k, v in LOG_KEYS.items()}
_CHUNK = 1 << 20


@dataclass(frozen=True)
class GateLogLayout:
    """What the first record of a log fixes for every other one."""
    gating_type: str
    num_layers: int
    kinds: tuple        # gate kinds in GATE_KINDS order: ("mha", "ffn") or, from our export, + "beta"
    hidden_dim: int     # D of elementwise gates, else None
    has_n_clips: bool   # records carry the optional n_clips key


@dataclass
class GateLogEntry:
    """One record: ``gates[(layer, kind)]`` float32 in the gate store's shapes (per-query (1,), clipwise
    (T,), elementwise (T, D)); ``n_clips`` T (per-query gating: the optional key, else None)."""
    lineno: int
    qid: int
    vid: str
    gates: dict
    n_clips: int = None


def _count_lines(path):
    """Number of lines of ``path`` (newlines + 1 for a last line without one)."""
    n, last = 0, b"\n"
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            n += chunk.count(b"\n")
            last = chunk[-1:]
    return n + (last != b"\n")


def _last_line(path, size):
    """The bytes of the last line of ``path`` (a final newline ends it)."""
    with open(path, "rb") as fh:
        fh.seek(size - 1)
        end = size - 1 if fh.read(1) == b"\n" else size
        pos, tail = end, b""
        while pos > 0:  # tail holds the bytes [pos, end)
            step = min(_CHUNK, pos)
            pos -= step
            fh.seek(pos)
            tail = fh.read(step) + tail
            cut = tail.rfind(b"\n")
            if cut >= 0:
                return tail[cut + 1:]
        return tail


class GateLogReader:
    """Stream the records of a gate log, checked (module docstring): ``for entry in reader`` yields
    ``GateLogEntry``; ``layout`` (``GateLogLayout``) is set once the first record is read.

    The last line is checked when the reader is made, so a truncated file is refused before any work.
    ``progress``: a progress bar (bytes read) on stderr.
    """

    def __init__(self, path, progress=False):
        self.path = os.fspath(path)
        if os.path.isdir(self.path):
            raise DataError(f"{self.path}: is a folder, expected a gate log (JSONL)")
        if not os.path.isfile(self.path):
            raise DataError(f"{self.path}: gate log not found")
        self.size = os.path.getsize(self.path)
        if self.size == 0:
            raise DataError(f"{self.path}: gate log is empty")
        self.progress = progress
        self.layout = None
        self.n_records = 0
        self._seen = {}
        last = _last_line(self.path, self.size)
        if last.strip():
            try:
                json.loads(last)
            except ValueError:
                raise DataError(f"{self.path}: line {_count_lines(self.path)}: truncated last line (the file ends "
                                f"inside a record: was the capture interrupted?); remove that line to use the "
                                f"rest") from None

    def _fail(self, lineno, problem):
        raise DataError(f"{self.path}: line {lineno}: {problem}")

    def __iter__(self):
        bar = tqdm(total=self.size, unit="B", unit_scale=True, desc=f"reading {os.path.basename(self.path)}",
                   disable=not self.progress, file=sys.stderr)
        try:
            with open(self.path, "rb") as fh:
                for lineno, raw in enumerate(fh, 1):
                    bar.update(len(raw))
                    if not raw.strip():
                        continue
                    try:
                        obj = json.loads(raw)
                    except ValueError as exc:
                        self._fail(lineno, f"malformed JSON ({exc}); a gate log has one JSON object per line")
                    yield self._entry(lineno, obj)
        finally:
            bar.close()

    # -- one record --------------------------------------------------------------------------------
    def _entry(self, lineno, obj):
        if not isinstance(obj, dict):
            self._fail(lineno, f"expected a JSON object, got {type(obj).__name__}")
        missing = [k for k in RECORD_KEYS if k not in obj]
        if missing:
            self._fail(lineno, f"missing key(s) {', '.join(missing)}; a gate log record has {', '.join(RECORD_KEYS)}")
        qid, vid, gating_type, layer_gates = obj["qid"], obj["vid"], obj["gating_type"], obj["layer_gates"]
        if isinstance(qid, bool) or not isinstance(qid, int):
            self._fail(lineno, f"qid must be an integer, got {qid!r}")
        if qid in self._seen:
            self._fail(lineno, f"duplicate qid {qid} (first on line {self._seen[qid]})")
        if vid is not None and not isinstance(vid, str):
            self._fail(lineno, f"qid {qid}: vid must be a string, got {vid!r}")
        if gating_type not in STORED_GATING_TYPES:
            self._fail(lineno, f"qid {qid}: unknown gating_type {gating_type!r} (known: {', '.join(STORED_GATING_TYPES)})")
        if not isinstance(layer_gates, list) or not layer_gates or not all(isinstance(g, dict) for g in layer_gates):
            self._fail(lineno, f"qid {qid}: layer_gates must be a non-empty list of one object per fusion layer")
        n_clips = obj.get("n_clips")
        if n_clips is not None and (isinstance(n_clips, bool) or not isinstance(n_clips, int) or n_clips < 1):
            self._fail(lineno, f"qid {qid}: n_clips must be a positive integer, got {n_clips!r}")
        kinds = self._kinds(lineno, qid, layer_gates)
        gates, t, d = {}, None, None
        for layer, entry in enumerate(layer_gates):
            for kind in kinds:
                arr, t, d = self._array(lineno, qid, gating_type, layer, kind, entry[LOG_KEYS[kind]], t, d)
                gates[(layer, kind)] = arr
        if gating_type in PER_QUERY_GATING_TYPES:
            t = n_clips
        elif n_clips is not None and n_clips != t:
            self._fail(lineno, f"qid {qid}: n_clips {n_clips} but the gates cover {t} clips")
        self._check_layout(lineno, qid, GateLogLayout(gating_type, len(layer_gates), kinds, d, n_clips is not None))
        self._seen[qid] = lineno
        self.n_records += 1
        return GateLogEntry(lineno, qid, "" if vid is None else vid, gates, t)

    def _kinds(self, lineno, qid, layer_gates):
        names = None
        for layer, entry in enumerate(layer_gates):
            unknown = sorted(set(entry) - set(_KIND_OF))
            if unknown:
                self._fail(lineno, f"qid {qid}: layer {layer} has unknown key(s) {', '.join(unknown)} "
                                   f"(expected {', '.join(LOG_KEYS.values())})")
            for key in ("gate_mha", "gate_ffn"):
                if key not in entry:
                    self._fail(lineno, f"qid {qid}: layer {layer} has no {key}")
            if names is not None and set(entry) != names:
                self._fail(lineno, f"qid {qid}: layer {layer} has the gates {sorted(entry)}, layer 0 {sorted(names)}")
            names = set(entry)
        return tuple(k for k in GATE_KINDS if LOG_KEYS[k] in names)

    def _array(self, lineno, qid, gating_type, layer, kind, value, t, d):
        name = gate_name(layer, kind)
        try:
            arr = np.asarray(value, dtype=np.float32)
        except (TypeError, ValueError):
            self._fail(lineno, f"qid {qid}: {name} is not a numeric array (nested lists of one shape)")
        if gating_type in PER_QUERY_GATING_TYPES:
            if arr.shape != (1, 1):
                self._fail(lineno, f"qid {qid}: {name} has shape {list(arr.shape)}; {gating_type} gates are [[g]] "
                                   f"(shape [1, 1])")
            return arr.reshape(1), t, d
        if arr.ndim != 2 or arr.shape[0] < 1 or (gating_type == "clipwise" and arr.shape[1] != 1):
            want = "T x 1" if gating_type == "clipwise" else "T x D"
            self._fail(lineno, f"qid {qid}: {name} has shape {list(arr.shape)}; {gating_type} gates are {want} "
                               f"(one row per valid clip)")
        if t is not None and arr.shape[0] != t:
            self._fail(lineno, f"qid {qid}: {name} covers {arr.shape[0]} clips, other gates of this query {t}")
        if gating_type == "clipwise":
            return np.ascontiguousarray(arr[:, 0]), arr.shape[0], None
        if d is not None and arr.shape[1] != d:
            self._fail(lineno, f"qid {qid}: {name} has {arr.shape[1]} feature dims, other gates of this query {d}")
        return arr, arr.shape[0], arr.shape[1]

    def _check_layout(self, lineno, qid, layout):
        first = self.layout
        if first is None:
            self.layout = layout
            return
        for field, what in (("gating_type", "gating_type"), ("num_layers", "fusion layers"),
                            ("kinds", "gate kinds"), ("hidden_dim", "feature dims"), ("has_n_clips", "n_clips key")):
            mine, theirs = getattr(layout, field), getattr(first, field)
            if mine != theirs:
                if field == "kinds":
                    mine, theirs = [LOG_KEYS[k] for k in mine], [LOG_KEYS[k] for k in theirs]
                self._fail(lineno, f"qid {qid}: {what} {mine}, but the first record has {theirs} (every record of "
                                   f"a gate log must have the same layout)")


# -- writing -----------------------------------------------------------------------------------------
def _log_value(arr, gating_type):
    a = np.asarray(arr, dtype=np.float32)
    if gating_type in PER_QUERY_GATING_TYPES:
        return a.reshape(1, 1).tolist()
    if a.ndim == 1:
        return a.reshape(-1, 1).tolist()
    return a.tolist()


def log_record(qid, vid, gating_type, gates, layers, kinds, n_clips=None):
    """The gate-log object of one query (keys in the original order): ``gates[(layer, kind)]`` in the gate
    store's shapes; ``n_clips`` is written only for per-query gating (when known, i.e. >= 1)."""
    rec = {"qid": int(qid), "vid": vid if vid else None,
           "layer_gates": [{LOG_KEYS[k]: _log_value(gates[(layer, k)], gating_type) for k in kinds}
                           for layer in layers],
           "gating_type": gating_type}
    if gating_type in PER_QUERY_GATING_TYPES and n_clips is not None and int(n_clips) >= 1:
        rec["n_clips"] = int(n_clips)
    return rec


def write_gate_log(path, records, total=None, progress=False):
    """Write ``records`` (an iterable of ``log_record`` objects) as a gate log, atomically, lines joined by
    newlines as the original writes them (no final newline). Returns the number of records."""
    count = 0

    def write(fh):
        nonlocal count
        for rec in tqdm(records, total=total, desc=f"writing {os.path.basename(path)}", unit="query",
                        disable=not progress, file=sys.stderr):
            fh.write(("\n" if count else "") + json.dumps(rec))
            count += 1

    atomic_write(path, write)
    return count


def export_gate_log(run_dir, path, progress=False):
    """Write the gates of the output folder ``run_dir`` (its ``gates/`` store) to ``path`` in the research
    code's gate-log schema, in recorded order; the v2 FiLM shift as ``gate_beta`` and the valid clips of
    per-query gates as ``n_clips`` (module docstring). Returns {path, n_records, gating_type, kinds, keys}."""
    try:
        run = load_gate_run(run_dir)
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(f"{os.fspath(run_dir)}: cannot export a gate log: {exc}") from None
    with run:
        kinds = tuple(run.kinds)
        if not {"mha", "ffn"} <= set(kinds):
            raise DataError(f"{run.path}: the gate log schema needs gate_mha and gate_ffn; this store has {list(kinds)}")
        records = (log_record(qid, vid, run.gating_type, gates, run.layers, kinds, run.n_clips.get(qid))
                   for qid, vid, gates in run.iter_queries())
        n = write_gate_log(os.fspath(path), records, total=len(run), progress=progress)
        with_n_clips = run.gating_type in PER_QUERY_GATING_TYPES and any(t >= 1 for t in run.n_clips.values())
        keys = [LOG_KEYS[k] for k in kinds] + (["n_clips"] if with_n_clips else [])
        return {"path": os.path.abspath(path), "n_records": n, "gating_type": run.gating_type, "kinds": list(kinds),
                "keys": keys}
