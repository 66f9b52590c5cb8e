"""Train QD-DETR (optionally with audio fusion) on QVHighlights-format data.

    python -m qd_detr.train --train_path train.jsonl --eval_path val.jsonl \
        --v_feat_dirs slowfast_features clip_features --t_feat_dir clip_text_features \
        --a_feat_dir pann_features --v_feat_dim 2816 --t_feat_dim 512 --a_feat_dim 2050 \
        --results_dir results/run1 --use_avigate_custom --gating_type clipwise \
        [--gate_monitor_every 5]

Option names and defaults are the original ``qd_detr/config.py`` ones (``DEFAULT_OPTIONS``);
``--v_feat_dim`` is given without the 2 temporal endpoint features (TEF), ``--a_feat_dim`` with them,
exactly as in the original scripts. The training recipe is the original one: AdamW (``lr``, ``wd``),
StepLR every ``lr_drop`` epochs, gradient clipping at ``grad_clip``, Hungarian matching and the
``SetCriterion`` losses (``qd_detr.losses``), evaluation every ``eval_epoch`` (5) epochs with the
official metrics, best model chosen on ``MR-full-mAP``.

Outputs in ``--results_dir`` (original names and formats):
- ``opt.json``: the options with ``v_feat_dim`` *without* the +2 (as the original ``display_save``);
- ``model_best.ckpt`` / ``model_latest.ckpt``: ``{model, optimizer, lr_scheduler, epoch, opt}``,
  ``epoch`` 0-based, ``opt`` an ``argparse.Namespace`` with the final dims (``v_feat_dim`` + 2 with
  TEF) and ``device`` a ``torch.device``; ``model_e{epoch:04d}.ckpt`` every 50 epochs (10 when the
  train path contains "subs_train") and at each ``lr_drop``, without ``lr_scheduler``;
- ``train.log.txt`` / ``eval.log.txt`` (original line formats), ``latest_hl_val_preds.jsonl`` and
  ``..._metrics.json`` (renamed to ``best_...`` when the model improves), ``train_summary.json``;
- with ``--gate_monitor_every N``: ``gate_monitor/epoch_{n}/`` gate analyses (``n`` = completed
  epochs, 0 = untrained), ``gate_monitor/gate_evolution.csv`` and evolution plots
  (``gate_analysis.monitor``).

Deviations from the original, each because the original cannot run here or to make runs usable:
the device defaults to ``auto`` (``--device`` also takes ``cpu``, ``cuda[:N]`` and the original
integers, -1 = cpu); ``--num_workers`` defaults to 0 (reproducible label sampling); no TensorBoard,
code copies or ``code.zip``; the last epoch is always evaluated and saved; without ``--eval_path``
``model_latest.ckpt`` is still written at every evaluation interval; ``--batching query`` (default)
trains with padding-aware gate pooling and attention masks, ``--batching original`` with the
original batch-dependent behaviour; NMS (``--nms_thd``) and ``span_loss_type ce`` are not supported.
Runs are deterministic for a given ``--seed`` on CPU.
"""
import argparse
import json
import math
import os
import random
import sys
import time
from collections import defaultdict

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from .checkpoint import normalize_state_dict, read_checkpoint, resolve_device, split_checkpoint, strict_load
from .cli import prepare_output_dir, run_main
from .config import DEFAULT_OPTIONS, FUSION_VARIANTS, GATING_TYPES, SSM_OPTIONS, V2_OPTIONS, check_options, make_options
from .dataset import QVHighlightsDataset, collate, has_labels, move_to_device, read_jsonl
from .errors import CheckpointError, ConfigError, DataError
from .eval import eval_submission
from .inference import make_batches
from .losses import build_criterion
from .model import BATCHING_MODES, build_model
from .postprocess import submission_lines, write_json, write_jsonl

__all__ = ["get_args_parser", "options_from_args", "opt_json_from", "build_datasets", "build_optimizer", "set_seed",
           "train_one_epoch", "evaluate_model", "checkpoint_dict", "save_checkpoint", "train", "main",
           "train_demo_model", "demo_gate_structure", "gate_structure", "signal_clips", "DEMO_DATA_ARGS", "DEMO_OPTIONS", "TRAIN_LOG_FORMAT",
           "EVAL_LOG_FORMAT"]

TRAIN_LOG_FORMAT = "{time_str} [Epoch] {epoch:03d} [Loss] {loss_str}\n"
EVAL_LOG_FORMAT = "{time_str} [Epoch] {epoch:03d} [Loss] {loss_str} [Metrics] {eval_metrics_str}\n"
BEST_METRIC = "MR-full-mAP"
_D = DEFAULT_OPTIONS


