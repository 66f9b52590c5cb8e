"""The later fusion variants of the research code: v2 gating (with and without FiLM) and diagstrip-ssm.

Fidelity to the original code is checked on the shared fixtures (test_model_fidelity.py and
../shared/tools/check_fixtures.py); here the math is checked against independent hand computations
on project-built models, and the variant detection against the cases that would otherwise be silent.
"""
import argparse
import json

import numpy as np
import pytest
import torch

from conftest import (
    FIXTURES,
    SMALL_SSM,
    demo_train_args,
    fixture_val_dataset,
    forward_batches,
    fusion_batch,
    requires_fixtures,
    save_checkpoint,
    small_model,
)
from qd_detr.checkpoint import load_checkpoint
from qd_detr.cli import run_main
from qd_detr.config import SSM_OPTIONS, V2_OPTIONS, fusion_variant, make_options
from qd_detr.errors import ToolkitError
from qd_detr.gates import GateRecorder, fusion_gate_kinds, fusion_gate_ranges
from qd_detr.train import main as train_main


def _perturb(model, seed=0):
    """Move the 0-d gate parameters away from their initial values (a trained model's are not 1.0/0.3)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 0:
                p.add_(0.2 * torch.randn((), generator=g))


def _mlp(seq, x):
    return seq[2](torch.relu(seq[0](x)))


@pytest.mark.parametrize("gating", ["global", "clipwise", "elementwise"])
@pytest.mark.parametrize("film", [False, True])
def test_v2_block_equals_the_formulas(gating, film):
    """z = V + g_mha*LN(a); d = LN(ffn1(norm2 z)); z_bar = z + g_ffn*d, or z + d*(1+g_ffn) + g_beta."""
    model, _ = small_model("custom", gating, seed=2, mha_gate_temp=1.7, ffn_gate_film=film)
    _perturb(model)
    fusion = model.fusion  # default (query) semantics: the global pool covers valid clips only
    video, audio, mask = fusion_batch(zero_padding=False)  # random values in the padded positions
    block = fusion.fusion_layers[0]
    gf = block.gating_function
    if gating == "global":
        m = mask.unsqueeze(-1)
        joint = torch.cat([(video * m).sum(1) / m.sum(1), (audio * m).sum(1) / m.sum(1)], dim=1)
    else:
        joint = torch.cat([video, audio], dim=2)
    g_mha = torch.sigmoid((_mlp(gf.mlp_mha, joint) + gf.mha_bias) / 1.7) * gf.mha_scale
    g_ffn = torch.tanh(_mlp(gf.mlp_ffn, joint)) * gf.ffn_alpha
    g_beta = torch.tanh(_mlp(gf.mlp_ffn_beta, joint)) * gf.ffn_beta if film else None
    if gating == "global":
        g_mha, g_ffn = g_mha[:, :, None], g_ffn[:, :, None]
        g_beta = g_beta[:, :, None] if film else None
    a = block.out_proj(block.a_proj(block.norm1(audio)))
    z = video + g_mha * block.delta_norm_mha(a)
    d = block.delta_norm_ffn(block.ffn1(block.norm2(z)))
    z_bar = z + d * (1 + g_ffn) + g_beta if film else z + g_ffn * d
    x = block.norm3(z_bar)
    r = block.self_attention(x, x, x, key_padding_mask=mask.eq(0))[0] + z_bar
    want = block.ffn2(block.norm4(r)) + r

    records = []
    with torch.no_grad():
        got = block(video, audio, video_mask=mask)
        with GateRecorder(fusion, records.extend):
            fusion(video, audio, video_mask=mask)
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want.detach()[valid], atol=2e-5, rtol=0)
    assert fusion_gate_kinds(fusion) == (("mha", "ffn", "beta") if film else ("mha", "ffn"))
    rec = records[1]  # batch element 1 (6 valid clips) of the fusion forward
    n = 6
    expect = {"mha": g_mha[1], "ffn": g_ffn[1]} | ({"beta": g_beta[1]} if film else {})
    for kind, value in expect.items():
        value = value.detach().numpy()
        value = value.reshape(-1)[:1] if gating == "global" else value[:n]
        value = value[:, 0] if gating == "clipwise" else value
        np.testing.assert_allclose(rec.gates[(0, kind)], value, atol=1e-6, rtol=0)
    assert {kind for _, kind in rec.gates} == set(fusion_gate_kinds(fusion))
    mha = g_mha.detach()
    assert float(mha.min()) > 0 and float(mha.max()) < abs(float(gf.mha_scale.detach()))


def test_v2_ranges_follow_the_trained_constants_and_say_what_zero_means():
    model, _ = small_model("custom", "clipwise", seed=0, mha_gate_temp=2.0, ffn_gate_film=True)
    _perturb(model, seed=1)
    gf = model.fusion.fusion_layers[1].gating_function
    ranges = fusion_gate_ranges(model.fusion)
    mha, ffn, beta = (ranges[f"layers.1.gate_{k}"] for k in ("mha", "ffn", "beta"))
    assert mha.activation == "sigmoid" and mha.high == pytest.approx(gf.mha_scale.item()) and not mha.signed
    assert ffn.magnitude == pytest.approx(abs(gf.ffn_alpha.item())) and ffn.film and ffn.off == -1.0
    assert "weight 1" in ffn.meaning() and "not off" in ffn.meaning()
    assert beta.magnitude == pytest.approx(abs(gf.ffn_beta.item()))
    assert "never negative" in mha.meaning()


def _ssm_reference(x, mask, w, diag, encoder):
    """float64 strip features built clip by clip with loops, then the encoder on the sample alone."""
    out = []
    for b in range(x.shape[0]):
        n = int(mask[b].sum())
        xb = x[b, :n].double()
        xb = xb / (xb.norm(dim=-1, keepdim=True) + 1e-6)
        sim = (xb @ xb.T - diag * torch.eye(n, dtype=torch.float64) + 1) / 2
        strip = torch.zeros(2 * w + 1, n, dtype=torch.float64)
        for c, k in enumerate(range(-w, w + 1)):
            for t in range(n - abs(k)):
                strip[c, t] = sim[t, t + k] if k >= 0 else sim[t - k, t]
        h = encoder.double().net(strip[None])[0]
        encoder.float()
        out.append(h.mean(-1))
    return torch.stack(out)


def test_ssm_gate_equals_an_independent_computation_and_is_batch_invariant_only_in_query_mode():
    model, _ = small_model("custom", "global_diagstrip_ssm", seed=4, **SMALL_SSM)
    block = model.fusion.fusion_layers[0]
    gate = block.gating_function.ssm_gate
    video, audio, mask = fusion_batch(seed=3, zero_padding=False)
    with torch.no_grad():
        g_mha, g_ffn = block.gating_function(video, audio, video_mask=mask, audio_mask=mask)
        feat = torch.cat([_ssm_reference(audio, mask, 3, 0.1, gate.encoder),
                          _ssm_reference(video, mask, 3, 0.1, gate.encoder)], dim=-1)
        feat = torch.nn.functional.layer_norm(feat, (feat.shape[-1],), gate.norm.weight.double(), gate.norm.bias.double())
        gate.double()
        want_mha = torch.sigmoid(gate.mlp_mha(feat))
        want_ffn = torch.tanh(gate.mlp_ffn(feat))
        gate.float()
    assert g_mha.shape == (3, 1, 1) and g_ffn.shape == (3, 1, 1)
    np.testing.assert_allclose(g_mha.reshape(-1).numpy(), want_mha.reshape(-1).numpy(), atol=1e-6)
    np.testing.assert_allclose(g_ffn.reshape(-1).numpy(), want_ffn.reshape(-1).numpy(), atol=1e-6)
    # the original semantics leak padding into the last sum(dilations) valid steps of short samples
    model.set_batching("original")
    with torch.no_grad():
        leaky, _ = block.gating_function(video, audio, video_mask=mask, audio_mask=mask)
    assert float((leaky - g_mha).abs()[0]) < 1e-6  # full-length sample: no padding
    assert float((leaky - g_mha).abs()[1:].max()) > 1e-5


def test_diagstrip_global_reads_sigmoid_and_the_two_readings_differ():
    """Same weights and keys: v1 global (tanh) and diagstrip global (sigmoid) are different models."""
    v1, opt = small_model("custom", "global", seed=5)
    ds, _ = small_model("custom", "global", seed=5, **SMALL_SSM)
    ds.load_state_dict(v1.state_dict(), strict=True)
    assert fusion_variant(opt) == "v1" and ds.fusion.variant == "diagstrip"
    video, audio, mask = fusion_batch(seed=6, zero_padding=False)
    with torch.no_grad():
        a = v1.fusion.fusion_layers[0].gating_function(video, audio, video_mask=mask)[0]
        b = ds.fusion.fusion_layers[0].gating_function(video, audio, video_mask=mask)[0]
        raw = torch.atanh(a)
    torch.testing.assert_close(b, torch.sigmoid(raw), atol=1e-5, rtol=0)
    assert float((a - b).abs().max()) > 1e-2
    assert fusion_gate_ranges(ds.fusion)["layers.0.gate_mha"].activation == "sigmoid"
    assert fusion_gate_ranges(v1.fusion)["layers.0.gate_mha"].activation == "tanh"


@requires_fixtures
def test_custom_global_fixture_with_diagstrip_options_is_rebuilt_with_a_sigmoid(tmp_path):
    """The case that used to load silently with tanh gates: ckpt_custom_global + the diagstrip-ssm options."""
    src = FIXTURES / "ckpt_custom_global" / "model.ckpt"
    ckpt = torch.load(src, map_location="cpu", weights_only=False)
    for key, value in SSM_OPTIONS.items():
        setattr(ckpt["opt"], key, value)
    path = tmp_path / "model.ckpt"
    torch.save(ckpt, path)
    ds_model, _, report = load_checkpoint(path)
    v1_model, _, v1_report = load_checkpoint(src)
    assert report["fusion_variant"] == "diagstrip" and v1_report["fusion_variant"] == "v1"
    assert report["gate_ranges"]["layers.0.gate_mha"]["activation"] == "sigmoid"
    ref = np.load(FIXTURES / "ckpt_custom_global" / "reference_outputs_bs1.npz")
    dataset = fixture_val_dataset(load_checkpoint(src)[1])
    out_ds, gates_ds = forward_batches(ds_model, dataset, [[0]])
    out_v1, gates_v1 = forward_batches(v1_model, dataset, [[0]])
    qid = int(ref["__qids__"][0])
    assert np.abs(out_v1[qid]["pred_logits"] - ref[f"{qid}/pred_logits"]).max() < 1e-5
    assert np.abs(out_ds[qid]["pred_logits"] - ref[f"{qid}/pred_logits"]).max() > 1e-3
    assert abs(float(gates_ds[qid].gates[(0, "mha")][0]) - float(gates_v1[qid].gates[(0, "mha")][0])) > 1e-3


@requires_fixtures
def test_v2_temperature_comes_from_the_options_and_a_wrong_one_changes_outputs(tmp_path):
    src = FIXTURES / "ckpt_v2_clipwise_film" / "model.ckpt"
    model, opt, report = load_checkpoint(src)
    assert report["gate_options"]["mha_gate_temp"] == {"value": 2.0, "source": "options"}
    assert report["fusion_variant"] == "v2" and report["gate_ranges"]["layers.0.gate_ffn"]["film"]
    ckpt = torch.load(src, map_location="cpu", weights_only=False)
    ckpt["opt"].mha_gate_temp = 1.5
    torch.save(ckpt, tmp_path / "model.ckpt")
    other, _, _ = load_checkpoint(tmp_path / "model.ckpt")
    dataset = fixture_val_dataset(opt)
    a, _ = forward_batches(model, dataset, [[0]])
    b, _ = forward_batches(other, dataset, [[0]])
    qid = next(iter(a))
    assert np.abs(a[qid]["saliency_scores"] - b[qid]["saliency_scores"]).max() > 1e-3
    # without the option the temperature is not guessed
    del ckpt["opt"].mha_gate_temp
    torch.save(ckpt, tmp_path / "model.ckpt")
    with pytest.raises(ToolkitError, match="mha_gate_temp"):
        load_checkpoint(tmp_path / "model.ckpt")


def test_bare_v2_and_ssm_state_dicts_need_the_options_weights_cannot_tell(tmp_path):
    model, _ = small_model("custom", "clipwise", seed=0, mha_gate_temp=2.0, ffn_gate_film=True)
    torch.save(model.state_dict(), tmp_path / "v2.pth")
    with pytest.raises(ToolkitError, match="mha_gate_temp"):
        load_checkpoint(tmp_path / "v2.pth", options={"nheads": 4, "fusion_n_heads": 4, "gating_type": "clipwise"})
    loaded, opt, _ = load_checkpoint(tmp_path / "v2.pth", options={"nheads": 4, "fusion_n_heads": 4,
                                                                  "gating_type": "clipwise", "mha_gate_temp": 2.0})
    assert opt.ffn_gate_film is True and loaded.fusion.fusion_layers[0].gating_function.mha_temp == 2.0
    ssm_model, _ = small_model("custom", "global_diagstrip_ssm", seed=0, **SMALL_SSM)
    torch.save(ssm_model.state_dict(), tmp_path / "ssm.pth")
    with pytest.raises(ToolkitError, match="ssm_dilations"):
        load_checkpoint(tmp_path / "ssm.pth", options={"nheads": 4, "fusion_n_heads": 4})
    _, opt, report = load_checkpoint(tmp_path / "ssm.pth", options={
        "nheads": 4, "fusion_n_heads": 4, "ssm_dilations": [1, 2], "ssm_diag_subtract": 0.1})
    assert opt.gating_type == "global_diagstrip_ssm" and opt.ssm_band_width == 3 and opt.ssm_enc_channels == 8
    assert report["gate_options"]["ssm_dilations"]["value"] == [1, 2]


def test_options_and_weights_of_different_variants_are_refused(tmp_path):
    model, opt = small_model("custom", "clipwise", seed=0, mha_gate_temp=2.0)
    for key in V2_OPTIONS:
        delattr(opt, key) if hasattr(opt, key) else None
    save_checkpoint(tmp_path / "a.ckpt", model, opt)
    with pytest.raises(ToolkitError, match="v2"):
        load_checkpoint(tmp_path / "a.ckpt")
    with pytest.raises(ToolkitError, match="different research branches|mix two research branches"):
        fusion_variant(make_options(mha_gate_temp=1.5, ssm_band_width=8))


@pytest.mark.parametrize("flags, variant, saved", [
    (["--mha_gate_temp", "2.0", "--ffn_gate_film"], "v2", V2_OPTIONS),
    (["--gating_type", "global_diagstrip_ssm", "--ssm_band_width", "2", "--ssm_enc_channels", "8",
      "--ssm_dilations", "1", "2"], "diagstrip", SSM_OPTIONS),
])
def test_training_writes_the_research_branch_options_and_monitors_every_gate(demo_data, tmp_path, flags, variant,
                                                                             saved):
    root, paths = demo_data
    results = tmp_path / "run"
    args = demo_train_args(root, results, "--n_epoch", "1", "--eval_epoch", "1", "--gate_monitor_every", "1",
                           "--gate_monitor_n", "3", "--gate_monitor_no_plots", *flags, dec_layers=1)
    assert run_main(train_main, args) == 0
    ckpt = torch.load(results / "model_latest.ckpt", map_location="cpu", weights_only=False)
    opt_json = json.loads((results / "opt.json").read_text())
    assert set(saved) <= set(vars(ckpt["opt"])) and set(saved) <= set(opt_json)
    other = SSM_OPTIONS if variant == "v2" else V2_OPTIONS
    assert not set(other) & set(vars(ckpt["opt"])) and "fusion_variant" not in opt_json
    model, opt, report = load_checkpoint(results / "model_latest.ckpt")
    assert report["fusion_variant"] == variant
    # strict load by the original rules: architecture from the saved options, Namespace allow-listed
    with torch.serialization.safe_globals([argparse.Namespace]):
        weights = torch.load(results / "model_latest.ckpt", map_location="cpu", weights_only=True)["model"]
    from qd_detr.model import build_model
    build_model(ckpt["opt"]).load_state_dict(weights, strict=True)
    import pandas as pd
    evo = pd.read_csv(results / "gate_monitor" / "gate_evolution.csv")
    assert set(evo["gate"]) == set(fusion_gate_kinds(model.fusion))
    if variant == "v2":
        assert "beta" in set(evo["gate"]) and ckpt["opt"].mha_gate_temp == 2.0
        if (FIXTURES / "ckpt_v2_clipwise_film" / "model.ckpt").is_file():
            # same key names in the same order as a checkpoint written by the original v2 code
            ref = torch.load(FIXTURES / "ckpt_v2_clipwise_film" / "model.ckpt", map_location="cpu",
                             weights_only=False)["model"]
            assert list(weights) == list(ref)
    else:
        assert opt.ssm_dilations == [1, 2] and opt.gating_type == "global_diagstrip_ssm"
        if (FIXTURES / "ckpt_ssm_diagstrip" / "model.ckpt").is_file():
            ref = torch.load(FIXTURES / "ckpt_ssm_diagstrip" / "model.ckpt", map_location="cpu",
                             weights_only=False)["model"]
            # the fixture has three dilations (encoder.net.0..15), this run two (net.0..10)
            assert [k for k in ref if not any(f"encoder.net.{i}." in k for i in (12, 15))] == list(weights)


def test_saved_options_unknown_are_listed_and_unimplemented_architecture_is_refused(tmp_path):
    model, opt = small_model("custom", "clipwise", seed=0)
    opt.my_new_flag = 3
    save_checkpoint(tmp_path / "a.ckpt", model, opt)
    assert load_checkpoint(tmp_path / "a.ckpt")[2]["unknown_options"] == ["my_new_flag"]
    opt.use_temporal_gate = True  # a research-branch fusion this toolkit does not implement
    save_checkpoint(tmp_path / "b.ckpt", model, opt)
    with pytest.raises(ToolkitError, match="use_temporal_gate=True"):
        load_checkpoint(tmp_path / "b.ckpt")
    opt.use_temporal_gate = False  # off: harmless, known
    save_checkpoint(tmp_path / "c.ckpt", model, opt)
    assert load_checkpoint(tmp_path / "c.ckpt")[2]["unknown_options"] == ["my_new_flag"]
