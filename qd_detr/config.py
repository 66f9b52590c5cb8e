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
    "DEFAULT_OPTIONS", "ARCH_OPTIONS", "TOOLKIT_OPTIONS", "GATING_TYPES", "PER_QUERY_GATING_TYPES",
    "PER_CLIP_GATING_TYPES", "STORED_GATING_TYPES", "FUSION_VARIANTS", "V2_OPTIONS", "SSM_OPTIONS",
    "SSM_DEFAULTS_BEFORE_OPTIONS", "make_options", "options_from_opt_json", "fusion_layout", "fusion_variant",
    "gate_options", "has_tef", "check_options", "resolve_path",
]

# Gating types of AVIGATEFusionCustom; global_diagstrip_ssm exists only in the diagstrip variant.
GATING_TYPES = ("global", "clipwise", "elementwise", "global_diagstrip_ssm")
# Gating types a gate record or gate store can carry, by how many gates a query gets (shapes in
# qd_detr.gates.GATE_SHAPES). "legacy" is the older AVIGATEFusion layout (one gate per query), which
# GATING_TYPES does not build but earlier gate stores name.
PER_QUERY_GATING_TYPES = ("global", "legacy", "global_diagstrip_ssm")  # one gate per query: (1,)
PER_CLIP_GATING_TYPES = ("clipwise", "elementwise")                   # per valid clip: (T,), (T, D)
STORED_GATING_TYPES = PER_QUERY_GATING_TYPES + PER_CLIP_GATING_TYPES

# Options that this toolkit's own train.py saves besides the research code's (qd_detr.research_options
# has the research code's); none changes the model.
TOOLKIT_OPTIONS = ("batching", "quiet", "overwrite", "eval_epoch", "gate_monitor_every", "gate_monitor_qids",
                   "gate_monitor_n", "gate_monitor_no_plots", "pin_memory", "use_tef", "use_video",
                   "tensorboard_log_dir")

# Variants of AVIGATEFusionCustom (see qd_detr.avigate_custom): the branch whose code a checkpoint needs.
FUSION_VARIANTS = {
    "v1": "avigate_custom branch (tanh gates)",
    "diagstrip": "diagstrip-ssm branch (sigmoid MHA gate for global; global_diagstrip_ssm gate)",
    "v2": "feat/gate_analysis_junhan_v2-0812 branch (v2 gate refinement: sigmoid MHA gate with "
          "bias/temperature/scale, tanh*alpha FFN gate, optional FiLM shift)",
}

# The options each later branch added to its saved ``opt`` (with the parser defaults of that branch).
# Their presence in a checkpoint's options tells the variant; they are not in DEFAULT_OPTIONS on purpose.
V2_OPTIONS = dict(mha_gate_temp=1.5, mha_gate_bias_init=1.0, mha_gate_scale_init=1.0, ffn_gate_alpha_init=0.3,
                  ffn_gate_film=False, ffn_gate_beta_init=0.3)
SSM_OPTIONS = dict(ssm_band_width=8, ssm_enc_channels=64, ssm_dilations=[1, 2, 4], ssm_diag_subtract=0.1,
                   ssm_use_video_branch=1)
# Commit da424ca of the diagstrip-ssm branch hard-codes these values and saves no ssm_* options
# (they became options at e7bb153, ssm_use_video_branch at 46bfa8c).
SSM_DEFAULTS_BEFORE_OPTIONS = dict(ssm_band_width=8, ssm_enc_channels=64, ssm_dilations=[1, 2, 4],
                                   ssm_diag_subtract=0.1, ssm_use_video_branch=1)

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
    "mha_gate_temp", "ffn_gate_film", "ssm_band_width", "ssm_enc_channels", "ssm_dilations",
    "ssm_diag_subtract", "ssm_use_video_branch",
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


def fusion_variant(opt):
    """The AVIGATEFusionCustom variant an option set describes: "v1", "diagstrip" or "v2".

    Told by the options each branch saves: any v2 option (``mha_gate_temp``, ``ffn_gate_film``, ...)
    means v2; any ``ssm_*`` option or gating type ``global_diagstrip_ssm`` means diagstrip. A plain
    ``global`` checkpoint of diagstrip commits 87a994b / da424ca (sigmoid MHA gate, no ``ssm_*``
    options yet) cannot be told from a v1 one by its file; only comparing outputs with the run's own
    predictions can (``gate_analysis.reproduction``).
    """
    v2 = sorted(k for k in V2_OPTIONS if hasattr(opt, k))
    ssm = sorted(k for k in SSM_OPTIONS if hasattr(opt, k))
    if getattr(opt, "gating_type", None) == "global_diagstrip_ssm":
        ssm = ssm or ["gating_type=global_diagstrip_ssm"]
    if v2 and ssm:
        raise ConfigError(f"options mix two research branches: v2 gate options ({', '.join(v2)}) and "
                          f"diagstrip-ssm options ({', '.join(ssm)}); no branch of the research code has both")
    return "v2" if v2 else "diagstrip" if ssm else "v1"


