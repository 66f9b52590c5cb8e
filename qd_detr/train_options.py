"""Training options: the ``python -m qd_detr.train`` parser and the option set a checkpoint carries.

Option names and defaults are the original ``qd_detr/config.py`` ones (``DEFAULT_OPTIONS``);
``--v_feat_dim`` is given without the 2 temporal endpoint features (TEF), ``--a_feat_dim`` with them,
exactly as in the original scripts. ``options_from_args`` turns parsed arguments into the
``argparse.Namespace`` saved in checkpoints and the dict saved as ``opt.json``; ``--no_tensorboard``
stays out of both (``qd_detr.train.main`` passes it to ``train``).
"""
import argparse
import os

import torch

from .checkpoint import resolve_device
from .config import DEFAULT_OPTIONS, FUSION_VARIANTS, GATING_TYPES, SSM_OPTIONS, V2_OPTIONS, check_options, make_options
from .errors import ConfigError
from .model import BATCHING_MODES
from .summary_writer import TENSORBOARD_DIR

__all__ = ["get_args_parser", "options_from_args", "opt_json_from", "parse_device", "TRAIN_LOG_FORMAT",
           "EVAL_LOG_FORMAT"]

TRAIN_LOG_FORMAT = "{time_str} [Epoch] {epoch:03d} [Loss] {loss_str}\n"
EVAL_LOG_FORMAT = "{time_str} [Epoch] {epoch:03d} [Loss] {loss_str} [Metrics] {eval_metrics_str}\n"
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
    g.add_argument("--no_tensorboard", action="store_true",
                   help="write no TensorBoard event files (default: RESULTS/tensorboard_log/ when the tensorboard "
                        "package is installed: losses, metrics and, with --gate_monitor_every, the gates)")

    g = p.add_argument_group("gate monitor")
    g.add_argument("--gate_monitor_every", type=_nonneg_int, default=0,
                   help="capture fusion gates on fixed validation queries every N epochs (0: off)")
    g.add_argument("--gate_monitor_qids", type=int, nargs="+", default=None, help="validation qids to track")
    g.add_argument("--gate_monitor_n", type=_pos_int, default=16,
                   help="track the first N validation queries when --gate_monitor_qids is not given")
    g.add_argument("--gate_monitor_no_plots", action="store_true", help="per-epoch CSVs only (evolution plots stay)")
    return p


def parse_device(text):
    """A ``torch.device`` from ``--device``: auto, cpu, cuda, cuda:N, or the original integers (-1 = cpu)."""
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
    raw.pop("no_tensorboard", None)  # how this run logs, not an option of the model: train(tensorboard=...)
    device = parse_device(raw["device"])
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
    opt.tensorboard_log_dir = os.path.join(results_dir, TENSORBOARD_DIR)
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
