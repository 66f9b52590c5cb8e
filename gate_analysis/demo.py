"""The built-in demo: a small model trained by ``qd_detr.train`` on generated QVHighlights-style data.

Everything is generated deterministically by project code on first use and cached (nothing is
downloaded) in the user's cache folder, outside the checkout: ``$AVIGATE_DEMO_DIR`` if set, else
``$XDG_CACHE_HOME/avigate-gates/demo`` (``~/.cache/avigate-gates/demo``; on Windows ``%LOCALAPPDATA%``).
The cache is built in a temporary folder and renamed into place, so an interrupted build is never reused.
"""
import datetime
import os
import shutil
import sys

__all__ = ["user_cache_dir", "demo_dir", "ensure_demo", "demo_arguments", "DEMO_VERSION"]

DEMO_VERSION = "v1"
_READY = "READY"


def user_cache_dir():
    """The user's cache folder: ``$XDG_CACHE_HOME``, else ``%LOCALAPPDATA%`` on Windows, else ``~/.cache``."""
    if os.environ.get("XDG_CACHE_HOME"):
        return os.environ["XDG_CACHE_HOME"]
    if sys.platform.startswith("win") and os.environ.get("LOCALAPPDATA"):
        return os.environ["LOCALAPPDATA"]
    return os.path.join(os.path.expanduser("~"), ".cache")


def demo_dir():
    """The demo's cache folder (``$AVIGATE_DEMO_DIR`` overrides the user cache folder), per ``DEMO_VERSION``."""
    base = os.environ.get("AVIGATE_DEMO_DIR") or os.path.join(user_cache_dir(), "avigate-gates", "demo")
    return os.path.join(base, DEMO_VERSION)


def ensure_demo(log=print, progress=False):
    """Paths of the demo checkpoint and data, building them first if needed (``progress``: a bar over the
    training epochs of the build, about a minute)."""
    target = demo_dir()
    if not os.path.exists(os.path.join(target, _READY)):
        from qd_detr.demo_model import train_demo_model
        log(f"building the demo model and data in {target} (first use only)...")
        tmp = f"{target}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            ckpt = train_demo_model(tmp, seed=0, progress=progress)
            with open(os.path.join(tmp, _READY), "w") as fh:
                fh.write(os.path.relpath(ckpt, tmp) + "\n")
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    with open(os.path.join(target, _READY)) as fh:
        ckpt = os.path.join(target, fh.read().strip())
    data = os.path.join(target, "data")
    return {"model_path": ckpt, "data_path": os.path.join(data, "highlight_val_release.jsonl"),
            "v_feat_dirs": [os.path.join(data, "slowfast_features"), os.path.join(data, "clip_features")],
            "t_feat_dir": os.path.join(data, "clip_text_features"),
            "a_feat_dir": os.path.join(data, "pann_features")}


def demo_arguments(progress=True):
    """run_gate_analysis.py arguments for the demo (explicit user arguments take precedence)."""
    args = ensure_demo(log=lambda msg: print(msg, file=sys.stderr), progress=progress)
    args["output_dir"] = os.path.join("gate_analysis_results", f"demo_{datetime.datetime.now():%Y%m%d_%H%M%S}")
    return args