def gate_options(opt):
    """(keyword arguments for AVIGATEFusionCustom's gating functions, {option: source}) of an option set.

    v2: ``mha_temp`` from ``mha_gate_temp`` (a plain float, only in the options: it must be there),
    ``ffn_film`` and the ``*_init`` values (overwritten by the weights). diagstrip with
    ``global_diagstrip_ssm``: the ``ssm`` settings, from the options or, before they were options,
    from the values commit da424ca hard-codes.
    """
    variant = fusion_variant(opt)
    if variant == "v2":
        if getattr(opt, "mha_gate_temp", None) is None:
            raise ConfigError("v2 gating needs mha_gate_temp (the sigmoid temperature lives only in the "
                              "saved options; a wrong value changes every output): pass --mha_gate_temp")
        kwargs = dict(mha_temp=float(opt.mha_gate_temp), ffn_film=bool(getattr(opt, "ffn_gate_film", False)),
                      mha_bias_init=float(getattr(opt, "mha_gate_bias_init", 1.0)),
                      mha_scale_init=float(getattr(opt, "mha_gate_scale_init", 1.0)),
                      ffn_alpha_init=float(getattr(opt, "ffn_gate_alpha_init", 0.3)),
                      ffn_beta_init=float(getattr(opt, "ffn_gate_beta_init", 0.3)))
        sources = {"mha_gate_temp": "options",
                   "ffn_gate_film": "options" if hasattr(opt, "ffn_gate_film") else "default (False)"}
        return kwargs, sources
    if variant == "diagstrip" and getattr(opt, "gating_type", None) == "global_diagstrip_ssm":
        saved = {k: getattr(opt, k) for k in SSM_OPTIONS if hasattr(opt, k)}
        values, sources = {}, {}
        for key, default in SSM_DEFAULTS_BEFORE_OPTIONS.items():
            if key in saved:
                values[key], sources[key] = saved[key], "options"
            else:
                values[key] = default
                sources[key] = ("not saved (before commit 46bfa8c the video branch is always used)"
                                if key == "ssm_use_video_branch" and saved else
                                "not saved: the value commit da424ca hard-codes")
        dilations = values["ssm_dilations"]
        dilations = [int(d) for d in (dilations if isinstance(dilations, (list, tuple)) else [dilations])]
        ssm = dict(band_width=int(values["ssm_band_width"]), enc_channels=int(values["ssm_enc_channels"]),
                   dilations=tuple(dilations), diag_subtract=float(values["ssm_diag_subtract"]),
                   use_video_branch=bool(int(values["ssm_use_video_branch"])))
        return {"ssm": ssm}, sources
    return {}, {}


def check_options(opt, source="options"):
    """Raise ConfigError when ``opt`` lacks what is needed to build the model."""
    missing = [k for k in ("v_feat_dim", "t_feat_dim") if getattr(opt, k, None) is None]
    if fusion_layout(opt) != "video_only" and getattr(opt, "a_feat_dim", None) is None:
        missing.append("a_feat_dim")
    if missing:
        raise ConfigError(f"{source}: missing option(s) {', '.join(missing)}")
    if getattr(opt, "position_embedding", "sine") != "sine":
        raise ConfigError(f"{source}: position_embedding={opt.position_embedding!r}; only 'sine' exists")
    if fusion_layout(opt) == "custom":
        variant = fusion_variant(opt)
        allowed = GATING_TYPES if variant == "diagstrip" else GATING_TYPES[:3]
        if opt.gating_type not in allowed:
            raise ConfigError(f"{source}: gating_type={opt.gating_type!r} is not supported by the {variant} "
                              f"fusion (supported: {', '.join(allowed)})")
        gate_options(opt)
    if getattr(opt, "hidden_dim", 256) != 256:
        # gen_sineembed_for_position hard-codes 128 dims per coordinate (a 256-d query embedding).
        raise ConfigError(f"{source}: hidden_dim={opt.hidden_dim}; QD-DETR's anchor decoder requires 256")


def resolve_path(path, base):
    """``path`` made absolute against ``base`` when relative (checkpoint options store repo-relative paths)."""
    if path is None or os.path.isabs(path):
        return path
    return os.path.normpath(os.path.join(base, path))
