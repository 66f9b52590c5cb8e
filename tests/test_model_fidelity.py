"""The rebuilt model against the original research code's own outputs, and its batching semantics."""
import numpy as np
import pytest
import torch

from conftest import (
    FIXTURE_NAMES,
    FIXTURES,
    SMALL_SSM,
    demo_dataset,
    fixture_val_dataset,
    forward_batches,
    requires_fixtures,
    small_model,
)
from qd_detr.checkpoint import load_checkpoint

TOL = 1e-5


def _max_diffs(ref, outputs, gates, trim):
    worst = {}
    for qid, out in outputs.items():
        n = out["n"] if trim else None
        for key in ("pred_logits", "pred_spans", "saliency_scores"):
            want = ref[f"{qid}/{key}"]
            got = out[key][:n] if key == "saliency_scores" and trim else out[key]
            worst[key] = max(worst.get(key, 0.0), float(np.abs(got - want[:len(got)]).max()))
        for (layer, kind), g in getattr(gates.get(qid), "gates", {}).items():
            want = ref[f"{qid}/layer{layer}/gate_{kind}"]
            want = want.reshape(-1) if want.shape[-1] == 1 or want.ndim == 1 else want
            if want.shape[0] == len(out["saliency_scores"]) and g.shape[0] != want.shape[0]:
                want = want[:g.shape[0]]  # batched per-clip reference keeps the padded clips
            worst["gates"] = max(worst.get("gates", 0.0), float(np.abs(g.reshape(want.shape) - want).max()))
    return worst


@requires_fixtures
@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_per_query_semantics_equal_batch_size_one(name):
    """Batched in 'query' mode (ragged lengths in one batch), every query equals the bs1 reference."""
    model, opt, report = load_checkpoint(FIXTURES / name / "model.ckpt")
    assert report["keys"]["missing"] == 0 and report["keys"]["unexpected"] == 0
    ref = np.load(FIXTURES / name / "reference_outputs_bs1.npz")
    dataset = fixture_val_dataset(opt)
    outputs, gates = forward_batches(model, dataset, [list(range(len(dataset)))])
    worst = _max_diffs(ref, outputs, gates, trim=True)
    assert set(outputs) == {int(q) for q in ref["__qids__"]}
    assert all(v <= TOL for v in worst.values()), worst
    if model.fusion is not None:
        assert "gates" in worst


@requires_fixtures
@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_original_batching_reproduces_original_batch(name):
    """'original' mode reproduces the original batched outputs (quirks included) for the batch of 16."""
    model, opt, _ = load_checkpoint(FIXTURES / name / "model.ckpt", batching="original")
    ref = np.load(FIXTURES / name / "reference_outputs_batched.npz")
    dataset = fixture_val_dataset(opt)
    outputs, gates = forward_batches(model, dataset, [list(range(len(dataset)))])
    worst = _max_diffs(ref, outputs, {} if model.fusion is None else gates, trim=False)
    assert all(v <= TOL for v in worst.values()), worst


@requires_fixtures
def test_original_batching_differs_from_per_query_where_the_original_is_batch_dependent():
    """The two semantics are really different for a global-gate model (padding enters the pooled gate)."""
    ref = np.load(FIXTURES / "ckpt_custom_global" / "reference_outputs_bs1.npz")
    model, opt, _ = load_checkpoint(FIXTURES / "ckpt_custom_global" / "model.ckpt", batching="original")
    dataset = fixture_val_dataset(opt)
    outputs, gates = forward_batches(model, dataset, [list(range(len(dataset)))])
    assert _max_diffs(ref, outputs, gates, trim=True)["gates"] > 1e-3


V2_FILM = dict(mha_gate_temp=2.0, ffn_gate_film=True)


@pytest.mark.parametrize("layout,gating,extra", [
    ("custom", "global", {}), ("custom", "clipwise", {}), ("custom", "elementwise", {}), ("avigate", "global", {}),
    ("concat", None, {}), ("video_only", None, {}), ("custom", "global", V2_FILM), ("custom", "elementwise", V2_FILM),
    ("custom", "global", dict(mha_gate_temp=1.5)), ("custom", "global_diagstrip_ssm", SMALL_SSM),
    ("custom", "global", dict(SMALL_SSM))])
