"""Gates vs annotations: rank AUROC, labels per clip, and gates that follow the labels by construction."""
import numpy as np
import pytest
import torch
from scipy import stats

from conftest import demo_dataset, small_model
from gate_analysis.ground_truth import (
    CSV_COLUMNS,
    GLOBAL_NOTE,
    clip_labels,
    ground_truth_tables,
    plot_ground_truth,
    write_ground_truth,
)
from gate_analysis.rank_stats import auroc, midranks
from gate_analysis.store import GateStoreWriter, load_gate_run
from qd_detr.dataset import collate, model_kwargs, read_jsonl
from qd_detr.gates import GateRecorder


@pytest.mark.parametrize("scores,labels,want", [
    ([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], 0.75),        # the classic example: 3 of 4 pairs ordered
    ([0.5, 0.5, 0.2], [1, 0, 0], 0.75),                  # one tie (counts 1/2) and one win
    ([1, 1, 1, 1], [1, 0, 1, 0], 0.5),                   # all tied
    ([3, 2, 1], [1, 1, 0], 1.0),
    ([1, 2, 3], [1, 1, 0], 0.0),
    ([2, 2, 1, 1, 3], [1, 0, 1, 0, 1], 4 / 6),           # pos {2,1,3} vs neg {2,1}: .5+1+0+.5+1+1
])
def test_auroc_hand_computed(scores, labels, want):
    assert auroc(scores, np.array(labels, bool)) == pytest.approx(want)


def test_auroc_equals_pairwise_count_and_midranks_equal_scipy():
    rng = np.random.default_rng(0)
    for _ in range(20):
        s = rng.integers(0, 4, size=15).astype(float)  # many ties
        y = rng.random(15) < 0.4
        if y.all() or not y.any():
            continue
        pos, neg = s[y], s[~y]
        pairwise = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))
        assert auroc(s, y) == pytest.approx(pairwise)
        np.testing.assert_array_equal(midranks(s), stats.rankdata(s, method="average"))
    assert np.isnan(auroc([1, 2], [True, True])) and np.isnan(auroc([np.nan, 1], [True, False]))


def test_clip_labels_mean_of_annotators_and_truncation():
    rec = {"relevant_clip_ids": [1, 2, 9], "saliency_scores": [[4, 2, 0], [1, 1, 1], [4, 4, 4]]}
    inside, sal = clip_labels(rec, 5)  # clip 9 lies beyond the 5 valid clips
    assert inside.tolist() == [False, True, True, False, False]
    np.testing.assert_allclose(sal, [0, 2, 1, 0, 0])


def _store(tmp_path, gating_type, gates_by_qid, n_clips=None):
    w = GateStoreWriter(tmp_path, gating_type, num_layers=2)
    for qid, gates in gates_by_qid.items():
        w.add(qid, f"v{qid}", gates, n_clips=(n_clips or {}).get(qid))
    w.close()
    return load_gate_run(tmp_path)


def _records(rng, n=6, t=20):
    recs = []
    for q in range(n):
        start = int(rng.integers(0, t - 6))
        ids = list(range(start, start + int(rng.integers(2, 6))))
        recs.append({"qid": q, "vid": f"v{q}", "duration": 2 * t, "relevant_windows": [[2 * ids[0], 2 * ids[-1] + 2]],
                     "relevant_clip_ids": ids, "saliency_scores": rng.integers(0, 5, size=(len(ids), 3)).tolist()})
    return recs


def test_gates_that_follow_saliency_correlate_and_noise_does_not(tmp_path):
    rng = np.random.default_rng(1)
    t = 20
    recs = _records(rng, t=t)
    gates = {}
    for r in recs:
        inside, sal = clip_labels(r, t)
        follow = (sal / 4 * 1.6 - 0.8).astype(np.float32)  # a strictly increasing function of the saliency
        gates[r["qid"]] = {(0, "mha"): follow, (0, "ffn"): -follow,
                           (1, "mha"): rng.uniform(-1, 1, t).astype(np.float32),
                           (1, "ffn"): np.where(inside, 0.5, -0.5).astype(np.float32)}
    run = _store(tmp_path, "clipwise", gates)
    pq, ov = ground_truth_tables(recs, run)
    assert list(pq.columns) == list(CSV_COLUMNS["gate_ground_truth.csv"]) and len(pq) == len(recs) * 4
    g = {k: sel for k, sel in pq.groupby("name")}
    sal_rho = np.array([stats.spearmanr(gates[q][(0, "mha")], clip_labels(r, t)[1]).statistic
                        for q, r in zip(range(len(recs)), recs)])
    np.testing.assert_allclose(g["layers.0.gate_mha"]["spearman_saliency"], sal_rho)
    np.testing.assert_allclose(sal_rho, 1.0)
    np.testing.assert_allclose(g["layers.0.gate_ffn"]["spearman_saliency"], -sal_rho)
    assert (g["layers.1.gate_ffn"]["auroc_inside"] == 1).all()                         # perfect separation
    np.testing.assert_allclose(g["layers.1.gate_ffn"]["diff_inside_minus_outside"], 1.0, atol=1e-6)
    np.testing.assert_allclose(g["layers.0.gate_mha"]["auroc_inside"].to_numpy()
                               + g["layers.0.gate_ffn"]["auroc_inside"].to_numpy(), 1.0)
    r0 = recs[0]
    np.testing.assert_allclose(g["layers.1.gate_mha"]["auroc_inside"].iloc[0],
                               auroc(gates[0][(1, "mha")], clip_labels(r0, t)[0]))
    pooled = ov[(ov["scope"] == "pooled") & (ov["statistic"] == "auroc_inside")].set_index("name")["value"]
    assert pooled["layers.1.gate_ffn"] == 1.0 and 0.2 < pooled["layers.1.gate_mha"] < 0.8
    per_q = ov[(ov["scope"] == "per_query") & (ov["statistic"] == "spearman_saliency")].set_index("name")
    assert per_q.loc["layers.0.gate_mha", "value"] == pytest.approx(sal_rho.mean())
    assert per_q.loc["layers.0.gate_mha", "n"] == len(recs)
    assert list(ov.columns) == list(CSV_COLUMNS["gate_ground_truth_overall.csv"])


