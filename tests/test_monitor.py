"""GateMonitor (periodic captures in a user's training loop) and the gate-evolution readers and plots."""
import os

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import demo_split_dataset, small_model
from gate_analysis.monitor import (
    EVOLUTION_COLUMNS,
    DatasetBatches,
    GateMonitor,
    plot_gate_evolution,
    read_gate_evolution,
    summarize_gate_evolution,
)
from qd_detr.dataset import model_kwargs
from qd_detr.errors import ConfigError, DataError
from qd_detr.gates import GateRecorder
from qd_detr.model import NoFusionError


@pytest.fixture(scope="module")
def val_dataset(demo_data):
    return demo_split_dataset(demo_data[0], "val")


def _direct_means(model, batches):
    """{(qid, layer, kind): mean gate} recorded independently of the monitor."""
    got = {}
    model.eval()
    with GateRecorder(model.fusion, lambda recs: got.update({r.sample_id: r for r in recs})) as rec:
        for metas, inputs in batches:
            rec.set_ids([m["qid"] for m in metas])
            with torch.no_grad():
                model(**model_kwargs(inputs))
    return {(q, l, k): float(np.mean(g, dtype=np.float64)) for q, r in got.items() for (l, k), g in r.gates.items()}


def _perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.fusion.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def test_step_schedule_rows_and_values_equal_direct_capture(val_dataset, tmp_path):
    model, _ = small_model("custom", "clipwise")
    batches = DatasetBatches(val_dataset, n=5, batch_size=2)
    monitor = GateMonitor(model, batches, tmp_path / "mon", every=2, plots=False)
    expected = {0: _direct_means(model, batches)}
    assert monitor.capture(0)["dir"].endswith("epoch_0")
    for epoch in range(4):  # a "training" loop: weights change every epoch
        _perturb(model, epoch)
        if monitor.due(epoch):
            expected[epoch + 1] = _direct_means(model, batches)
        out = monitor.step(epoch)
        assert (out is not None) == (epoch in (1, 3))
    assert sorted(os.listdir(tmp_path / "mon")) == ["epoch_0", "epoch_2", "epoch_4", "evolution_layers.png",
                                                    "evolution_queries.png", "gate_evolution.csv"]
    evo = pd.read_csv(tmp_path / "mon" / "gate_evolution.csv")
    assert list(evo.columns) == list(EVOLUTION_COLUMNS)
    assert len(evo) == 3 * 5 * 2 * 2  # epochs x queries x layers x gates
    assert sorted(evo["qid"].unique()) == sorted(batches.qids)
    for row in evo.itertuples():
        assert row.mean == pytest.approx(expected[row.epoch][(row.qid, row.layer, row.gate)], abs=1e-6)
        assert row.name == f"layers.{row.layer}.gate_{row.gate}"
        assert row.min <= row.mean <= row.max
    lengths = dict(zip(val_dataset.qids, val_dataset.ctx_lengths()))
    assert all(row.n_values == lengths[row.qid] for row in evo.itertuples())  # clipwise: one value per clip
    # the per-epoch analysis is a complete gate-analysis folder
    assert os.path.isfile(tmp_path / "mon" / "epoch_2" / "gate_stats_per_layer.csv")
    assert os.path.isfile(tmp_path / "mon" / "epoch_2" / "gates" / "meta.json")


def test_capture_restores_mode_and_leaves_user_tracking_alone(val_dataset, tmp_path):
    model, _ = small_model("custom", "global")
    fusion = model.fusion
    fusion.enable_gate_tracking()
    fusion.clear_gate_history()
    model.train()
    monitor = GateMonitor.from_dataset(model, val_dataset, tmp_path / "m", every=1, n=3, plots=False,
                                       evolution_plots=False)
    monitor.capture(1)
    assert model.training and all(m.training for m in model.modules())
    assert fusion.gate_history == {}  # the capture did not write into the user's history
    assert fusion.gate_tracking_enabled
    metas, inputs = next(iter(DatasetBatches(val_dataset, n=1)))
    fusion.set_current_sample_id([metas[0]["qid"]])
    with torch.no_grad():
        model(**model_kwargs(inputs))
    assert list(fusion.gate_history) == [metas[0]["qid"]]  # the user's recorder still works
    model.eval()
    monitor.capture(2)
    assert not model.training
    evo = pd.read_csv(tmp_path / "m" / "gate_evolution.csv")
    assert len(evo) == 2 * 3 * 2 * 2 and set(evo["n_values"]) == {1}  # global: one value per query


def test_dict_batches_and_one_shot_iterator(val_dataset, tmp_path):
    model, _ = small_model("custom", "elementwise")
    collated = list(DatasetBatches(val_dataset, n=4, batch_size=2))
    dict_batches = ({"qids": [m["qid"] for m in metas], **inputs} for metas, inputs in collated)  # generator
    monitor = GateMonitor(model, dict_batches, tmp_path / "d", every=1, plots=False, evolution_plots=False)
    first = monitor.step(0)
    second = monitor.step(1)
    assert second["dir"].endswith("epoch_2") and first["dir"].endswith("epoch_1")
    evo = read_gate_evolution(tmp_path / "d")
    assert len(evo) == 2 * 4 * 2 * 2
    # elementwise: T * hidden values per query
    assert set(evo["n_values"] % 256) == {0}


