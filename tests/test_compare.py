"""Comparison across runs: per-layer evolution and per-query differences on runs with known gates."""
import json
import os

import numpy as np
import pandas as pd
import pytest

from gate_analysis.compare import CSV_COLUMNS, compare_runs, plot_compare
from gate_analysis.stats import GateStatsAccumulator
from gate_analysis.stats_csv import write_stats_csvs
from gate_analysis.store import GateStoreWriter
from qd_detr.errors import ConfigError, DataError


def _make_run(folder, qids, offset, epoch, gating_type="clipwise", with_csv=True):
    """A run folder whose query q has gates offset + 0.01 q + 0.1 layer (+0.05 for ffn) on every clip."""
    os.makedirs(folder, exist_ok=True)
    w = GateStoreWriter(folder, gating_type, num_layers=2)
    acc = GateStatsAccumulator(gating_type, 2)
    for q in qids:
        n = 1 if gating_type == "global" else 5 + q % 3
        gates = {(l, k): np.full(n, offset + 0.01 * q + 0.1 * l + (0.05 if k == "ffn" else 0), np.float32)
                 for l in range(2) for k in ("mha", "ffn")}
        w.add(q, f"v{q}", gates, n_clips=n)
        acc.update(q, gates, vid=f"v{q}")
    w.close()
    if with_csv:
        write_stats_csvs(acc, folder)
    manifest = {"status": "complete", "model": {"layout": "custom", "gating_type": gating_type, "fusion_layers": 2},
                "checkpoint": {"path": f"/ckpt/e{epoch}.ckpt", "sha256": "ab" * 32, "load_report": {"epoch": epoch}},
                "metrics_brief": {"MR-full-mAP": 10.0 + epoch}}
    with open(os.path.join(folder, "run.json"), "w") as fh:
        json.dump(manifest, fh)
    return folder


def test_compare_runs_known_differences(tmp_path):
    a = _make_run(tmp_path / "epoch1", range(6), 0.0, 1)
    b = _make_run(tmp_path / "epoch5", range(1, 6), 0.3, 5, with_csv=False)   # read from the gate store
    c = _make_run(tmp_path / "seed2", range(7), -0.2, 5, gating_type="global")
    runs, layers, queries = compare_runs([a, b, c])
    for name, df in zip(CSV_COLUMNS, (runs, layers, queries)):
        assert list(df.columns) == list(CSV_COLUMNS[name]), name
    assert runs["run_label"].tolist() == ["epoch1", "epoch5", "seed2"]
    assert runs["epoch"].tolist() == [1, 5, 5] and runs["MR-full-mAP"].tolist() == [11.0, 15.0, 15.0]
    assert runs["gating_type"].tolist() == ["clipwise", "clipwise", "global"]
    l0 = layers[(layers["layer"] == 1) & (layers["gate"] == "ffn")].set_index("run")
    assert l0.loc[0, "mean"] == pytest.approx(0.15 + 0.01 * np.mean(range(6)), abs=1e-6)
    assert l0.loc[1, "mean"] == pytest.approx(0.45 + 0.01 * np.mean(range(1, 6)), abs=1e-6)
    assert l0.loc[0, "std"] == pytest.approx(0.01 * np.std(range(6)), abs=1e-6)
    assert l0.loc[0, "mean_within_std"] == pytest.approx(0, abs=1e-6)
    assert sorted(queries["qid"].unique()) == [1, 2, 3, 4, 5]  # present in all three runs
    assert len(queries) == 5 * 3 * 2 * 3  # queries x (2 layers + all) x kinds x runs
    d = queries.set_index(["qid", "layer", "gate", "run"])["diff_vs_first"]
    # 'all': the mean over layers of |layer mean|: run 2 ffn |-0.13|, |-0.03| -> 0.08 vs run 0's 0.07, 0.17 -> 0.12
    assert d[(2, 0, "mha", 1)] == pytest.approx(0.3, abs=1e-6) and d[(2, "all", "ffn", 2)] == pytest.approx(-0.04, abs=1e-6)
    assert (queries[queries["run"] == 0]["diff_vs_first"] == 0).all()
    paths = plot_compare(runs, layers, queries, tmp_path / "out")
    assert [os.path.basename(p) for p in paths] == ["compare_layer_evolution.png", "compare_query_differences.png"]
    with pytest.raises(ConfigError, match="at least two"):
        compare_runs([a])
    with pytest.raises(DataError, match="not a gate-analysis output folder"):
        compare_runs([a, tmp_path / "out"])


def test_compare_runs_standalone_command(tmp_path, capsys):
    """run_gate_analysis.py --compare_runs A B --output_dir D, no model (in process: same main and error policy)."""
    from qd_detr.cli import run_main
    from run_gate_analysis import main
    a = _make_run(tmp_path / "run_a", range(4), 0.1, 1)
    b = _make_run(tmp_path / "run_b", range(4), -0.1, 2)
    out = tmp_path / "cmp"
    argv = ["--compare_runs", str(a), str(b), "--output_dir", str(out), "--quiet"]
    assert run_main(main, argv) == 0
    for name in (*CSV_COLUMNS, "run.json", "report.html", "plots/compare_layer_evolution.png"):
        assert (out / name).exists(), name
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["kind"] == "compare" and manifest["status"] == "complete" and manifest["counts"]["runs"] == 2
    assert pd.read_csv(out / "gate_compare_queries.csv")["qid"].nunique() == 4
    html = (out / "report.html").read_text()
    assert "Comparison across runs" in html and "data:image/png;base64," in html
    capsys.readouterr()
    assert run_main(main, argv[:2] + ["--output_dir", str(tmp_path / "cmp1")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error:") and "at least two" in err
    assert run_main(main, argv) == 2  # an existing, non-empty output folder needs --overwrite
    assert "--overwrite" in capsys.readouterr().err
