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

Masks produced by :func:`qd_detr.batching.collate` are float tensors with 1 = valid position, 0 = padding
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

import os
import random
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .annotations import LABEL_KEYS, has_labels, read_jsonl, record_problem
from .batching import collate, length_grouped_batches, model_kwargs, move_to_device, sequential_batches
from .errors import ConfigError, DataError
from .features import (
    check_2d,
    l2_normalize_rows,
    load_feature_array,
    peek_shape,
    temporal_endpoint_features,
)

__all__ = [
    "QVHighlightsDataset",
    "build_dataset",
    # re-exported: their modules are qd_detr.annotations, qd_detr.batching and qd_detr.features
    "read_jsonl",
    "has_labels",
    "collate",
    "move_to_device",
    "model_kwargs",
    "length_grouped_batches",
    "sequential_batches",
    "l2_normalize_rows",
    "temporal_endpoint_features",
]


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
            problem = record_problem(rec, ("qid", "vid"))
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
            found = peek_shape(path, "last_hidden_state")[-1]
            if found != self.t_feat_dim:
                raise self._dim_error("text", path, found, self.t_feat_dim)
        if self.v_feat_dim is not None:
            paths = self.video_paths(rec["vid"])
            dims = [peek_shape(p, "features")[-1] for p in paths]
            self._check_video_dim(paths, dims, sum(dims) + tef)
        if self.a_feat_dim is not None:
            path = self.audio_path(rec["vid"])
            raw = peek_shape(path, None)[-1]
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
        arr = load_feature_array(path, "last_hidden_state")
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
            arr = load_feature_array(path, "features")
            check_2d(arr, path)
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
        arr = load_feature_array(path, None)
        check_2d(arr, path)
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
                    n = min(n, peek_shape(path, "features")[0])
                if self.a_feat_dir is not None:
                    n = min(n, peek_shape(self.audio_path(vid), None)[0])
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


def build_dataset(opt, records, dirs, skip_missing=False, load_labels=False, **dataset_kwargs):
    """A dataset that prepares features exactly as the checkpoint's training did.

    ``opt``: the checkpoint's options; ``records``: annotation dicts; ``dirs``: ``{"v_feat_dirs",
    "t_feat_dir", "a_feat_dir"}`` (``qd_detr.features.resolve_feature_dirs``; audio None = no audio);
    ``dataset_kwargs``: further ``QVHighlightsDataset`` arguments (training runs: ``training``,
    ``max_windows``, ``txt_drop_ratio``, ``seed``).
    """
    audio = dirs.get("a_feat_dir") is not None
    return QVHighlightsDataset(
        records, dirs["v_feat_dirs"], dirs["t_feat_dir"], dirs.get("a_feat_dir"),
        max_q_l=opt.max_q_l, max_v_l=opt.max_v_l, ctx_mode=opt.ctx_mode, clip_len=opt.clip_length,
        normalize_v=not opt.no_norm_vfeat, normalize_t=not opt.no_norm_tfeat, load_labels=load_labels,
        v_feat_dim=opt.v_feat_dim, t_feat_dim=opt.t_feat_dim, a_feat_dim=opt.a_feat_dim if audio else None,
        skip_missing=skip_missing, **dataset_kwargs)
