"""Shared test helpers: the ../shared reference material (optional) and small project-built models."""
import argparse
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
FIXTURES = SHARED / "fixtures"
FIXTURE_DATA = FIXTURES / "data"

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Test models are tiny: one intra-op thread avoids OpenMP overhead and contention on a busy machine.
# Fixture comparisons keep their tolerance (1 vs 2 threads changes outputs by <= 3e-6).
torch.set_num_threads(1)

requires_fixtures = pytest.mark.skipif(not FIXTURE_DATA.is_dir(),
                                       reason="../shared/fixtures not present (only in CI and dev checkouts)")
FIXTURE_NAMES = ("ckpt_custom_global", "ckpt_custom_clipwise", "ckpt_avigate_legacy", "ckpt_main_plain",
                 "ckpt_v2_clipwise_film", "ckpt_ssm_diagstrip")


def fixture_feature_args(audio=True):
    d = FIXTURE_DATA
    args = ["--v_feat_dirs", str(d / "slowfast_features"), str(d / "clip_features"),
            "--t_feat_dir", str(d / "clip_text_features")]
    return args + (["--a_feat_dir", str(d / "pann_features")] if audio else [])


SMALL_DIMS = dict(slowfast_dim=24, clip_dim=16, text_dim=16, audio_dim=12)


def small_options(layout="custom", gating_type="clipwise", **kw):
    """Options of a small model (hidden 256 is fixed by QD-DETR) over SMALL_DIMS demo features."""
    from qd_detr.config import make_options
    base = dict(v_feat_dim=SMALL_DIMS["slowfast_dim"] + SMALL_DIMS["clip_dim"] + 2,
                t_feat_dim=SMALL_DIMS["text_dim"], a_feat_dim=SMALL_DIMS["audio_dim"] + 2,
                a_feat_dir="pann_features", enc_layers=1, dec_layers=1, dim_feedforward=64, fusion_layers=2,
                fusion_n_heads=4, nheads=4, input_dropout=0.0, dropout=0.0)
    if layout == "custom":
        base.update(use_avigate_custom=True, gating_type=gating_type)
    elif layout == "avigate":
        base.update(use_avigate=True)
    elif layout == "video_only":
        base.update(a_feat_dir=None, a_feat_dim=None)
    base.update(kw)
    return make_options(**base)


def small_model(layout="custom", gating_type="clipwise", seed=0, **kw):
    from qd_detr.model import build_model
    torch.manual_seed(seed)
    opt = small_options(layout, gating_type, **kw)
    return build_model(opt).eval(), opt


def save_checkpoint(path, model, opt, epoch=0):
    torch.save({"model": model.state_dict(), "epoch": epoch, "opt": argparse.Namespace(**vars(opt))}, path)
    return path


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """Project-generated QVHighlights-layout data with small feature dims (train and val splits)."""
    from qd_detr.demo_data import make_demo_dataset
    out = tmp_path_factory.mktemp("demo_data")
    paths = make_demo_dataset(out, n_videos=6, queries_per_video=2, seed=0, **SMALL_DIMS)
    return out, paths


def demo_feature_args(root, audio=True):
    args = ["--v_feat_dirs", os.path.join(root, "slowfast_features"), os.path.join(root, "clip_features"),
            "--t_feat_dir", os.path.join(root, "clip_text_features")]
    return args + (["--a_feat_dir", os.path.join(root, "pann_features")] if audio else [])
