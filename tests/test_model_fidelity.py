"""The rebuilt model against the original research code's own outputs, and its batching semantics."""
import numpy as np
import pytest
import torch

from conftest import FIXTURE_DATA, FIXTURE_NAMES, FIXTURES, requires_fixtures, small_model
from qd_detr.checkpoint import load_checkpoint
from qd_detr.dataset import collate, model_kwargs, read_jsonl
from qd_detr.gates import GateRecorder
from qd_detr.inference import build_dataset

TOL = 1e-5


def _fixture_dataset(opt):
    d = FIXTURE_DATA
    dirs = {"v_feat_dirs": [str(d / "slowfast_features"), str(d / "clip_features")],
            "t_feat_dir": str(d / "clip_text_features"),
            "a_feat_dir": str(d / "pann_features") if opt.a_feat_dir is not None else None}
    return build_dataset(opt, read_jsonl(d / "highlight_val_release.jsonl"), dirs)


def _run(model, dataset, batches):
    """Outputs and captured gates per qid, for the given index batches."""
    outputs, gates = {}, {}
    recorder = GateRecorder(model.fusion, lambda recs: gates.update({r.sample_id: r for r in recs})) \
        if model.fusion is not None else None
    if recorder:
        recorder.attach()
    try:
        for idx in batches:
            metas, inputs = collate([dataset[i] for i in idx])
            if recorder:
                recorder.set_ids([m["qid"] for m in metas])
            with torch.no_grad():
                out = model(**model_kwargs(inputs))
            for i, m in enumerate(metas):
                outputs[m["qid"]] = {k: out[k][i].numpy() for k in ("pred_logits", "pred_spans", "saliency_scores")}
                outputs[m["qid"]]["n"] = int(inputs["src_vid_mask"][i].sum())
    finally:
        if recorder:
            recorder.detach()
    return outputs, gates


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
    dataset = _fixture_dataset(opt)
    outputs, gates = _run(model, dataset, [list(range(len(dataset)))])
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
    dataset = _fixture_dataset(opt)
    outputs, gates = _run(model, dataset, [list(range(len(dataset)))])
    worst = _max_diffs(ref, outputs, {} if model.fusion is None else gates, trim=False)
    assert all(v <= TOL for v in worst.values()), worst


@requires_fixtures
def test_original_batching_differs_from_per_query_where_the_original_is_batch_dependent():
    """The two semantics are really different for a global-gate model (padding enters the pooled gate)."""
    ref = np.load(FIXTURES / "ckpt_custom_global" / "reference_outputs_bs1.npz")
    model, opt, _ = load_checkpoint(FIXTURES / "ckpt_custom_global" / "model.ckpt", batching="original")
    dataset = _fixture_dataset(opt)
    outputs, gates = _run(model, dataset, [list(range(len(dataset)))])
    assert _max_diffs(ref, outputs, gates, trim=True)["gates"] > 1e-3


@pytest.mark.parametrize("layout,gating", [("custom", "global"), ("custom", "clipwise"),
                                           ("custom", "elementwise"), ("avigate", "global"),
                                           ("concat", None), ("video_only", None)])
def test_batched_equals_single_in_query_mode(demo_data, layout, gating):
    """Project-built models: outputs and gates of a ragged batch equal one-at-a-time runs."""
    root, paths = demo_data
    model, opt = small_model(layout, gating or "global", seed=1)
    dirs = {"v_feat_dirs": paths["v_feat_dirs"], "t_feat_dir": paths["t_feat_dir"],
            "a_feat_dir": paths["a_feat_dir"] if layout != "video_only" else None}
    dataset = build_dataset(opt, read_jsonl(paths["jsonl"]["val"]), dirs)
    lengths = dataset.ctx_lengths()
    assert len(set(lengths)) > 1, "the demo data must have ragged lengths for this test to mean anything"
    single, single_gates = _run(model, dataset, [[i] for i in range(len(dataset))])
    batched, batched_gates = _run(model, dataset, [list(range(len(dataset)))])
    for qid, out in single.items():
        n = out["n"]
        for key in ("pred_logits", "pred_spans"):
            np.testing.assert_allclose(batched[qid][key], out[key], atol=TOL, rtol=0)
        np.testing.assert_allclose(batched[qid]["saliency_scores"][:n], out["saliency_scores"][:n], atol=TOL, rtol=0)
        if model.fusion is not None:
            for key, g in single_gates[qid].gates.items():
                np.testing.assert_allclose(batched_gates[qid].gates[key], g, atol=TOL, rtol=0)
