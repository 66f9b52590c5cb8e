"""Shared test helpers: the ../shared reference material (optional), small project-built models and
checkpoints, demo datasets and ragged batches, and running the command-line tools (in process or as a
subprocess). Test modules import these by name; none re-declares them."""
import argparse
import json
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
FIXTURES = SHARED / "fixtures"
FIXTURE_DATA = FIXTURES / "data"
QVH_DATA = SHARED / "data" / "qvhighlights"  # the real QVHighlights annotations and the official eval sample

# A test that sends Ctrl-C to a child needs SIGINT delivered: a suite started in the background by a shell
# without job control inherits SIGINT ignored, and so would every child (Python then never raises
# KeyboardInterrupt). The default handler here makes the children start with the default disposition.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Test models are tiny: one intra-op thread avoids OpenMP overhead and contention on a busy machine.
# Fixture comparisons keep their tolerance (1 vs 2 threads changes outputs by <= 3e-6).
torch.set_num_threads(1)
os.environ.setdefault("AVIGATE_CHECK_FIGURE_TEXT", "1")  # every figure the tests draw is checked for clipped text


@pytest.fixture(autouse=True)
def one_thread():
    """Every test starts on one intra-op thread, whatever an earlier test or library call set."""
    torch.set_num_threads(1)
    yield


requires_fixtures = pytest.mark.skipif(not FIXTURE_DATA.is_dir(),
                                       reason="../shared/fixtures not present (only in CI and dev checkouts)")
FIXTURE_NAMES = ("ckpt_custom_global", "ckpt_custom_clipwise", "ckpt_avigate_legacy", "ckpt_main_plain",
                 "ckpt_v2_clipwise_film", "ckpt_ssm_diagstrip")


def fixture_feature_args(audio=True):
    d = FIXTURE_DATA
    args = ["--v_feat_dirs", str(d / "slowfast_features"), str(d / "clip_features"),
            "--t_feat_dir", str(d / "clip_text_features")]
    return args + (["--a_feat_dir", str(d / "pann_features")] if audio else [])


def fixture_val_dataset(opt):
    """The fixtures' 16 val queries prepared as ``opt``'s model reads them (audio when ``opt`` has it)."""
    from qd_detr.annotations import read_jsonl
    from qd_detr.dataset import build_dataset
    d = FIXTURE_DATA
    dirs = {"v_feat_dirs": [str(d / "slowfast_features"), str(d / "clip_features")],
            "t_feat_dir": str(d / "clip_text_features"),
            "a_feat_dir": str(d / "pann_features") if opt.a_feat_dir is not None else None}
    return build_dataset(opt, read_jsonl(d / "highlight_val_release.jsonl"), dirs)


# ------------------------------------------------------------------------------------------------
# small models and checkpoints
# ------------------------------------------------------------------------------------------------

SMALL_DIMS = dict(slowfast_dim=24, clip_dim=16, text_dim=16, audio_dim=12)
SMALL_SSM = dict(ssm_band_width=3, ssm_enc_channels=8, ssm_dilations=[1, 2], ssm_diag_subtract=0.1,
                ssm_use_video_branch=1)  # a small diagstrip-ssm gate


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


def save_checkpoint(path, model, opt, epoch=0, legacy_format=False, **entries):
    """Save ``{"model", "epoch", "opt", **entries}`` as the training code does; ``model`` is a module or a
    state dict (e.g. a tampered one); ``legacy_format``: torch's pre-zip pickle format."""
    weights = model if isinstance(model, Mapping) else model.state_dict()
    torch.save({"model": weights, "epoch": epoch, "opt": argparse.Namespace(**vars(opt)), **entries}, path,
               _use_new_zipfile_serialization=not legacy_format)
    return path


def small_checkpoint(path, layout="custom", gating_type="clipwise", seed=0, **kw):
    """``small_model(...)`` saved to ``path``: (path, model, opt)."""
    model, opt = small_model(layout, gating_type, seed=seed, **kw)
    return save_checkpoint(path, model, opt), model, opt


