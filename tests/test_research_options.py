"""The table of research-code options: coverage of the research branches, classification, real checkpoints."""
import argparse
import ast
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import SHARED
from qd_detr.research_options import (
    ALWAYS_ACTIVE,
    KINDS,
    MIRROR_COMMITS,
    RESEARCH_OPTIONS,
    Condition,
    classify_saved_options,
    describe_unknown,
)

MIRROR = Path("/work/.mirror/junhanjeong+QD-DETR-exp/repo")

# Attribute names (argparse dest) that qd_detr/config.py defines with add_argument on five branches,
# extracted from the mirror (tips in MIRROR_COMMITS). This is the table's contract; CI has no mirror.
MAIN_OPTIONS = [
    "dset_name", "dset_domain", "eval_split_name", "debug", "data_ratio", "results_root", "exp_id", "seed",
    "device", "num_workers", "no_pin_memory", "lr", "lr_drop", "wd", "n_epoch", "max_es_cnt", "bsz", "eval_bsz",
    "grad_clip", "eval_untrained", "resume", "resume_all", "start_epoch", "max_q_l", "max_v_l", "clip_length",
    "max_windows", "train_path", "eval_path", "no_norm_vfeat", "no_norm_tfeat", "v_feat_dirs", "t_feat_dir",
    "a_feat_dir", "v_feat_dim", "t_feat_dim", "a_feat_dim", "ctx_mode", "position_embedding", "enc_layers",
    "dec_layers", "dim_feedforward", "hidden_dim", "input_dropout", "dropout", "txt_drop_ratio", "use_txt_pos",
    "nheads", "num_queries", "pre_norm", "n_input_proj", "contrastive_hdim", "temperature", "lw_saliency",
    "saliency_margin", "aux_loss", "span_loss_type", "contrastive_align_loss", "set_cost_span", "set_cost_giou",
    "set_cost_class", "span_loss_coef", "giou_loss_coef", "label_loss_coef", "eos_coef",
    "contrastive_align_loss_coef", "no_sort_results", "max_before_nms", "max_after_nms", "conf_thd", "nms_thd",
    "eval_id", "eval_results_dir", "model_dir", "use_umt",
]
_NO_UMT = [n for n in MAIN_OPTIONS if n != "use_umt"]
_CUSTOM = ["fusion_layers", "fusion_n_heads", "use_avigate_custom", "gating_type"]
_GATE_LOG = ["gate_log", "gate_sample_count", "gate_save_path"]
BRANCH_OPTIONS = {
    "main": MAIN_OPTIONS,
    "avigate": MAIN_OPTIONS + ["use_avigate"],
    "avigate_custom": _NO_UMT + _CUSTOM,
    "feat/gate_analysis_junhan_v2-0812": _NO_UMT + _CUSTOM + _GATE_LOG + [
        "mha_gate_temp", "mha_gate_bias_init", "mha_gate_scale_init", "ffn_gate_alpha_init", "ffn_gate_film",
        "ffn_gate_beta_init"],
    "diagstrip-ssm": _NO_UMT + _CUSTOM + _GATE_LOG + [
        "ssm_band_width", "ssm_enc_channels", "ssm_dilations", "ssm_diag_subtract", "ssm_use_video_branch"],
}
# Attributes parse() (config.py) and train.py add to opt after parsing, on every branch.
DERIVED = ["results_dir", "ckpt_filepath", "train_log_filepath", "eval_log_filepath", "tensorboard_log_dir",
           "pin_memory", "use_tef", "use_video", "train_log_txt_formatter", "eval_log_txt_formatter"]

# Options whose effect on the forward the toolkit implements (pre_norm only as False, so not listed).
IMPLEMENTED = [
    "hidden_dim", "enc_layers", "dec_layers", "nheads", "dim_feedforward", "num_queries", "n_input_proj",
    "max_q_l", "max_v_l", "span_loss_type", "contrastive_align_loss", "contrastive_hdim", "use_txt_pos",
    "position_embedding", "v_feat_dim", "t_feat_dim", "a_feat_dim", "a_feat_dir", "use_avigate_custom",
    "use_avigate", "gating_type", "fusion_layers", "fusion_n_heads", "ctx_mode", "input_dropout", "dropout",
    "mha_gate_temp", "ffn_gate_film", "ssm_band_width", "ssm_enc_channels", "ssm_dilations", "ssm_diag_subtract",
    "ssm_use_video_branch",
]

AUDIO = {"a_feat_dir": "pann_features", "a_feat_dim": 2050}


# ---------------------------------------------------------------- coverage of the research branches

