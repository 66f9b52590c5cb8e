"""Model options: the original QD-DETR defaults and rebuilding options from a checkpoint.

The original code keeps its configuration in an ``argparse.Namespace`` (``checkpoint["opt"]``) and in
an ``opt.json`` beside the checkpoint. ``opt.json`` is written *before* the original parser adds 2
(the temporal endpoint features, TEF) to ``v_feat_dim``; ``checkpoint["opt"]`` holds the final value.
Everything here works on ``argparse.Namespace`` objects so that checkpoints written by our own
``train.py`` have the same layout as the original ones.
"""
import argparse
import json
import os

from .errors import ConfigError

__all__ = [
    "DEFAULT_OPTIONS", "ARCH_OPTIONS", "GATING_TYPES", "make_options", "options_from_opt_json",
    "fusion_layout", "has_tef", "check_options", "resolve_path",
]

GATING_TYPES = ("global", "clipwise", "elementwise")

# Defaults of the original BaseOptions (qd_detr/config.py of the research code) that matter for
# building, running or training the model. Feature dimensions have no default there.
DEFAULT_OPTIONS = dict(
    dset_name="hl", eval_split_name="val", seed=2018, device=0, num_workers=4,
    lr=1e-4, lr_drop=400, wd=1e-4, n_epoch=200, bsz=32, eval_bsz=100, grad_clip=0.1,
    max_q_l=32, max_v_l=75, clip_length=2, max_windows=5,
    train_path=None, eval_path=None, no_norm_vfeat=False, no_norm_tfeat=False,
    v_feat_dirs=None, t_feat_dir=None, a_feat_dir=None,
    v_feat_dim=None, t_feat_dim=None, a_feat_dim=None, ctx_mode="video_tef",
    position_embedding="sine", enc_layers=2, dec_layers=2, fusion_layers=4, fusion_n_heads=4,
    dim_feedforward=1024, hidden_dim=256, input_dropout=0.5, dropout=0.1, txt_drop_ratio=0,
    use_txt_pos=False, use_avigate_custom=False, use_avigate=False, use_umt=False,
    gating_type="global", nheads=8, num_queries=10, pre_norm=False, n_input_proj=2,
    contrastive_hdim=64, temperature=0.07, lw_saliency=1.0, saliency_margin=0.2, aux_loss=True,
    span_loss_type="l1", contrastive_align_loss=False, set_cost_span=10, set_cost_giou=1,
    set_cost_class=4, span_loss_coef=10, giou_loss_coef=1, label_loss_coef=4, eos_coef=0.1,
    contrastive_align_loss_coef=0.0, max_before_nms=10, max_after_nms=10, conf_thd=0.0, nms_thd=-1,
)

# Options that change the parameters or the forward pass (SPEC section 6.1).
ARCH_OPTIONS = (
    "hidden_dim", "enc_layers", "dec_layers", "nheads", "dim_feedforward", "num_queries",
    "n_input_proj", "max_q_l", "max_v_l", "span_loss_type", "contrastive_align_loss",
    "contrastive_hdim", "pre_norm", "use_txt_pos", "position_embedding", "v_feat_dim",
    "t_feat_dim", "a_feat_dim", "a_feat_dir", "use_avigate_custom", "use_avigate", "use_umt",
    "gating_type", "fusion_layers", "fusion_n_heads", "ctx_mode", "input_dropout", "dropout",
)


def has_tef(opt):
    """True when the temporal endpoint features (2 dims) are appended to video and audio."""
    return "tef" in (getattr(opt, "ctx_mode", None) or "")


def make_options(**kwargs):
    """A Namespace with the original defaults, updated with ``kwargs`` (final dims, TEF included)."""
    opt = argparse.Namespace(**DEFAULT_OPTIONS)
    for key, value in kwargs.items():  # extra keys are kept: checkpoints carry bookkeeping fields
        setattr(opt, key, value)
    return opt


def options_from_opt_json(path):
    """Read an ``opt.json`` written by the original ``display_save`` and return the final options.

    ``opt.json`` stores ``v_feat_dim`` before the +2 of the TEF, so 2 is added here exactly as the
    original parser does; ``a_feat_dim`` already includes them.
    """
    try:
        with open(path) as fh:
            raw = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read options ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object of options")
    opt = make_options(**raw)
    if has_tef(opt) and opt.v_feat_dim is not None:
        opt.v_feat_dim = int(opt.v_feat_dim) + 2
    return opt


def fusion_layout(opt):
    """The audio layout an option set describes.

    Returns one of ``"custom"`` (AVIGATEFusionCustom), ``"avigate"`` (the older AVIGATEFusion),
    ``"concat"`` (audio concatenated to video, no fusion module) or ``"video_only"``. The original
    ``build_model`` picks the audio branch on ``a_feat_dir is None``, not on the fusion flag.
    """
    if getattr(opt, "a_feat_dir", None) is None:
        return "video_only"
    if getattr(opt, "use_umt", False):
        raise ConfigError("the UMT fusion layout (use_umt) is not supported by this toolkit")
    if getattr(opt, "use_avigate_custom", False):
        return "custom"
    if getattr(opt, "use_avigate", False):
        return "avigate"
    return "concat"


def check_options(opt, source="options"):
    """Raise ConfigError when ``opt`` lacks what is needed to build the model."""
    missing = [k for k in ("v_feat_dim", "t_feat_dim") if getattr(opt, k, None) is None]
    if fusion_layout(opt) != "video_only" and getattr(opt, "a_feat_dim", None) is None:
        missing.append("a_feat_dim")
    if missing:
        raise ConfigError(f"{source}: missing option(s) {', '.join(missing)}")
    if getattr(opt, "position_embedding", "sine") != "sine":
        raise ConfigError(f"{source}: position_embedding={opt.position_embedding!r}; only 'sine' exists")
    if fusion_layout(opt) == "custom" and opt.gating_type not in GATING_TYPES:
        raise ConfigError(f"{source}: gating_type={opt.gating_type!r} is not supported "
                          f"(supported: {', '.join(GATING_TYPES)})")
    if getattr(opt, "hidden_dim", 256) != 256:
        # gen_sineembed_for_position hard-codes 128 dims per coordinate (a 256-d query embedding).
        raise ConfigError(f"{source}: hidden_dim={opt.hidden_dim}; QD-DETR's anchor decoder requires 256")


def resolve_path(path, base):
    """``path`` made absolute against ``base`` when relative (checkpoint options store repo-relative paths)."""
    if path is None or os.path.isabs(path):
        return path
    return os.path.normpath(os.path.join(base, path))
