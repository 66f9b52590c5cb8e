"""Interventions (gate clamps, audio zero/swap) and effective contributions, on cases with known answers."""
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import analysis_config, demo_dataset, interrupted_after, ragged_batch, small_checkpoint, small_model
from gate_analysis.ablation import CSV_COLUMNS, compare_predictions, run_ablation
from gate_analysis.contributions import ContributionWriter, load_contributions
from gate_analysis.interventions import (
    AudioInterventionDataset,
    Intervention,
    clamp_gates,
    dataset_mean_gates,
    parse_interventions,
    reference_intervention,
    run_intervention,
    swap_sources,
)
from gate_analysis.stats import GateStatsAccumulator
from qd_detr.dataset import collate, model_kwargs, read_jsonl
from qd_detr.errors import ConfigError
from qd_detr.gates import GateRecorder
from qd_detr.inference import evaluate, make_batches, predict


def _batch(dataset, idx):
    return model_kwargs(collate([dataset[i] for i in idx])[1])


def _forward(model, inputs):
    with torch.no_grad():
        return model(**inputs)


@pytest.fixture(scope="module")
def clipwise(demo_data):
    _, paths = demo_data
    model, opt = small_model("custom", "clipwise", seed=1)
    return model, opt, demo_dataset(opt, paths), paths


def test_parse_interventions_grammar_and_errors():
    ivs = parse_interventions(["zero", "mean", "audio_swap"], ["all", "1"], ["both", "mha"], num_layers=2)
    assert [iv.name for iv in ivs] == ["zero@all:both", "zero@all:mha", "zero@1:both", "zero@1:mha", "mean@all:both",
                                       "mean@all:mha", "mean@1:both", "mean@1:mha", "audio_swap"]
    assert ivs[0].audio_off and not ivs[1].audio_off and ivs[-1].audio_off and ivs[-1].target == "audio"
    assert reference_intervention(ivs).name == "zero@all:both"
    assert reference_intervention([Intervention("one"), Intervention("audio_swap"), Intervention("audio_zero")]).name \
        == "audio_zero"
    with pytest.raises(ConfigError, match="layer 2 does not exist"):
        parse_interventions(["zero"], ["2"], num_layers=2)
    with pytest.raises(ConfigError, match="unknown intervention"):
        parse_interventions(["half"])
    with pytest.raises(ConfigError, match="'all' or a layer index"):
        parse_interventions(["one"], ["first"], num_layers=2)


def test_clamp_context_restores_the_model_exactly(clipwise):
    model, opt, dataset, _ = clipwise
    inputs = _batch(dataset, [0, 3, 5])  # ragged: padding present
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = _forward(model, inputs)
    hooks_before = [len(b.gating_function._forward_hooks) for b in model.fusion.fusion_layers]
    seen = {}
    with GateRecorder(model.fusion, lambda recs: seen.update({r.sample_id: r for r in recs})) as rec:
        with clamp_gates(model.fusion, {(0, "mha"): 0.0, (1, "ffn"): -1.0}):
            rec.set_ids(["a", "b", "c"])
            during = _forward(model, inputs)
    assert not torch.equal(during["saliency_scores"], before["saliency_scores"])  # the clamp acts
    for r in seen.values():  # the recorder sees the effective (clamped) gates; others untouched
        assert np.all(r.gates[(0, "mha")] == 0) and np.all(r.gates[(1, "ffn")] == -1)
        assert np.ptp(r.gates[(0, "ffn")]) > 0
    with pytest.raises(RuntimeError, match="boom"):
        with clamp_gates(model.fusion, {(1, "mha"): 1.0}):
            raise RuntimeError("boom")
    after = _forward(model, inputs)
    for key in ("pred_logits", "pred_spans", "saliency_scores"):
        assert torch.equal(after[key], before[key]), key  # bitwise
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert [len(b.gating_function._forward_hooks) for b in model.fusion.fusion_layers] == hooks_before


