"""Performance link: per-query table, correlations, failure-case matching and query subsets."""
import numpy as np
import pandas as pd
import pytest

from gate_analysis.performance import (
    CSV_COLUMNS,
    QueryMetrics,
    ablation_join,
    apply_subset,
    correlation_table,
    failure_cases,
    failure_comparison,
    performance_table,
    query_gate_features,
    read_subset,
    subset_comparison,
)
from qd_detr.errors import ConfigError, DataError
from qd_detr.eval import per_query_metrics


def _query_stats(qids, means):
    rows = []
    for q in qids:
        for layer in (0, 1):
            for kind in ("mha", "ffn"):
                rows.append({"qid": q, "vid": f"v{q}", "layer": layer, "gate": kind,
                             "mean": means[(q, layer, kind)], "std": 0.1 * layer})
    return pd.DataFrame(rows)


def _records_and_lines(n=8):
    rng = np.random.default_rng(0)
    recs, lines = [], []
    for q in range(n):
        st = 2 * int(rng.integers(0, 20))
        recs.append({"qid": q, "vid": f"v{q}", "duration": 60 + 10 * q, "relevant_windows": [[st, st + 10]],
                     "relevant_clip_ids": list(range(st // 2, st // 2 + 5)), "saliency_scores": [[2, 3, 4]] * 5})
        shift = 2 * q  # query q's top window is shifted by 2q seconds: IoU falls with q
        lines.append({"qid": q, "vid": f"v{q}", "pred_relevant_windows": [[st + shift, st + shift + 10, 0.9]],
                      "pred_saliency_scores": [0.0] * 30})
    return recs, lines


def test_query_metrics_fed_batch_by_batch_equal_the_metrics_computed_at_the_end():
    recs, lines = _records_and_lines(10)
    recs.append({"qid": 99, "vid": "v99", "duration": 60})  # unlabelled: no metrics row
    lines.append({"qid": 99, "vid": "v99", "pred_relevant_windows": [[0, 10, 0.5]], "pred_saliency_scores": [0.0] * 30})
    labelled = [r for r in recs if r.get("relevant_windows")]
    want = per_query_metrics(lines, labelled)
    qm = QueryMetrics(recs)
    for start in (0, 4):  # batches of the run; queries 8, 9 and 99 never seen (e.g. restored by --resume)
        qm.add(lines[start:start + 4])
    assert sorted(qm._seen) == list(range(8))
    assert qm.rows(lines, recs) == want
    final = [dict(line) for line in lines]
    final[2]["pred_relevant_windows"] = [[0, 2, 0.9]]  # a line that changed after it was seen: recomputed
    assert qm.rows(final, recs) == per_query_metrics(final, labelled) != want
    assert qm.rows(lines[:5], recs) == per_query_metrics(lines[:5], labelled)  # only the predicted queries
    bad = QueryMetrics(recs)
    bad.add([{"qid": 1, "vid": "v1", "pred_relevant_windows": "oops", "pred_saliency_scores": []}])
    assert bad._seen == {}  # not kept; the final call reports the problem as per_query_metrics does
    with pytest.raises(DataError, match="duplicate|more than once"):
        qm.rows(lines + lines[:1], recs)
    # the table built with the metrics fed during the run is the one built from scratch
    means = {(q, l, k): 0.1 * q + l for q in range(10) for l in (0, 1) for k in ("mha", "ffn")}
    qs = _query_stats(range(10), means)
    pd.testing.assert_frame_equal(performance_table(lines, recs, qs, metrics=qm), performance_table(lines, recs, qs))


def test_performance_table_joins_metrics_and_gates_and_correlates():
    recs, lines = _records_and_lines()
    means = {(q, l, k): (1 - q / 8) * (0.5 if k == "mha" else -0.5) + 0.1 * l for q in range(8) for l in (0, 1)
             for k in ("mha", "ffn")}
    perf = performance_table(lines, recs, _query_stats(range(8), means))
    assert list(perf.columns) == list(CSV_COLUMNS["gate_performance.csv"])
    assert len(perf) == 8 * 3 * 2  # layers 0, 1 and 'all'
    want = {r["qid"]: r for r in per_query_metrics(lines, recs)}
    for _, row in perf.iterrows():
        assert row["top1_iou"] == pytest.approx(want[row["qid"]]["top1_iou"])
    allrow = perf[(perf["qid"] == 3) & (perf["layer"] == "all") & (perf["gate"] == "mha")].iloc[0]
    assert allrow["gate_mean"] == pytest.approx((means[(3, 0, "mha")] + means[(3, 1, "mha")]) / 2)
    assert allrow["window_length"] == 10 and allrow["duration"] == 90
    corr = correlation_table(perf)
    assert list(corr.columns) == list(CSV_COLUMNS["gate_performance_correlations.csv"])
    c = corr[(corr["x"] == "gate_mean") & (corr["y"] == "top1_iou")].set_index("name")
    # IoU decreases with q (until it reaches 0), MHA gates decrease with q: rho > 0; FFN the opposite sign
    assert c.loc["layers.all.gate_mha", "rho"] > 0.9 and c.loc["layers.all.gate_ffn", "rho"] < -0.9
    assert c.loc["layers.0.gate_mha", "n"] == 8
    assert corr[corr["x"] == "gate_std"]["rho"].isna().all()  # constant std: undefined, never a number
    # an ablation frame: every intervention's effect joined per query x gate, and correlation rows
    abl = pd.concat([pd.DataFrame({"qid": list(range(8)), "intervention": name,
                                   "delta_top1_iou": np.linspace(-0.5, 0.2, 8) * sign,
                                   "delta_mr_ap": np.linspace(-50, 0, 8) * sign, "delta_hl_ap_verygood": np.zeros(8)})
                     for name, sign in (("zero@all:both", 1), ("audio_zero", -1))], ignore_index=True)
    joined = ablation_join(perf, abl)
    assert list(joined.columns) == list(CSV_COLUMNS["gate_performance_ablation.csv"])
    assert len(joined) == 2 * len(perf) and list(dict.fromkeys(joined["intervention"])) == ["zero@all:both",
                                                                                          "audio_zero"]
    row = joined[(joined["qid"] == 3) & (joined["intervention"] == "audio_zero") & (joined["name"] == "layers.0.gate_mha")]
    assert row["delta_mr_ap"].item() == pytest.approx(-np.linspace(-50, 0, 8)[3])
    assert row["gate_mean"].item() == pytest.approx(means[(3, 0, "mha")])
    corr2 = correlation_table(perf, abl)
    e = corr2[(corr2["intervention"] == "zero@all:both") & (corr2["y"] == "delta_mr_ap")
              & (corr2["x"] == "gate_mean")].set_index("name")
    assert e.loc["layers.all.gate_mha", "rho"] == pytest.approx(-1.0)


def test_failure_cases_nearest_neighbour_without_replacement():
    q = pd.DataFrame({
        "qid":           [1,    2,    3,    10,   11,   12,   13],
        "top1_iou":      [0.0,  0.0,  0.1,  0.9,  0.8,  0.6,  0.3],
        "mr_ap":         [5.0,  1.0,  0.0,  90,   80,   60,   30],
        "duration":      [60,   62,   150,  61,   150,  140,  60],
        "window_length": [10,   10,   40,   10,   40,   12,   10],
    })
    pairs = failure_cases(q, 3)
    assert list(pairs.columns) == list(CSV_COLUMNS["gate_failure_pairs.csv"])
    # worst first: qid 2 (IoU 0, lower AP), then 1, then 3; 13 (IoU 0.3) is no success
    assert pairs["failure_qid"].tolist() == [2, 1, 3]
    # 2 takes its nearest success 10; 1 would also be nearest to 10 but it is used: next nearest is 12
    assert pairs["matched_qid"].tolist() == [10, 12, 11]
    scale = q[["duration", "window_length"]].std(ddof=0).to_numpy()
    d = np.hypot((62 - 61) / scale[0], 0)
    assert pairs["distance"].iloc[0] == pytest.approx(d)
    # the 5 worst include 12 (IoU 0.6): it is a failure then, never a match; only 10 and 11 remain
    assert failure_cases(q, 5)["matched_qid"].tolist() == [10, 11]
    with pytest.raises(ConfigError):
        failure_cases(q, 0)
    perf = pd.DataFrame({"qid": [1, 2, 3, 10, 11, 12], "layer": 0, "gate": "mha",
                         "gate_mean": [0.1, 0.2, 0.3, 0.5, 0.7, 0.9], "contribution_mean": np.nan})
    comp = failure_comparison(pairs, perf)
    assert list(comp.columns) == list(CSV_COLUMNS["gate_failure_comparison.csv"]) and len(comp) == 1
    row = comp.iloc[0]
    assert row["mean_failure"] == pytest.approx(0.2) and row["mean_matched"] == pytest.approx(0.7)
    assert row["diff"] == pytest.approx(-0.5) and row["n_pairs"] == 3


def test_read_and_apply_subset(tmp_path):
    txt = tmp_path / "audio.txt"
    txt.write_text("# audio-related queries\n5\n\n3  # dog barking\n5\n")
    assert read_subset(txt) == [5, 3]
    jl = tmp_path / "audio.jsonl"
    jl.write_text('{"qid": 7, "query": "a # b"}\n{"qid": 3}\n')
    assert read_subset(jl) == [7, 3]
    bad = tmp_path / "bad.txt"
    bad.write_text("4\nfour\n")
    with pytest.raises(DataError, match="bad.txt:2"):
        read_subset(bad)
    with pytest.raises(DataError, match="not found"):
        read_subset(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(DataError, match="no query id"):
        read_subset(tmp_path / "empty.txt")
    recs = [{"qid": q} for q in range(6)]
    kept, info = apply_subset(recs, txt, "restrict")
    assert [r["qid"] for r in kept] == [3, 5] and info["n_in_data"] == 2
    kept, info = apply_subset(recs, jl, "split")
    assert len(kept) == 6 and info["n_missing_from_data"] == 1
    (tmp_path / "none.txt").write_text("99\n")
    with pytest.raises(ConfigError, match="none of its"):
        apply_subset(recs, tmp_path / "none.txt")


def test_subset_comparison_in_vs_out():
    means = {(q, l, k): (0.8 if q < 3 else -0.2) for q in range(8) for l in (0, 1) for k in ("mha", "ffn")}
    feats = query_gate_features(_query_stats(range(8), means))
    recs, lines = _records_and_lines()
    perf = performance_table(lines, recs, _query_stats(range(8), means))
    comp = subset_comparison([0, 1, 2], feats, perf, lines=lines, records=recs)
    assert list(comp.columns) == list(CSV_COLUMNS["gate_subset_comparison.csv"])
    g = comp[(comp["section"] == "gates") & (comp["name"] == "layers.all.gate_mha")].iloc[0]
    assert g["mean_in"] == pytest.approx(0.8) and g["mean_out"] == pytest.approx(-0.2)
    assert g["n_in"] == 3 and g["n_out"] == 5 and g["p_value"] < 0.05
    m = comp[(comp["section"] == "metrics") & (comp["statistic"] == "top1_iou")].iloc[0]
    ious = perf.drop_duplicates("qid").set_index("qid")["top1_iou"]
    assert m["mean_in"] == pytest.approx(ious.loc[[0, 1, 2]].mean())
    off = comp[(comp["section"] == "official") & (comp["statistic"] == "MR-full-R1@0.5")].iloc[0]
    assert off["n_in"] == 3 and off["mean_in"] == round(100 * (ious.loc[[0, 1, 2]] >= 0.5).mean(), 2)
