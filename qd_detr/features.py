"""Feature files: reading them safely, their per-row preparation, and finding a checkpoint's folders.

Layout (QVHighlights): video ``{dir}/{vid}.npz["features"]`` (clips, dim) per video folder, text
``{t_feat_dir}/qid{qid}.npz["last_hidden_state"]`` (tokens, dim) or (1, tokens, dim), audio
``{a_feat_dir}/{vid}.npy`` (clips, dim). Every problem with a file is a DataError naming it.
"""
from __future__ import annotations

import os
import sys
import zipfile

import numpy as np
import torch

from .config import fusion_layout
from .errors import ConfigError, DataError

__all__ = ["L2_EPS", "l2_normalize_rows", "temporal_endpoint_features", "peek_shape", "load_feature_array",
           "check_2d", "resolve_feature_dirs"]

L2_EPS = 1e-5


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


def peek_shape(path: str, key: str | None) -> tuple[int, ...]:
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
        return tuple(load_feature_array(path, key).shape)


def load_feature_array(path: str, key: str | None) -> np.ndarray:
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


def check_2d(arr: np.ndarray, path: str) -> None:
    """DataError unless ``arr`` is a non-empty 2-D (clips, dim) array."""
    if arr.ndim != 2:
        raise DataError(f"{path}: expected a 2-D (clips, dim) array, found shape {arr.shape}")
    if arr.shape[0] == 0:
        raise DataError(f"{path}: has no rows")


# ---------------------------------------------------------------------------------------- folders
def _find_dir(path, base_dirs, what):
    candidates = [path] if os.path.isabs(path) else [path] + [os.path.join(b, path) for b in base_dirs]
    for cand in candidates:
        if os.path.isdir(cand):
            return os.path.normpath(cand)
    raise DataError(f"{path}: {what} folder not found (tried {', '.join(os.path.normpath(c) for c in candidates)}); "
                    f"pass it explicitly")


def resolve_feature_dirs(opt, model_path, v_feat_dirs=None, t_feat_dir=None, a_feat_dir=None):
    """Feature folders: the given ones, else those saved in the checkpoint's options (relative paths
    are tried from the current folder, then from the checkpoint's folder and its parent)."""
    ckpt_dir = os.path.dirname(os.path.abspath(model_path))
    bases = [ckpt_dir, os.path.dirname(ckpt_dir)]
    v = v_feat_dirs or getattr(opt, "v_feat_dirs", None)
    t = t_feat_dir or getattr(opt, "t_feat_dir", None)
    if not v or not t:
        raise ConfigError(f"{model_path}: the checkpoint does not name its feature folders; pass "
                          "--v_feat_dirs and --t_feat_dir")
    dirs = {"v_feat_dirs": [_find_dir(d, bases if not v_feat_dirs else [], "video feature") for d in v],
            "t_feat_dir": _find_dir(t, bases if not t_feat_dir else [], "text feature"), "a_feat_dir": None}
    if fusion_layout(opt) != "video_only":
        a = a_feat_dir or opt.a_feat_dir
        dirs["a_feat_dir"] = _find_dir(a, bases if not a_feat_dir else [], "audio feature")
    elif a_feat_dir:
        print(f"note: the model uses no audio; --a_feat_dir {a_feat_dir} is ignored", file=sys.stderr)
    return dirs