# ---------------------------------------------------------------------------------------- options
def _nonneg_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def _pos_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def get_args_parser():
    """The training CLI: the original option names and defaults, plus ``--results_dir`` and the monitor."""
    p = argparse.ArgumentParser(description="Train QD-DETR (+ AVIGATE audio fusion) on QVHighlights-format data",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dset_name", default=_D["dset_name"], choices=["hl"], help="dataset kind (QVHighlights)")
    g.add_argument("--train_path", required=True, help="training JSONL with labels")
    g.add_argument("--eval_path", default=None, help="validation JSONL (metrics when it has labels)")
    g.add_argument("--eval_split_name", default=_D["eval_split_name"], help="name used in prediction file names")
    g.add_argument("--data_ratio", type=float, default=1.0, help="use the first fraction of the training queries")
    g.add_argument("--v_feat_dirs", nargs="+", required=True, help="video feature folders (slowfast, then clip)")
    g.add_argument("--t_feat_dir", required=True, help="text feature folder (qid{qid}.npz)")
    g.add_argument("--a_feat_dir", default=None, help="audio feature folder ({vid}.npy); none: video-only model")
    g.add_argument("--v_feat_dim", type=int, required=True, help="video feature dim without the 2 TEF dims")
    g.add_argument("--t_feat_dim", type=int, required=True, help="text feature dim")
    g.add_argument("--a_feat_dim", type=int, default=None, help="audio feature dim including the 2 TEF dims")
    g.add_argument("--ctx_mode", default=_D["ctx_mode"], help="'video_tef', 'video' or 'tef'")
    g.add_argument("--max_q_l", type=_pos_int, default=_D["max_q_l"])
    g.add_argument("--max_v_l", type=_pos_int, default=_D["max_v_l"])
    g.add_argument("--clip_length", type=int, default=_D["clip_length"])
    g.add_argument("--max_windows", type=_pos_int, default=_D["max_windows"])
    g.add_argument("--no_norm_vfeat", action="store_true", help="do not L2-normalise video (and audio) features")
    g.add_argument("--no_norm_tfeat", action="store_true", help="do not L2-normalise text features")
    g.add_argument("--txt_drop_ratio", type=float, default=_D["txt_drop_ratio"],
                   help="fraction of text tokens zeroed in training")

    g = p.add_argument_group("model")
    g.add_argument("--hidden_dim", type=int, default=_D["hidden_dim"], help="must be 256 (anchor decoder)")
    g.add_argument("--enc_layers", type=_pos_int, default=_D["enc_layers"])
    g.add_argument("--dec_layers", type=_pos_int, default=_D["dec_layers"])
    g.add_argument("--dim_feedforward", type=_pos_int, default=_D["dim_feedforward"])
    g.add_argument("--nheads", type=_pos_int, default=_D["nheads"])
    g.add_argument("--num_queries", type=_pos_int, default=_D["num_queries"])
    g.add_argument("--input_dropout", type=float, default=_D["input_dropout"])
    g.add_argument("--dropout", type=float, default=_D["dropout"])
    g.add_argument("--n_input_proj", type=int, choices=(1, 2, 3), default=_D["n_input_proj"])
    g.add_argument("--pre_norm", action="store_true")
    g.add_argument("--position_embedding", default=_D["position_embedding"], choices=("sine",))
    g.add_argument("--use_txt_pos", action="store_true")
    g.add_argument("--contrastive_align_loss", action="store_true")
    g.add_argument("--contrastive_hdim", type=_pos_int, default=_D["contrastive_hdim"])
    g.add_argument("--temperature", type=float, default=_D["temperature"])
    g.add_argument("--span_loss_type", default=_D["span_loss_type"], choices=("l1",))
    g.add_argument("--no_aux_loss", dest="aux_loss", action="store_false")
    g.add_argument("--use_avigate_custom", action="store_true", help="AVIGATEFusionCustom (needs --a_feat_dir)")
    g.add_argument("--use_avigate", action="store_true", help="the older AVIGATEFusion (needs --a_feat_dir)")
    g.add_argument("--gating_type", default=_D["gating_type"], choices=GATING_TYPES)
    g.add_argument("--fusion_layers", type=_pos_int, default=_D["fusion_layers"])
    g.add_argument("--fusion_n_heads", type=_pos_int, default=_D["fusion_n_heads"])
    g.add_argument("--fusion_variant", choices=tuple(FUSION_VARIANTS), default=None,
                   help="which research branch's fusion math: v1 (avigate_custom, tanh gates), diagstrip "
                        "(diagstrip-ssm: sigmoid MHA gate for global, global_diagstrip_ssm), v2 (gate "
                        "refinement). Default: v2 when a v2 flag below is given, diagstrip when an --ssm_* "
                        "flag or --gating_type global_diagstrip_ssm is, else v1. The checkpoint saves the "
                        "options of that branch, so it loads in the branch's own code")
    g = p.add_argument_group("v2 gating (branch feat/gate_analysis_junhan_v2-0812)")
    g.add_argument("--mha_gate_temp", type=float, default=None,
                   help=f"sigmoid temperature of the MHA gate (default {V2_OPTIONS['mha_gate_temp']})")
    g.add_argument("--mha_gate_bias_init", type=float, default=None,
                   help=f"initial MHA gate bias (default {V2_OPTIONS['mha_gate_bias_init']})")
    g.add_argument("--mha_gate_scale_init", type=float, default=None,
                   help=f"initial MHA gate scale (default {V2_OPTIONS['mha_gate_scale_init']})")
    g.add_argument("--ffn_gate_alpha_init", type=float, default=None,
                   help=f"initial FFN gate alpha (default {V2_OPTIONS['ffn_gate_alpha_init']})")
    g.add_argument("--ffn_gate_film", action="store_true", default=None,
                   help="FiLM: FFN branch scaled by 1 + g_ffn plus a shift g_beta")
    g.add_argument("--ffn_gate_beta_init", type=float, default=None,
                   help=f"initial FiLM shift scale (default {V2_OPTIONS['ffn_gate_beta_init']})")
    g = p.add_argument_group("diagstrip-ssm gating (branch diagstrip-ssm)")
    g.add_argument("--ssm_band_width", type=_pos_int, default=None,
                   help=f"diagonal strip half-width w (default {SSM_OPTIONS['ssm_band_width']})")
    g.add_argument("--ssm_enc_channels", type=_pos_int, default=None,
                   help=f"strip encoder channels (default {SSM_OPTIONS['ssm_enc_channels']})")
    g.add_argument("--ssm_dilations", type=_pos_int, nargs="+", default=None,
                   help=f"strip encoder dilations (default {' '.join(map(str, SSM_OPTIONS['ssm_dilations']))})")
    g.add_argument("--ssm_diag_subtract", type=float, default=None,
                   help=f"diagonal suppression (default {SSM_OPTIONS['ssm_diag_subtract']})")
    g.add_argument("--ssm_use_video_branch", type=int, choices=(0, 1), default=None,
                   help="1: audio and video strips (default), 0: audio only")

    g = p.add_argument_group("loss")
    for name in ("lw_saliency", "saliency_margin", "set_cost_span", "set_cost_giou", "set_cost_class",
                 "span_loss_coef", "giou_loss_coef", "label_loss_coef", "eos_coef", "contrastive_align_loss_coef"):
        g.add_argument(f"--{name}", type=float, default=float(_D[name]))

    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=_D["lr"])
    g.add_argument("--lr_drop", type=_pos_int, default=_D["lr_drop"], help="StepLR step (epochs)")
    g.add_argument("--wd", type=float, default=_D["wd"])
    g.add_argument("--n_epoch", type=_pos_int, default=_D["n_epoch"])
    g.add_argument("--max_es_cnt", type=int, default=200, help="early stop after this many evaluations without "
                   "improvement (-1: never)")
    g.add_argument("--bsz", type=_pos_int, default=_D["bsz"])
    g.add_argument("--eval_bsz", type=_pos_int, default=_D["eval_bsz"])
    g.add_argument("--grad_clip", type=float, default=_D["grad_clip"], help="max grad norm, <= 0: off")
    g.add_argument("--eval_epoch", type=_pos_int, default=5, help="evaluate every N epochs")
    g.add_argument("--eval_untrained", action="store_true", help="also evaluate before training")
    g.add_argument("--seed", type=int, default=_D["seed"])
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, or the original 0 (cuda) / -1 (cpu)")
    g.add_argument("--num_workers", type=_nonneg_int, default=0, help="data loading worker processes")
    g.add_argument("--no_pin_memory", action="store_true")
    g.add_argument("--batching", choices=BATCHING_MODES, default="query",
                   help="query: padding-aware gate pooling and masks; original: the original batch-dependent forward")
    g.add_argument("--resume", default=None, help="checkpoint whose weights initialise the model (strict)")
    g.add_argument("--resume_all", action="store_true",
                   help="with --resume: also restore optimizer, scheduler and continue after its epoch")
    g.add_argument("--start_epoch", type=int, default=None, help="0-based epoch to start from")

    g = p.add_argument_group("post-processing")
    g.add_argument("--max_before_nms", type=int, default=_D["max_before_nms"])
    g.add_argument("--max_after_nms", type=int, default=_D["max_after_nms"])
    g.add_argument("--conf_thd", type=float, default=_D["conf_thd"])
    g.add_argument("--nms_thd", type=float, default=_D["nms_thd"], help="only -1 (no NMS) is supported")

    g = p.add_argument_group("output")
    g.add_argument("--results_dir", required=True, help="output folder (checkpoints, logs, opt.json)")
    g.add_argument("--overwrite", action="store_true", help="allow a non-empty --results_dir (files are replaced)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")

    g = p.add_argument_group("gate monitor")
    g.add_argument("--gate_monitor_every", type=_nonneg_int, default=0,
                   help="capture fusion gates on fixed validation queries every N epochs (0: off)")
    g.add_argument("--gate_monitor_qids", type=int, nargs="+", default=None, help="validation qids to track")
    g.add_argument("--gate_monitor_n", type=_pos_int, default=16,
                   help="track the first N validation queries when --gate_monitor_qids is not given")
    g.add_argument("--gate_monitor_no_plots", action="store_true", help="per-epoch CSVs only (evolution plots stay)")
    return p