# ------------------------------------------------------------------------------------------------
# inputs: ragged batches and the demo data
# ------------------------------------------------------------------------------------------------

def valid_mask(lengths):
    """[B, max(lengths)] float mask, 1 on the first ``lengths[i]`` positions of row i."""
    return (torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]).float()


def ragged_batch(opt, lengths, seed=0, text_len=5):
    """Model inputs of a ragged batch as the collate function builds them (padding rows zero, masks 1 =
    valid; the first query's text is padded after 3 tokens)."""
    g = torch.Generator().manual_seed(seed)
    b, lmax = len(lengths), max(lengths)
    vid = torch.randn(b, lmax, opt.v_feat_dim, generator=g)
    aud = torch.rand(b, lmax, opt.a_feat_dim, generator=g)
    txt = torch.randn(b, text_len, opt.t_feat_dim, generator=g)
    mask = valid_mask(lengths)
    txt_mask = torch.ones(b, text_len)
    txt_mask[0, 3:] = 0
    return dict(src_txt=txt, src_txt_mask=txt_mask, src_vid=vid * mask[..., None], src_vid_mask=mask,
                src_aud=aud * mask[..., None], src_aud_mask=mask)


def fusion_batch(lengths=(9, 6, 4), seed=0, dim=256, zero_padding=True):
    """(video, audio, mask) inputs of a bare fusion module: projected features [B, T, dim] and the [B, T]
    mask; ``zero_padding=False`` leaves random values in the padded positions."""
    g = torch.Generator().manual_seed(seed)
    mask = valid_mask(lengths)
    video, audio = (torch.randn(len(lengths), max(lengths), dim, generator=g) for _ in range(2))
    if zero_padding:
        video, audio = video * mask[..., None], audio * mask[..., None]
    return video, audio, mask


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


def demo_data_args(paths, audio=True):
    """``--data_path`` (the demo val split) and the feature flags of the demo data."""
    return ["--data_path", paths["jsonl"]["val"], *demo_feature_args(paths["root"], audio)]


def demo_dirs(paths, audio=True):
    """The demo data's feature folders as ``build_dataset`` takes them."""
    return {"v_feat_dirs": paths["v_feat_dirs"], "t_feat_dir": paths["t_feat_dir"],
            "a_feat_dir": paths["a_feat_dir"] if audio else None}


def demo_dataset(opt, paths, n=None, audio=True):
    """The demo val split (its first ``n`` queries) prepared as ``opt``'s model reads it."""
    from qd_detr.annotations import read_jsonl
    from qd_detr.dataset import build_dataset
    records = read_jsonl(paths["jsonl"]["val"])
    return build_dataset(opt, records[:n] if n else records, demo_dirs(paths, audio))


def demo_split_dataset(root, split="val", **kw):
    """``QVHighlightsDataset`` over a demo split with audio (``kw``: labels, training, ...)."""
    from qd_detr.dataset import QVHighlightsDataset
    root = str(root)
    return QVHighlightsDataset(os.path.join(root, f"highlight_{split}_release.jsonl"),
                               [os.path.join(root, "slowfast_features"), os.path.join(root, "clip_features")],
                               os.path.join(root, "clip_text_features"), os.path.join(root, "pann_features"), **kw)


def demo_train_args(root, results, *extra, dec_layers=2):
    """qd_detr.train flags: a small clipwise model on the demo data, results in ``results``."""
    root = str(root)
    return ["--train_path", os.path.join(root, "highlight_train_release.jsonl"),
            "--eval_path", os.path.join(root, "highlight_val_release.jsonl"), *demo_feature_args(root),
            "--v_feat_dim", str(SMALL_DIMS["slowfast_dim"] + SMALL_DIMS["clip_dim"]),
            "--t_feat_dim", str(SMALL_DIMS["text_dim"]), "--a_feat_dim", str(SMALL_DIMS["audio_dim"] + 2),
            "--results_dir", str(results), "--use_avigate_custom", "--gating_type", "clipwise",
            "--fusion_layers", "2", "--fusion_n_heads", "4", "--enc_layers", "1", "--dec_layers", str(dec_layers),
            "--dim_feedforward", "32", "--nheads", "4", "--bsz", "6", "--eval_bsz", "8", "--seed", "3",
            "--device", "cpu", "--quiet", *extra]