def test_mean_clamp_uses_per_dim_dataset_means_for_elementwise(demo_data):
    _, paths = demo_data
    model, opt = small_model("custom", "elementwise", seed=2)
    dataset = demo_dataset(opt, paths, n=4)
    acc = GateStatsAccumulator("elementwise", 2)
    with GateRecorder(model.fusion, lambda recs: [acc.update(r.sample_id, r.gates) for r in recs]) as rec:
        for i in range(len(dataset)):
            rec.set_ids([dataset.records[i]["qid"]])
            _forward(model, _batch(dataset, [i]))
    means = dataset_mean_gates(acc)
    assert means[(1, "ffn")].shape == (256,) and means[(1, "ffn")].dtype == np.float32
    dims = acc.dim_stats()
    np.testing.assert_allclose(means[(0, "mha")], dims[(dims.layer == 0) & (dims.gate == "mha")]["mean"], rtol=1e-6)
    got = {}
    with GateRecorder(model.fusion, lambda recs: got.update({r.sample_id: r for r in recs})) as rec:
        with clamp_gates(model.fusion, {k: v for k, v in means.items()}):
            rec.set_ids(["x", "y"])
            _forward(model, _batch(dataset, [0, 1]))
    for r in got.values():
        assert r.gates[(0, "mha")].shape == (r.n_clips, 256)
        np.testing.assert_array_equal(r.gates[(0, "mha")], np.broadcast_to(means[(0, "mha")], (r.n_clips, 256)))


def test_audio_datasets_zero_and_swap(clipwise):
    model, opt, dataset, _ = clipwise
    zero = AudioInterventionDataset(dataset, "audio_zero")
    swap = AudioInterventionDataset(dataset, "audio_swap", seed=3)
    src = swap_sources(dataset.records, seed=3)
    assert all(src[v] != v for v in src) and sorted(src.values()) == sorted(src)  # a derangement of the videos
    for i in (0, 5):
        orig = dataset[i]["model_inputs"]["audio_feat"]
        z = zero[i]["model_inputs"]["audio_feat"]
        s = swap[i]["model_inputs"]["audio_feat"]
        assert z.shape == s.shape == orig.shape
        assert torch.all(z[:, :-2] == 0) and torch.equal(z[:, -2:], orig[:, -2:])  # TEF kept
        other = dataset.load_audio(src[dataset.records[i]["vid"]])
        rows = torch.arange(len(orig)) % len(other)
        assert torch.equal(s[:, :-2], other[rows]) and torch.equal(s[:, -2:], orig[:, -2:])
        assert torch.equal(dataset[i]["model_inputs"]["audio_feat"], orig)  # the base dataset is untouched
    with pytest.raises(ConfigError, match="two different videos"):
        swap_sources([{"vid": "a"}, {"vid": "a"}])


def _mute_audio_branch(model):
    """Audio can no longer matter: the audio branch outputs 0 and the projected audio is a constant."""
    with torch.no_grad():
        for block in model.fusion.fusion_layers:
            block.out_proj.weight.zero_()
            block.out_proj.bias.zero_()
        model.input_aud_proj[-1].net[1].weight.zero_()
    return model


def test_zero_audio_branch_means_zero_ablation_effect(demo_data):
    _, paths = demo_data
    model, opt = small_model("custom", "clipwise", seed=4)
    dataset = demo_dataset(opt, paths)
    batches = make_batches(dataset, "query", 4, opt)
    ivs = parse_interventions(["zero", "one", "minus_one", "mean", "audio_zero", "audio_swap"], ["all"], ["mha"], 2)
    means = {(l, k): 0.3 for l in range(2) for k in ("mha", "ffn")}
    # the same model with audio: switching audio off changes predictions (so the test below can fail)
    base = predict(model, dataset, batches, "cpu", progress=False)
    pq, ov, _ = run_ablation(model, dataset, batches, "cpu", ivs[:1] + ivs[-2:-1], base, gate_means=means)
    assert (pq["saliency_mean_abs_change"] > 0).all()
    _mute_audio_branch(model)
    base = predict(model, dataset, batches, "cpu", progress=False)
    pq, ov, info = run_ablation(model, dataset, batches, "cpu", ivs, base, gate_means=means)
    assert set(pq["intervention"]) == {iv.name for iv in ivs} and len(pq) == len(ivs) * len(dataset)
    assert (pq["top1_window_iou_vs_base"] == 1).all() and (pq["saliency_mean_abs_change"] == 0).all()
    deltas = pq[[c for c in pq.columns if c.startswith("delta_")]].to_numpy(float)
    assert np.isfinite(deltas).all() and np.all(deltas == 0)
    official = ov[ov["metric"] == "MR-full-mAP"]
    assert len(official) == len(ivs) and (official["delta"] == 0).all()