def test_global_gates_only_across_queries(tmp_path):
    rng = np.random.default_rng(2)
    recs = _records(rng, n=8)
    fracs = {r["qid"]: len(r["relevant_clip_ids"]) / 20 for r in recs}
    gates = {q: {(l, k): np.array([f if l == 0 else 0.1 * l], np.float32) for l in range(2) for k in ("mha", "ffn")}
             for q, f in fracs.items()}
    run = _store(tmp_path, "global", gates, n_clips={q: 20 for q in fracs})
    pq, ov, paths = write_ground_truth(recs, tmp_path, gate_run=run)
    assert len(pq) == 0 and set(paths) == {"per_query", "overall"}
    na = ov[ov["statistic"] == "not_applicable"]
    assert len(na) == 4 and (na["note"] == GLOBAL_NOTE).all()
    across = ov[ov["scope"] == "across_queries"].set_index("name")
    assert across.loc["layers.0.gate_mha", "value"] == pytest.approx(1.0)  # gate = fraction of relevant clips
    assert np.isnan(across.loc["layers.1.gate_mha", "value"])             # constant gate: undefined
    assert write_ground_truth([{"qid": 1, "vid": "a", "duration": 10}], tmp_path, gate_run=run) == (None, None, {})


def test_model_gates_set_to_follow_the_audio_signal_separate_relevant_clips(demo_data, tmp_path):
    """Layer-0 MHA gate weights are set so that g = tanh(s (w . A_t - c)), w the direction in projected audio
    space that separates clips with the demo audio signal; the gates must then follow the relevant windows."""
    _, paths = demo_data
    model, opt = small_model("custom", "clipwise", seed=6)
    records = read_jsonl(paths["jsonl"]["val"])
    dataset = demo_dataset(opt, paths)
    signal_clips = {}  # the demo's audio signal sits on the clips relevant to any query of the video
    for r in records:
        signal_clips.setdefault(r["vid"], set()).update(r["relevant_clip_ids"])
    projected, is_signal = [], []
    with torch.no_grad():
        for i, r in enumerate(records):
            a = model.input_aud_proj(dataset[i]["model_inputs"]["audio_feat"][None])[0]
            projected.append(a)
            is_signal.append(torch.tensor([t in signal_clips[r["vid"]] for t in range(len(a))]))
    a_all, sig = torch.cat(projected), torch.cat(is_signal)
    w = a_all[sig].mean(0) - a_all[~sig].mean(0)
    w = w / w.norm()
    c = float(((a_all[sig] @ w).mean() + (a_all[~sig] @ w).mean()) / 2)
    s = 4.0 / float((a_all[sig] @ w).mean() - c)
    mlp = model.fusion.fusion_layers[0].gating_function.mlp_mha
    with torch.no_grad():
        for p in mlp.parameters():
            p.zero_()
        mlp[0].weight[0, 256:], mlp[0].bias[0] = w, -c       # unit 0: relu(w.A - c)
        mlp[0].weight[1, 256:], mlp[0].bias[1] = -w, c       # unit 1: relu(c - w.A)
        mlp[2].weight[0, 0], mlp[2].weight[0, 1] = s, -s     # s (w.A - c)
    writer = GateStoreWriter(tmp_path, "clipwise", 2)
    expected = {}
    with GateRecorder(model.fusion, lambda recs: [writer.add(x.sample_id, "v", x.gates) for x in recs]) as rec:
        for i, r in enumerate(records):
            rec.set_ids([r["qid"]])
            with torch.no_grad():
                model(**model_kwargs(collate([dataset[i]])[1]))
            expected[r["qid"]] = torch.tanh(s * (projected[i] @ w - c)).numpy()
    writer.close()
    run = load_gate_run(tmp_path)
    for q, want in expected.items():
        np.testing.assert_allclose(run.gate(q, 0, "mha"), want, atol=1e-5)
    pq, ov = ground_truth_tables(records, run)
    sel = pq[pq["name"] == "layers.0.gate_mha"].set_index("qid")
    for r in records:
        inside, sal = clip_labels(r, len(expected[r["qid"]]))
        assert sel.loc[r["qid"], "auroc_inside"] == pytest.approx(auroc(expected[r["qid"]], inside), abs=1e-9)
    pooled = ov[(ov["scope"] == "pooled") & (ov["name"] == "layers.0.gate_mha")].set_index("statistic")["value"]
    # against the clips that carry the audio signal (relevant to any query of the video) the gates are
    # almost perfect; against one query's own windows the other query's clips count as outside
    gate_all = np.concatenate([expected[r["qid"]] for r in records])
    assert auroc(gate_all, sig.numpy()) > 0.95
    assert pooled["auroc_inside"] > 0.7 and pooled["spearman_saliency"] > 0.4
    assert pooled["mean_inside"] > pooled["mean_outside"] + 0.5
    files = plot_ground_truth(pq, ov, tmp_path, records=records, gate_run=run)
    assert {p.rsplit("/", 1)[1] for p in files} == {"ground_truth_auroc_spearman.png", "ground_truth_inside_outside.png",
                                                    "ground_truth_across_queries.png", "ground_truth_examples.png"}