# ------------------------------------------------------------------------------------------------
# forward passes and gate capture
# ------------------------------------------------------------------------------------------------

def forward_batches(model, dataset, batches):
    """Outputs and captured gates per qid, for the given index batches: ({qid: {"pred_logits",
    "pred_spans", "saliency_scores", "n" (valid clips)}}, {qid: GateRecord}); no gates without fusion."""
    from qd_detr.dataset import collate, model_kwargs
    from qd_detr.gates import GateRecorder
    outputs, gates = {}, {}
    recorder = GateRecorder(model.fusion, lambda recs: gates.update({r.sample_id: r for r in recs})) \
        if model.fusion is not None else None
    if recorder:
        recorder.attach()
    try:
        for idx in batches:
            metas, inputs = collate([dataset[i] for i in idx])
            if recorder:
                recorder.set_ids([m["qid"] for m in metas])
            with torch.no_grad():
                out = model(**model_kwargs(inputs))
            for i, m in enumerate(metas):
                outputs[m["qid"]] = {k: out[k][i].numpy() for k in ("pred_logits", "pred_spans", "saliency_scores")}
                outputs[m["qid"]]["n"] = int(inputs["src_vid_mask"][i].sum())
    finally:
        if recorder:
            recorder.detach()
    return outputs, gates


def gates_one_by_one(model, dataset, indices=None):
    """{qid: GateRecord} of each query run alone (no padding), for ``indices`` (default all)."""
    indices = range(len(dataset)) if indices is None else indices
    return forward_batches(model, dataset, [[i] for i in indices])[1]


# ------------------------------------------------------------------------------------------------
# running the tools
# ------------------------------------------------------------------------------------------------

SCRIPT_ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def run_python(*argv, cwd=ROOT, env=SCRIPT_ENV, timeout=600, **kw):
    """``python *argv`` (a script path or ``-m module`` and its flags) as a subprocess, output captured."""
    return subprocess.run([sys.executable, *map(str, argv)], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=timeout, **kw)


def run_fixture_analysis(name, out, *extra):
    """run_gate_analysis.py (a subprocess) on the checkpoint of fixture ``name`` and the fixture val data, on
    the CPU without plots; it must succeed. The completed process."""
    proc = run_python("run_gate_analysis.py", "--model_path", FIXTURES / name / "model.ckpt", "--data_path",
                      FIXTURE_DATA / "highlight_val_release.jsonl", *fixture_feature_args(), "--output_dir", out,
                      "--device", "cpu", "--no_plots", "--quiet", *extra)
    assert proc.returncode == 0, proc.stderr
    return proc


def run_gate_analysis_main(*argv):
    """run_gate_analysis.py in process (its error policy included): the exit code."""
    import run_gate_analysis
    from qd_detr.cli import run_main
    return run_main(run_gate_analysis.main, [str(a) for a in argv])


def analysis_config(ckpt, paths, out, **kw):
    """``AnalysisConfig`` of ``ckpt`` on the demo val split, on the CPU, outputs in ``out``."""
    from gate_analysis.pipeline import AnalysisConfig
    return AnalysisConfig(model_path=str(ckpt), data_path=paths["jsonl"]["val"], output_dir=str(out), device="cpu",
                          **demo_dirs(paths), **kw)


def interrupted_after(iterate, n):
    """The generator function ``iterate`` stopped by a KeyboardInterrupt before its item ``n`` (Ctrl-C)."""
    def interrupted(*args, **kwargs):
        for i, item in enumerate(iterate(*args, **kwargs)):
            if i == n:
                raise KeyboardInterrupt
            yield item
    return interrupted


def legacy_report(capsys, argv):
    """test_legacy_model.py --json in process: (exit code, the one-line JSON report, stderr)."""
    import test_legacy_model
    code = test_legacy_model.main([*argv, "--json", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert len(out.strip().splitlines()) == 1
    return code, json.loads(out), err
