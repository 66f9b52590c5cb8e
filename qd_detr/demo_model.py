"""The demo model: a small AVIGATE model trained on generated data, and how its gates are structured.

``train_demo_model`` writes ``qd_detr.demo_data`` data and trains on it with ``qd_detr.trainer``;
``gate_structure`` measures whether the gates follow the audio signal the data plants.
"""
import os
from collections import defaultdict

import numpy as np
import torch

from .annotations import read_jsonl
from .batching import collated_batches, sequential_batches
from .checkpoint import load_checkpoint
from .dataset import build_dataset
from .demo_data import make_demo_dataset
from .engine import capture_gates
from .gates import gate_name
from .train_options import get_args_parser, options_from_args
from .trainer import train

__all__ = ["DEMO_DATA_ARGS", "DEMO_OPTIONS", "train_demo_model", "signal_clips", "gate_structure",
           "demo_gate_structure"]

#: Synthetic data of the demo model (``qd_detr.demo_data.make_demo_dataset`` arguments).
DEMO_DATA_ARGS = dict(n_videos=24, queries_per_video=1, slowfast_dim=32, clip_dim=32, text_dim=32, audio_dim=32)
#: Training options of the demo model (on top of ``DEFAULT_OPTIONS``).
DEMO_OPTIONS = dict(use_avigate_custom=True, gating_type="clipwise", fusion_layers=2, fusion_n_heads=4,
                    enc_layers=1, dec_layers=1, dim_feedforward=128, hidden_dim=256, nheads=8,
                    input_dropout=0.1, dropout=0.1, n_epoch=15, bsz=8, eval_bsz=32, lr=5e-4, lr_drop=400,
                    eval_epoch=5)


def train_demo_model(out_dir, seed=0, progress=False, log=None, gate_monitor_every=0, threads=1, **overrides):
    """Generate the demo data in ``out_dir/data`` and train the small demo model into ``out_dir/model``.

    The model is AVIGATE custom fusion with clipwise gates, 2 fusion layers, 1 encoder and 1 decoder
    layer, hidden 256 (``DEMO_OPTIONS``), on ``DEMO_DATA_ARGS`` data (one query per video, so the
    audio marks exactly the query's relevant clips). CPU only, with ``threads`` torch threads during
    training (1 by default: bit-identical checkpoints on every machine for a ``seed``, and no thread
    oversubscription on a busy 2-core machine); the previous thread count is restored.
    ``overrides`` replace training options. Returns the path of ``model_best.ckpt`` (``opt`` holds
    absolute feature folders).
    """
    out_dir = os.path.abspath(out_dir)
    data = make_demo_dataset(os.path.join(out_dir, "data"), seed=seed, **DEMO_DATA_ARGS)
    dims = data["dims"]
    argv = ["--train_path", data["jsonl"]["train"], "--eval_path", data["jsonl"]["val"],
            "--v_feat_dirs", *data["v_feat_dirs"], "--t_feat_dir", data["t_feat_dir"],
            "--a_feat_dir", data["a_feat_dir"], "--v_feat_dim", str(dims["v_feat_dim"] - 2),
            "--t_feat_dim", str(dims["t_feat_dim"]), "--a_feat_dim", str(dims["a_feat_dim"]),
            "--results_dir", os.path.join(out_dir, "model"), "--overwrite", "--seed", str(seed),
            "--device", "cpu", "--gate_monitor_every", str(gate_monitor_every)]
    options = {**DEMO_OPTIONS, **overrides}
    for key, value in options.items():
        if value is True:
            argv.append(f"--{key}")
        elif value is not False:
            argv += [f"--{key}", str(value)]
    args = get_args_parser().parse_args(argv)
    opt, opt_json = options_from_args(args)
    previous = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        summary = train(opt, opt_json, progress=progress, log=log or (lambda *a: None), tensorboard=False)
    finally:
        torch.set_num_threads(previous)
    return summary["checkpoint_best"] or summary["checkpoint_latest"]


def signal_clips(records):
    """{vid: set of clip ids relevant to any query of the video}: the demo's audio-signal clips."""
    out = defaultdict(set)
    for r in records:
        out[r["vid"]].update(r.get("relevant_clip_ids") or [])
    return out


def gate_structure(model, dataset, batch_size=32):
    """Mean gate on audio-signal clips (``signal_clips`` of ``dataset.records``) vs the other clips.

    Returns {"layers.{l}.gate_{kind}": {"signal", "other", "difference", "n_signal", "n_other",
    "contribution_signal", "contribution_other"}}: mean gate (elementwise gates averaged over dims
    first) and mean effective contribution ``||g * branch|| / ||stream||`` (sign-free: how much the
    gated branch adds) on each clip group. The model runs in eval mode; its mode is restored.
    """
    signal = signal_clips(dataset.records)
    vid_of = {r["qid"]: r["vid"] for r in dataset.records}
    got = {}
    batches = (([m["qid"] for m in metas], inputs)
               for metas, inputs in collated_batches(dataset, sequential_batches(len(dataset), batch_size)))
    capture_gates(model, batches, lambda recs: got.update({r.sample_id: r for r in recs}), capture_contributions=True)
    values = defaultdict(lambda: ([], [], [], []))
    for qid, record in got.items():
        for (layer, kind), gate in record.gates.items():
            gate = gate.reshape(len(gate), -1).mean(axis=1)  # (T,)
            contrib = record.contributions[(layer, kind)]     # (T,)
            is_signal = np.isin(np.arange(len(gate)), sorted(signal[vid_of[qid]]))
            for slot, arr in enumerate((gate[is_signal], gate[~is_signal], contrib[is_signal], contrib[~is_signal])):
                values[(layer, kind)][slot].append(arr)
    out = {}
    for (layer, kind), parts in sorted(values.items()):
        sig, oth, csig, coth = (np.concatenate(p).astype(np.float64) for p in parts)
        out[gate_name(layer, kind)] = {"signal": float(sig.mean()), "other": float(oth.mean()),
                                       "difference": float(sig.mean() - oth.mean()),
                                       "n_signal": int(sig.size), "n_other": int(oth.size),
                                       "contribution_signal": float(csig.mean()),
                                       "contribution_other": float(coth.mean())}
    return out


def demo_gate_structure(checkpoint_path, data_path=None):
    """``gate_structure`` of a demo checkpoint on a labelled JSONL (default: its validation data).

    In the demo data a clip carries the audio signal when it is relevant to any query of its video
    (``qd_detr.demo_data``), so a trained model's layer-0 MHA gate should be higher there."""
    model, opt, _ = load_checkpoint(checkpoint_path, device="cpu")
    records = read_jsonl(data_path or opt.eval_path)
    dirs = dict(v_feat_dirs=opt.v_feat_dirs, t_feat_dir=opt.t_feat_dir, a_feat_dir=opt.a_feat_dir)
    return gate_structure(model, build_dataset(opt, records, dirs))
