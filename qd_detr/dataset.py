"""QVHighlights annotations and features, prepared exactly as QD-DETR-exp prepares them.

The preparation reproduces ``StartEndDataset`` / ``StartEndDataset_audio`` and their collate
functions from junhanjeong/QD-DETR-exp (``qd_detr/start_end_dataset*.py``) value for value:

* video: for each directory in ``v_feat_dirs`` (in the given order) ``{dir}/{vid}.npz["features"]``,
  cut to ``max_v_l`` rows, cast to float32, L2-normalised per row as ``x / (||x|| + 1e-5)`` when
  ``normalize_v``; all streams cut to the shortest one and concatenated on the feature axis.
* text: ``{t_feat_dir}/qid{qid}.npz["last_hidden_state"]`` cast to float32, cut to ``max_q_l`` along its
  first axis, L2-normalised per token when ``normalize_t``; a leading batch axis of a 3-D array is
  dropped *afterwards* (see the quirk notes below).
* audio (optional): ``{a_feat_dir}/{vid}.npy``, cut to ``max_v_l`` rows, float32, L2-normalised per row
  when ``normalize_v`` (the original has no separate audio switch). With audio, video and audio are
  both cut to ``ctx_l = min(len(video), len(audio))``.
* TEF (``"tef" in ctx_mode``): ``[i / ctx_l, i / ctx_l + 1 / ctx_l]`` in float32, appended to the video
  **and** to the audio. Without ``"video"`` in ctx_mode the video input is the TEF alone, with
  ``ctx_l = max_v_l``.

Masks produced by :func:`collate` are float tensors with 1 = valid position, 0 = padding
(the convention of the original ``pad_sequences_1d``; the model inverts them itself).

Quirks of the original that are reproduced on purpose:

* A 3-D text array ``(1, L, D)`` is cut to ``max_q_l`` along the *batch* axis, so its tokens are
  **not** truncated; only then is the batch axis dropped.
* Label windows are normalised by the feature length ``ctx_l * clip_len``, not by the JSONL duration,
  so a window may map past 1.0 when the features are shorter than the annotation.
* ``saliency_all_labels`` has length ``ctx_l``, or ``ctx_l + 1`` when a relevant clip id equals
  ``ctx_l`` (the original grows the array by one in that case).

Deviations (only where the original crashes, mutates its input or relies on global state):

* Random choices (easy positive/negative saliency clips, window subsampling when a query has more
  than ``max_windows`` windows, text row dropping) use generators owned by the dataset. In
  evaluation mode (``training=False``) they are re-seeded per query, so labels are reproducible.
* Windows are subsampled from a copy; the original shuffles ``meta["relevant_windows"]`` in place.
* Relevant clip ids larger than ``ctx_l`` (the original raises there) are ignored for
  ``saliency_all_labels``, and easy positives are drawn only from clip ids inside the features.
"""

from __future__ import annotations

import json
import math
import os
import random
import zipfile
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from qd_detr.errors import ConfigError, DataError

__all__ = [
    "read_jsonl",
    "has_labels",
    "QVHighlightsDataset",
    "collate",
    "move_to_device",
    "model_kwargs",
    "length_grouped_batches",
    "sequential_batches",
    "l2_normalize_rows",
    "temporal_endpoint_features",
]

L2_EPS = 1e-5
LABEL_KEYS = ("relevant_windows", "relevant_clip_ids", "saliency_scores")


# ----------------------------------------------------------------------------------------------
# annotations
# ----------------------------------------------------------------------------------------------

def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _record_problem(rec: dict, required: Sequence[str]) -> str | None:
    """Return a description of what is wrong with one annotation object, or None."""
    for name in required:
        if name not in rec:
            return f"missing required field '{name}'"
    if "qid" in rec and not _is_int(rec["qid"]):
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
        if not isinstance(ids, list) or not all(_is_int(i) and i >= 0 for i in ids):
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