def _parse_device(text):
    text = str(text).strip()
    try:
        index = int(text)
    except ValueError:
        return resolve_device(text)
    return resolve_device("cpu" if index < 0 else f"cuda:{index}")


def options_from_args(args):
    """(opt, opt_json) from parsed CLI arguments.

    ``opt`` is the Namespace the checkpoints carry: original defaults, final dims (``v_feat_dim`` + 2
    with TEF, 0 + 2 without video), ``device`` a ``torch.device`` and the derived bookkeeping fields
    of the original ``parse()``. ``opt_json`` is the dict for ``opt.json`` (``v_feat_dim`` as given,
    ``device`` as the original integer: -1 cpu, N cuda:N). Raises ConfigError on contradictions.
    """
    raw = dict(vars(args))
    device = _parse_device(raw["device"])
    if raw["a_feat_dir"] is None and (raw["use_avigate_custom"] or raw["use_avigate"]):
        raise ConfigError("--use_avigate_custom / --use_avigate need audio features: pass --a_feat_dir and "
                          "--a_feat_dim")
    if raw["a_feat_dir"] is not None and raw["a_feat_dim"] is None:
        raise ConfigError("--a_feat_dir given without --a_feat_dim (audio dim including the 2 TEF dims, e.g. 2050)")
    if raw["a_feat_dir"] is None and raw["a_feat_dim"] is not None:
        raise ConfigError("--a_feat_dim given without --a_feat_dir")
    if raw["use_avigate_custom"] and raw["use_avigate"]:
        raise ConfigError("choose one of --use_avigate_custom and --use_avigate")
    if raw["nms_thd"] != -1:
        raise ConfigError("--nms_thd: NMS is not implemented; only -1 (no NMS, the default) is supported")
    if not 0 < raw["data_ratio"] <= 1:
        raise ConfigError(f"--data_ratio must be in (0, 1], got {raw['data_ratio']}")
    if not 0 <= raw["txt_drop_ratio"] < 1:
        raise ConfigError(f"--txt_drop_ratio must be in [0, 1), got {raw['txt_drop_ratio']}")
    if raw["resume_all"] and not raw["resume"]:
        raise ConfigError("--resume_all needs --resume CHECKPOINT")
    if raw["gate_monitor_every"]:
        if not raw["eval_path"]:
            raise ConfigError("--gate_monitor_every tracks validation queries: pass --eval_path")
        if not (raw["use_avigate_custom"] or raw["use_avigate"]):
            raise ConfigError("--gate_monitor_every needs a fusion model (--use_avigate_custom or --use_avigate); "
                              "without one there are no gates")
    if "video" not in raw["ctx_mode"] and "tef" not in raw["ctx_mode"]:
        raise ConfigError(f"--ctx_mode {raw['ctx_mode']!r} has neither 'video' nor 'tef'")
    _variant_options(raw)
    results_dir = os.path.abspath(raw["results_dir"])
    raw["results_dir"] = results_dir
    opt_json = dict(raw)
    opt_json["device"] = -1 if device.type == "cpu" else (device.index or 0)
    opt = make_options(**raw)
    opt.device = device
    opt.pin_memory = device.type == "cuda" and not raw["no_pin_memory"]
    opt.use_tef = "tef" in opt.ctx_mode
    opt.use_video = "video" in opt.ctx_mode
    if not opt.use_video:
        opt.v_feat_dim = 0
    if opt.use_tef:
        opt.v_feat_dim += 2
    opt.ckpt_filepath = os.path.join(results_dir, "model.ckpt")
    opt.train_log_filepath = os.path.join(results_dir, "train.log.txt")
    opt.eval_log_filepath = os.path.join(results_dir, "eval.log.txt")
    opt.tensorboard_log_dir = os.path.join(results_dir, "tensorboard_log")
    opt.train_log_txt_formatter = TRAIN_LOG_FORMAT
    opt.eval_log_txt_formatter = EVAL_LOG_FORMAT
    check_options(opt, "training options")
    return opt, opt_json


