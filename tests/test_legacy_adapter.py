"""Legacy adapter: checkpoints and in-memory models become trackable with every weight and output unchanged."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import (
    FIXTURES,
    fusion_batch,
    requires_fixtures,
    save_checkpoint,
    small_checkpoint,
    small_model,
    small_options,
)
from gate_analysis.legacy import (
    PROBE_LENGTHS,
    EquivalenceError,
    IncompatibleModelError,
    classify_keys,
    make_probe_batch,
)
from legacy_model_adapter import adapt_legacy_model, load_legacy_model_with_gate_tracking
from qd_detr.avigate import AVIGATEFusion
from qd_detr.avigate_custom import AVIGATEFusionCustom
from qd_detr.config import fusion_variant
from qd_detr.errors import ConfigError
from qd_detr.gates import fusion_gate_kinds
from qd_detr.model import NoFusionError, build_model


def _probe(opt, seed=7, lengths=(9, 5, 2)):
    """Inputs independent of the adapter's own probe (other seed and lengths)."""
    audio = opt.a_feat_dir is not None
    return make_probe_batch(opt.v_feat_dim, opt.t_feat_dim, opt.a_feat_dim if audio else None, lengths=lengths,
                            text_lengths=(5, 3, 4), seed=seed)


def _outputs(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return {k: out[k] for k in ("pred_logits", "pred_spans", "saliency_scores", "saliency_scores_neg")}


def _assert_same_outputs(a, b, atol=1e-6):
    for key in a:
        assert a[key].shape == b[key].shape, key
        assert float((a[key] - b[key]).abs().max()) <= atol, key


# ------------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout,gating", [("custom", "global"), ("custom", "clipwise"), ("custom", "elementwise"),
                                           ("avigate", "global")])
def test_checkpoint_is_rebuilt_with_every_tensor_and_output_unchanged(tmp_path, layout, gating):
    path, source, opt = small_checkpoint(tmp_path / "model.ckpt", layout, gating, seed=3)
    model, _, report = load_legacy_model_with_gate_tracking(path, device="cpu", return_details=True)
    adapter = report["legacy_adapter"]

    # independent of the adapter's own proof: every tensor equals the file's, layer by layer
    saved = torch.load(path, map_location="cpu", weights_only=False)["model"]
    own = model.state_dict()
    assert set(own) == set(saved)
    assert all(torch.equal(own[k], saved[k]) for k in saved)
    if layout == "custom":  # the predecessor copied layer 0 into every layer; here layer 1 is its own
        w0, w1 = (own[f"fusion.fusion_layers.{i}.gating_function.mlp_mha.0.weight"] for i in (0, 1))
        assert not torch.equal(w0, w1)
        assert torch.equal(w1, source.state_dict()["fusion.fusion_layers.1.gating_function.mlp_mha.0.weight"])

    # the tracked model reproduces the source model (query semantics, ragged batch)
    inputs = _probe(opt)
    _assert_same_outputs(_outputs(source, inputs), _outputs(model, inputs), atol=0)
    assert model.fusion.gate_tracking_enabled

    assert adapter["layout"] == layout and adapter["gating_type"] == gating
    assert adapter["gating_type_source"]
    assert adapter["weights"]["compared"] == adapter["weights"]["identical"] == len(saved)
    assert sum(adapter["key_groups"].values()) == len(saved) and adapter["unmatched_keys"] == []
    assert adapter["n_parameters"] == sum(p.numel() for p in source.parameters())
    eq = adapter["equivalence"]
    assert eq["passed"] and eq["max_abs_diff"] == 0.0 and set(eq["modes"]) == {"query", "original"}
    assert eq["probe"]["padded_samples"] == 2
    assert "fused_video_features" in eq["modes"]["original"]["diffs"]
    n_layers = 1 if layout == "avigate" else 2
    assert len(adapter["gates"]["layers"]) == 2 * n_layers
    want = {"global": [[1]] * 3, "clipwise": [[n] for n in PROBE_LENGTHS],
            "elementwise": [[n, 256] for n in PROBE_LENGTHS]}[gating]
    assert all(g["recorded_shapes"] == want for g in adapter["gates"]["layers"])
    assert "legacy adapter:" in adapter["summary"]


def test_tracking_after_loading_records_every_query_without_padding(tmp_path):
    path, source, opt = small_checkpoint(tmp_path / "m.ckpt", "custom", "clipwise", seed=4)
    model = load_legacy_model_with_gate_tracking(path, device="cpu")
    inputs = _probe(opt)
    model.fusion.set_current_sample_id([11, 12, 13])
    with torch.no_grad():
        model(**inputs)
    assert sorted(model.fusion.gate_history) == [11, 12, 13]
    assert [model.fusion.gate_history[q].gates[(1, "ffn")].shape for q in (11, 12, 13)] == [(9,), (5,), (2,)]


@pytest.mark.parametrize("prefix,rule", [("module.", "module.* -> *"),
                                         ("avigate_fusion.", "avigate_fusion.* -> fusion.*")])