def test_compare_predictions_and_overall_by_hand(clipwise, tmp_path):
    model, opt, dataset, _ = clipwise
    batches = make_batches(dataset, "query", 4, opt)
    base = predict(model, dataset, batches, "cpu", progress=False)
    iv = Intervention("zero")
    lines, _ = run_intervention(model, dataset, batches, "cpu", iv)
    pq, ov, info = run_ablation(model, dataset, batches, "cpu", [iv], base, output_dir=tmp_path)
    for name in ("ablation.csv", "ablation_overall.csv"):
        assert list(pd.read_csv(tmp_path / name).columns) == list(CSV_COLUMNS[name])
    saved = read_jsonl(tmp_path / "ablation" / "zero_all_both.jsonl", required=("qid",))
    assert saved == lines  # the ablation run is deterministic and stored
    b, a = evaluate(base, dataset.records)["brief"], evaluate(lines, dataset.records)["brief"]
    row = ov[ov["metric"] == "MR-full-mAP"].iloc[0]
    assert row["baseline"] == b["MR-full-mAP"] and row["ablated"] == a["MR-full-mAP"]
    assert row["delta"] == pytest.approx(a["MR-full-mAP"] - b["MR-full-mAP"], abs=1e-9)
    # one query by hand: top-1 window IoU between the two runs and the mean |saliency change|
    q = base[2]
    other = next(l for l in lines if l["qid"] == q["qid"])
    (s1, e1), (s2, e2) = q["pred_relevant_windows"][0][:2], other["pred_relevant_windows"][0][:2]
    inter, union = max(0, min(e1, e2) - max(s1, s2)), max(e1, e2) - min(s1, s2)
    r = pq[pq["qid"] == q["qid"]].iloc[0]
    assert r["top1_window_iou_vs_base"] == pytest.approx(inter / union)
    assert r["saliency_mean_abs_change"] == pytest.approx(
        np.abs(np.subtract(other["pred_saliency_scores"], q["pred_saliency_scores"])).mean())
    mean_iou = ov[ov["metric"] == "mean_top1_iou"].iloc[0]
    assert mean_iou["n_improved"] + mean_iou["n_worsened"] + mean_iou["n_unchanged"] == len(dataset)
    assert mean_iou["delta"] == pytest.approx(pq["delta_top1_iou"].mean())
    same = compare_predictions(iv, base, base, dataset.records)
    assert (same["top1_window_iou_vs_base"] == 1).all() and (same["delta_mr_ap"] == 0).all()


@pytest.mark.parametrize("layout,gating", [("custom", "clipwise"), ("custom", "elementwise"), ("custom", "global"),
                                           ("avigate", "global")])
def test_recorded_contributions_equal_a_hand_computation(layout, gating):
    model, opt = small_model(layout, gating, seed=5)
    inputs = ragged_batch(opt, [7, 4, 6])
    got = {}
    with GateRecorder(model.fusion, lambda recs: got.update({r.sample_id: r for r in recs}),
                      capture_contributions=True) as rec:
        rec.set_ids([0, 1, 2])
        _forward(model, inputs)
    mask = inputs["src_vid_mask"]
    with torch.no_grad():
        if layout == "custom":
            v, a = model.input_vid_proj(inputs["src_vid"]), model.input_aud_proj(inputs["src_aud"])
        else:
            v, a = model.fusion.video_proj(inputs["src_vid"]), model.fusion.audio_proj(inputs["src_aud"])
        for layer, block in enumerate(model.fusion.fusion_layers):
            g_mha, g_ffn = block.gating_function(v, a, video_mask=mask)
            if g_mha.dim() == 2:
                g_mha, g_ffn = g_mha[..., None], g_ffn[..., None]
            branch = block.audio_branch(a) if layout == "custom" else block.audio_branch(v, a, mask)
            z = g_mha * branch + v
            f = block.ffn1(block.norm2(z))
            want_mha = (g_mha * branch).double().norm(dim=-1) / v.double().norm(dim=-1)
            want_ffn = (g_ffn * f).double().norm(dim=-1) / z.double().norm(dim=-1)
            for i, n in enumerate([7, 4, 6]):
                c = got[i].contributions
                assert c[(layer, "mha")].shape == (n,)
                np.testing.assert_allclose(c[(layer, "mha")], want_mha[i, :n].numpy(), rtol=1e-4, atol=1e-6)
                np.testing.assert_allclose(c[(layer, "ffn")], want_ffn[i, :n].numpy(), rtol=1e-4, atol=1e-6)
            v = block(v, a, mask, mask)
    assert all(np.all(c > 0) for r in got.values() for c in r.contributions.values())


