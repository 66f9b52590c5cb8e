"""Batching: collating dataset items into padded model inputs, and choosing which items share a batch.

Masks are float tensors with 1 = valid position, 0 = padding (the convention of the original
``pad_sequences_1d``; the model inverts them itself). Padded feature rows are exactly zero.
"""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import torch

from .annotations import is_int
from .errors import DataError

__all__ = ["collate", "move_to_device", "model_kwargs", "sequential_batches", "length_grouped_batches",
           "make_batches", "collated_batches", "DEFAULT_QUERY_BATCH"]

#: Queries per batch of ``--batching query`` when no batch size is given.
DEFAULT_QUERY_BATCH = 32


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
    if not is_int(batch_size) or batch_size < 1:
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


def make_batches(dataset, batching, batch_size=None, opt=None):
    """Index batches of ``dataset``: file order in chunks of ``batch_size`` or the options' ``eval_bsz``
    (``batching="original"``), else length-grouped chunks of ``batch_size`` (default 32)."""
    if batching == "original":
        return sequential_batches(len(dataset), batch_size or int(getattr(opt, "eval_bsz", 100) or 100))
    return length_grouped_batches(dataset.ctx_lengths(), batch_size or DEFAULT_QUERY_BATCH)


def collated_batches(dataset, batches):
    """Yield ``collate([dataset[i] for i in batch])`` = ``(metas, inputs)`` for each index batch, in this
    process (no DataLoader, so no random number is drawn)."""
    for batch in batches:
        yield collate([dataset[i] for i in batch])