def test_per_query_statistics_equal_scipy_and_the_pairwise_definitions():
    """The vectorised per-query rows: Spearman rho/p as scipy.stats.spearmanr, AUROC as pairwise counts,
    NaN where a statistic is undefined (constant row, no saliency, one side empty)."""
    from gate_analysis.ground_truth import query_ground_truth
    rng = np.random.default_rng(5)
    for _ in range(30):
        t = int(rng.integers(3, 40))
        v = rng.integers(0, 6, size=t).astype(float) / 5  # ties on purpose
        inside = rng.random(t) < 0.4
        sal = np.where(inside, rng.integers(0, 5, size=t) / 3, 0.0)
        got = query_ground_truth(v, inside, sal)
        if np.ptp(v) > 0 and np.ptp(sal) > 0:
            want = stats.spearmanr(v, sal)
            assert got["spearman_saliency"] == pytest.approx(want.statistic, rel=1e-12, abs=1e-15)
            assert got["spearman_p_value"] == pytest.approx(want.pvalue, rel=1e-9, abs=1e-15)
        else:
            assert np.isnan(got["spearman_saliency"]) and np.isnan(got["spearman_p_value"])
        if inside.any() and not inside.all():
            pos, neg = v[inside], v[~inside]
            pairwise = ((pos[:, None] > neg).sum() + 0.5 * (pos[:, None] == neg).sum()) / (pos.size * neg.size)
            assert got["auroc_inside"] == pytest.approx(pairwise)
            assert got["diff_inside_minus_outside"] == pytest.approx(pos.mean() - neg.mean())
        else:
            assert np.isnan(got["auroc_inside"])
        assert got["n_clips"] == t and got["n_inside"] == int(inside.sum())
    v = np.linspace(-1, 1, 10)
    inside = np.arange(10) >= 5
    assert np.isnan(query_ground_truth(np.ones(10), inside, v)["spearman_saliency"])       # constant values
    assert np.isnan(query_ground_truth(v, inside, np.full(10, np.nan))["spearman_saliency"])  # no saliency
    assert query_ground_truth(v, inside, v)["spearman_saliency"] == pytest.approx(1.0)


def test_accumulated_p_values_equal_those_of_each_query_alone(tmp_path):
    """The accumulator defers the per-query Spearman p-values to one vectorised call when the table is built
    (each query's own call would cost ~2 ms on the thread beside the model): they equal what
    ``query_ground_truth`` computes for the query alone, bit for bit, scipy's to 1e-9, and NaN stays NaN."""
    from gate_analysis.ground_truth import query_ground_truth
    rng = np.random.default_rng(7)
    t = 30
    recs = _records(rng, n=12, t=t)
    gates = {r["qid"]: {(0, "mha"): rng.uniform(-1, 1, t).astype(np.float32),
                        (0, "ffn"): np.full(t, 0.3, np.float32),          # constant: no rho, no p-value
                        (1, "mha"): np.round(rng.uniform(-1, 1, t), 1).astype(np.float32),  # ties
                        (1, "ffn"): rng.uniform(-1, 1, t).astype(np.float32)} for r in recs}
    pq, _ = ground_truth_tables(recs, _store(tmp_path, "clipwise", gates))
    pq = pq[pq["measure"] == "gate"].set_index(["qid", "name"])
    n_finite = 0
    for r in recs:
        inside, sal = clip_labels(r, t)
        for (layer, kind), g in gates[r["qid"]].items():
            got = pq.loc[(r["qid"], f"layers.{layer}.gate_{kind}"), "spearman_p_value"]
            want = query_ground_truth(g.astype(np.float64), inside, sal)["spearman_p_value"]
            if np.isnan(want):
                assert np.isnan(got) and kind == "ffn" and layer == 0
                continue
            n_finite += 1
            assert got == want
            assert got == pytest.approx(stats.spearmanr(g, sal).pvalue, rel=1e-9, abs=1e-300)
    assert n_finite == 3 * len(recs)
