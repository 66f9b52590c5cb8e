"""Gate capture: values against direct computation, padding, ids, firing audit and the tracking API."""
import json

import numpy as np
import pytest
import torch

from conftest import demo_dataset, ragged_batch, small_model
from qd_detr.gates import GateCaptureError, GateRecorder
from qd_detr.model import NoFusionError


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
    inputs = ragged_batch(opt, lengths)
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
            model(**ragged_batch(opt, [6, 3]))
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
                model(**ragged_batch(opt, [5, 5]))


def test_recorder_leaves_outputs_and_state_dict_unchanged():
    model, opt = small_model("custom", "elementwise")
    inputs = ragged_batch(opt, [8, 5])
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
    out = model(**ragged_batch(opt, [6, 4]))
    out["pred_logits"].sum().backward()  # tracking must not interfere with training
    rec = fusion.gate_history["q2"]
    assert isinstance(rec.gates[(1, "ffn")], np.ndarray) and rec.gates[(1, "ffn")].shape == (4,)
    stats = fusion.get_gate_statistics("q2")
    assert stats["layers.1.gate_ffn"]["count"] == 4
    overall = fusion.get_gate_statistics()
    assert overall["layers.0.gate_mha"]["count"] == 10 and overall["layers.0.gate_mha"]["n_samples"] == 2
    fusion.disable_gate_tracking()
    with torch.no_grad():
        model(**ragged_batch(opt, [3]))
    assert len(fusion.gate_history) == 2  # nothing recorded while disabled
    with pytest.raises(KeyError):
        fusion.get_gate_statistics("missing")


def test_single_id_with_batch_names_each_element():
    model, opt = small_model("custom", "global")
    fusion = model.avigate_fusion.enable_gate_tracking()
    fusion.set_current_sample_id("batch7")
    with torch.no_grad():
        model(**ragged_batch(opt, [4, 4, 2]))
    assert list(fusion.gate_history) == ["batch7/0", "batch7/1", "batch7/2"]


def test_model_without_fusion_has_no_gates():
    model, _ = small_model("video_only")
    assert model.fusion is None
    with pytest.raises(NoFusionError, match="no audio-visual fusion module"):
        model.avigate_fusion


# ------------------------------------------------------------------------------------------ engine
def test_engine_sink_captures_what_a_recorder_around_the_loop_captures(demo_data):
    """iterate_batches(sink=...) names records by qid, pauses them in exact re-runs, leaves outputs as they are."""
    from qd_detr.batching import make_batches
    from qd_detr.engine import iterate_batches
    model, opt = small_model("custom", "clipwise", seed=1)
    dataset = demo_dataset(opt, demo_data[1])
    batches = make_batches(dataset, "query", 4)
    kw = dict(progress=False, exact=True)
    manual, engine, stats = {}, {}, {}
    with GateRecorder(model.fusion, lambda recs: manual.update({r.sample_id: r for r in recs})) as rec:
        plain = [o for _, _, o in iterate_batches(model, dataset, batches, "cpu", suspend=rec.paused,
                                                  before_forward=lambda m, _: rec.set_ids([x["qid"] for x in m]),
                                                  **kw)]
    got = [o for _, _, o in iterate_batches(model, dataset, batches, "cpu", stats=stats,
                                            sink=lambda recs: engine.update({r.sample_id: r for r in recs}), **kw)]
    assert sorted(engine) == sorted(manual) == sorted(dataset.qids)
    for qid in manual:
        for key, gate in manual[qid].gates.items():
            assert np.array_equal(gate, engine[qid].gates[key])
    for a, b in zip(plain, got):
        assert all(torch.equal(a[k], b[k]) for k in ("pred_logits", "pred_spans", "saliency_scores"))
    assert not model.fusion.gate_tracking_enabled and "exact_reruns" in stats


def test_run_batches_restores_mode_and_pauses_user_tracking(demo_data):
    from qd_detr.batching import collated_batches, sequential_batches
    from qd_detr.engine import capture_gates
    model, opt = small_model("custom", "elementwise", seed=2)
    dataset = demo_dataset(opt, demo_data[1])
    fusion = model.fusion.enable_gate_tracking()
    model.train()
    got = {}
    batches = (([m["qid"] for m in metas], inputs)
               for metas, inputs in collated_batches(dataset, sequential_batches(len(dataset), 5)))
    n = capture_gates(model, batches, lambda recs: got.update({r.sample_id: r for r in recs}),
                      capture_contributions=True)
    assert n == -(-len(dataset) // 5) and sorted(got) == sorted(dataset.qids)
    assert model.training and fusion.gate_tracking_enabled and fusion.gate_history == {}
    rec = got[dataset.qids[0]]
    assert rec.gates[(0, "mha")].shape == (rec.n_clips, model.hidden_dim)
    assert rec.contributions[(0, "mha")].shape == (rec.n_clips,)
    fusion.disable_gate_tracking()


def test_tracking_api_writes_statistics_and_the_comparison_plot(tmp_path):
    model, opt = small_model("custom", "clipwise")
    fusion = model.fusion.enable_gate_tracking()
    fusion.set_current_sample_id([11, 12])
    with torch.no_grad():
        model(**ragged_batch(opt, [6, 3]))
    paths = fusion.save_gate_analysis(tmp_path / "out")
    saved = json.loads(open(paths["statistics"]).read())
    assert saved["gating_type"] == "clipwise" and saved["statistics"]["layers.0.gate_mha"]["n_samples"] == 2
    assert paths["plot"].endswith("gate_comparison.png") and open(paths["plot"], "rb").read(4) == b"\x89PNG"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gate_comparison.png", "gate_statistics_all.json"]


def test_an_extension_that_cannot_be_imported_is_a_clear_error():
    from qd_detr.errors import ConfigError
    from qd_detr.extensions import load_extension
    with pytest.raises(ConfigError, match="compare_samples_gates .* needs the analysis package .no_such_pkg_xyz"):
        load_extension("no_such_pkg_xyz.plots:plot", "compare_samples_gates (a plot)")
    with pytest.raises(ConfigError, match="has no nothing_here"):
        load_extension("qd_detr.gates:nothing_here", "test")