def _variant_options(raw):
    """Replace the v2 / ssm flags in ``raw`` by the full option set of the chosen branch (as that
    branch's parser saves it) or by nothing (v1); raise ConfigError on flags of the wrong branch."""
    variant = raw.pop("fusion_variant")
    given_v2 = sorted(k for k in V2_OPTIONS if raw.get(k) is not None)
    given_ssm = sorted(k for k in SSM_OPTIONS if raw.get(k) is not None)
    if variant is None:
        if given_v2 and given_ssm:
            raise ConfigError(f"v2 flags ({', '.join(given_v2)}) and diagstrip-ssm flags ({', '.join(given_ssm)}) "
                              "belong to different research branches; choose one")
        ssm_type = raw["gating_type"] == "global_diagstrip_ssm"
        variant = "v2" if given_v2 else "diagstrip" if given_ssm or ssm_type else "v1"
    wrong = {"v1": given_v2 + given_ssm, "v2": given_ssm, "diagstrip": given_v2}[variant]
    if wrong:
        raise ConfigError(f"--fusion_variant {variant} has no option(s) {', '.join(wrong)}")
    if variant != "v1" and not raw["use_avigate_custom"]:
        raise ConfigError(f"--fusion_variant {variant} is a variant of --use_avigate_custom; pass it too")
    if raw["gating_type"] == "global_diagstrip_ssm" and variant != "diagstrip":
        raise ConfigError(f"--gating_type global_diagstrip_ssm exists only in the diagstrip variant, not {variant}")
    for table, own in ((V2_OPTIONS, "v2"), (SSM_OPTIONS, "diagstrip")):
        for key, default in table.items():
            value = raw.pop(key)
            if variant == own:
                raw[key] = list(default) if isinstance(default, list) and value is None else \
                    (default if value is None else value)
    if variant == "v2":
        raw["ffn_gate_film"] = bool(raw["ffn_gate_film"])