@pytest.mark.parametrize("branch", sorted(BRANCH_OPTIONS))
def test_every_branch_option_is_in_the_table(branch):
    names = BRANCH_OPTIONS[branch]
    assert len(names) == len(set(names))
    missing = [n for n in names if n not in RESEARCH_OPTIONS]
    assert not missing, f"{branch}: options missing from RESEARCH_OPTIONS: {missing}"
    wrong = [n for n in names if branch not in RESEARCH_OPTIONS[n].branches]
    assert not wrong, f"{branch}: not listed in .branches of {wrong}"


def test_derived_attributes_are_in_the_table():
    for name in DERIVED:
        assert RESEARCH_OPTIONS[name].origin in ("parse()", "train.py")
        assert set(RESEARCH_OPTIONS[name].branches) == set(MIRROR_COMMITS)


def test_the_table_holds_nothing_else():
    listed = set().union(*map(set, BRANCH_OPTIONS.values())) | set(DERIVED)
    extra = sorted(set(RESEARCH_OPTIONS) - listed)
    # Options of the other research branches (txt_audio, temporal_gate, preload_to_gpu, ...).
    assert extra == sorted(["use_custom_audio_fusion", "use_alignment_loss", "local_align_loss_coef",
                            "global_align_loss_coef", "use_temporal_gate", "sparsity_loss_coef", "preload_to_gpu"])


def test_table_entries_are_well_formed():
    hexsha = re.compile(r"^[0-9a-f]{40}$")
    for sha in MIRROR_COMMITS.values():
        assert hexsha.match(sha)
    for name, option in RESEARCH_OPTIONS.items():
        assert option.name == name
        assert option.kind in KINDS, name
        assert option.description and "\n" not in option.description, name
        assert option.branches and set(option.branches) <= set(MIRROR_COMMITS), name
        if set(option.branches) != set(MIRROR_COMMITS):
            assert option.introduced and hexsha.match(option.introduced), name
        if option.kind != "arch":
            assert option.inactive is ALWAYS_ACTIVE and option.read_if is None, name
            assert not option.changes_forward(object(), {}), name
    assert RESEARCH_OPTIONS["aux_loss"].flag == "--no_aux_loss"


def _git_show(rev, path="qd_detr/config.py"):
    return subprocess.run(["git", "-C", str(MIRROR), "show", f"{rev}:{path}"], check=True, capture_output=True,
                          text=True).stdout


def _add_argument_names(source):
    """dest names of every add_argument call (regex, as a second reading next to the literal lists)."""
    names = []
    for chunk in source.split("add_argument(")[1:]:
        flag = re.match(r"""\s*['"]--([A-Za-z0-9_]+)['"]""", chunk)
        assert flag, chunk[:80]
        dest = re.search(r"""dest\s*=\s*['"](\w+)['"]""", chunk.split(")\n")[0])
        names.append(dest.group(1) if dest else flag.group(1))
    return names


def _add_argument_defaults(source):
    """{dest: parser default} of every add_argument call with a literal default (ast, nothing executed)."""
    out = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            kw = {k.arg: k.value for k in node.keywords}
            dest = ast.literal_eval(kw["dest"]) if "dest" in kw else ast.literal_eval(node.args[0]).lstrip("-")
            action = ast.literal_eval(kw["action"]) if "action" in kw else None
            if action in ("store_true", "store_false"):
                out[dest] = action == "store_false"
            else:
                out[dest] = ast.literal_eval(kw["default"]) if "default" in kw else None
    return out


requires_mirror = pytest.mark.skipif(not (MIRROR.is_dir() and shutil.which("git")),
                                     reason="research-code mirror not present (only on dev machines)")


@requires_mirror
def test_literal_lists_match_the_mirror():
    for branch, names in BRANCH_OPTIONS.items():
        assert sorted(_add_argument_names(_git_show(branch))) == sorted(names), branch


@requires_mirror
def test_every_mirror_branch_matches_the_table():
    """All branches: names, branch lists and parser defaults of the table agree with config.py."""
    branches = subprocess.run(["git", "-C", str(MIRROR), "for-each-ref", "--format=%(refname:short)",
                               "refs/heads"], check=True, capture_output=True, text=True).stdout.split()
    assert set(branches) == set(MIRROR_COMMITS)
    defined = {}
    for branch in branches:
        source = _git_show(branch)
        names = _add_argument_names(source)
        assert sorted(names) == sorted(_add_argument_defaults(source)), branch
        for name, default in _add_argument_defaults(source).items():
            assert name in RESEARCH_OPTIONS, f"{branch}: {name} not in the table"
            assert RESEARCH_OPTIONS[name].default == default, f"{branch}: default of {name}"
            defined.setdefault(name, set()).add(branch)
        train = _git_show(branch, "qd_detr/train.py")
        for name in ("train_log_txt_formatter", "eval_log_txt_formatter"):
            assert f"opt.{name} =" in train, branch
        for name in DERIVED[:8]:
            assert f"opt.{name} =" in source, (branch, name)
    for name, branches_defining in defined.items():
        assert set(RESEARCH_OPTIONS[name].branches) == branches_defining, name
    assert sorted(defined) == sorted(set(RESEARCH_OPTIONS) - set(DERIVED))