def read_jsonl(path, required: Sequence[str] = ("qid", "query", "vid", "duration")) -> list[dict]:
    """Read a QVHighlights-style JSONL annotation file.

    One JSON object per line (blank lines are skipped). Every line must hold the ``required``
    fields; known fields are type-checked (``qid`` int, ``duration`` positive number, ``query``/``vid``
    strings, label fields well formed). ``qid`` values must be unique.

    Returns:
        list of dicts, in file order.

    Raises:
        DataError: the path is missing or a directory, the file is empty, or a line is malformed;
            the message names the file and the 1-based line number.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: annotation file not found")
    if p.is_dir():
        raise DataError(f"{p}: is a directory, expected a .jsonl annotation file")
    records: list[dict] = []
    seen: dict[int, int] = {}
    try:
        with p.open("r", encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                text = line.strip()
                if not text:
                    continue
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{p}:{lineno}: malformed JSON ({exc.msg}, column {exc.colno})") \
                        from None
                if not isinstance(obj, dict):
                    raise DataError(f"{p}:{lineno}: expected a JSON object, got "
                                    f"{type(obj).__name__}")
                problem = _record_problem(obj, required)
                if problem:
                    raise DataError(f"{p}:{lineno}: {problem}")
                if "qid" in obj:
                    if obj["qid"] in seen:
                        raise DataError(f"{p}:{lineno}: duplicate qid {obj['qid']} "
                                        f"(first seen on line {seen[obj['qid']]})")
                    seen[obj["qid"]] = lineno
                records.append(obj)
    except UnicodeDecodeError as exc:
        raise DataError(f"{p}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise DataError(f"{p}: cannot read ({exc.strerror or exc})") from None
    if not records:
        raise DataError(f"{p}: contains no records (empty dataset)")
    return records


def has_labels(record: dict) -> bool:
    """True when the record carries moment and highlight labels.

    That is ``relevant_windows``, ``relevant_clip_ids`` and ``saliency_scores`` are all present
    (QVHighlights test records have none of them).
    """
    return all(record.get(k) is not None for k in LABEL_KEYS)


# ----------------------------------------------------------------------------------------------
# feature helpers
# ----------------------------------------------------------------------------------------------

def l2_normalize_rows(x: np.ndarray, eps: float = L2_EPS) -> np.ndarray:
    """``x / (||x||_2 + eps)`` along the last axis, in the dtype of ``x`` (float32 here)."""
    return x / (np.linalg.norm(x, axis=-1, keepdims=True) + eps)


def temporal_endpoint_features(ctx_l: int) -> torch.Tensor:
    """TEF of the original, float32 (ctx_l, 2): row i = ``[i/ctx_l, i/ctx_l + 1/ctx_l]``.

    The end column is the start column plus the float32-rounded step, exactly like the original
    (so it can differ from ``(i+1)/ctx_l`` in the last bit).
    """
    starts = torch.arange(ctx_l, dtype=torch.float32).div(ctx_l)
    ends = starts.add(1.0 / ctx_l)
    return torch.stack((starts, ends), dim=1)


def _peek_shape(path: str, key: str | None) -> tuple[int, ...]:
    """Shape of an array in a .npy file or of ``key`` in a .npz file, reading only its header."""
    try:
        if key is None:
            return tuple(np.load(path, mmap_mode="r", allow_pickle=False).shape)
        with zipfile.ZipFile(path) as zf:
            with zf.open(key + ".npy") as fh:
                version = np.lib.format.read_magic(fh)
                if version == (1, 0):
                    shape = np.lib.format.read_array_header_1_0(fh)[0]
                elif version == (2, 0):
                    shape = np.lib.format.read_array_header_2_0(fh)[0]
                else:
                    raise ValueError("unsupported npy version")
                return tuple(shape)
    except Exception:  # fall back to a full (checked) load, which reports problems properly
        return tuple(_load_array(path, key).shape)


def _load_array(path: str, key: str | None) -> np.ndarray:
    """Load a numeric feature array; every problem becomes a DataError naming the file."""
    try:
        if key is None:
            arr = np.load(path, allow_pickle=False)
            if not isinstance(arr, np.ndarray):
                arr.close()
                raise DataError(f"{path}: expected a plain .npy array, found an .npz archive")
        else:
            with np.load(path, allow_pickle=False) as archive:
                if not hasattr(archive, "files"):
                    raise DataError(f"{path}: expected an .npz archive with key '{key}'")
                if key not in archive.files:
                    raise DataError(f"{path}: has no key '{key}' (keys: {sorted(archive.files)})")
                arr = archive[key]
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: feature file not found") from None
    except Exception as exc:  # corrupt zip, truncated file, pickled object, ...
        raise DataError(f"{path}: cannot read feature file ({type(exc).__name__}: {exc})") from None
    if arr.dtype.kind not in "fiu":
        raise DataError(f"{path}: features must be numeric, found dtype {arr.dtype}")
    if not np.isfinite(arr).all():
        bad = int(arr.size - np.isfinite(arr).sum())
        raise DataError(f"{path}: contains {bad} NaN/Inf value(s)")
    return arr


def _check_2d(arr: np.ndarray, path: str) -> None:
    if arr.ndim != 2:
        raise DataError(f"{path}: expected a 2-D (clips, dim) array, found shape {arr.shape}")
    if arr.shape[0] == 0:
        raise DataError(f"{path}: has no rows")


def _windows_to_cxw(windows: list, length_sec: int) -> torch.Tensor:
    """(N,2) [st,ed] seconds -> float32 (N,2) [center, width] normalised by ``length_sec``."""
    xx = torch.tensor(windows, dtype=torch.float32).reshape(-1, 2) / length_sec
    return torch.stack((xx.sum(-1) * 0.5, xx[:, 1] - xx[:, 0]), dim=-1)


# ----------------------------------------------------------------------------------------------
# dataset
# ----------------------------------------------------------------------------------------------

class QVHighlightsDataset(Dataset):
    """QVHighlights queries with their text, video and (optional) audio features.

    ``dataset[i]`` is ``{"meta": record, "model_inputs": {...}}`` with

    * ``query_feat``  float32 (Lq, Dt), Lq <= max_q_l
    * ``video_feat``  float32 (L, Dv [+2 TEF]); with ctx_mode ``"tef"`` only: (max_v_l, 2)
    * ``audio_feat``  float32 (L, Da [+2 TEF]), only when ``a_feat_dir`` is given (same L as video)
    * with labels: ``span_labels`` float32 (N<=max_windows, 2) normalised (center, width);
      ``saliency_pos_labels`` / ``saliency_neg_labels`` lists of 2 clip indices (hard, easy);
      ``saliency_all_labels`` float64 (L or L+1,) per-clip sum of the annotator scores.

    Args:
        records: list of annotation dicts, or a path given to :func:`read_jsonl`.
        v_feat_dirs: video feature directories (order matters: slowfast then clip in QD-DETR).
        t_feat_dir: text feature directory (``qid{qid}.npz``).
        a_feat_dir: audio feature directory (``{vid}.npy``) or None for a video-only model.
        load_labels: None = build labels when every record has them; True requires them.
        training: draw saliency samples from the dataset's running generator (else re-seeded per
            query) and allow ``txt_drop_ratio``.
        v_feat_dim / t_feat_dim / a_feat_dim: dims the model expects for its inputs (video and
            audio *including* the 2 TEF dims, as in a checkpoint's ``opt``); a mismatch is a DataError.
        skip_missing: drop records whose feature files are missing (listed in ``self.skipped`` as
            ``(qid, path)``) instead of raising.
        seed: seed of the label-sampling generators.
    """

    def __init__(self, records, v_feat_dirs, t_feat_dir, a_feat_dir=None, max_q_l=32, max_v_l=75,
                 ctx_mode="video_tef", clip_len=2, normalize_v=True, normalize_t=True,
                 load_labels=None, max_windows=5, training=False, txt_drop_ratio=0,
                 v_feat_dim=None, t_feat_dim=None, a_feat_dim=None, skip_missing=False, seed=None):
        if isinstance(records, (str, os.PathLike)):
            records = read_jsonl(records)
        records = list(records)
        if isinstance(v_feat_dirs, (str, os.PathLike)):
            v_feat_dirs = [v_feat_dirs]
        self.v_feat_dirs = [str(d) for d in (v_feat_dirs or [])]
        self.t_feat_dir = str(t_feat_dir)
        self.a_feat_dir = None if a_feat_dir is None else str(a_feat_dir)
        self.max_q_l = int(max_q_l)
        self.max_v_l = int(max_v_l)
        self.ctx_mode = ctx_mode
        self.use_tef = "tef" in ctx_mode
        self.use_video = "video" in ctx_mode
        self.clip_len = clip_len
        self.normalize_v = normalize_v
        self.normalize_t = normalize_t
        self.max_windows = int(max_windows)
        self.training = bool(training)
        self.txt_drop_ratio = float(txt_drop_ratio)
        self.v_feat_dim = v_feat_dim
        self.t_feat_dim = t_feat_dim
        self.a_feat_dim = a_feat_dim
        self.seed = seed
        self._rng = random.Random(seed)
        self._np_rng = np.random.default_rng(seed)
        self.skipped: list[tuple[Any, str]] = []

        if self.max_q_l < 1 or self.max_v_l < 1:
            raise ConfigError(f"max_q_l and max_v_l must be >= 1, got {max_q_l}, {max_v_l}")
        if not (self.use_video or self.use_tef):
            raise ConfigError(f"ctx_mode {ctx_mode!r} contains neither 'video' nor 'tef': no video input")
        if self.use_video and not self.v_feat_dirs:
            raise ConfigError("ctx_mode uses video but v_feat_dirs is empty")
        if self.a_feat_dir is not None and not self.use_video:
            raise ConfigError(f"audio needs video features; ctx_mode {ctx_mode!r} has no 'video'")
        if a_feat_dim is not None and self.a_feat_dir is None:
            raise ConfigError(f"a_feat_dim={a_feat_dim} given but a_feat_dir is None (video-only data)")
        if self.txt_drop_ratio and not self.training:
            raise ConfigError("txt_drop_ratio > 0 is only allowed with training=True")

        for name, d in ([("video feature", d) for d in (self.v_feat_dirs if self.use_video else [])]
                        + [("text feature", self.t_feat_dir)]
                        + ([("audio feature", self.a_feat_dir)] if self.a_feat_dir else [])):
            if not os.path.isdir(d):
                raise DataError(f"{d}: {name} directory not found")

        for i, rec in enumerate(records):
            if not isinstance(rec, dict):
                raise DataError(f"records[{i}]: expected a dict, got {type(rec).__name__}")
            problem = _record_problem(rec, ("qid", "vid"))
            if problem:
                raise DataError(f"records[{i}] (qid {rec.get('qid')!r}): {problem}")

        if load_labels is None:
            load_labels = bool(records) and all(has_labels(r) for r in records)
        elif load_labels:
            for rec in records:
                if not has_labels(rec):
                    missing = [k for k in LABEL_KEYS if rec.get(k) is None]
                    raise DataError(f"qid {rec['qid']}: load_labels=True but the record has no "
                                    f"{', '.join(missing)}")
        self.load_labels = bool(load_labels)

        # existence of every feature file, checked once (a few stat calls per record)
        kept = []
        exists: dict[str, bool] = {}
        for rec in records:
            missing = None
            for path in self.feature_paths(rec):
                ok = exists.get(path)
                if ok is None:
                    ok = exists[path] = os.path.isfile(path)
                if not ok:
                    missing = path
                    break
            if missing is None:
                kept.append(rec)
            elif skip_missing:
                self.skipped.append((rec["qid"], missing))
            else:
                raise DataError(f"{missing}: feature file not found (qid {rec['qid']}, vid "
                                f"{rec['vid']}); pass --skip_missing (skip_missing=True) to skip such queries")
        if not kept:
            if self.skipped:
                raise DataError(f"all {len(self.skipped)} queries were skipped for missing features; "
                                f"first missing file: {self.skipped[0][1]}")
            raise DataError("no records given (empty dataset)")
        self.records = kept

        if any(d is not None for d in (v_feat_dim, t_feat_dim, a_feat_dim)):
            self._check_dims_from_headers(self.records[0])

    # -- paths ---------------------------------------------------------------------------------
    def text_path(self, qid) -> str:
        return os.path.join(self.t_feat_dir, f"qid{qid}.npz")

    def video_paths(self, vid) -> list[str]:
        if not self.use_video:
            return []
        return [os.path.join(d, f"{vid}.npz") for d in self.v_feat_dirs]

    def audio_path(self, vid) -> str | None:
        return None if self.a_feat_dir is None else os.path.join(self.a_feat_dir, f"{vid}.npy")

    def feature_paths(self, record: dict) -> list[str]:
        """All feature files one record needs (text, video dirs in order, audio)."""
        paths = [self.text_path(record["qid"])] + self.video_paths(record["vid"])
        if self.a_feat_dir is not None:
            paths.append(self.audio_path(record["vid"]))
        return paths

    @property
    def has_audio(self) -> bool:
        return self.a_feat_dir is not None

    @property
    def qids(self) -> list:
        return [r["qid"] for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    # -- dimension checks ------------------------------------------------------------------------
    @staticmethod
    def _dim_error(what: str, files: str, found: int, expected: int, detail: str = "") -> DataError:
        option = {"video": "v_feat_dim", "text": "t_feat_dim", "audio": "a_feat_dim"}[what]
        return DataError(f"{files}: {what} features have dim {found}{detail} but the model expects "
                         f"{option}={expected}")

    def _check_dims_from_headers(self, rec: dict) -> None:
        tef = 2 if self.use_tef else 0
        if self.t_feat_dim is not None:
            path = self.text_path(rec["qid"])
            found = _peek_shape(path, "last_hidden_state")[-1]
            if found != self.t_feat_dim:
                raise self._dim_error("text", path, found, self.t_feat_dim)
        if self.v_feat_dim is not None:
            paths = self.video_paths(rec["vid"])
            dims = [_peek_shape(p, "features")[-1] for p in paths]
            self._check_video_dim(paths, dims, sum(dims) + tef)
        if self.a_feat_dim is not None:
            path = self.audio_path(rec["vid"])
            raw = _peek_shape(path, None)[-1]
            self._check_audio_dim(path, raw + tef, raw)

    def _check_video_dim(self, paths: list[str], dims: list[int], found: int) -> None:
        if self.v_feat_dim is None or found == self.v_feat_dim:
            return
        parts = " + ".join(f"{os.path.basename(os.path.dirname(p)) or p} {d}"
                           for p, d in zip(paths, dims))
        if self.use_tef:
            parts = f"{parts} + TEF 2" if parts else "TEF 2"
        raise self._dim_error("video", ", ".join(paths) or "(TEF only)", found, self.v_feat_dim,
                              f" ({parts})")

    def _check_audio_dim(self, path: str, found: int, raw: int) -> None:
        if self.a_feat_dim is None or found == self.a_feat_dim:
            return
        detail = f" ({raw} + TEF 2)" if self.use_tef else ""
        raise self._dim_error("audio", path, found, self.a_feat_dim, detail)

    # -- feature loading -------------------------------------------------------------------------
    def load_text(self, qid) -> torch.Tensor:
        """Prepared query tokens, float32 (Lq, Dt)."""
        path = self.text_path(qid)
        arr = _load_array(path, "last_hidden_state")
        if arr.ndim == 3:
            if arr.shape[0] != 1:
                raise DataError(f"{path}: 3-D last_hidden_state must have a leading batch dim of 1, "
                                f"found shape {arr.shape}")
        elif arr.ndim != 2:
            raise DataError(f"{path}: last_hidden_state must be (L, D) or (1, L, D), found {arr.shape}")
        # original order: cast, cut along axis 0 (the batch axis for 3-D input!), normalise, squeeze
        feat = arr.astype(np.float32)[: self.max_q_l]
        if self.normalize_t:
            feat = l2_normalize_rows(feat)
        if feat.ndim == 3:
            feat = feat[0]
        if feat.shape[0] == 0:
            raise DataError(f"{path}: last_hidden_state has no tokens")
        if self.training and self.txt_drop_ratio > 0:
            n_drop = round(len(feat) * self.txt_drop_ratio)
            if n_drop > 0:
                feat = feat.copy()
                feat[self._np_rng.choice(len(feat), size=n_drop, replace=False)] = 0
        if self.t_feat_dim is not None and feat.shape[-1] != self.t_feat_dim:
            raise self._dim_error("text", path, feat.shape[-1], self.t_feat_dim)
        return torch.from_numpy(np.ascontiguousarray(feat))

    def load_video(self, vid) -> torch.Tensor:
        """Prepared video features without TEF, float32 (Lv, sum of dims); Lv <= max_v_l."""
        streams = []
        paths = self.video_paths(vid)
        for path in paths:
            arr = _load_array(path, "features")
            _check_2d(arr, path)
            part = arr[: self.max_v_l].astype(np.float32)
            if self.normalize_v:
                part = l2_normalize_rows(part)
            streams.append(part)
        shortest = min(len(s) for s in streams)
        joined = np.concatenate([s[:shortest] for s in streams], axis=1)
        self._check_video_dim(paths, [s.shape[1] for s in streams],
                              joined.shape[1] + (2 if self.use_tef else 0))
        return torch.from_numpy(joined)

    def load_audio(self, vid) -> torch.Tensor:
        """Prepared audio features without TEF, float32 (La, Da); La <= max_v_l."""
        path = self.audio_path(vid)
        arr = _load_array(path, None)
        _check_2d(arr, path)
        feat = arr[: self.max_v_l].astype(np.float32)
        if self.normalize_v:  # the original normalises audio under the *video* switch
            feat = l2_normalize_rows(feat)
        self._check_audio_dim(path, feat.shape[1] + (2 if self.use_tef else 0), feat.shape[1])
        return torch.from_numpy(feat)

    def ctx_lengths(self) -> list[int]:
        """Clip count ``ctx_l`` of every item, read from file headers only (for batching)."""
        cache: dict[str, int] = {}
        out = []
        for rec in self.records:
            vid = rec["vid"]
            if vid not in cache:
                n = self.max_v_l
                for path in self.video_paths(vid):
                    n = min(n, _peek_shape(path, "features")[0])
                if self.a_feat_dir is not None:
                    n = min(n, _peek_shape(self.audio_path(vid), None)[0])
                cache[vid] = n
            out.append(cache[vid])
        return out

    # -- labels ------------------------------------------------------------------------------------
    def reseed(self, seed) -> None:
        """Restart the random label sampling (and text dropping) from ``seed`` (e.g. per DataLoader worker)."""
        self._rng = random.Random(seed)
        self._np_rng = np.random.default_rng(seed)

    def _label_rng(self, record: dict) -> random.Random:
        if self.training:
            return self._rng
        return random.Random(f"{0 if self.seed is None else self.seed}:{record['qid']}")

    def build_labels(self, record: dict, ctx_l: int, rng: random.Random | None = None) -> dict:
        """Training labels for one record whose features have ``ctx_l`` clips."""
        rng = rng or self._label_rng(record)
        qid = record["qid"]
        windows = [list(w) for w in record["relevant_windows"]]
        if not windows:
            raise DataError(f"qid {qid}: relevant_windows is empty; cannot build span labels")
        if len(windows) > self.max_windows:
            rng.shuffle(windows)
            windows = windows[: self.max_windows]
        labels = {"span_labels": _windows_to_cxw(windows, ctx_l * self.clip_len)}

        clip_ids = list(record["relevant_clip_ids"])
        scores = np.asarray(record["saliency_scores"])
        if not clip_ids:
            raise DataError(f"qid {qid}: relevant_clip_ids is empty; cannot build saliency labels")
        if scores.ndim != 2 or len(scores) != len(clip_ids):
            raise DataError(f"qid {qid}: saliency_scores must be one score list per relevant clip "
                            f"({len(clip_ids)}), found shape {scores.shape}")
        summed = scores.sum(axis=1)
        order = np.argsort(summed)  # increasing, numpy default kind (as the original)
        last = ctx_l - 1
        hard_pos = [min(clip_ids[order[-1]], last)]
        hard_neg = [min(clip_ids[order[0]], last)]
        inside = [c for c in clip_ids if c < ctx_l]
        outside = sorted(set(range(ctx_l)) - set(clip_ids))
        if outside and inside:
            easy_pos = [rng.choice(inside)]
            easy_neg = [rng.choice(outside)]
        else:
            easy_pos, easy_neg = list(hard_pos), list(hard_neg)
        labels["saliency_pos_labels"] = hard_pos + easy_pos
        labels["saliency_neg_labels"] = hard_neg + easy_neg

        size = ctx_l + 1 if ctx_l in clip_ids else ctx_l
        all_scores = np.zeros(size)
        for cid, s in zip(clip_ids, summed):
            if cid < size:
                all_scores[cid] = s
        labels["saliency_all_labels"] = all_scores
        return labels

    # -- item --------------------------------------------------------------------------------------
    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        inputs: dict[str, Any] = {"query_feat": self.load_text(record["qid"])}
        tef = 2 if self.use_tef else 0
        if self.use_video:
            video = self.load_video(record["vid"])
            ctx_l = len(video)
        else:
            video = None
            ctx_l = self.max_v_l
            self._check_video_dim([], [], tef)
        audio = None
        if self.a_feat_dir is not None:
            audio = self.load_audio(record["vid"])
            ctx_l = min(ctx_l, len(audio))
            video = video[:ctx_l]
            audio = audio[:ctx_l]
        if self.use_tef:
            tef_feat = temporal_endpoint_features(ctx_l)
            video = tef_feat if video is None else torch.cat((video, tef_feat), dim=1)
            if audio is not None:
                audio = torch.cat((audio, tef_feat), dim=1)
        inputs["video_feat"] = video
        if audio is not None:
            inputs["audio_feat"] = audio
        if self.load_labels:
            inputs.update(self.build_labels(record, ctx_l))
        return {"meta": record, "model_inputs": inputs}


# ----------------------------------------------------------------------------------------------
# batching
# ----------------------------------------------------------------------------------------------

def _pad(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad (L_i, ...) tensors to (B, max L, ...) float32 plus a float32 (B, max L) mask."""
    trailing = tuple(seqs[0].shape[1:])
    for s in seqs:
        if tuple(s.shape[1:]) != trailing:
            raise DataError(f"cannot batch features of shapes {tuple(seqs[0].shape)} and "
                            f"{tuple(s.shape)}: feature dims differ")
    longest = max(len(s) for s in seqs)
    padded = torch.zeros((len(seqs), longest) + trailing, dtype=torch.float32)
    mask = torch.zeros((len(seqs), longest), dtype=torch.float32)
    for i, s in enumerate(seqs):
        padded[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return padded, mask


def collate(batch: list[dict]) -> tuple[list[dict], dict]:
    """Batch dataset items, padding to the longest item of the batch.

    Returns ``(metas, inputs)`` with ``inputs``:

    * ``src_txt`` float32 (B, Lq_max, Dt), ``src_txt_mask`` float32 (B, Lq_max), 1 = token, 0 = pad
    * ``src_vid`` float32 (B, L_max, Dv), ``src_vid_mask`` float32 (B, L_max), 1 = clip, 0 = pad
    * ``src_aud`` / ``src_aud_mask`` likewise, only for audio datasets
    * ``targets`` (only with labels): ``span_labels`` list of ``{"spans": (N_i, 2)}``;
      ``saliency_pos_labels`` / ``saliency_neg_labels`` int64 (B, 2);
      ``saliency_all_labels`` float32 (B, max label length), zero-padded.

    Padded feature rows are exactly zero. Use :func:`model_kwargs` to drop ``targets`` before
    ``model(**kwargs)``.
    """
    if not batch:
        raise ValueError("collate() got an empty batch")
    metas = [item["meta"] for item in batch]
    parts = [item["model_inputs"] for item in batch]
    keys = set(parts[0])
    for p in parts[1:]:
        if set(p) != keys:
            raise ValueError(f"items disagree on inputs: {sorted(keys)} vs {sorted(p)}")
    inputs: dict[str, Any] = {}
    inputs["src_txt"], inputs["src_txt_mask"] = _pad([p["query_feat"] for p in parts])
    inputs["src_vid"], inputs["src_vid_mask"] = _pad([p["video_feat"] for p in parts])
    if "audio_feat" in keys:
        inputs["src_aud"], inputs["src_aud_mask"] = _pad([p["audio_feat"] for p in parts])
    if "span_labels" in keys:
        targets: dict[str, Any] = {
            "span_labels": [{"spans": p["span_labels"]} for p in parts],
            "saliency_pos_labels": torch.tensor([p["saliency_pos_labels"] for p in parts],
                                                dtype=torch.long),
            "saliency_neg_labels": torch.tensor([p["saliency_neg_labels"] for p in parts],
                                                dtype=torch.long),
        }
        sal = [torch.from_numpy(np.asarray(p["saliency_all_labels"], dtype=np.float32))
               for p in parts]
        targets["saliency_all_labels"] = _pad(sal)[0]
        inputs["targets"] = targets
    return metas, inputs


def move_to_device(inputs, device, non_blocking: bool = False):
    """Copy every tensor inside nested dicts/lists/tuples to ``device``; other values pass through."""
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device, non_blocking=non_blocking)
    if isinstance(inputs, dict):
        return {k: move_to_device(v, device, non_blocking) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(move_to_device(v, device, non_blocking) for v in inputs)
    return inputs


def model_kwargs(inputs: dict) -> dict:
    """The collated inputs without ``targets``: ready for ``model(**model_kwargs(inputs))``."""
    return {k: v for k, v in inputs.items() if k != "targets"}


def _check_batch_size(batch_size) -> int:
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return batch_size


def sequential_batches(n: int, batch_size: int) -> list[list[int]]:
    """``[[0..bs-1], [bs..2bs-1], ...]`` covering ``range(n)`` in order (last batch may be short)."""
    _check_batch_size(batch_size)
    return [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]


def length_grouped_batches(lengths: Iterable[int], batch_size: int) -> list[list[int]]:
    """Indices grouped so that items of similar length share a batch.

    Indices are stably sorted by length (ties keep index order) and cut into consecutive chunks
    of ``batch_size``; batches come shortest first. Deterministic for given inputs. Less padding
    per batch matters for QD-DETR-exp's global gate, which mean-pools over padding too.
    """
    _check_batch_size(batch_size)
    lengths = list(lengths)
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[s: s + batch_size] for s in range(0, len(order), batch_size)]