def test_batched_equals_single_in_query_mode(demo_data, layout, gating, extra):
    """Project-built models: outputs and gates of a ragged batch equal one-at-a-time runs."""
    root, paths = demo_data
    model, opt = small_model(layout, gating or "global", seed=1, **extra)
    dataset = demo_dataset(opt, paths, audio=layout != "video_only")
    lengths = dataset.ctx_lengths()
    assert len(set(lengths)) > 1, "the demo data must have ragged lengths for this test to mean anything"
    single, single_gates = forward_batches(model, dataset, [[i] for i in range(len(dataset))])
    batched, batched_gates = forward_batches(model, dataset, [list(range(len(dataset)))])
    for qid, out in single.items():
        n = out["n"]
        for key in ("pred_logits", "pred_spans"):
            np.testing.assert_allclose(batched[qid][key], out[key], atol=TOL, rtol=0)
        np.testing.assert_allclose(batched[qid]["saliency_scores"][:n], out["saliency_scores"][:n], atol=TOL, rtol=0)
        if model.fusion is not None:
            for key, g in single_gates[qid].gates.items():
                np.testing.assert_allclose(batched_gates[qid].gates[key], g, atol=TOL, rtol=0)


def _outputs_for(probs, spans):
    """Model outputs whose foreground probabilities are ``probs`` [B, nq] and spans (cx, w) ``spans``."""
    p = torch.tensor(probs, dtype=torch.float64)
    logits = torch.stack([p.log(), (1 - p).log()], -1).float()
    return {"pred_logits": logits, "pred_spans": torch.tensor(spans, dtype=torch.float32)}


def test_ambiguous_rows_flags_exactly_the_rows_noise_could_change():
    from qd_detr.postprocess import PROB_NOISE, ambiguous_rows
    clear = [0.9, 0.7, 0.5, 0.3]
    spans = [[0.3, 0.2]] * 4                                 # windows 15-45 s of 150 s: far from odd seconds
    near_odd_second = [[0.3, 0.2], [0.3, 0.2], [(31 + 1e-5) / 150 - 0.05, 0.1], [0.3, 0.2]]  # an end at 31.00001 s
    probs = [clear,
             [0.9, 0.7, 0.7 + PROB_NOISE / 4, 0.3],       # near tie: rank order undecided
             [0.9, 0.7, 0.12345 + PROB_NOISE / 4, 0.3],   # next to a 4-decimal rounding boundary
             clear,                                       # window end next to a 2 s rounding boundary
             [0.9, 0.7, 0.7 + 50 * PROB_NOISE, 0.3]]      # close, but well outside the noise
    all_spans = [spans, spans, spans, near_odd_second, spans]
    assert ambiguous_rows([{"duration": 150}] * 5, _outputs_for(probs, all_spans)) == [1, 2, 3]


# (global, 1): on the development machine one query's windows differ without the exact re-runs.
@pytest.mark.parametrize("gating,seed", [("global", 1), ("elementwise", 3)])
def test_batched_predictions_equal_batch_size_one(demo_data, gating, seed):
    """predict() on one ragged batch writes the windows and scores of one-query-at-a-time runs;
    saliency (float16, not re-run) within one float16 step, or 1e-6 near zero where steps are tiny."""
    from qd_detr.inference import predict
    root, paths = demo_data
    model, opt = small_model("custom", gating, seed=seed)
    model.set_batching("query")
    dataset = demo_dataset(opt, paths)
    device = torch.device("cpu")
    alone = predict(model, dataset, [[i] for i in range(len(dataset))], device, progress=False)
    stats = {}
    batched = predict(model, dataset, [list(range(len(dataset)))], device, progress=False, stats=stats)
    assert stats["exact_reruns"] > 0, "this model/data pair is chosen to exercise the exact re-runs"
    assert [line["qid"] for line in batched] == [line["qid"] for line in alone]
    for got, want in zip(batched, alone):
        assert got["pred_relevant_windows"] == want["pred_relevant_windows"], got["qid"]
        g, w = np.float16(got["pred_saliency_scores"]), np.float16(want["pred_saliency_scores"])
        assert np.all(np.abs(g.astype(np.float64) - w) <= np.maximum(np.spacing(np.abs(w)), 1e-6)), got["qid"]