def test_existing_captures_need_overwrite_or_resume(val_dataset, tmp_path):
    model, _ = small_model()
    batches = DatasetBatches(val_dataset, n=2)
    out = GateMonitor(model, batches, tmp_path, every=1, plots=True, evolution_plots=False).capture(3)
    assert out["plots"] and all(p.startswith(str(tmp_path / "epoch_3" / "plots")) and os.path.isfile(p)
                                for p in out["plots"])
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]
    with pytest.raises(ConfigError, match="already holds"):
        GateMonitor(model, batches, tmp_path, every=1)
    resumed = GateMonitor(model, batches, tmp_path, every=1, resume=True, plots=False, evolution_plots=False)
    resumed.capture(4)
    assert sorted(read_gate_evolution(tmp_path)["epoch"].unique()) == [3, 4]
    GateMonitor(model, batches, tmp_path, every=1, overwrite=True)
    assert not os.path.exists(tmp_path / "epoch_3")


def test_monitor_errors(val_dataset, tmp_path):
    model, _ = small_model("video_only")
    with pytest.raises(NoFusionError):
        GateMonitor(model, [], tmp_path / "x")
    fused, _ = small_model()
    with pytest.raises(ConfigError, match="not in the validation data"):
        DatasetBatches(val_dataset, qids=[987654])
    with pytest.raises(ConfigError):
        GateMonitor(fused, [], tmp_path / "y", every=0)
    with pytest.raises(DataError, match="empty"):
        GateMonitor(fused, [], tmp_path / "z", plots=False).capture(0)
    batch = next(iter(DatasetBatches(val_dataset, n=2)))
    with pytest.raises(ValueError, match="twice"):
        GateMonitor(fused, [batch, batch], tmp_path / "w", plots=False).capture(0)


def _fake_capture(folder, epoch, rows):
    d = folder / f"epoch_{epoch}"
    d.mkdir(parents=True)
    df = pd.DataFrame(rows, columns=["qid", "layer", "gate", "mean", "std", "min", "max", "count"])
    df["name"] = [f"layers.{l}.gate_{g}" for l, g in zip(df["layer"], df["gate"])]
    df.to_csv(d / "gate_stats_per_query.csv", index=False)


def test_read_several_runs_summary_by_hand_and_plots(tmp_path):
    for run, shift in (("a", 0.0), ("b", 0.5)):
        for epoch in (0, 5):
            _fake_capture(tmp_path / run / "gate_monitor", epoch, [
                (1, 0, "mha", 0.0 + shift, 1.0, -1.0, 1.0, 2), (2, 0, "mha", 2.0 + shift, 0.0, 2.0, 2.0, 2),
                (1, 0, "ffn", 0.1, 0.0, 0.1, 0.1, 2), (2, 0, "ffn", 0.1, 0.0, 0.1, 0.1, 2)])
    df = read_gate_evolution([tmp_path / "a" / "gate_monitor", tmp_path / "b"])  # monitor folder or its parent
    assert list(df.columns) == ["run"] + list(EVOLUTION_COLUMNS)
    assert df["run"].nunique() == 2 and len(df) == 2 * 2 * 2 * 2
    assert list(df[df["run"] == df["run"].iloc[0]]["gate"][:2]) == ["mha", "ffn"]  # mha first per query
    s = summarize_gate_evolution(df)
    a = s[(s["run"] == df["run"].iloc[0]) & (s["epoch"] == 0) & (s["gate"] == "mha")].iloc[0]
    # pooled values {-1, 1, 2, 2}: mean 1, std sqrt(1.5); per-query means {0, 2}: mean 1, std 1
    assert a["mean"] == pytest.approx(1.0) and a["std"] == pytest.approx(np.sqrt(1.5))
    assert a["query_mean"] == pytest.approx(1.0) and a["query_std"] == pytest.approx(1.0)
    assert (a["n_queries"], a["n_values"], a["min"], a["max"]) == (2, 4, -1.0, 2.0)
    # single epoch folders of one run are read as that run
    one = read_gate_evolution([tmp_path / "a" / "gate_monitor" / "epoch_5", tmp_path / "a" / "gate_monitor" / "epoch_0"])
    assert one["run"].nunique() == 1 and list(one["epoch"].unique()) == [0, 5]
    for by in ("layer", "query"):
        path = plot_gate_evolution([tmp_path / "a", tmp_path / "b"], tmp_path / f"evo_{by}.png", by=by)
        assert os.path.getsize(path) > 1000
    with pytest.raises(DataError, match="not found"):
        read_gate_evolution(tmp_path / "missing")
    with pytest.raises(DataError, match="no epoch_N"):
        read_gate_evolution(tmp_path)
    with pytest.raises(DataError, match="more than once"):
        read_gate_evolution([tmp_path / "a" / "gate_monitor", tmp_path / "a" / "gate_monitor" / "epoch_0"])
