"""One table of every option the research code (``junhanjeong/QD-DETR-exp``) can save in a checkpoint.

A checkpoint written by the research code stores its ``argparse.Namespace`` as ``checkpoint["opt"]``
(``opt.json`` beside it holds the same before ``parse()`` post-processing). This module says, for every
name that can appear there, what it is, so that the toolkit never ignores a saved option silently:
names not in the table are *unknown* and listed in reports, and options that change the forward pass
(kind ``"arch"``) at a value that turns a feature on are an error unless the toolkit implements them.

How the table was made: ``qd_detr/config.py`` (``BaseOptions``/``TestOptions`` ``add_argument`` calls and
the attributes ``parse()`` adds to ``opt``) and ``qd_detr/train.py`` (the two log formatters it adds) were
read on every branch of the mirror (the 21 tips in :data:`MIRROR_COMMITS`, newest commit 2025-08-13; the
union over all 57 commits of the history gives the same 101 flags, plus 10 attributes added after parsing).
Each option was classified by reading where
``build_model``, the model's ``forward``, ``build_transformer``/``build_position_encoding``, the fusion
modules (``umt.py``, ``avigate.py``, ``avigate_custom.py``, ``custom_audio_fusion.py``, ``temporal_gate.py``,
``ssm_gate.py``), the datasets, ``train.py`` and ``inference.py`` read it. No research code is copied here.

Kinds:

- ``"arch"``: read by ``build_model`` or the forward and changes parameters or inference outputs;
- ``"init"``: only the initial value of a trained parameter (the state dict wins when rebuilding);
- ``"train"``: training only (optimiser, losses, matcher, augmentation, dropout rates, resuming);
- ``"data"``: which data is read and how it is turned into model inputs (``affects_inputs`` marks those
  that change the tensors the model sees);
- ``"eval"``: evaluation / inference / post-processing only;
- ``"bookkeeping"``: paths, ids, devices, seeds, workers, logging.

Each ``"arch"`` option records when it does *not* change the forward compared with the baseline (the
research defaults, main-branch model, no fusion extra): ``read_if`` is the condition under which
``build_model`` reads it at all (e.g. fusion options only matter with audio, ``a_feat_dir`` not None) and
``inactive`` the value at which it is harmless, a :class:`Condition` of (value, opt), or
:data:`ALWAYS_ACTIVE` when no value is. Two options also stand for code changes of their branch: any
``mha_gate_temp`` under AVIGATEFusionCustom means the v2 gate (sigmoid MHA gate, delta LayerNorms), and
``ssm_*`` keys with ``gating_type="global"`` mean diagstrip-ssm's sigmoid global MHA gate.

Other code-only changes are invisible here: these branches change the architecture without any option
of their own (``umt_dropout_tuning``/``umt_linear_add``, ``umt_concat``, ``remove_unimodal``,
``umt_concat_remove_unimodal``, ``temporal_gate``'s shorter custom-audio projection, ``feat/t2v-ffn``,
``feat/t2v+avigate_custom_with_saliency_token``, ``audio_only``'s dataset, diagstrip-ssm commits before
e7bb153). Only the state-dict keys (strict loading) can reveal those.
"""
import argparse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ALWAYS_ACTIVE", "KINDS", "MIRROR_COMMITS", "RESEARCH_OPTIONS", "Condition", "ResearchOption",
    "classify_saved_options", "describe_unknown",
]

KINDS = ("arch", "init", "train", "data", "eval", "bookkeeping")