def test_known_legacy_prefixes_are_mapped_and_reported(tmp_path, prefix, rule):
    source, opt = small_model("custom", "global", seed=5)
    sd = source.state_dict()
    if prefix == "module.":
        sd = {prefix + k: v for k, v in sd.items()}
    else:
        sd = {(prefix + k[len("fusion."):]) if k.startswith("fusion.") else k: v for k, v in sd.items()}
    save_checkpoint(tmp_path / "m.ckpt", sd, opt, epoch=1)
    model, _, report = load_legacy_model_with_gate_tracking(tmp_path / "m.ckpt", device="cpu", return_details=True)
    renames = dict(map(tuple, report["legacy_adapter"]["key_renames"]))
    assert renames[rule] == sum(1 for k in sd if k.startswith(prefix))
    _assert_same_outputs(_outputs(source, _probe(opt)), _outputs(model, _probe(opt)), atol=0)


def _tampered(tmp_path, edit):
    source, opt = small_model("custom", "clipwise", seed=6)
    sd = dict(source.state_dict())
    edit(sd)
    return save_checkpoint(tmp_path / "tampered.ckpt", sd, opt)


def test_renamed_key_is_named(tmp_path):
    key = "fusion.fusion_layers.1.a_proj.weight"
    path = _tampered(tmp_path, lambda sd: sd.__setitem__("fusion.fusion_layers.1.a_projection.weight", sd.pop(key)))
    with pytest.raises(IncompatibleModelError) as err:
        load_legacy_model_with_gate_tracking(path, device="cpu")
    assert key in str(err.value) and "fusion.fusion_layers.1.a_projection.weight" in str(err.value)
    assert "matched nothing" in str(err.value)


def test_dropped_key_is_named(tmp_path):
    key = "fusion.fusion_layers.1.norm3.bias"
    path = _tampered(tmp_path, lambda sd: sd.pop(key))
    with pytest.raises(IncompatibleModelError, match=r"missing key\(s\): " + key.replace(".", r"\.")):
        load_legacy_model_with_gate_tracking(path, device="cpu")


def test_wrong_shape_is_named(tmp_path):
    key = "fusion.fusion_layers.0.ffn1.0.weight"
    path = _tampered(tmp_path, lambda sd: sd.__setitem__(key, sd[key][:-1]))
    with pytest.raises(IncompatibleModelError, match="mis-shaped") as err:
        load_legacy_model_with_gate_tracking(path, device="cpu")
    assert key in str(err.value) and "(1023, 256)" in str(err.value)


def test_unknown_layout_lists_the_keys_that_matched_nothing(tmp_path):
    foreign = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    torch.save({"model": foreign.state_dict(), "epoch": 0}, tmp_path / "foreign.ckpt")
    with pytest.raises(IncompatibleModelError, match="4 of 4 weight keys match no known layout") as err:
        load_legacy_model_with_gate_tracking(tmp_path / "foreign.ckpt", device="cpu")
    assert "0.weight" in str(err.value) and "1.bias" in str(err.value)


def test_key_table_covers_every_layout_and_refuses_mixed_layouts():
    for layout, gating, kw in [("custom", "elementwise", {"contrastive_align_loss": True}), ("avigate", "global", {}),
                               ("concat", "global", {}), ("video_only", "global", {"use_txt_pos": True})]:
        model = build_model(small_options(layout, gating, **kw))
        keys = classify_keys(model.state_dict())
        assert keys.unmatched == [], layout
        assert keys.layout == (layout if layout in ("custom", "avigate") else "concat or video_only")
    custom = build_model(small_options("custom", "global")).state_dict()
    mixed = dict(custom, **{"fusion.video_proj.weight": torch.zeros(256, 42)})
    with pytest.raises(IncompatibleModelError, match="different layouts are mixed"):
        classify_keys(mixed)


def test_model_without_fusion_is_refused_with_the_reason(tmp_path):
    path, _, _ = small_checkpoint(tmp_path / "v.ckpt", "video_only", seed=1)
    with pytest.raises(NoFusionError, match="has no fusion module, so no gates"):
        load_legacy_model_with_gate_tracking(path, device="cpu")


# ------------------------------------------------------------------------------------------------
# gating type
# ------------------------------------------------------------------------------------------------

def test_gating_type_conflict_names_both(tmp_path):
    path, _, _ = small_checkpoint(tmp_path / "c.ckpt", "custom", "clipwise", seed=2)
    with pytest.raises(ConfigError, match="--gating_type global conflicts with the checkpoint's gating_type clipwise"):
        load_legacy_model_with_gate_tracking(path, gating_type="global", device="cpu")


def test_gating_type_must_be_given_when_the_checkpoint_does_not_say(tmp_path):
    """Weights alone: global and clipwise state dicts are key- and shape-identical, so the user must say."""
    sd_global = build_model(small_options("custom", "global")).state_dict()
    source, opt = small_model("custom", "clipwise", seed=8)
    sd = source.state_dict()
    assert {k: v.shape for k, v in sd_global.items()} == {k: v.shape for k, v in sd.items()}
    path = tmp_path / "bare.ckpt"
    torch.save(sd, path)  # a bare state dict, no options, no opt.json
    with pytest.raises(ConfigError, match="global and clipwise weights have identical names and shapes"):
        load_legacy_model_with_gate_tracking(path, device="cpu")
    heads = {"nheads": opt.nheads, "fusion_n_heads": opt.fusion_n_heads}
    model, _, report = load_legacy_model_with_gate_tracking(path, gating_type="clipwise", device="cpu",
                                                            return_details=True, options=heads)
    assert report["legacy_adapter"]["gating_type"] == "clipwise"
    assert report["legacy_adapter"]["gating_type_source"] == "given"
    _assert_same_outputs(_outputs(source, _probe(opt)), _outputs(model, _probe(opt)), atol=0)