def opt_json_from(opt):
    """The ``opt.json`` dict of final options: ``v_feat_dim`` without the TEF dims (and 0 without
    video, as the original saves it before ``parse()`` adjusts it), ``device`` as the original integer."""
    out = {k: v for k, v in vars(opt).items() if not k.endswith(("_filepath", "_formatter"))
           and k not in ("tensorboard_log_dir", "pin_memory", "use_tef", "use_video")}
    if getattr(opt, "v_feat_dim", None) is not None:
        out["v_feat_dim"] = opt.v_feat_dim - (2 if "tef" in opt.ctx_mode else 0)
    device = torch.device(opt.device) if not isinstance(opt.device, int) else opt.device
    out["device"] = device if isinstance(device, int) else (-1 if device.type == "cpu" else device.index or 0)
    return out


# ---------------------------------------------------------------------------------------- setup
def set_seed(seed):
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _dataset(opt, records, training, load_labels):
    return QVHighlightsDataset(
        records, opt.v_feat_dirs, opt.t_feat_dir, opt.a_feat_dir, max_q_l=opt.max_q_l, max_v_l=opt.max_v_l,
        ctx_mode=opt.ctx_mode, clip_len=opt.clip_length, normalize_v=not opt.no_norm_vfeat,
        normalize_t=not opt.no_norm_tfeat, load_labels=load_labels, max_windows=opt.max_windows, training=training,
        txt_drop_ratio=opt.txt_drop_ratio if training else 0, v_feat_dim=opt.v_feat_dim, t_feat_dim=opt.t_feat_dim,
        a_feat_dim=opt.a_feat_dim if opt.a_feat_dir is not None else None, seed=opt.seed)


def build_datasets(opt):
    """(train dataset, eval dataset or None). Training queries need labels; ``data_ratio`` keeps the
    first fraction of them (as the original)."""
    records = read_jsonl(opt.train_path)
    if opt.data_ratio != 1:
        records = records[:max(1, int(len(records) * opt.data_ratio))]
    unlabelled = [r["qid"] for r in records if not has_labels(r)]
    if unlabelled:
        raise DataError(f"{opt.train_path}: {len(unlabelled)} training queries have no labels "
                        f"(relevant_windows, relevant_clip_ids, saliency_scores), e.g. qid {unlabelled[0]}")
    train_ds = _dataset(opt, records, training=True, load_labels=True)
    eval_ds = None
    if opt.eval_path:
        eval_ds = _dataset(opt, read_jsonl(opt.eval_path), training=False, load_labels=None)
    return train_ds, eval_ds


def build_optimizer(model, opt):
    """AdamW over the trainable parameters and StepLR(lr_drop), as the original ``setup_model``."""
    params = [{"params": [p for _, p in model.named_parameters() if p.requires_grad]}]
    optimizer = torch.optim.AdamW(params, lr=opt.lr, weight_decay=opt.wd)
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, opt.lr_drop)


def _reseed_worker(_):
    """DataLoader workers: a distinct, loader-seeded label-sampling generator per worker."""
    info = torch.utils.data.get_worker_info()
    ds = info.dataset
    ds.reseed(info.seed)


def _train_loader(dataset, opt):
    gen = torch.Generator().manual_seed(opt.seed)
    return DataLoader(dataset, batch_size=opt.bsz, shuffle=True, collate_fn=collate, num_workers=opt.num_workers,
                      pin_memory=opt.pin_memory, generator=gen, worker_init_fn=_reseed_worker)


# ---------------------------------------------------------------------------------------- epochs
class _Meter:
    def __init__(self):
        self.sum, self.n = 0.0, 0

    def update(self, value):
        self.sum += float(value)
        self.n += 1

    @property
    def avg(self):
        return self.sum / max(1, self.n)


def _log_value(key, value, weight_dict):
    value = value.detach().item() if torch.is_tensor(value) else float(value)
    return value * weight_dict[key] if key in weight_dict else value


