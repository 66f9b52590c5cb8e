"""QVHighlights annotation files: reading and checking JSONL records.

A record is one JSON object per line with ``qid`` (int), ``query`` (str), ``vid`` (a file stem) and
``duration`` (seconds, > 0); labelled splits add ``relevant_windows`` ([[start, end], ...] seconds),
``relevant_clip_ids`` (2 s clip indices) and ``saliency_scores`` (one list of annotator scores per
relevant clip). The JSON-lines format itself is read by ``qd_detr.io.iter_json_lines``.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

from .errors import DataError
from .io import iter_json_lines

__all__ = ["ANNOTATION_FIELDS", "LABEL_KEYS", "read_jsonl", "has_labels", "record_problem", "is_int"]

#: Fields every annotation record needs (``read_jsonl``'s default ``required``).
ANNOTATION_FIELDS = ("qid", "query", "vid", "duration")
#: The label fields; a record has labels when all three are present.
LABEL_KEYS = ("relevant_windows", "relevant_clip_ids", "saliency_scores")


def is_int(value: Any) -> bool:
    """True for an int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def record_problem(rec: dict, required: Sequence[str]) -> str | None:
    """What is wrong with one annotation record (a sentence), or None.

    Checks that the ``required`` fields exist and that the known fields are well formed.
    """
    for name in required:
        if name not in rec:
            return f"missing required field '{name}'"
    if "qid" in rec and not is_int(rec["qid"]):
        return f"field 'qid' must be an integer, got {type(rec['qid']).__name__} {rec['qid']!r}"
    if "duration" in rec:
        dur = rec["duration"]
        if not _is_number(dur):
            return f"field 'duration' must be a finite number, got {type(dur).__name__} {dur!r}"
        if dur <= 0:
            return f"field 'duration' must be positive, got {dur!r}"
    for name in ("query", "vid"):
        if name in rec and not isinstance(rec[name], str):
            return f"field '{name}' must be a string, got {type(rec[name]).__name__}"
    if "vid" in rec and (not rec["vid"] or "/" in rec["vid"] or "\\" in rec["vid"]):
        return f"field 'vid' must be a non-empty file stem, got {rec['vid']!r}"
    if "relevant_windows" in rec:
        wins = rec["relevant_windows"]
        if not isinstance(wins, list) or not all(
                isinstance(w, list) and len(w) == 2 and all(_is_number(v) for v in w) for w in wins):
            return "field 'relevant_windows' must be a list of [start, end] number pairs"
        for w in wins:
            if w[1] < w[0]:
                return f"field 'relevant_windows' has a window with end < start: {w}"
    if "relevant_clip_ids" in rec:
        ids = rec["relevant_clip_ids"]
        if not isinstance(ids, list) or not all(is_int(i) and i >= 0 for i in ids):
            return "field 'relevant_clip_ids' must be a list of non-negative integers"
    if "saliency_scores" in rec:
        scores = rec["saliency_scores"]
        if not isinstance(scores, list) or not all(
                isinstance(s, list) and s and all(_is_number(v) for v in s) for s in scores):
            return "field 'saliency_scores' must be a list of per-clip score lists"
        ids = rec.get("relevant_clip_ids")
        if isinstance(ids, list) and len(ids) != len(scores):
            return (f"'saliency_scores' has {len(scores)} entries but 'relevant_clip_ids' has "
                    f"{len(ids)}")
    return None


def read_jsonl(path, required: Sequence[str] = ANNOTATION_FIELDS) -> list[dict]:
    """Read a QVHighlights-style JSONL annotation file.

    One JSON object per line (blank lines are skipped). Every line must hold the ``required``
    fields; known fields are type-checked (``qid`` int, ``duration`` positive number, ``query``/``vid``
    strings, label fields well formed). ``qid`` values must be unique.

    Returns:
        list of dicts, in file order.

    Raises:
        DataError: the path is missing or a folder, the file is empty, or a line is malformed;
            the message names the file and the 1-based line number (``path: line N: ...``).
    """
    records: list[dict] = []
    seen: dict[int, int] = {}
    for lineno, obj in iter_json_lines(path, what="annotation file"):
        problem = record_problem(obj, required)
        if problem:
            raise DataError(f"{path}: line {lineno}: {problem}")
        if "qid" in obj:
            if obj["qid"] in seen:
                raise DataError(f"{path}: line {lineno}: duplicate qid {obj['qid']} "
                                f"(first seen on line {seen[obj['qid']]})")
            seen[obj["qid"]] = lineno
        records.append(obj)
    if not records:
        raise DataError(f"{path}: contains no records (empty dataset)")
    return records


def has_labels(record: dict) -> bool:
    """True when the record carries moment and highlight labels.

    That is ``relevant_windows``, ``relevant_clip_ids`` and ``saliency_scores`` are all present
    (QVHighlights test records have none of them).
    """
    return all(record.get(k) is not None for k in LABEL_KEYS)