def test_contribution_writer_streams_and_resumes(clipwise, tmp_path):
    model, opt, dataset, _ = clipwise
    records = []
    with GateRecorder(model.fusion, records.extend, capture_contributions=True) as rec:
        rec.set_ids([dataset.records[i]["qid"] for i in (0, 1, 2)])
        _forward(model, _batch(dataset, [0, 1, 2]))
    w = ContributionWriter(tmp_path)
    for r in records[:2]:
        w.add(r, "vidA")
    w.close()  # interrupted: only the first query's batch "completed"
    with open(tmp_path / "gate_contributions.partial.csv", "a") as fh:
        fh.write("999,cut")  # a line cut by the interruption
    w = ContributionWriter(tmp_path, keep_qids={records[0].sample_id})
    w.add(records[2], "vidC")
    path = w.finish()
    df = load_contributions(tmp_path)
    assert path.endswith("gate_contributions.csv") and list(df.columns) == list(CSV_COLUMNS["gate_contributions.csv"])
    assert list(dict.fromkeys(df["qid"])) == [records[0].sample_id, records[2].sample_id]
    r = records[2]
    sel = df[(df["qid"] == r.sample_id) & (df["layer"] == 1) & (df["gate"] == "mha")]
    assert list(sel["clip"]) == list(range(r.n_clips)) and (sel["n_clips"] == r.n_clips).all()
    np.testing.assert_allclose(sel["contribution"], r.contributions[(1, "mha")], rtol=1e-6)
    np.testing.assert_allclose(sel["gate_value"], r.gates[(1, "mha")], rtol=1e-6)
    np.testing.assert_allclose(sel["gate_abs"], np.abs(r.gates[(1, "mha")]), rtol=1e-6)


def test_contributions_survive_an_interrupted_and_resumed_run(demo_data, tmp_path, monkeypatch):
    from gate_analysis import pipeline
    from gate_analysis.pipeline import run_analysis
    from qd_detr import inference
    _, paths = demo_data
    ckpt, _, _ = small_checkpoint(tmp_path / "model.ckpt", "custom", "clipwise", seed=8)

    def config(out, **kw):
        return analysis_config(ckpt, paths, out, batch_size=2, batching="query", no_plots=True, **kw)

    full, broken, plain = tmp_path / "full", tmp_path / "broken", tmp_path / "plain"
    for d in (full, broken, plain):
        d.mkdir()
    run_analysis(config(full, contributions=True), progress=False, log=lambda m: None)
    real = inference.iterate_batches
    monkeypatch.setattr(pipeline, "iterate_batches", interrupted_after(real, 2))
    for out, kw in ((broken, {"contributions": True}), (plain, {})):
        with pytest.raises(KeyboardInterrupt):
            run_analysis(config(out, **kw), progress=False, log=lambda m: None)
    assert (broken / "gate_contributions.partial.csv").exists() and not (broken / "gate_contributions.csv").exists()
    monkeypatch.setattr(pipeline, "iterate_batches", real)
    run_analysis(config(broken, contributions=True, resume=True), progress=False, log=lambda m: None)
    assert (broken / "gate_contributions.csv").read_text() == (full / "gate_contributions.csv").read_text()
    assert not (broken / "gate_contributions.partial.csv").exists()
    with pytest.raises(ConfigError, match="started without it"):
        run_analysis(config(plain, contributions=True, resume=True), progress=False, log=lambda m: None)