# Branch tips of the mirror that were read (branch -> commit).
MIRROR_COMMITS = {
    "main": "5e7429abf5bc7dc567ba4353b08b36d3ec3f34bb",
    "audio_only": "7b45f88f073875964c77207e6ecb0e2e02aaa47c",
    "umt": "3ee4ea460f2d00554becaff43ec916559750d2e6",
    "umt_dropout_tuning": "d58b98ba9319aea502930ad8d1ee278c1fecf991",
    "umt_linear_add": "d58b98ba9319aea502930ad8d1ee278c1fecf991",
    "umt_concat": "9bcf6488ffa586919894eec5a34cf0ff4517154f",
    "remove_unimodal": "459a87f641cd371a3c68a094d335130fd4e07e3c",
    "umt_concat_remove_unimodal": "353af97651da9edad77845ce5eb5668bcd0b4b9a",
    "avigate": "cfefb813db987c0668fc07ce672d167e066dab12",
    "txt_audio": "de8001cafcc884a772bddfbed46c8d35116dc422",
    "txt_audio_align_loss": "f92feb90b0d987d32c93e9396330291276398cac",
    "txt_audio_align_v2": "7e2089b98cf4fcbb43c8bf2717effcd47fd80ac3",
    "temporal_gate": "44f642cd7e10aafedeb1cccab221abad358ea105",
    "avigate_custom": "3accce8da7f028c2e1e2fbaae96a5bab37343f90",
    "preload_to_gpu": "81edcb59d9f6a6881efc877a5acfb4c050c5c096",
    "feat/t2v-ffn": "3cd466c5277f5504806a6d83949be80ead12ea16",
    "feat/t2v+avigate_custom_with_saliency_token": "e68bb480e43186ff5068f7895bfbfbc98bde5d5f",
    "gate_analysis": "9d839fa723f4e74a166382196316682f8bd21d9d",
    "feat/gate_analysis_junhan": "73b09d9a702949cbc0ef2033c762dc21f7323729",
    "feat/gate_analysis_junhan_v2-0812": "dd81d7cfd797b701056c56b5611bc74ab1e3d862",
    "diagstrip-ssm": "46bfa8c1ba7a51feacf7f190398a7680c09907cf",
}


class _AlwaysActive:
    """Marker: no value of this option leaves the forward equal to the baseline."""

    def __repr__(self):
        return "ALWAYS_ACTIVE"


ALWAYS_ACTIVE = _AlwaysActive()


@dataclass(frozen=True)
class Condition:
    """A named predicate ``test(value, opt)`` of an option's saved value and the whole saved option dict."""

    text: str
    test: Callable[[Any, Mapping[str, Any]], bool] = field(repr=False, compare=False)

    def __call__(self, value: Any, opt: Mapping[str, Any]) -> bool:
        return bool(self.test(value, opt))


@dataclass(frozen=True)
class ResearchOption:
    """One option of the research code.

    ``default`` is the parser default (``None`` for attributes computed by ``parse()``/``train.py``);
    ``branches`` the mirror branches that define it; ``inactive``/``read_if`` (``"arch"`` only) see the
    module docstring; ``flag`` the command-line flag when it differs from the attribute name; ``origin``
    where it comes from (``BaseOptions``, ``TestOptions``, ``parse()``, ``train.py``); ``introduced`` the
    commit that added it (options missing on some branches).
    """

    name: str
    kind: str
    default: Any
    branches: tuple
    description: str
    affects_inputs: bool = False
    inactive: Any = ALWAYS_ACTIVE
    read_if: Condition | None = None
    flag: str | None = None
    origin: str = "BaseOptions"
    introduced: str | None = None

    def changes_forward(self, value: Any, opt: Mapping[str, Any] | None = None) -> bool:
        """True when this option, saved as ``value`` next to ``opt``, changes the forward vs the baseline."""
        if self.kind != "arch":
            return False
        opt = opt or {}
        if self.read_if is not None and not self.read_if(value, opt):
            return False
        if self.inactive is ALWAYS_ACTIVE:
            return True
        if isinstance(self.inactive, Condition):
            return not self.inactive(value, opt)
        return not _same(value, self.inactive)


