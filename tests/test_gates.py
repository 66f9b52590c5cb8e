"""Gate capture: values against direct computation, padding, ids, firing audit and the tracking API."""
import numpy as np
import pytest
import torch

from conftest import small_model
from qd_detr.gates import GateCaptureError, GateRecorder
from qd_detr.model import NoFusionError


def _inputs(opt, lengths, seed=0):
    """A ragged batch (padding rows zero, masks 1 = valid), as the collate function builds it."""
    g = torch.Generator().manual_seed(seed)
    b, lmax = len(lengths), max(lengths)
    vid = torch.randn(b, lmax, opt.v_feat_dim, generator=g)
    aud = torch.rand(b, lmax, opt.a_feat_dim, generator=g)
    txt = torch.randn(b, 5, opt.t_feat_dim, generator=g)
    mask = torch.zeros(b, lmax)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    vid, aud = vid * mask[..., None], aud * mask[..., None]
    txt_mask = torch.ones(b, 5)
    txt_mask[0, 3:] = 0
    return dict(src_txt=txt, src_txt_mask=txt_mask, src_vid=vid, src_vid_mask=mask, src_aud=aud, src_aud_mask=mask)


def _manual_gates(model, inputs):
    """Gates computed by hand from the gating MLP weights, layer by layer (numpy, float64)."""
    fusion = model.fusion
    mask = inputs["src_vid_mask"]
    with torch.no_grad():
        v = model.input_vid_proj(inputs["src_vid"])
        a = model.input_aud_proj(inputs["src_aud"])
    out = []
    for block in fusion.fusion_layers:
        gf = block.gating_function
        vn, an, m = v.double().numpy(), a.double().numpy(), mask.double().numpy()
        if gf.gating_type == "global":  # valid-clip mean (query semantics)
            joint = np.concatenate([(vn * m[..., None]).sum(1) / m.sum(1, keepdims=True),
                                    (an * m[..., None]).sum(1) / m.sum(1, keepdims=True)], -1)
        else:
            joint = np.concatenate([vn, an], -1)
        layer = {}
        for kind, mlp in (("mha", gf.mlp_mha), ("ffn", gf.mlp_ffn)):
            w1, b1 = mlp[0].weight.double().detach().numpy(), mlp[0].bias.double().detach().numpy()
            w2, b2 = mlp[2].weight.double().detach().numpy(), mlp[2].bias.double().detach().numpy()
            layer[kind] = np.tanh(np.maximum(joint @ w1.T + b1, 0) @ w2.T + b2)
        out.append(layer)
        with torch.no_grad():
            v = block(v, a, mask)
    return out


@pytest.mark.parametrize("gating", ["global", "clipwise", "elementwise"])
def test_recorded_gates_equal_direct_computation_with_padding_excluded(gating):
    model, opt = small_model("custom", gating)
    lengths = [7, 4, 9]
    inputs = _inputs(opt, lengths)
    got = {}
    with GateRecorder(model.fusion, lambda recs: got.update({r.sample_id: r for r in recs})) as rec:
        rec.set_ids([101, 102, 103])
        with torch.no_grad():
            model(**inputs)
    manual = _manual_gates(model, inputs)
    assert sorted(got) == [101, 102, 103]
    for i, (qid, n) in enumerate(zip([101, 102, 103], lengths)):
        assert got[qid].n_clips == n
        for layer, kinds in enumerate(manual):
            for kind, want in kinds.items():
                g = got[qid].gates[(layer, kind)]
                assert g.dtype == np.float32
                if gating == "global":
                    assert g.shape == (1,)  # stored once, not broadcast
                    np.testing.assert_allclose(g, want[i], atol=2e-6)
                elif gating == "clipwise":
                    assert g.shape == (n,)
                    np.testing.assert_allclose(g, want[i, :n, 0], atol=2e-6)
                else:
                    assert g.shape == (n, 256)
                    np.testing.assert_allclose(g, want[i, :n], atol=2e-6)
                assert np.all(np.abs(g) <= 1)


def test_legacy_layout_gates_are_one_per_query():
    model, opt = small_model("avigate")
    got = {}
    with GateRecorder(model.fusion, lambda recs: got.update({r.sample_id: r for r in recs})) as rec:
        rec.set_ids(["a", "b"])
        with torch.no_grad():
            model(**_inputs(opt, [6, 3]))
    assert set(got) == {"a", "b"}
    assert got["b"].gates[(0, "mha")].shape == (1,) and got["b"].n_clips == 3
    assert len(got["a"].gates) == 2  # one fusion layer, two gates


def test_firing_audit_fails_loudly_when_a_hook_fires_twice():
    model, opt = small_model("custom", "clipwise")
    block = model.fusion.fusion_layers[0]
    original = block.forward

    def twice(v, a, video_mask=None, audio_mask=None):
        block.gating_function(v, a, video_mask=video_mask)  # an extra gating call the audit must catch
        return original(v, a, video_mask, audio_mask)

    block.forward = twice
    with GateRecorder(model.fusion, lambda recs: None):
        with pytest.raises(GateCaptureError, match="fired"):
            with torch.no_grad():
                model(**_inputs(opt, [5, 5]))


def test_recorder_leaves_outputs_and_state_dict_unchanged():
    model, opt = small_model("custom", "elementwise")
    inputs = _inputs(opt, [8, 5])
    keys_before = list(model.state_dict())
    with torch.no_grad():
        plain = model(**inputs)
    with GateRecorder(model.fusion, lambda recs: None, capture_contributions=True):
        with torch.no_grad():
            tracked = model(**inputs)
    assert list(model.state_dict()) == keys_before
    for key in ("pred_logits", "pred_spans", "saliency_scores"):
        assert torch.equal(plain[key], tracked[key])


def test_tracking_api_in_train_mode_with_grad_stores_detached_copies():
    model, opt = small_model("custom", "clipwise")
    fusion = model.avigate_fusion
    assert fusion is model.fusion and "avigate_fusion" not in "".join(model.state_dict())
    fusion.enable_gate_tracking()
    model.train()
    fusion.set_current_sample_id(["q1", "q2"])
    out = model(**_inputs(opt, [6, 4]))
    out["pred_logits"].sum().backward()  # tracking must not interfere with training
    rec = fusion.gate_history["q2"]
    assert isinstance(rec.gates[(1, "ffn")], np.ndarray) and rec.gates[(1, "ffn")].shape == (4,)
    stats = fusion.get_gate_statistics("q2")
    assert stats["layers.1.gate_ffn"]["count"] == 4
    overall = fusion.get_gate_statistics()
    assert overall["layers.0.gate_mha"]["count"] == 10 and overall["layers.0.gate_mha"]["n_samples"] == 2
    fusion.disable_gate_tracking()
    with torch.no_grad():
        model(**_inputs(opt, [3]))
    assert len(fusion.gate_history) == 2  # nothing recorded while disabled
    with pytest.raises(KeyError):
        fusion.get_gate_statistics("missing")


def test_single_id_with_batch_names_each_element():
    model, opt = small_model("custom", "global")
    fusion = model.avigate_fusion.enable_gate_tracking()
    fusion.set_current_sample_id("batch7")
    with torch.no_grad():
        model(**_inputs(opt, [4, 4, 2]))
    assert list(fusion.gate_history) == ["batch7/0", "batch7/1", "batch7/2"]


def test_model_without_fusion_has_no_gates():
    model, _ = small_model("video_only")
    assert model.fusion is None
    with pytest.raises(NoFusionError, match="no audio-visual fusion module"):
        model.avigate_fusion