# ---------------------------------------------------------------- classification

def test_kinds_of_some_options():
    assert RESEARCH_OPTIONS["mha_gate_temp"].kind == "arch"
    assert RESEARCH_OPTIONS["ffn_gate_film"].kind == "arch"
    assert RESEARCH_OPTIONS["use_umt"].kind == "arch"
    assert RESEARCH_OPTIONS["ssm_dilations"].kind == "arch"
    for name in ("mha_gate_bias_init", "mha_gate_scale_init", "ffn_gate_alpha_init", "ffn_gate_beta_init"):
        assert RESEARCH_OPTIONS[name].kind == "init"
    assert RESEARCH_OPTIONS["lr"].kind == "train"
    assert RESEARCH_OPTIONS["txt_drop_ratio"].kind == "train"
    assert RESEARCH_OPTIONS["nms_thd"].kind == "eval"
    assert RESEARCH_OPTIONS["gate_log"].kind == "eval"
    assert RESEARCH_OPTIONS["results_dir"].kind == "bookkeeping"
    for name in ("max_v_l", "max_q_l"):
        assert RESEARCH_OPTIONS[name].kind == "data" and RESEARCH_OPTIONS[name].affects_inputs
    assert not RESEARCH_OPTIONS["train_path"].affects_inputs


def test_feature_switched_on_is_an_error_unless_implemented():
    opt = {"use_umt": True, **AUDIO}
    assert classify_saved_options(opt, implemented=IMPLEMENTED)["arch_not_implemented"] == ["use_umt"]
    assert classify_saved_options(opt, implemented=IMPLEMENTED + ["use_umt"])["arch_not_implemented"] == []
    assert classify_saved_options(opt, implemented=IMPLEMENTED + ["use_umt"])["arch_active"] == ["a_feat_dim",
                                                                                                  "a_feat_dir",
                                                                                                  "use_umt"]


def test_harmless_values_are_not_reported():
    opt = {"use_umt": False, "txt_drop_ratio": 0, "pre_norm": False, "use_avigate": False, **AUDIO}
    assert classify_saved_options(opt, implemented=IMPLEMENTED)["arch_not_implemented"] == []
    # build_model ignores every fusion flag of a video-only option set (a_feat_dir None)
    assert classify_saved_options({"use_umt": True, "use_avigate_custom": True, "a_feat_dir": None,
                                   "gating_type": "clipwise", "mha_gate_temp": 2.0},
                                  implemented=[])["arch_not_implemented"] == []
    # a training-only option is never an error, whatever its value
    assert classify_saved_options({"txt_drop_ratio": 0.3, "lr": 1.0}, implemented=[])["arch_not_implemented"] == []


def test_unknown_names_are_listed():
    res = classify_saved_options({"foo_bar": 1, "hidden_dim": 256, "zzz": None}, implemented=IMPLEMENTED)
    assert res["unknown"] == ["foo_bar", "zzz"]
    assert res["known"] == ["hidden_dim"]
    line = describe_unknown(res["unknown"])
    assert "foo_bar" in line and "zzz" in line and "\n" not in line
    assert "none" in describe_unknown([])


def test_namespace_is_accepted():
    res = classify_saved_options(argparse.Namespace(pre_norm=True, device=torch.device("cpu")), implemented=())
    assert res["arch_not_implemented"] == ["pre_norm"]
    assert res["known"] == ["device", "pre_norm"]


def test_structural_values_other_than_the_baseline_are_reported():
    opt = {"hidden_dim": 128, "nheads": 8, "dim_feedforward": 256, "v_feat_dim": 2818}
    assert classify_saved_options(opt, implemented=[])["arch_not_implemented"] == ["dim_feedforward", "hidden_dim",
                                                                                   "v_feat_dim"]
    opt = {"contrastive_align_loss": False, "contrastive_hdim": 32}
    assert classify_saved_options(opt, implemented=[])["arch_not_implemented"] == []
    opt = {"contrastive_align_loss": True, "contrastive_hdim": 32}
    assert classify_saved_options(opt, implemented=[])["arch_not_implemented"] == ["contrastive_align_loss",
                                                                                   "contrastive_hdim"]