def train_one_epoch(model, criterion, loader, optimizer, opt, epoch_i=0, progress=False):
    """One pass over ``loader``; returns {loss name: average} (weighted terms times their weight, as
    the original logs them, plus ``loss_overall``). Raises FloatingPointError on a non-finite loss."""
    model.train()
    criterion.train()
    meters = defaultdict(_Meter)
    bar = tqdm(loader, desc=f"epoch {epoch_i + 1} train", leave=False, file=sys.stderr, disable=not progress,
               unit="batch")
    for b, (metas, inputs) in enumerate(bar):
        inputs = move_to_device(inputs, opt.device, non_blocking=opt.pin_memory)
        targets = inputs.pop("targets")
        outputs = model(**inputs)
        loss_dict = criterion(outputs, targets)
        loss = criterion.total(loss_dict)
        if not torch.isfinite(loss):
            terms = ", ".join(f"{k}={float(v):.4g}" for k, v in loss_dict.items())
            raise FloatingPointError(f"non-finite loss at epoch {epoch_i + 1}, batch {b + 1} "
                                     f"(qids {[m['qid'] for m in metas][:8]}): {terms}")
        optimizer.zero_grad()
        loss.backward()
        if opt.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), opt.grad_clip)
        optimizer.step()
        meters["loss_overall"].update(loss.item())
        for k, v in loss_dict.items():
            meters[k].update(_log_value(k, v, criterion.weight_dict))
        bar.set_postfix(loss=f"{meters['loss_overall'].avg:.4f}")
    return {k: m.avg for k, m in meters.items()}


@torch.no_grad()
def evaluate_model(model, criterion, dataset, opt, progress=False):
    """Predictions and metrics on ``dataset``.

    Returns (submission lines in dataset order, official metrics or None when the dataset has no
    labels, {loss name: average} (empty without labels)). Batches follow ``opt.batching``: length-
    grouped ``eval_bsz`` batches (query) or ``eval_bsz`` batches in file order (original)."""
    model.eval()
    criterion.eval()
    batches = make_batches(dataset, opt.batching, opt.eval_bsz, opt)
    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=opt.num_workers)
    meters = defaultdict(_Meter)
    by_qid = {}
    for metas, inputs in tqdm(loader, desc="evaluate", leave=False, file=sys.stderr, disable=not progress,
                              unit="batch"):
        inputs = move_to_device(inputs, opt.device)
        targets = inputs.pop("targets", None)
        outputs = model(**inputs, compute_neg=targets is not None)
        for line in submission_lines(metas, outputs, inputs["src_vid_mask"]):
            by_qid[line["qid"]] = line
        if targets is not None:
            loss_dict = criterion(outputs, targets)
            meters["loss_overall"].update(float(criterion.total(loss_dict)))
            for k, v in loss_dict.items():
                meters[k].update(_log_value(k, v, criterion.weight_dict))
    lines = [by_qid[r["qid"]] for r in dataset.records]
    metrics = None
    if dataset.load_labels:
        metrics = eval_submission(lines, dataset.records, verbose=False, match_number=True)
    return lines, metrics, {k: m.avg for k, m in meters.items()}


# ---------------------------------------------------------------------------------------- checkpoints
def checkpoint_dict(model, optimizer, lr_scheduler, epoch, opt):
    """The original checkpoint layout; ``lr_scheduler`` None leaves the entry out (``model_e*`` files)."""
    ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    if lr_scheduler is not None:
        ckpt["lr_scheduler"] = lr_scheduler.state_dict()
    ckpt["epoch"] = int(epoch)
    ckpt["opt"] = argparse.Namespace(**vars(opt))
    return ckpt


