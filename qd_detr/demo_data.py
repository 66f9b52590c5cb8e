"""Deterministic synthetic data in the exact QVHighlights layout (for demos and tests).

Layout written under ``out_dir``::

    highlight_{split}_release.jsonl         qid, query, duration, vid
                                            (+ relevant_windows, relevant_clip_ids, saliency_scores
                                             unless the split name contains "test")
    slowfast_features/{vid}.npz             "features" float32 (n_clips, slowfast_dim)
    clip_features/{vid}.npz                 "features" float32 (n_clips, clip_dim)
    clip_text_features/qid{qid}.npz         "last_hidden_state" float32 (L, text_dim), L in 8..20,
                                            "pooler_output" float32 (text_dim,)
    pann_features/{vid}.npy                 float32 (n_clips, audio_dim), non-negative

Signal: every query has a unit "concept" vector. Its text tokens are ``0.6 * concept + noise``; the
CLIP features of its relevant clips get ``+1.5 * concept`` (mapped into the clip space) scaled by the
clip's saliency, slowfast ``+0.3 * concept``. Every clip relevant to *any* query of its video gets a
shared sparse non-negative audio direction ``x3`` (jitter 0.7-1.3), so audio tells relevance apart.

Durations are even (30-150 s, 2 s clips); windows are multiples of 2 s, non-overlapping within a
query, never touch the last 2 clips, and each labelled split covers the short (<=10 s), middle
(10-30 s] and long (>30 s) buckets of the QVHighlights evaluation. Videos are disjoint across splits.
Output files are byte-identical for the same arguments (the .npz archives carry fixed timestamps).
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np

from .io import atomic_write, write_text

__all__ = ["make_demo_dataset", "BUCKET_CLIPS"]

CLIP_SEC = 2
#: window length range in clips per evaluation bucket (seconds = 2 * clips)
BUCKET_CLIPS = {"short": (1, 5), "middle": (6, 15), "long": (16, 35)}
_BUCKETS = ("short", "middle", "long")
_TAIL_CLIPS = 2  # windows never touch the last two clips
_ID_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"
_SUBJECTS = ["A man", "A woman", "Two kids", "A dog", "The chef", "A vlogger", "People", "A girl"]
_VERBS = ["walks along", "talks about", "cooks on", "plays near", "shows", "dances by", "looks at",
          "sings next to"]
_OBJECTS = ["the beach", "a red car", "the kitchen", "a market", "the camera", "a guitar",
            "the city street", "a birthday cake", "the mountains", "a small boat"]
_FIXED_DATE = (1980, 1, 1, 0, 0, 0)


def _write_npz(path: Path, **arrays: np.ndarray) -> None:
    """Like ``np.savez`` (uncompressed) but with fixed zip timestamps, so bytes are reproducible."""
    def write(fh):
        with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_STORED) as zf:
            for name in sorted(arrays):
                buf = io.BytesIO()
                np.lib.format.write_array(buf, np.ascontiguousarray(arrays[name]), allow_pickle=False)
                info = zipfile.ZipInfo(name + ".npy", date_time=_FIXED_DATE)
                info.external_attr = 0o644 << 16
                zf.writestr(info, buf.getvalue())
    atomic_write(path, write, binary=True, fsync=False)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _plan_windows(rng: np.random.Generator, buckets: list[str], n_mandatory: int,
                  n_usable: int) -> list[tuple[int, int]]:
    """Non-overlapping (start_clip, n_clips) windows, one per bucket, inside ``n_usable`` clips.

    The first ``n_mandatory`` buckets always get a window (the caller made room for their minimum
    lengths); optional ones are dropped when they do not fit.
    """
    lengths = []
    for b in buckets:
        lo, hi = BUCKET_CLIPS[b]
        lengths.append(int(rng.integers(lo, max(lo, min(hi, n_usable)) + 1)))

    def fits(ls):
        return sum(ls) + len(ls) - 1 <= n_usable

    while len(lengths) > n_mandatory and not fits(lengths):
        lengths.pop()
    if not fits(lengths):
        lengths = [BUCKET_CLIPS[b][0] for b in buckets[:n_mandatory]]
    order = rng.permutation(len(lengths))
    lengths = [lengths[i] for i in order]
    free = n_usable - (sum(lengths) + len(lengths) - 1)
    cuts = np.sort(rng.integers(0, free + 1, size=len(lengths)))
    spans, pos, used = [], 0, 0
    for i, n in enumerate(lengths):
        pos += int(cuts[i]) - used
        used = int(cuts[i])
        spans.append((pos, n))
        pos += n + 1
    return spans


def _scores_for(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 3) ints 0-4 peaking in the middle of a window, at least one clip [4, 4, 4]."""
    pos = (np.arange(n) + 0.5) / n
    mu = 1.5 + 2.0 * (1.0 - np.abs(2.0 * pos - 1.0))
    scores = np.clip(np.rint(mu[:, None] + rng.normal(0.0, 0.8, size=(n, 3))), 0, 4).astype(int)
    scores[int(rng.integers(0, n))] = 4
    return scores