def test_v2_gate_options():
    custom = {"use_avigate_custom": True, "gating_type": "clipwise", **AUDIO}
    done = ["use_avigate_custom", "gating_type", "a_feat_dim", "a_feat_dir"]
    res = classify_saved_options({**custom, "mha_gate_temp": 1.5, "ffn_gate_film": False, "mha_gate_bias_init": 3.0},
                                 implemented=done)
    assert res["arch_not_implemented"] == ["mha_gate_temp"]  # any value: the v2 gate code path
    res = classify_saved_options({**custom, "mha_gate_temp": 2.0, "ffn_gate_film": True}, implemented=done)
    assert res["arch_not_implemented"] == ["ffn_gate_film", "mha_gate_temp"]


def test_ssm_options():
    ssm = {"ssm_band_width": 8, "ssm_enc_channels": 64, "ssm_dilations": [1, 2, 4], "ssm_diag_subtract": 0.1,
           "ssm_use_video_branch": 1}
    done = ["use_avigate_custom", "gating_type", "a_feat_dim", "a_feat_dir"]

    def report(gating, **kw):
        opt = {"use_avigate_custom": True, "gating_type": gating, **AUDIO, **ssm, **kw}
        return classify_saved_options(opt, implemented=done)["arch_not_implemented"]

    assert report("clipwise", ssm_band_width=4) == []            # not read by clipwise/elementwise gates
    assert report("global_diagstrip_ssm") == []                   # defaults: the SSM gate as implemented
    assert report("global_diagstrip_ssm", ssm_dilations=(1, 2, 4)) == []
    assert report("global_diagstrip_ssm", ssm_band_width=4, ssm_use_video_branch=0) == ["ssm_band_width",
                                                                                        "ssm_use_video_branch"]
    assert report("global") == sorted(ssm)                        # diagstrip-ssm's sigmoid global MHA gate
    assert isinstance(RESEARCH_OPTIONS["ssm_band_width"].inactive, Condition)


def test_inactive_values_do_not_change_the_forward():
    """At its recorded inactive value (feature context switched on), no arch option changes the forward."""
    context = {"use_avigate_custom": True, "gating_type": "global_diagstrip_ssm", "contrastive_align_loss": True,
               **AUDIO}
    for option in RESEARCH_OPTIONS.values():
        if option.kind == "arch" and option.inactive is not ALWAYS_ACTIVE and not isinstance(option.inactive,
                                                                                             Condition):
            assert not option.changes_forward(option.inactive, context), option.name
            if isinstance(option.inactive, bool):
                assert option.changes_forward(not option.inactive, context), option.name


# ---------------------------------------------------------------- real research checkpoints

FIXTURE_CKPTS = sorted((SHARED / "fixtures").glob("ckpt_*/model.ckpt")) if SHARED.is_dir() else []
requires_shared = pytest.mark.skipif(not FIXTURE_CKPTS, reason=f"{SHARED} (shared fixtures) not present")
_OPTS = {}


def _saved_options(path):
    if path not in _OPTS:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        _OPTS[path] = vars(ckpt["opt"])
    return _OPTS[path]


@requires_shared
@pytest.mark.parametrize("path", FIXTURE_CKPTS, ids=lambda p: p.parent.name)
def test_fixture_options_are_all_known_and_implemented(path):
    opt = _saved_options(path)
    res = classify_saved_options(opt, implemented=IMPLEMENTED)
    print(f"{path.parent.name}: unknown={res['unknown']} arch_not_implemented={res['arch_not_implemented']} "
          f"arch_active={res['arch_active']}")
    assert res["unknown"] == []
    assert res["arch_not_implemented"] == []
    assert set(res["known"]) == set(opt)


@requires_shared
def test_fixture_features_are_detected_without_implementation():
    by_name = {p.parent.name: _saved_options(p) for p in FIXTURE_CKPTS}
    if "ckpt_v2_clipwise_film" in by_name:
        res = classify_saved_options(by_name["ckpt_v2_clipwise_film"], implemented=[])
        assert {"mha_gate_temp", "ffn_gate_film", "use_avigate_custom", "gating_type"} <= set(
            res["arch_not_implemented"])
        assert "mha_gate_bias_init" not in res["arch_not_implemented"]
    if "ckpt_main_plain" in by_name:
        res = classify_saved_options(by_name["ckpt_main_plain"], implemented=[])
        assert "use_umt" not in res["arch_not_implemented"] and "a_feat_dir" not in res["arch_not_implemented"]
    if "ckpt_ssm_diagstrip" in by_name:
        res = classify_saved_options(by_name["ckpt_ssm_diagstrip"], implemented=["gating_type"])
        assert not any(n.startswith("ssm_") for n in res["arch_not_implemented"])