def save_checkpoint(ckpt, path):
    """``torch.save`` to a temporary name, then rename (never a half-written checkpoint)."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _restore(model, optimizer, lr_scheduler, opt):
    """Load ``opt.resume`` (weights strictly; with ``resume_all`` optimizer, scheduler, epoch)."""
    obj = read_checkpoint(opt.resume)
    sd, _, _, _ = split_checkpoint(obj, opt.resume)
    sd, _ = normalize_state_dict(sd)
    strict_load(model, sd, opt.resume)
    if not opt.resume_all:
        return None
    missing = [k for k in ("optimizer", "lr_scheduler", "epoch") if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise CheckpointError(f"{opt.resume}: --resume_all needs the entries {missing}, which this checkpoint lacks")
    try:
        optimizer.load_state_dict(obj["optimizer"])
        lr_scheduler.load_state_dict(obj["lr_scheduler"])
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"{opt.resume}: optimizer state does not fit this model ({exc})") from None
    return int(obj["epoch"]) + 1


def _write_text(path, text, mode="a"):
    with open(path, mode) as fh:
        fh.write(text)


def _time_str():
    return time.strftime("%Y_%m_%d_%H_%M_%S")


# ---------------------------------------------------------------------------------------- training
def train(opt, opt_json=None, progress=True, log=print):
    """Train with the options of ``options_from_args`` (``opt``, and ``opt_json`` for ``opt.json``;
    derived from ``opt`` when None); returns a summary dict (also written to ``train_summary.json``)
    with the checkpoint paths, per-epoch losses, metrics and timings."""
    t0 = time.time()
    resuming = bool(opt.resume_all)
    results_dir = opt.results_dir
    prepare_output_dir(results_dir, overwrite=opt.overwrite or resuming)
    set_seed(opt.seed)
    train_ds, eval_ds = build_datasets(opt)
    criterion = build_criterion(opt)
    model = build_model(opt)
    model.set_batching(opt.batching)
    model.to(opt.device)
    criterion.to(opt.device)
    optimizer, lr_scheduler = build_optimizer(model, opt)
    start_epoch = 0
    if opt.resume:
        restored = _restore(model, optimizer, lr_scheduler, opt)
        if restored is not None:
            start_epoch = restored
    if opt.start_epoch is not None:
        start_epoch = opt.start_epoch
    if opt.eval_untrained and start_epoch == 0:
        start_epoch = -1
    if opt_json is None:
        opt_json = opt_json_from(opt)
    with open(os.path.join(results_dir, "opt.json"), "w") as fh:
        json.dump(opt_json, fh, indent=4, default=str)
    if not resuming:
        for path in (opt.train_log_filepath, opt.eval_log_filepath):
            _write_text(path, "", mode="w")

    monitor = None
    if opt.gate_monitor_every:
        from gate_analysis.monitor import GateMonitor
        monitor = GateMonitor.from_dataset(
            model, eval_ds, os.path.join(results_dir, "gate_monitor"), every=opt.gate_monitor_every,
            qids=opt.gate_monitor_qids, n=opt.gate_monitor_n, batch_size=opt.eval_bsz,
            plots=not opt.gate_monitor_no_plots, overwrite=not resuming, resume=resuming)
        if start_epoch <= 0:
            monitor.capture(0)

    loader = _train_loader(train_ds, opt)
    split = opt.eval_split_name
    latest_preds = os.path.join(results_dir, f"latest_{opt.dset_name}_{split}_preds.jsonl")
    best_score, es_cnt = -math.inf, 0
    history = []
    paths = {"best": None, "latest": None, "epochs": []}
    epochs = range(start_epoch, opt.n_epoch)
    for epoch_i in tqdm(epochs, desc="epochs", file=sys.stderr, disable=not progress, unit="epoch"):
        entry = {"epoch": epoch_i}
        if epoch_i > -1:
            te = time.time()
            entry["train_loss"] = train_one_epoch(model, criterion, loader, optimizer, opt, epoch_i, progress)
            entry["train_seconds"] = round(time.time() - te, 3)
            lr_scheduler.step()
            _write_text(opt.train_log_filepath, TRAIN_LOG_FORMAT.format(
                time_str=_time_str(), epoch=epoch_i + 1,
                loss_str=" ".join(f"{k} {v:.4f}" for k, v in entry["train_loss"].items())))
        last = epoch_i == opt.n_epoch - 1
        if (epoch_i + 1) % opt.eval_epoch == 0 or last:
            stop = False
            if eval_ds is not None:
                lines, metrics, eval_loss = evaluate_model(model, criterion, eval_ds, opt, progress)
                write_jsonl(latest_preds, lines)
                latest_files = [latest_preds]
                if metrics is not None:
                    metrics_path = latest_preds.replace(".jsonl", "_metrics.json")
                    write_json(metrics_path, metrics)
                    latest_files.append(metrics_path)
                entry["eval_loss"] = eval_loss
                entry["metrics"] = None if metrics is None else metrics["brief"]
                _write_text(opt.eval_log_filepath, EVAL_LOG_FORMAT.format(
                    time_str=_time_str(), epoch=epoch_i,
                    loss_str=" ".join(f"{k} {v:.4f}" for k, v in eval_loss.items()),
                    eval_metrics_str=json.dumps(metrics)))
                score = -math.inf if metrics is None else metrics["brief"].get(BEST_METRIC, -math.inf)
                if metrics is not None and (paths["best"] is None or score > best_score):
                    best_score, es_cnt = score, 0
                    paths["best"] = save_checkpoint(checkpoint_dict(model, optimizer, lr_scheduler, epoch_i, opt),
                                                    opt.ckpt_filepath.replace(".ckpt", "_best.ckpt"))
                    for src in latest_files:
                        os.replace(src, src.replace("latest", "best"))
                    entry["best"] = True
                elif metrics is not None:
                    es_cnt += 1
                    stop = opt.max_es_cnt != -1 and es_cnt > opt.max_es_cnt
                if metrics is not None:
                    b = metrics["brief"]
                    log(f"epoch {epoch_i + 1}: " + ", ".join(
                        f"{k} {b[k]}" for k in (BEST_METRIC, "MR-full-R1@0.5", "HL-min-VeryGood-mAP") if k in b)
                        + (" (best)" if entry.get("best") else ""))
            if epoch_i > -1 or eval_ds is None:
                paths["latest"] = save_checkpoint(checkpoint_dict(model, optimizer, lr_scheduler, epoch_i, opt),
                                                  opt.ckpt_filepath.replace(".ckpt", "_latest.ckpt"))
            if stop:
                _write_text(opt.train_log_filepath, f"Early Stop at epoch {epoch_i}")
                log(f"early stop at epoch {epoch_i + 1} (best {BEST_METRIC} {best_score})")
                history.append(entry)
                break
        if epoch_i > -1:
            save_interval = 10 if "subs_train" in opt.train_path else 50
            if (epoch_i + 1) % save_interval == 0 or (epoch_i + 1) % opt.lr_drop == 0:
                paths["epochs"].append(save_checkpoint(
                    checkpoint_dict(model, optimizer, None, epoch_i, opt),
                    opt.ckpt_filepath.replace(".ckpt", f"_e{epoch_i:04d}.ckpt")))
            if monitor is not None:
                captured = monitor.step(epoch_i)
                if captured is None and last and not monitor.due(epoch_i):
                    captured = monitor.capture(epoch_i + 1)
                if captured is not None:
                    entry["gate_monitor"] = captured["dir"]
        history.append(entry)

    summary = {
        "results_dir": results_dir,
        "checkpoint_best": paths["best"],
        "checkpoint_latest": paths["latest"],
        "checkpoints_epoch": paths["epochs"],
        "best_metric": BEST_METRIC,
        "best_score": None if best_score == -math.inf else best_score,
        "n_train_queries": len(train_ds),
        "n_eval_queries": 0 if eval_ds is None else len(eval_ds),
        "gate_monitor": None if monitor is None else monitor.out_dir,
        "seconds": round(time.time() - t0, 2),
        "history": history,
    }
    write_json(os.path.join(results_dir, "train_summary.json"), summary)
    return summary


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    opt, opt_json = options_from_args(args)
    summary = train(opt, opt_json, progress=not args.quiet)
    ckpt = summary["checkpoint_best"] or summary["checkpoint_latest"]
    print(f"trained {len(summary['history'])} epochs in {summary['seconds']} s; checkpoint: {ckpt}")
    if summary["gate_monitor"]:
        print(f"gate evolution: {os.path.join(summary['gate_monitor'], 'gate_evolution.csv')}")
    return 0


# ---------------------------------------------------------------------------------------- demo model
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
    from .demo_data import make_demo_dataset
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
        summary = train(opt, opt_json, progress=progress, log=log or (lambda *a: None))
    finally:
        torch.set_num_threads(previous)
    return summary["checkpoint_best"] or summary["checkpoint_latest"]


def signal_clips(records):
    """{vid: set of clip ids relevant to any query of the video}: the demo's audio-signal clips."""
    out = defaultdict(set)
    for r in records:
        out[r["vid"]].update(r.get("relevant_clip_ids") or [])
    return out