def make_demo_dataset(out_dir, n_videos: int = 8, queries_per_video: int = 3, seed: int = 0,
                      split_names=("train", "val"), slowfast_dim: int = 2304, clip_dim: int = 512,
                      text_dim: int = 512, audio_dim: int = 2048) -> dict:
    """Write a synthetic QVHighlights-style dataset and return its paths.

    Args:
        out_dir: directory to write into (created; existing files of the same name are replaced).
        n_videos: videos **per split**; queries_per_video: queries per video.
        seed: everything is a function of the arguments (same arguments -> identical bytes).
        split_names: one JSONL per split; splits whose name contains "test" carry no labels.
        slowfast_dim / clip_dim / text_dim / audio_dim: raw feature dims (defaults: QVHighlights).

    Returns:
        dict with ``root``; ``jsonl`` {split: path}; ``slowfast_features``, ``clip_features``,
        ``clip_text_features``, ``pann_features``; ``v_feat_dirs`` [slowfast, clip];
        ``t_feat_dir``; ``a_feat_dir``; ``dims`` {v_feat_dim, t_feat_dim, a_feat_dim} as a model
        expects them (video and audio including the 2 TEF dims); ``qids`` {split: [qid, ...]}.
    """
    if n_videos < 1 or queries_per_video < 1:
        raise ValueError("n_videos and queries_per_video must be >= 1")
    if len(set(split_names)) != len(split_names) or not split_names:
        raise ValueError(f"split_names must be distinct and non-empty, got {split_names!r}")
    root = Path(out_dir)
    dirs = {name: root / name for name in
            ("slowfast_features", "clip_features", "clip_text_features", "pann_features")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng(seed)
    # shared structure: text concept -> clip / slowfast space, one audio "relevance" direction
    to_clip = (np.eye(text_dim, dtype=np.float64) if clip_dim == text_dim
               else rng.normal(size=(text_dim, clip_dim)) / np.sqrt(text_dim))
    to_sf = rng.normal(size=(text_dim, slowfast_dim)) / np.sqrt(text_dim)
    audio_dir = np.zeros(audio_dim)
    active = rng.choice(audio_dim, size=max(1, audio_dim // 8), replace=False)
    audio_dir[active] = np.abs(rng.normal(size=active.size)) + 0.1
    audio_dir = _unit(audio_dir)

    vids_seen: set[str] = set()
    jsonl_paths: dict[str, str] = {}
    qids_by_split: dict[str, list[int]] = {}
    next_qid = 1
    for split in split_names:
        labelled = "test" not in split
        n_queries = n_videos * queries_per_video
        lines, qids = [], []
        for v in range(n_videos):
            # bucket plan of this video's queries: a cycle over the split guarantees coverage
            plans = []
            for k in range(queries_per_video):
                j = v * queries_per_video + k
                # first window(s) mandatory: the bucket cycle over the split guarantees coverage
                plan = list(_BUCKETS[::-1]) if (j == 0 and n_queries < 3) else [_BUCKETS[j % 3]]
                n_mandatory = len(plan)
                plan += [("short", "middle")[int(rng.integers(0, 2))]
                         for _ in range(int(rng.integers(0, 3)))]
                plans.append((plan, n_mandatory))
            need = _TAIL_CLIPS + max(sum(BUCKET_CLIPS[b][0] for b in p[:m]) + m - 1 for p, m in plans)
            n_clips = int(rng.integers(max(15, need), 76))
            duration = n_clips * CLIP_SEC
            while True:
                ytid = "".join(_ID_CHARS[i] for i in rng.integers(0, len(_ID_CHARS), size=11))
                start = 30.0 * int(rng.integers(0, 60))
                vid = f"{ytid}_{start:.1f}_{start + duration:.1f}"
                if vid not in vids_seen:
                    vids_seen.add(vid)
                    break

            # base features: piecewise-constant scenes plus noise
            scene_of = np.cumsum(rng.random(n_clips) < 0.15)
            n_scenes = int(scene_of[-1]) + 1
            clip_feat = (rng.normal(size=(n_scenes, clip_dim))[scene_of]
                         + 0.5 * rng.normal(size=(n_clips, clip_dim))) / np.sqrt(clip_dim)
            sf_feat = (rng.normal(size=(n_scenes, slowfast_dim))[scene_of]
                       + 0.5 * rng.normal(size=(n_clips, slowfast_dim))) / np.sqrt(slowfast_dim)
            audio = 0.5 * np.abs(rng.normal(size=(n_clips, audio_dim))) / np.sqrt(audio_dim)
            relevant_any = np.zeros(n_clips, dtype=bool)

            for plan, n_mandatory in plans:
                qid = next_qid
                next_qid += 1
                concept = _unit(rng.normal(size=text_dim))
                c_clip = _unit(concept @ to_clip)
                c_sf = _unit(concept @ to_sf)
                n_tok = int(rng.integers(8, 21))
                tokens = 0.6 * concept + 0.8 * rng.normal(size=(n_tok, text_dim)) / np.sqrt(text_dim)
                _write_npz(dirs["clip_text_features"] / f"qid{qid}.npz",
                           last_hidden_state=tokens.astype(np.float32),
                           pooler_output=tokens.mean(axis=0).astype(np.float32))
                spans = _plan_windows(rng, plan, n_mandatory, n_clips - _TAIL_CLIPS)
                spans.sort()
                clip_ids, scores = [], []
                for st, n in spans:
                    s = _scores_for(rng, n)
                    ids = list(range(st, st + n))
                    clip_ids += ids
                    scores += s.tolist()
                    weight = 0.5 + 0.5 * s.mean(axis=1) / 4.0
                    clip_feat[ids] += 1.5 * weight[:, None] * c_clip
                    sf_feat[ids] += 0.3 * c_sf
                    relevant_any[ids] = True
                words = (_SUBJECTS[int(rng.integers(len(_SUBJECTS)))],
                         _VERBS[int(rng.integers(len(_VERBS)))],
                         _OBJECTS[int(rng.integers(len(_OBJECTS)))])
                rec = {"qid": qid, "query": " ".join(words) + ".", "duration": duration, "vid": vid}
                if labelled:
                    rec["relevant_clip_ids"] = clip_ids
                    rec["saliency_scores"] = scores
                    rec["relevant_windows"] = [[st * CLIP_SEC, (st + n) * CLIP_SEC] for st, n in spans]
                lines.append(json.dumps(rec))
                qids.append(qid)

            idx = np.flatnonzero(relevant_any)
            audio[idx] += 3.0 * rng.uniform(0.7, 1.3, size=(idx.size, 1)) * audio_dir
            _write_npz(dirs["slowfast_features"] / f"{vid}.npz", features=sf_feat.astype(np.float32))
            _write_npz(dirs["clip_features"] / f"{vid}.npz", features=clip_feat.astype(np.float32))
            atomic_write(dirs["pann_features"] / f"{vid}.npy", lambda fh: np.save(fh, audio.astype(np.float32)),
                         binary=True, fsync=False)

        path = root / f"highlight_{split}_release.jsonl"
        write_text(path, "\n".join(lines) + "\n", fsync=False)
        jsonl_paths[split] = str(path)
        qids_by_split[split] = qids

    return {
        "root": str(root),
        "jsonl": jsonl_paths,
        **{name: str(d) for name, d in dirs.items()},
        "v_feat_dirs": [str(dirs["slowfast_features"]), str(dirs["clip_features"])],
        "t_feat_dir": str(dirs["clip_text_features"]),
        "a_feat_dir": str(dirs["pann_features"]),
        "dims": {"v_feat_dim": slowfast_dim + clip_dim + 2, "t_feat_dim": text_dim,
                 "a_feat_dim": audio_dim + 2},
        "qids": qids_by_split,
    }