def _same(a, b):
    """Equality that treats lists and tuples alike (argparse ``nargs`` values vs tuples)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(a == b)


# -- conditions under which build_model reads an option -------------------------------------------------

def _has_audio(opt):
    return opt.get("a_feat_dir") is not None


def _custom(opt):
    return _has_audio(opt) and bool(opt.get("use_avigate_custom"))


_AUDIO = Condition("a_feat_dir is not None (build_model builds the audio model)", lambda v, o: _has_audio(o))
_CUSTOM = Condition("audio model with use_avigate_custom", lambda v, o: _custom(o))
_CONTRASTIVE = Condition("contrastive_align_loss", lambda v, o: bool(o.get("contrastive_align_loss")))


def _ssm_inactive(default):
    """When an ssm_* option leaves the forward unchanged.

    ssm_* keys exist only on diagstrip-ssm, whose ``global`` gating uses a sigmoid MHA gate (v1: tanh):
    with gating_type 'global' the key itself changes the forward; with 'global_diagstrip_ssm' its value
    does unless it is the default; clipwise/elementwise do not read it.
    """
    def test(value, opt):
        gating = opt.get("gating_type", "global")
        if gating == "global":
            return False
        return gating != "global_diagstrip_ssm" or _same(value, default)
    return Condition(f"gating_type clipwise/elementwise, or global_diagstrip_ssm with {default!r} "
                     "('global' + this key = the diagstrip sigmoid MHA gate)", test)


# -- branch groups ------------------------------------------------------------------------------------------

_ALL = tuple(MIRROR_COMMITS)
_UMT = ("main", "umt", "umt_dropout_tuning", "umt_linear_add", "umt_concat", "remove_unimodal",
        "umt_concat_remove_unimodal", "avigate", "txt_audio", "txt_audio_align_loss", "txt_audio_align_v2",
        "temporal_gate")
_AVIGATE = ("avigate", "txt_audio", "txt_audio_align_loss", "txt_audio_align_v2", "temporal_gate")
_TXT_AUDIO = ("txt_audio", "txt_audio_align_loss", "txt_audio_align_v2", "temporal_gate")
_ALIGN = ("txt_audio_align_loss", "txt_audio_align_v2")
_CUSTOM_BRANCHES = ("avigate_custom", "preload_to_gpu", "feat/t2v-ffn", "feat/t2v+avigate_custom_with_saliency_token",
                    "gate_analysis", "feat/gate_analysis_junhan", "feat/gate_analysis_junhan_v2-0812",
                    "diagstrip-ssm")
_GATE_LOG = ("feat/gate_analysis_junhan", "feat/gate_analysis_junhan_v2-0812", "diagstrip-ssm")
_V2 = ("feat/gate_analysis_junhan_v2-0812",)
_DIAGSTRIP = ("diagstrip-ssm",)

_C_UMT = "02434ede68b2a43162edcae39f74ce8562bf96d3"
_C_AVIGATE = "1dbe3afa273e90fe040cfd7fa09638dfb4ecfe41"
_C_TXT_AUDIO = "d127f36101514f84ee27144e8ac7d8ece3dfd3fc"
_C_ALIGN = "ad0015418b978e3974eb97fec9e8359182ecfcc5"
_C_TEMPORAL = "44f642cd7e10aafedeb1cccab221abad358ea105"
_C_CUSTOM = "7f0ae92a26c6f7609ec814ce2cb5a213f054126c"
_C_FUSION_LAYERS = "4e295a852df9280d682fae75bb15f0da63deef46"
_C_FUSION_HEADS = "3accce8da7f028c2e1e2fbaae96a5bab37343f90"
_C_PRELOAD = "81edcb59d9f6a6881efc877a5acfb4c050c5c096"
_C_GATE_LOG = "e05e5058343947138862944b9eed895b37966127"
_C_V2 = "dd81d7cfd797b701056c56b5611bc74ab1e3d862"
_C_SSM = "e7bb153c689e44b94b21a97f6945edf37eef739b"
_C_SSM_VIDEO = "46bfa8c1ba7a51feacf7f190398a7680c09907cf"

_O = ResearchOption
_TABLE = [
    # --- bookkeeping ---
    _O("debug", "bookkeeping", False, _ALL, "Debug mode: break all loops early, use debug_results/ and 0 workers."),
    _O("results_root", "bookkeeping", "results", _ALL, "Root folder under which each run gets its results_dir."),
    _O("exp_id", "bookkeeping", None, _ALL, "Name of the run (required for training), part of results_dir."),
    _O("seed", "bookkeeping", 2018, _ALL, "Random seed of numpy/torch/random."),
    _O("device", "bookkeeping", 0, _ALL,
       "GPU index (0) or -1 for CPU; parse() replaces it with torch.device('cuda'|'cpu')."),
    _O("num_workers", "bookkeeping", 4, _ALL, "DataLoader worker processes (0: main process)."),
    _O("no_pin_memory", "bookkeeping", False, _ALL, "Disable pin_memory in the DataLoaders."),
    _O("preload_to_gpu", "bookkeeping", False, ("preload_to_gpu",),
       "Keep the whole dataset in GPU memory to speed up training (same tensors).", introduced=_C_PRELOAD),
    _O("results_dir", "bookkeeping", None, _ALL,
       "Run folder (results_root/dset-ctx-exp_id-time); eval_results_dir at test time.", origin="parse()"),
    _O("ckpt_filepath", "bookkeeping", None, _ALL, "results_dir/model.ckpt.", origin="parse()"),
    _O("train_log_filepath", "bookkeeping", None, _ALL, "results_dir/train.log.txt.", origin="parse()"),
    _O("eval_log_filepath", "bookkeeping", None, _ALL, "results_dir/eval.log.txt.", origin="parse()"),
    _O("tensorboard_log_dir", "bookkeeping", None, _ALL, "results_dir/tensorboard_log.", origin="parse()"),
    _O("pin_memory", "bookkeeping", None, _ALL, "Negation of no_pin_memory.", origin="parse()"),
    _O("train_log_txt_formatter", "bookkeeping", None, _ALL, "Format string of one training log line.",
       origin="train.py"),
    _O("eval_log_txt_formatter", "bookkeeping", None, _ALL, "Format string of one evaluation log line.",
       origin="train.py"),
    # --- train ---
    _O("lr", "train", 1e-4, _ALL, "AdamW learning rate."),
    _O("lr_drop", "train", 400, _ALL, "Epoch period of the StepLR decay (x0.1)."),
    _O("wd", "train", 1e-4, _ALL, "AdamW weight decay."),
    _O("n_epoch", "train", 200, _ALL, "Number of training epochs."),
    _O("max_es_cnt", "train", 200, _ALL, "Early-stopping patience in epochs (-1 disables)."),
    _O("bsz", "train", 32, _ALL, "Training batch size."),
    _O("grad_clip", "train", 0.1, _ALL, "Gradient-norm clipping threshold (-1 disables)."),
    _O("eval_untrained", "train", False, _ALL, "Evaluate the freshly initialised model before training."),
    _O("resume", "train", None, _ALL, "Checkpoint to load weights from (to resume or evaluate)."),
    _O("resume_all", "train", False, _ALL, "With resume, also restore optimizer, scheduler and epoch."),
    _O("start_epoch", "train", None, _ALL, "First epoch; set from the checkpoint with resume_all."),
    _O("max_windows", "train", 5, _ALL, "Maximum ground-truth windows per query used as training targets."),
    _O("txt_drop_ratio", "train", 0, _ALL,
       "Fraction of query tokens dropped as augmentation in the training dataset (forced to 0 for eval)."),
    _O("input_dropout", "train", 0.5, _ALL,
       "Dropout of the input projections and text positional table; no effect in eval mode."),
    _O("dropout", "train", 0.1, _ALL, "Dropout inside the transformer layers; no effect in eval mode."),
    _O("temperature", "train", 0.07, _ALL, "Temperature of the contrastive alignment loss (criterion only)."),
    _O("lw_saliency", "train", 1.0, _ALL, "Weight of the saliency loss."),
    _O("saliency_margin", "train", 0.2, _ALL, "Margin of the saliency ranking loss."),
    _O("aux_loss", "train", True, _ALL,
       "Losses on every decoder layer; the forward only adds aux_outputs, final predictions are unchanged.",
       flag="--no_aux_loss"),
    _O("set_cost_span", "train", 10, _ALL, "Matcher cost weight of the L1 span distance."),
    _O("set_cost_giou", "train", 1, _ALL, "Matcher cost weight of the span GIoU."),
    _O("set_cost_class", "train", 4, _ALL, "Matcher cost weight of the foreground class."),
    _O("span_loss_coef", "train", 10, _ALL, "Weight of the L1 span loss."),
    _O("giou_loss_coef", "train", 1, _ALL, "Weight of the GIoU span loss."),
    _O("label_loss_coef", "train", 4, _ALL, "Weight of the foreground/background classification loss."),
    _O("eos_coef", "train", 0.1, _ALL, "Relative weight of the background (no-object) class."),
    _O("contrastive_align_loss_coef", "train", 0.0, _ALL, "Weight of the span-text contrastive alignment loss."),
    _O("local_align_loss_coef", "train", 0.3, _ALIGN, "Weight of the local audio-text alignment loss.",
       introduced=_C_ALIGN),
    _O("global_align_loss_coef", "train", 0.3, _ALIGN, "Weight of the global audio-text alignment loss.",
       introduced=_C_ALIGN),
    _O("sparsity_loss_coef", "train", 0.1, ("temporal_gate",), "Weight of the temporal-gate sparsity loss.",
       introduced=_C_TEMPORAL),
    # --- data ---
    _O("dset_name", "data", None, _ALL, "Dataset: 'hl' (QVHighlights) or 'tvsum' (tvsum disables the matcher)."),
    _O("dset_domain", "data", None, _ALL, "TVSum domain to train on (tvsum only)."),
    _O("data_ratio", "data", 1.0, _ALL, "Fraction of the annotation file used (train and eval)."),
    _O("max_q_l", "data", 32, _ALL,
       "Query tokens kept; also the row count of the text positional table (a parameter).", affects_inputs=True),
    _O("max_v_l", "data", 75, _ALL, "Clips kept per video (features truncated).", affects_inputs=True),
    _O("clip_length", "data", 2, _ALL, "Seconds per clip (labels, and span scaling with span_loss_type='ce')."),
    _O("train_path", "data", None, _ALL, "Training annotation file (jsonl)."),
    _O("eval_path", "data", None, _ALL, "Validation annotation file (jsonl) evaluated during training."),
    _O("no_norm_vfeat", "data", False, _ALL, "Do not L2-normalise video (and audio) features.",
       affects_inputs=True),
    _O("no_norm_tfeat", "data", False, _ALL, "Do not L2-normalise text features.", affects_inputs=True),
    _O("v_feat_dirs", "data", None, _ALL, "Video feature folders, concatenated per clip in this order.",
       affects_inputs=True),
    _O("t_feat_dir", "data", None, _ALL, "Text (query) feature folder.", affects_inputs=True),
    _O("use_tef", "data", None, _ALL,
       "'tef' in ctx_mode; set by parse() and not read later (the datasets re-derive it).", origin="parse()"),
    _O("use_video", "data", None, _ALL,
       "'video' in ctx_mode; set by parse() and not read later (the datasets re-derive it).", origin="parse()"),
    # --- eval ---
    _O("eval_split_name", "eval", "val", _ALL, "Split to evaluate ('val' has ground truth)."),
    _O("eval_bsz", "eval", 100, _ALL,
       "Inference batch size; batch padding changes global (mean-pooled) gates.", affects_inputs=True),
    _O("no_sort_results", "eval", False, _ALL, "Keep predicted windows unsorted (for visualisation)."),
    _O("max_before_nms", "eval", 10, _ALL, "Windows kept per query before NMS."),
    _O("max_after_nms", "eval", 10, _ALL, "Windows kept per query after NMS."),
    _O("conf_thd", "eval", 0.0, _ALL, "Drop predicted windows with a score below this."),
    _O("nms_thd", "eval", -1, _ALL, "IoU threshold of the optional NMS (-1: no NMS)."),
    _O("eval_id", "eval", None, _ALL, "Name of an evaluation run (TestOptions only).", origin="TestOptions"),
    _O("eval_results_dir", "eval", None, _ALL, "Output folder of an evaluation run (TestOptions only).",
       origin="TestOptions"),
    _O("model_dir", "eval", None, _ALL,
       "Folder of the evaluated checkpoint; parse() sets it to dirname(resume) (TestOptions only).",
       origin="TestOptions"),
    _O("gate_log", "eval", False, _GATE_LOG, "Record fusion gate values during inference (TestOptions only).",
       origin="TestOptions", introduced=_C_GATE_LOG),
    _O("gate_sample_count", "eval", -1, _GATE_LOG, "Queries whose gates are recorded (-1: all; TestOptions only).",
       origin="TestOptions", introduced=_C_GATE_LOG),
    _O("gate_save_path", "eval", None, _GATE_LOG, "Output jsonl of the gate log (TestOptions only).",
       origin="TestOptions", introduced=_C_GATE_LOG),
    # --- init ---
    _O("mha_gate_bias_init", "init", 1.0, _V2, "Initial value of the trained MHA-gate bias (v2 gate).",
       introduced=_C_V2),
    _O("mha_gate_scale_init", "init", 1.0, _V2, "Initial value of the trained MHA-gate scale (v2 gate).",
       introduced=_C_V2),
    _O("ffn_gate_alpha_init", "init", 0.3, _V2, "Initial value of the trained FFN-gate scale alpha (v2 gate).",
       introduced=_C_V2),
    _O("ffn_gate_beta_init", "init", 0.3, _V2, "Initial value of the trained FiLM shift scale beta (v2 gate).",
       introduced=_C_V2),
    # --- arch: QD-DETR core ---
    _O("hidden_dim", "arch", 256, _ALL, "Transformer width d_model.", inactive=256),
    _O("enc_layers", "arch", 2, _ALL, "Transformer encoder layers.", inactive=2),
    _O("dec_layers", "arch", 2, _ALL, "Transformer decoder layers.", inactive=2),
    _O("nheads", "arch", 8, _ALL, "Attention heads of the transformer.", inactive=8),
    _O("dim_feedforward", "arch", 1024, _ALL, "Hidden width of the transformer feed-forward layers.", inactive=1024),
    _O("pre_norm", "arch", False, _ALL, "Pre-LayerNorm transformer layers instead of post-norm.", inactive=False),
    _O("num_queries", "arch", 10, _ALL, "Number of moment query slots.", inactive=10),
    _O("n_input_proj", "arch", 2, _ALL, "Linear layers of each input projection (1-3).", inactive=2),
    _O("position_embedding", "arch", "sine", _ALL, "Video positional embedding; only 'sine' is implemented there.",
       inactive="sine"),
    _O("use_txt_pos", "arch", False, _ALL, "Add the trainable positional table to the text tokens.", inactive=False),
    _O("span_loss_type", "arch", "l1", _ALL,
       "'l1' regresses (center, width); 'ce' classifies start/end (span head of width 2*max_v_l).", inactive="l1"),
    _O("contrastive_align_loss", "arch", False, _ALL,
       "Adds the contrastive projection heads and their outputs.", inactive=False),
    _O("contrastive_hdim", "arch", 64, _ALL, "Width of the contrastive projection heads.", inactive=64,
       read_if=_CONTRASTIVE),
    _O("v_feat_dim", "arch", None, _ALL,
       "Video input width; includes the +2 TEF dims in checkpoint['opt'] (not in opt.json).",
       affects_inputs=True),
    _O("t_feat_dim", "arch", None, _ALL, "Text input width.", affects_inputs=True),
    _O("a_feat_dim", "arch", None, _ALL, "Audio input width (TEF dims included as given).", affects_inputs=True,
       read_if=_AUDIO),
    _O("a_feat_dir", "arch", None, _ALL, "Audio feature folder; None builds the video-only model.",
       affects_inputs=True, inactive=None),
    _O("ctx_mode", "arch", "video_tef", _ALL,
       "Input composition: 'tef' appends 2 temporal dims to video/audio, 'video' uses video features.",
       affects_inputs=True, inactive="video_tef"),
    # --- arch: audio-visual fusion variants ---
    _O("use_umt", "arch", False, _UMT, "UMT-style audio-video fusion module before the transformer.",
       inactive=False, read_if=_AUDIO, introduced=_C_UMT),
    _O("use_avigate", "arch", False, _AVIGATE, "First _AVIGATE fusion (1 layer, 8 heads, hard-coded).",
       inactive=False, read_if=_AUDIO, introduced=_C_AVIGATE),
    _O("use_custom_audio_fusion", "arch", False, _TXT_AUDIO,
       "Text-conditioned audio refinement concatenated to the video features.",
       inactive=False, read_if=_AUDIO, introduced=_C_TXT_AUDIO),
    _O("use_temporal_gate", "arch", False, ("temporal_gate",), "Text-conditioned temporal audio gate fusion.",
       inactive=False, read_if=_AUDIO, introduced=_C_TEMPORAL),
    _O("use_alignment_loss", "arch", False, _ALIGN,
       "Adds audio-text alignment projection heads (extra parameters and outputs), with or without audio.",
       inactive=False, introduced=_C_ALIGN),
    _O("use_avigate_custom", "arch", False, _CUSTOM_BRANCHES, "AVIGATEFusionCustom gated fusion layers.",
       inactive=False, read_if=_AUDIO, introduced=_C_CUSTOM),
    _O("gating_type", "arch", "global", _CUSTOM_BRANCHES,
       "Gate granularity: global, clipwise, elementwise; 'global_diagstrip_ssm' on diagstrip-ssm.",
       inactive="global", read_if=_CUSTOM, introduced=_C_CUSTOM),
    _O("fusion_layers", "arch", 4, _CUSTOM_BRANCHES, "Number of AVIGATEFusionCustom layers.", inactive=4,
       read_if=_CUSTOM, introduced=_C_FUSION_LAYERS),
    _O("fusion_n_heads", "arch", 4, _CUSTOM_BRANCHES, "Attention heads of each AVIGATEFusionCustom layer.",
       inactive=4, read_if=_CUSTOM, introduced=_C_FUSION_HEADS),
    _O("mha_gate_temp", "arch", 1.5, _V2,
       "Temperature of the v2 sigmoid MHA gate (not in the weights); no value gives the v1 gate.",
       read_if=_CUSTOM, introduced=_C_V2),
    _O("ffn_gate_film", "arch", False, _V2, "Adds the FiLM shift head to the v2 FFN gate.", inactive=False,
       read_if=_CUSTOM, introduced=_C_V2),
    _O("ssm_band_width", "arch", 8, _DIAGSTRIP, "Half-width of the diagonal strip taken from the self-similarity map.",
       inactive=_ssm_inactive(8), read_if=_CUSTOM, introduced=_C_SSM),
    _O("ssm_enc_channels", "arch", 64, _DIAGSTRIP, "Channels of the diagonal-strip CNN encoder.",
       inactive=_ssm_inactive(64), read_if=_CUSTOM, introduced=_C_SSM),
    _O("ssm_dilations", "arch", [1, 2, 4], _DIAGSTRIP, "Dilations of the strip encoder's convolutions.",
       inactive=_ssm_inactive([1, 2, 4]), read_if=_CUSTOM, introduced=_C_SSM),
    _O("ssm_diag_subtract", "arch", 0.1, _DIAGSTRIP, "Amount subtracted from the self-similarity diagonal.",
       inactive=_ssm_inactive(0.1), read_if=_CUSTOM, introduced=_C_SSM),
    _O("ssm_use_video_branch", "arch", 1, _DIAGSTRIP, "1: gate from audio and video strips; 0: audio only.",
       inactive=_ssm_inactive(1), read_if=_CUSTOM, introduced=_C_SSM_VIDEO),
]

RESEARCH_OPTIONS = {o.name: o for o in _TABLE}
assert len(RESEARCH_OPTIONS) == len(_TABLE), "duplicate option name in the table"
del _O, _TABLE


def classify_saved_options(opt_dict, implemented: Iterable[str] = ()) -> dict:
    """Sort the names of a saved option set (a dict, or an ``argparse.Namespace``) against the table.

    Returns sorted name lists: ``known`` (in the table), ``unknown`` (not in the table; to be listed in
    reports), ``arch_active`` (``"arch"`` options that change the forward at their saved value) and
    ``arch_not_implemented`` (those of ``arch_active`` not named in ``implemented``: an error for a rebuild).
    """
    if isinstance(opt_dict, argparse.Namespace):
        opt_dict = vars(opt_dict)
    implemented = set(implemented)
    known, unknown, active = [], [], []
    for name, value in opt_dict.items():
        option = RESEARCH_OPTIONS.get(name)
        if option is None:
            unknown.append(name)
            continue
        known.append(name)
        if option.changes_forward(value, opt_dict):
            active.append(name)
    return {"known": sorted(known), "unknown": sorted(unknown), "arch_active": sorted(active),
            "arch_not_implemented": sorted(n for n in active if n not in implemented)}


def describe_unknown(names: Iterable[str]) -> str:
    """One report line for saved options that the table does not know."""
    names = sorted(names)
    if not names:
        return "saved options: none unknown"
    return f"saved options unknown to the toolkit ({len(names)}, not used): " + ", ".join(names)