@torch.no_grad()
def gate_structure(model, dataset, batch_size=32):
    """Mean gate on audio-signal clips (``signal_clips`` of ``dataset.records``) vs the other clips.

    Returns {"layers.{l}.gate_{kind}": {"signal", "other", "difference", "n_signal", "n_other",
    "contribution_signal", "contribution_other"}}: mean gate (elementwise gates averaged over dims
    first) and mean effective contribution ``||g * branch|| / ||stream||`` (sign-free: how much the
    gated branch adds) on each clip group. The model runs in eval mode; its mode is restored.
    """
    from .gates import GateRecorder
    signal = signal_clips(dataset.records)
    vid_of = {r["qid"]: r["vid"] for r in dataset.records}
    got = {}
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with GateRecorder(model.fusion, lambda recs: got.update({r.sample_id: r for r in recs}),
                          capture_contributions=True) as rec:
            for start in range(0, len(dataset), batch_size):
                metas, inputs = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
                inputs.pop("targets", None)
                rec.set_ids([m["qid"] for m in metas])
                model(**move_to_device(inputs, device), compute_neg=False)
    finally:
        model.train(was_training)
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
        out[f"layers.{layer}.gate_{kind}"] = {"signal": float(sig.mean()), "other": float(oth.mean()),
                                              "difference": float(sig.mean() - oth.mean()),
                                              "n_signal": int(sig.size), "n_other": int(oth.size),
                                              "contribution_signal": float(csig.mean()),
                                              "contribution_other": float(coth.mean())}
    return out


def demo_gate_structure(checkpoint_path, data_path=None):
    """``gate_structure`` of a demo checkpoint on a labelled JSONL (default: its validation data).

    In the demo data a clip carries the audio signal when it is relevant to any query of its video
    (``qd_detr.demo_data``), so a trained model's layer-0 MHA gate should be higher there."""
    from .checkpoint import load_checkpoint
    from .inference import build_dataset
    model, opt, _ = load_checkpoint(checkpoint_path, device="cpu")
    records = read_jsonl(data_path or opt.eval_path)
    dirs = dict(v_feat_dirs=opt.v_feat_dirs, t_feat_dir=opt.t_feat_dir, a_feat_dir=opt.a_feat_dir)
    return gate_structure(model, build_dataset(opt, records, dirs))


if __name__ == "__main__":
    sys.exit(run_main(main))
