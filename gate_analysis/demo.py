"""The built-in demo: a small model trained by ``qd_detr.train`` on generated QVHighlights-style data.

Everything is generated deterministically by project code on first use and cached (nothing is
downloaded): ``$AVIGATE_DEMO_DIR`` if set, else ``.demo_cache/`` in the project folder. The cache is
built in a temporary folder and renamed into place, so an interrupted build is never reused.
"""
import datetime
import os
import shutil
import sys

__all__ = ["demo_dir", "ensure_demo", "demo_arguments", "DEMO_VERSION"]

DEMO_VERSION = "v1"
_READY = "READY"


def demo_dir():
    base = os.environ.get("AVIGATE_DEMO_DIR") or os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), ".demo_cache")
    return os.path.join(base, DEMO_VERSION)


def ensure_demo(log=print):
    """Paths of the demo checkpoint and data, building them first if needed."""
    target = demo_dir()
    if not os.path.exists(os.path.join(target, _READY)):
        from qd_detr.train import train_demo_model
        log(f"building the demo model and data in {target} (first use only)...")
        tmp = f"{target}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            ckpt = train_demo_model(tmp, seed=0)
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


def demo_arguments():
    """run_gate_analysis.py arguments for the demo (explicit user arguments take precedence)."""
    args = ensure_demo(log=lambda msg: print(msg, file=sys.stderr))
    args["output_dir"] = os.path.join("gate_analysis_results", f"demo_{datetime.datetime.now():%Y%m%d_%H%M%S}")
    return args
