"""One query's gates on the analysis side: the query id, the gating type and the shape of every gate array.

Shape convention (padding already excluded, T = valid clips of the query, D = hidden dim):
per-query gating types (``global``, ``legacy``, ``global_diagstrip_ssm``) -> (1,); ``clipwise`` -> (T,);
``elementwise`` -> (T, D). ``validate_gates`` is what the gate store and the statistics both accept.
"""
import numpy as np

from qd_detr.config import PER_CLIP_GATING_TYPES, PER_QUERY_GATING_TYPES, STORED_GATING_TYPES
from qd_detr.gates import GATE_SHAPES, gate_name

__all__ = ["PER_QUERY_GATING_TYPES", "PER_CLIP_GATING_TYPES", "GATING_TYPES", "SHAPE_CONVENTION", "as_qid",
           "check_gating_type", "validate_gates", "per_clip_values"]

#: Every gating type a gate store may hold (qd_detr.config.STORED_GATING_TYPES: the built ones and "legacy").
GATING_TYPES = STORED_GATING_TYPES
#: Shape of one query's gate array per gating type (qd_detr.gates.GATE_SHAPES), recorded in meta.json.
SHAPE_CONVENTION = GATE_SHAPES


def check_gating_type(gating_type):
    """``gating_type`` itself, or a ValueError naming the known ones."""
    if gating_type not in GATING_TYPES:
        raise ValueError(f"unknown gating_type {gating_type!r}; expected one of {list(GATING_TYPES)}")
    return gating_type


def as_qid(qid):
    """``qid`` as a Python int; a TypeError for anything that is not an integer (bools included)."""
    if isinstance(qid, (bool, np.bool_)) or not isinstance(qid, (int, np.integer)):
        raise TypeError(f"qid must be an int (the QVHighlights qid), got {qid!r} of type {type(qid).__name__}")
    return int(qid)


def validate_gates(gates, gating_type, layers, kinds, hidden_dim, where):
    """Check one query's gates ``{(layer, kind): array}``; return ({(layer, kind): contiguous float32 array},
    n_clips T or None for per-query gating, hidden_dim D or None). ``where`` starts every error message."""
    expected = [(l, k) for l in layers for k in kinds]
    got = set(gates)
    if got != set(expected):
        missing = sorted(set(expected) - got)
        extra = sorted(got - set(expected), key=str)
        raise ValueError(f"{where}: gates must have exactly the keys (layer, kind) for layers {list(layers)} and "
                         f"kinds {list(kinds)}; missing {[gate_name(*m) for m in missing]}, unexpected {extra}")
    out, n_clips = {}, None
    for key in expected:
        arr = np.asarray(gates[key])
        if arr.dtype != np.float32:
            arr = arr.astype(np.float32)
        name = gate_name(*key)
        if gating_type in PER_QUERY_GATING_TYPES:
            if arr.size != 1:
                raise ValueError(f"{where}: {name} has shape {arr.shape}; {gating_type} gates have shape (1,)")
            arr = arr.reshape(1)
        elif gating_type == "clipwise":
            if arr.ndim == 2 and arr.shape[1] == 1:
                arr = arr[:, 0]  # tolerate (T, 1)
            if arr.ndim != 1:
                raise ValueError(f"{where}: {name} has shape {arr.shape}; clipwise gates have shape (T,)")
        else:  # elementwise
            if arr.ndim != 2:
                raise ValueError(f"{where}: {name} has shape {arr.shape}; elementwise gates have shape (T, D)")
            if hidden_dim is None:
                hidden_dim = int(arr.shape[1])
            elif arr.shape[1] != hidden_dim:
                raise ValueError(f"{where}: {name} has {arr.shape[1]} feature dims, expected hidden_dim={hidden_dim}")
        if gating_type in PER_CLIP_GATING_TYPES:
            if n_clips is None:
                n_clips = int(arr.shape[0])
            elif arr.shape[0] != n_clips:
                raise ValueError(f"{where}: {name} has {arr.shape[0]} clips but other gates of this query have "
                                 f"{n_clips}; every layer and kind must cover the same valid clips")
        out[key] = np.ascontiguousarray(arr)
    return out, n_clips, hidden_dim


def per_clip_values(arr):
    """(T,) float64 per-clip values of a gate: clipwise (T,) as is, elementwise (T, D) averaged over D
    (float64 sums)."""
    a = np.asarray(arr)
    return a.mean(axis=1, dtype=np.float64) if a.ndim == 2 else a.astype(np.float64).reshape(-1)