# ------------------------------------------------------------------------------------------------
# in-memory models: the original research code's module tree, written independently (no tracking)
# ------------------------------------------------------------------------------------------------

def _mlp(hidden, out):
    return nn.Sequential(nn.Linear(2 * hidden, hidden // 2), nn.ReLU(), nn.Linear(hidden // 2, out))


def _ffn(hidden):
    return nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.ReLU(), nn.Linear(4 * hidden, hidden))


class OrigGatingFunction(nn.Module):
    mha_act = staticmethod(torch.tanh)  # the diagstrip branch's plain global gating uses a sigmoid here

    def __init__(self, hidden, gating_type, declare=True):
        super().__init__()
        if declare:
            self.gating_type = gating_type
        self._kind = gating_type
        out = hidden if gating_type == "elementwise" else 1
        self.mlp_mha, self.mlp_ffn = _mlp(hidden, out), _mlp(hidden, out)

    def forward(self, video, audio):
        if self._kind == "global":  # mean over every position, padding included (as the original)
            joint = torch.cat([video.mean(1), audio.mean(1)], dim=1)
            return self.mha_act(self.mlp_mha(joint)).unsqueeze(-1), torch.tanh(self.mlp_ffn(joint)).unsqueeze(-1)
        joint = torch.cat([video, audio], dim=2)
        return self.mha_act(self.mlp_mha(joint)), torch.tanh(self.mlp_ffn(joint))


class OrigBlock(nn.Module):
    audio_scale = 1.0
    gating_cls = OrigGatingFunction

    def __init__(self, hidden, n_heads, gating_type, declare=True):
        super().__init__()
        self.gating_function = self.gating_cls(hidden, gating_type, declare)
        self.a_proj, self.out_proj = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        self.ffn1, self.ffn2 = _ffn(hidden), _ffn(hidden)
        self.self_attention = nn.MultiheadAttention(hidden, n_heads, batch_first=True)
        self.norm1, self.norm2, self.norm3, self.norm4 = (nn.LayerNorm(hidden) for _ in range(4))
        self.n_heads, self.head_dim = n_heads, hidden // n_heads

    def forward(self, video, audio, video_mask=None, audio_mask=None):
        g_mha, g_ffn = self.gating_function(video, audio)
        a = self.norm1(audio)
        heads = [F.linear(a, self.a_proj.weight[h * self.head_dim:(h + 1) * self.head_dim],
                          self.a_proj.bias[h * self.head_dim:(h + 1) * self.head_dim]) for h in range(self.n_heads)]
        z = g_mha * self.audio_scale * self.out_proj(torch.cat(heads, dim=-1)) + video
        z_bar = g_ffn * self.ffn1(self.norm2(z)) + z
        pad = video_mask.eq(0) if video_mask is not None else None
        n3 = self.norm3
        r = self.self_attention(n3(z_bar), n3(z_bar), n3(z_bar), key_padding_mask=pad)[0] + z_bar
        return self.ffn2(self.norm4(r)) + r


class OrigFusionCustom(nn.Module):
    block = OrigBlock

    def __init__(self, hidden=256, n_heads=4, num_layers=2, gating_type="global", declare=True):
        super().__init__()
        if declare:
            self.gating_type = gating_type
        self.fusion_layers = nn.ModuleList(self.block(hidden, n_heads, gating_type, declare) for _ in range(num_layers))

    def forward(self, video_feat, audio_feat, video_mask=None, audio_mask=None):
        for layer in self.fusion_layers:
            video_feat = layer(video_feat, audio_feat, video_mask, audio_mask)
        return video_feat


def _legacy_copy(model, opt, fusion_cls=OrigFusionCustom, declare=True):
    """Our trained model with its fusion swapped for an untracked original-style copy (original batching)."""
    legacy = copy.deepcopy(model).set_batching("original")
    fusion = fusion_cls(256, opt.fusion_n_heads, opt.fusion_layers, opt.gating_type, declare)
    fusion.load_state_dict(model.fusion.state_dict(), strict=True)
    legacy.fusion = fusion
    return legacy.eval()


class UserQDDETR(nn.Module):
    """A user's own QD-DETR class (original attribute names, fusion under ``avigate_fusion``, no mixin)."""

    def __init__(self, ours, fusion):
        super().__init__()
        for name in ("transformer", "position_embed", "span_embed", "class_embed", "query_embed", "input_txt_proj",
                     "input_vid_proj", "input_aud_proj", "txt_position_embed", "saliency_proj1", "saliency_proj2"):
            setattr(self, name, copy.deepcopy(getattr(ours, name)))
        self.global_rep_token = nn.Parameter(ours.global_rep_token.detach().clone())
        self.global_rep_pos = nn.Parameter(ours.global_rep_pos.detach().clone())
        self.avigate_fusion = fusion
        self.aux_loss, self.use_txt_pos, self.max_v_l = True, False, 75

    def _memory(self, vid, vid_mask, txt, txt_mask, pos):
        b = vid.shape[0]
        src = torch.cat([self.global_rep_token.expand(b, 1, -1), vid, txt], dim=1)
        mask = torch.cat([torch.ones(b, 1), vid_mask, txt_mask], dim=1).bool()
        pos = torch.cat([self.global_rep_pos.expand(b, 1, -1), pos], dim=1)
        return self.transformer(src, ~mask, self.query_embed.weight, pos, video_length=vid.shape[1])

    def forward(self, src_txt, src_txt_mask, src_vid, src_vid_mask, src_aud=None, src_aud_mask=None):
        vid = self.avigate_fusion(video_feat=self.input_vid_proj(src_vid), audio_feat=self.input_aud_proj(src_aud),
                                  video_mask=src_vid_mask, audio_mask=src_aud_mask)
        txt = self.input_txt_proj(src_txt)
        pos = torch.cat([self.position_embed(vid, src_vid_mask), torch.zeros_like(txt)], dim=1)
        hs, ref, memory, mem_global = self._memory(vid, src_vid_mask, txt, src_txt_mask, pos)
        coord = (self.span_embed(hs) + torch.log(ref.clamp(1e-3, 1) / (1 - ref).clamp(min=1e-3))).sigmoid()
        logits = self.class_embed(hs)
        sal = (self.saliency_proj1(memory[:, :vid.shape[1]]) * self.saliency_proj2(mem_global).unsqueeze(1)).sum(-1)
        out = {"pred_logits": logits[-1], "pred_spans": coord[-1], "saliency_scores": sal / math.sqrt(256)}
        txt_neg, mask_neg = torch.roll(txt, -1, 0), torch.roll(src_txt_mask, -1, 0)
        _, _, mem_n, glob_n = self._memory(vid, src_vid_mask, txt_neg, mask_neg, pos.clone())
        out["saliency_scores_neg"] = (self.saliency_proj1(mem_n[:, :vid.shape[1]])
                                      * self.saliency_proj2(glob_n).unsqueeze(1)).sum(-1) / math.sqrt(256)
        return out


@pytest.mark.parametrize("gating", ["global", "clipwise", "elementwise"])
def test_in_memory_model_with_untracked_original_fusion_adapts_unchanged(gating):
    ours, opt = small_model("custom", gating, seed=9)
    legacy = _legacy_copy(ours, opt)
    before = {k: v.clone() for k, v in legacy.state_dict().items()}
    legacy.train()
    adapted, _, report = adapt_legacy_model(legacy, return_details=True)
    assert legacy.training and all(torch.equal(before[k], v) for k, v in legacy.state_dict().items())
    assert not hasattr(legacy.fusion, "gate_history") and not legacy.fusion._forward_hooks
    assert isinstance(adapted.fusion, AVIGATEFusionCustom) and adapted.fusion.gate_tracking_enabled
    assert adapted is not legacy
    assert report["gating_type"] == gating and report["gating_type_source"].endswith("gating_type")
    assert report["equivalence"]["batching"] == "original" and report["equivalence"]["passed"]
    assert report["weights"]["identical"] == len(before)
    inputs = _probe(opt, seed=11)
    legacy.eval()
    _assert_same_outputs(_outputs(legacy, inputs), _outputs(adapted, inputs))
    if gating == "global":  # the padded-mean gate really differs from per-query semantics here
        assert report["equivalence"]["modes"]["query"]["max_abs_diff"] > 1e-4


def test_user_class_with_avigate_fusion_attribute_adapts():
    ours, opt = small_model("custom", "clipwise", seed=10)
    fusion = OrigFusionCustom(256, opt.fusion_n_heads, opt.fusion_layers, "clipwise")
    fusion.load_state_dict(ours.fusion.state_dict())
    user = UserQDDETR(ours.set_batching("original"), fusion).eval()
    adapted, opt2, report = adapt_legacy_model(user, return_details=True)
    assert report["fusion_attribute"] == "avigate_fusion"
    assert dict(map(tuple, report["key_renames"]))["avigate_fusion.* -> fusion.*"] == len(fusion.state_dict())
    assert opt2.nheads == opt.nheads and opt2.fusion_n_heads == opt.fusion_n_heads
    inputs = _probe(opt, seed=12)
    _assert_same_outputs(_outputs(user, inputs), _outputs(adapted, inputs))


def test_our_own_model_keeps_per_query_batching():
    ours, opt = small_model("custom", "global", seed=13)
    ours.fusion.enable_gate_tracking()
    ours.fusion.set_current_sample_id(["mine_0", "mine_1", "mine_2"])
    with torch.no_grad():
        ours(**_probe(opt))
    adapted, _, report = adapt_legacy_model(nn.DataParallel(ours), return_details=True)
    assert report["wrapper"] == "DataParallel" and report["equivalence"]["batching"] == "query"
    assert adapted.batching == "query" and adapted is not ours
    assert sorted(ours.fusion.gate_history) == ["mine_0", "mine_1", "mine_2"]  # the user's records, untouched


def test_bare_fusion_module_gating_type_read_from_behaviour():
    torch.manual_seed(0)
    fusion = OrigFusionCustom(256, 4, 2, "clipwise", declare=False).eval()
    adapted, _, report = adapt_legacy_model(fusion, return_details=True)
    assert isinstance(adapted, AVIGATEFusionCustom) and adapted.gating_type == "clipwise"
    assert report["gating_type_source"] == "the gating function's output shape on the probe"
    v, a = torch.randn(2, 6, 256), torch.randn(2, 6, 256)
    mask = torch.tensor([[1.0] * 6, [1.0] * 4 + [0.0] * 2])
    with torch.no_grad():
        assert float((fusion(v, a, video_mask=mask) - adapted(v, a, video_mask=mask)).abs().max()) <= 1e-6
    with pytest.raises(ConfigError, match="gating_type global conflicts with the model's gating type clipwise"):
        adapt_legacy_model(fusion, gating_type="global")


def test_a_model_whose_forward_differs_is_refused():
    class ScaledBlock(OrigBlock):
        audio_scale = 0.5  # a user's own change to the fusion math: shapes and names unchanged

    class ScaledFusion(OrigFusionCustom):
        block = ScaledBlock

    ours, opt = small_model("custom", "clipwise", seed=14)
    with pytest.raises(EquivalenceError, match="does not reproduce the given model"):
        adapt_legacy_model(_legacy_copy(ours, opt, fusion_cls=ScaledFusion))


class OrigAVIGATEBlock(nn.Module):
    def __init__(self, hidden, n_heads):
        super().__init__()
        self.gating_function = nn.Module()
        self.gating_function.mlp_mha, self.gating_function.mlp_ffn = _mlp(hidden, 1), _mlp(hidden, 1)
        self.cross_attention = nn.MultiheadAttention(hidden, n_heads, batch_first=True)
        self.self_attention = nn.MultiheadAttention(hidden, n_heads, batch_first=True)
        self.ffn1, self.ffn2 = _ffn(hidden), _ffn(hidden)
        self.norm1, self.norm2, self.norm3, self.norm4 = (nn.LayerNorm(hidden) for _ in range(4))

    def forward(self, v, a, video_mask=None, audio_mask=None):
        joint = torch.cat([v.mean(1), a.mean(1)], dim=1)
        g_mha = torch.tanh(self.gating_function.mlp_mha(joint)).unsqueeze(-1)
        g_ffn = torch.tanh(self.gating_function.mlp_ffn(joint)).unsqueeze(-1)
        n1 = self.norm1
        z = g_mha * self.cross_attention(n1(v), n1(a), n1(a), key_padding_mask=audio_mask)[0] + v
        z_bar = g_ffn * self.ffn1(self.norm2(z)) + z
        r = self.self_attention(self.norm3(z_bar), self.norm3(z_bar), self.norm3(z_bar),
                                key_padding_mask=video_mask)[0] + z_bar  # float masks as-is (additive)
        return self.ffn2(self.norm4(r)) + r


class OrigAVIGATEFusion(nn.Module):
    def __init__(self, vid_dim, aud_dim, hidden=256):
        super().__init__()
        self.video_proj, self.audio_proj = nn.Linear(vid_dim, hidden), nn.Linear(aud_dim, hidden)
        self.dropout = nn.Dropout(0.5)
        self.fusion_layers = nn.ModuleList([OrigAVIGATEBlock(hidden, 8)])

    def forward(self, video_feat, audio_feat, video_mask=None, audio_mask=None):
        v, a = self.dropout(self.video_proj(video_feat)), self.dropout(self.audio_proj(audio_feat))
        for layer in self.fusion_layers:
            v = layer(v, a, video_mask, audio_mask)
        return v


def test_older_avigate_fusion_module_adapts_with_its_mask_quirk():
    torch.manual_seed(1)
    fusion = OrigAVIGATEFusion(20, 10).eval()
    adapted, opt, report = adapt_legacy_model(fusion, return_details=True)
    assert isinstance(adapted, AVIGATEFusion) and report["layout"] == "avigate"
    assert report["gating_type"] == "global" and report["equivalence"]["batching"] == "original"
    assert (opt.v_feat_dim, opt.a_feat_dim) == (20, 10)
    assert all(g["module_output_shape"] == [3, 1] for g in report["gates"]["layers"])


def test_in_memory_model_without_fusion_is_refused():
    ours, _ = small_model("video_only", seed=1)
    with pytest.raises(NoFusionError, match="has no fusion module, so no gates"):
        adapt_legacy_model(ours)


# ------------------------------------------------------------------------------------------------
# in-memory models of every fusion variant (v1, diagstrip, v2); our own classes stand in for the
# research code's (same state dicts and attribute names)
# ------------------------------------------------------------------------------------------------

SSM_KW = dict(ssm_band_width=3, ssm_enc_channels=8, ssm_dilations=[1, 3], ssm_diag_subtract=0.25)  # not the defaults


def _fusion_inputs(lengths):
    """Keyword inputs of a bare fusion module (projected features, hidden 256), padded rows zero."""
    v, a, mask = fusion_batch(lengths, seed=11)
    return dict(video_feat=v, audio_feat=a, video_mask=mask, audio_mask=mask)


def _user_gates(fusion, call):
    """What the user's own gating functions returned per (layer, kind), and the FiLM shift its blocks add."""
    found, handles = {}, []
    for i, block in enumerate(fusion.fusion_layers):
        gf = block.gating_function
        handles.append(gf.register_forward_hook(
            lambda m, args, out, i=i: found.update({(i, "mha"): out[0], (i, "ffn"): out[1]})))
        if getattr(gf, "ffn_film", False):  # the block adds gating_function.film_shift of its own inputs
            handles.append(block.register_forward_pre_hook(
                lambda m, args, i=i: found.update({(i, "beta"): m.gating_function.film_shift(*args[:3])})))
    try:
        with torch.no_grad():
            out = call()
    finally:
        for h in handles:
            h.remove()
    return out, found


def _check_against_user(user, adapted, kind, opt=None, lengths=(9, 5, 2)):
    """On an independent ragged batch: equal outputs, and every tracked gate equals the user's own gate."""
    inputs = _probe(opt, seed=11, lengths=lengths) if kind == "model" else _fusion_inputs(lengths)
    user_fusion, own_fusion = (user.fusion, adapted.fusion) if kind == "model" else (user, adapted)
    ref, user_gates = _user_gates(user_fusion, lambda: user(**inputs))
    ids = [f"q{i}" for i in range(len(lengths))]
    own_fusion.clear_gate_history()
    own_fusion.set_current_sample_id(ids)
    with torch.no_grad():
        got = adapted(**inputs)
    pairs = [(ref, got)] if torch.is_tensor(ref) else [(ref[k], got[k]) for k in ("pred_logits", "pred_spans",
                                                                                  "saliency_scores")]
    assert all(float((a - b).abs().max()) <= 1e-6 for a, b in pairs)
    assert {k for _, k in user_gates} == set(fusion_gate_kinds(own_fusion))
    for (layer, gate_kind), g in user_gates.items():
        for b, (sid, n) in enumerate(zip(ids, lengths)):
            want = g[b, :1] if g.shape[1] == 1 else g[b, :n]
            want = want[..., 0] if want.shape[-1] == 1 else want
            rec = torch.from_numpy(own_fusion.gate_history[sid].gates[(layer, gate_kind)])
            assert rec.shape == want.shape, (layer, gate_kind)
            assert float((rec - want).abs().max()) <= 1e-6, (layer, gate_kind)
    own_fusion.clear_gate_history()


@pytest.mark.parametrize("kind", ["model", "fusion"])
def test_v2_film_module_adapts_with_its_own_temperature(kind):
    ours, opt = small_model("custom", "clipwise", seed=21, mha_gate_temp=2.0, ffn_gate_film=True)  # default 1.5
    user = ours if kind == "model" else ours.fusion
    adapted, opt2, report = adapt_legacy_model(user, return_details=True)
    own_fusion = adapted.fusion if kind == "model" else adapted
    assert report["fusion_variant"] == "v2" and report["fusion_variant_source"].startswith("weights")
    assert report["gate_options"]["mha_gate_temp"] == {"value": 2.0,
                                                       "source": "fusion_layers[*].gating_function.mha_temp"}
    assert report["options_from_module"]["mha_gate_temp"]["value"] == 2.0
    film = report["gate_options"]["ffn_gate_film"]
    assert film["value"] is True and "gating_function.ffn_film" in film["source"] and "ffn_beta" in film["source"]
    assert opt2.mha_gate_temp == 2.0 and opt2.ffn_gate_film is True
    assert all(b.gating_function.mha_temp == 2.0 and b.gating_function.ffn_film for b in own_fusion.fusion_layers)
    assert report["gates"]["kinds"] == ["mha", "ffn", "beta"] == list(fusion_gate_kinds(own_fusion))
    assert {(g["layer"], g["kind"]) for g in report["gates"]["layers"]} == {
        (i, k) for i in range(2) for k in ("mha", "ffn", "beta")}
    assert "2" in report["gate_ranges"]["layers.0.gate_mha"]["formula"]
    _check_against_user(user, adapted, kind, opt)


class HiddenTempGating(nn.Module):
    """A v2 clipwise gating function that keeps its temperature under another name (no ``mha_temp``)."""

    def __init__(self, ours):
        super().__init__()
        for name in ("mlp_mha", "mlp_ffn", "mha_bias", "mha_scale", "ffn_alpha"):
            setattr(self, name, copy.deepcopy(getattr(ours, name)))
        self.gating_type, self.ffn_film, self._t = ours.gating_type, False, ours.mha_temp

    def forward(self, video, audio, video_mask=None, audio_mask=None):
        joint = torch.cat([video, audio], dim=2)
        return (torch.sigmoid((self.mlp_mha(joint) + self.mha_bias) / self._t) * self.mha_scale,
                torch.tanh(self.mlp_ffn(joint)) * self.ffn_alpha)


def test_v2_temperature_without_an_attribute_must_be_given_and_is_proved():
    ours, _ = small_model("custom", "clipwise", seed=22, mha_gate_temp=2.0)
    fusion = copy.deepcopy(ours.fusion)
    for block in fusion.fusion_layers:
        block.gating_function = HiddenTempGating(block.gating_function)
    with pytest.raises(ConfigError, match="no gating function has an mha_temp attribute"):
        adapt_legacy_model(fusion)
    with pytest.raises(EquivalenceError, match="does not reproduce the given model"):
        adapt_legacy_model(fusion, options={"mha_gate_temp": 1.5})  # a wrong temperature changes the outputs
    adapted, _, report = adapt_legacy_model(fusion, options={"mha_gate_temp": 2.0}, return_details=True)
    assert report["gate_options"]["mha_gate_temp"] == {"value": 2.0, "source": "given (options)"}
    _check_against_user(fusion, adapted, "fusion")
    with pytest.raises(ConfigError, match=r"mha_gate_temp=1.5 was given but the module has mha_gate_temp=2.0"):
        adapt_legacy_model(ours, options={"mha_gate_temp": 1.5})


@pytest.mark.parametrize("kind,video,batching", [("model", 1, "query"), ("fusion", 0, "original")])
def test_diagstrip_ssm_module_adapts_with_settings_read_from_its_gate(kind, video, batching):
    ours, opt = small_model("custom", "global_diagstrip_ssm", seed=23, ssm_use_video_branch=video, **SSM_KW)
    ours.set_batching(batching)
    user = ours if kind == "model" else ours.fusion
    adapted, opt2, report = adapt_legacy_model(user, return_details=True)
    own_fusion = adapted.fusion if kind == "model" else adapted
    assert report["gating_type"] == "global_diagstrip_ssm" and report["fusion_variant"] == "diagstrip"
    assert "ssm_gate" in report["fusion_variant_source"]
    assert {k: v["value"] for k, v in report["gate_options"].items()} == {
        "ssm_band_width": 3, "ssm_enc_channels": 8, "ssm_dilations": [1, 3], "ssm_diag_subtract": 0.25,
        "ssm_use_video_branch": video}
    sources = {k: v["source"] for k, v in report["gate_options"].items()}
    assert sources["ssm_dilations"] == "fusion_layers[*].gating_function.ssm_gate.encoder Conv1d(kernel 3).dilation"
    assert sources["ssm_diag_subtract"] == "fusion_layers[*].gating_function.ssm_gate.diag_subtract"
    assert sources["ssm_band_width"].startswith("fusion_layers[*].gating_function.ssm_gate.band_width, agrees")
    assert sources["ssm_use_video_branch"].startswith("fusion_layers[*].gating_function.ssm_gate.use_video_branch")
    assert sources["ssm_enc_channels"].startswith("weights")
    assert report["equivalence"]["batching"] == batching
    gate = own_fusion.fusion_layers[1].gating_function.ssm_gate
    assert (gate.band_width, gate.dilations, gate.diag_subtract, gate.use_video_branch) == (3, (1, 3), 0.25, bool(video))
    assert report["gates"]["kinds"] == ["mha", "ffn"]
    assert all(g["recorded_shapes"] == [[1]] * 3 for g in report["gates"]["layers"])
    _check_against_user(user, adapted, kind, opt)


class SigmoidGating(OrigGatingFunction):
    mha_act = staticmethod(torch.sigmoid)  # the diagstrip-ssm branch's plain global gating


class SigmoidBlock(OrigBlock):
    gating_cls = SigmoidGating


class SigmoidFusion(OrigFusionCustom):
    """The diagstrip branch's plain global fusion: v1 keys and attributes, no ``variant`` or ``ssm_*``."""
    block = SigmoidBlock


class SoftsignGating(OrigGatingFunction):
    mha_act = staticmethod(F.softsign)  # neither branch's gate


class SoftsignBlock(OrigBlock):
    gating_cls = SoftsignGating


class SoftsignFusion(OrigFusionCustom):
    block = SoftsignBlock


@pytest.mark.parametrize("kind", ["model", "fusion"])
def test_diagstrip_plain_global_of_our_class_is_resolved_by_outputs(kind):
    ours, opt = small_model("custom", "global", seed=24, ssm_band_width=8)
    user = ours if kind == "model" else ours.fusion
    adapted, opt2, report = adapt_legacy_model(user, return_details=True)
    own_fusion = adapted.fusion if kind == "model" else adapted
    assert report["fusion_variant"] == "diagstrip"
    assert [(r["variant"], r["passed"]) for r in report["variant_readings"]] == [("v1", False), ("diagstrip", True)]
    source = report["fusion_variant_source"]
    assert source.startswith("outputs on the probe: the diagstrip (sigmoid MHA gate) reading reproduces")
    assert "the v1 (tanh MHA gate) reading differs" in source and "agrees with AVIGATEFusionCustom.variant" in source
    assert report["gate_options"] == {}
    assert all(b.gating_function.variant == "diagstrip" for b in own_fusion.fusion_layers)
    assert report["gate_ranges"]["layers.0.gate_mha"]["activation"] == "sigmoid"
    _check_against_user(user, adapted, kind, opt)


def test_diagstrip_plain_global_without_any_marker_is_told_by_outputs():
    ours, opt = small_model("custom", "global", seed=25, ssm_band_width=8)
    user = _legacy_copy(ours, opt, fusion_cls=SigmoidFusion)
    assert not any(hasattr(m, "variant") or any(a.startswith("ssm") for a in vars(m)) for m in user.fusion.modules())
    assert {k: v.shape for k, v in user.fusion.state_dict().items()} == {
        k: v.shape for k, v in OrigFusionCustom(256, 4, 2, "global").state_dict().items()}
    adapted, opt2, report = adapt_legacy_model(user, return_details=True)
    assert report["fusion_variant"] == "diagstrip" and report["equivalence"]["batching"] == "original"
    assert [(r["variant"], r["passed"]) for r in report["variant_readings"]] == [("v1", False), ("diagstrip", True)]
    assert report["variant_readings"][0]["max_abs_diff"] > 1e-3
    assert report["fusion_variant_source"].startswith("outputs on the probe") and "agrees" not in \
        report["fusion_variant_source"]
    assert "told by outputs" in report["summary"]
    assert fusion_variant(opt2) == "diagstrip" and opt2.gating_type == "global"
    assert report["gate_ranges"]["layers.1.gate_mha"]["activation"] == "sigmoid"
    _check_against_user(user, adapted, "model", opt)

    # the same weights under the tanh gate are the v1 reading, found first
    v1 = _legacy_copy(ours, opt)
    _, opt_v1, report_v1 = adapt_legacy_model(v1, return_details=True)
    assert report_v1["fusion_variant"] == "v1" and fusion_variant(opt_v1) == "v1"
    assert [(r["variant"], r["passed"]) for r in report_v1["variant_readings"]] == [("v1", True)]


def test_plain_global_module_matching_neither_reading_is_refused():
    ours, opt = small_model("custom", "global", seed=26)
    with pytest.raises(EquivalenceError) as err:
        adapt_legacy_model(_legacy_copy(ours, opt, fusion_cls=SoftsignFusion))
    msg = str(err.value)
    assert isinstance(err.value, IncompatibleModelError)
    assert "does not reproduce the given model under either reading" in msg and "both tried" in msg
    assert "v1 (tanh MHA gate): max abs diff" in msg and "diagstrip (sigmoid MHA gate): max abs diff" in msg


def test_declared_variant_that_outputs_contradict_is_refused():
    ours, _ = small_model("custom", "global", seed=27)  # v1 gates
    ours.fusion.variant = "diagstrip"  # the module claims otherwise
    with pytest.raises(IncompatibleModelError, match="says fusion variant diagstrip .* outputs match the v1"):
        adapt_legacy_model(ours)
    ours.fusion.variant = "v2"
    with pytest.raises(IncompatibleModelError, match="says fusion variant v2 .* lack the v2 gate parameters"):
        adapt_legacy_model(ours)


@pytest.mark.parametrize("gating", ["clipwise", "elementwise"])
def test_v1_non_global_gating_needs_one_reading(gating):
    ours, opt = small_model("custom", gating, seed=28)
    _, _, report = adapt_legacy_model(_legacy_copy(ours, opt), return_details=True)
    assert report["fusion_variant"] == "v1" and len(report["variant_readings"]) == 1
    assert report["fusion_variant_source"] == f"no v2 or SSM gate weights; v1 and diagstrip compute {gating} gating alike"


# ------------------------------------------------------------------------------------------------
# the original research checkpoints
# ------------------------------------------------------------------------------------------------

@requires_fixtures
def test_fixture_layers_keep_their_own_trained_weights():
    """The predecessor replicated layer 0 into every layer; the trained layer 1 must survive untouched."""
    path = FIXTURES / "ckpt_custom_global" / "model.ckpt"
    model, _, report = load_legacy_model_with_gate_tracking(path, device="cpu", return_details=True)
    saved = torch.load(path, map_location="cpu", weights_only=False)["model"]
    for name in ("gating_function.mlp_mha.0.weight", "a_proj.weight", "ffn2.2.bias"):
        layer0, layer1 = saved[f"fusion.fusion_layers.0.{name}"], saved[f"fusion.fusion_layers.1.{name}"]
        assert not torch.equal(layer0, layer1)
        assert torch.equal(model.state_dict()[f"fusion.fusion_layers.1.{name}"], layer1)
    assert report["legacy_adapter"]["n_parameters"] == 11_340_077
    assert report["legacy_adapter"]["equivalence"]["max_abs_diff"] == 0.0


@requires_fixtures
@pytest.mark.parametrize("name", ["ckpt_v2_clipwise_film", "ckpt_ssm_diagstrip"])
def test_research_checkpoints_of_later_branches_adapt_in_memory(name):
    """A model loaded from a v2 FiLM / diagstrip SSM research checkpoint, given as an in-memory object."""
    from qd_detr.checkpoint import load_checkpoint
    model, opt, loaded = load_checkpoint(FIXTURES / name / "model.ckpt", device="cpu")
    adapted, _, report = adapt_legacy_model(model, return_details=True)
    assert report["gating_type"] == opt.gating_type and report["fusion_variant"] == loaded["fusion_variant"]
    # the values the checkpoint's options state are found on the modules (or in the weights)
    assert {k: v["value"] for k, v in report["gate_options"].items()} == {
        k: v["value"] for k, v in loaded["gate_options"].items()}
    assert all(v["source"].startswith(("fusion_layers[*].", "weights")) for v in report["gate_options"].values())
    if name == "ckpt_v2_clipwise_film":
        assert report["gate_options"]["mha_gate_temp"]["value"] == 2.0
        assert report["gates"]["kinds"] == ["mha", "ffn", "beta"]
    else:
        assert report["gate_options"]["ssm_dilations"]["value"] == [1, 2, 4]
        assert report["gates"]["kinds"] == ["mha", "ffn"]
    assert report["weights"]["identical"] == len(model.state_dict())
    assert report["equivalence"]["max_abs_diff"] == 0.0
    _check_against_user(model, adapted, "model", opt)
