"""TensorBoard event files of training and of the gate monitor, read back with TensorBoard's own event reader
and checked against the monitor's CSVs and raw gates of the same epoch."""
import json
import os
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import demo_split_dataset, demo_train_args, small_model
from gate_analysis.monitor import DatasetBatches, GateMonitor
from gate_analysis.stats import GateStatsAccumulator
from gate_analysis.store import load_gate_run
from gate_analysis.tensorboard_log import GATE_SCALARS, gate_histograms, gate_tag, write_gate_summaries
from qd_detr.cli import run_main
from qd_detr.train import main

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
SummaryWriter = pytest.importorskip("torch.utils.tensorboard").SummaryWriter


def _events(log_dir):
    acc = event_accumulator.EventAccumulator(str(log_dir), size_guidance={"histograms": 0, "scalars": 0,
                                                                          "tensors": 0})
    acc.Reload()
    return acc


def _scalars(acc, tag):
    return {e.step: e.value for e in acc.Scalars(tag)}


def _pooled_values(epoch_dir):
    """{(layer, kind): float32 values} of a capture's gate store, each video once (its first query)."""
    run = load_gate_run(str(epoch_dir))
    try:
        first = {}
        for qid in run.qids:
            first.setdefault(run.vids[qid] or f"qid{qid}", qid)
        return {(l, k): np.concatenate([np.asarray(run.gate(q, l, k), np.float32).ravel() for q in first.values()])
                for l in run.layers for k in run.kinds}
    finally:
        run.close()


def _check_capture(acc, epoch_dir, step):
    """The histograms and scalars at ``step`` equal the capture ``epoch_dir``: its raw gates, its clip-weighted
    gate_stats_per_layer.csv rows and its gate_histograms.csv bins. Returns the gates checked."""
    layer_csv = pd.read_csv(os.path.join(epoch_dir, "gate_stats_per_layer.csv"))
    clip = layer_csv[layer_csv["weighting"] == "clip"]
    bins_csv = pd.read_csv(os.path.join(epoch_dir, "gate_histograms.csv"))
    values = _pooled_values(epoch_dir)
    assert len(clip) == len(values)
    for row in clip.itertuples(index=False):
        key = (int(row.layer), row.gate)
        x = values[key]
        hist = {e.step: e.histogram_value for e in acc.Histograms(gate_tag(*key))}[step]
        # the CSV of the same epoch
        assert hist.num == row.n_values == x.size
        assert hist.min == pytest.approx(row.min, rel=1e-8, abs=1e-9)
        assert hist.max == pytest.approx(row.max, rel=1e-8, abs=1e-9)
        assert hist.sum == pytest.approx(row.mean * row.n_values, rel=1e-7, abs=1e-7)
        # the raw gate values of the capture (padding excluded, each video once)
        assert (hist.min, hist.max) == (float(x.min()), float(x.max()))
        assert hist.sum == pytest.approx(float(x.sum(dtype=np.float64)), rel=1e-9, abs=1e-9)
        assert hist.sum_squares == pytest.approx(float(np.dot(x.astype(np.float64), x)), rel=1e-7, abs=1e-9)
        # buckets: the fixed bins of gate_histograms.csv (no value outside the declared range here)
        b = bins_csv[(bins_csv["layer"] == key[0]) & (bins_csv["gate"] == key[1])]
        inner = b[b["bin_type"] == "bin"]
        assert int(b[b["bin_type"] != "bin"]["count"].sum()) == 0
        assert list(hist.bucket) == inner["count"].tolist()
        assert list(hist.bucket_limit) == pytest.approx(inner["bin_right"].tolist())
        lo, hi = float(inner["bin_left"].iloc[0]), float(inner["bin_right"].iloc[-1])
        assert list(hist.bucket) == np.histogram(x, bins=len(inner), range=(lo, hi))[0].tolist()
        for stat in GATE_SCALARS:
            tag = gate_tag(*key, stat)
            if pd.isna(getattr(row, stat)):  # frac_negative of a gate that cannot be negative
                assert tag not in acc.Tags()["scalars"]
                continue
            assert _scalars(acc, tag)[step] == pytest.approx(getattr(row, stat), rel=1e-6, abs=1e-7)
    return sorted(values)


# ------------------------------------------------------------------------------------------ training CLI
@pytest.fixture(scope="module")
def trained(demo_data, tmp_path_factory):
    root, paths = demo_data
    results = tmp_path_factory.mktemp("tb_run") / "run"
    code = run_main(main, demo_train_args(root, results, "--n_epoch", "2", "--eval_epoch", "1", "--lr_drop", "1",
                                          "--gate_monitor_every", "1", "--gate_monitor_n", "5",
                                          "--gate_monitor_no_plots"))
    assert code == 0
    return results


def test_training_gate_histograms_and_scalars_equal_the_epoch_csvs(trained):
    log_dir = trained / "tensorboard_log"  # the original layout: beside the checkpoints
    assert (trained / "model_best.ckpt").is_file()
    assert [n for n in os.listdir(log_dir) if n.startswith("events.out.tfevents.")]
    acc = _events(log_dir)
    mon = trained / "gate_monitor"
    epochs = sorted(int(p.name.split("_")[1]) for p in mon.iterdir() if p.is_dir())
    assert epochs == [0, 1, 2]
    for epoch in epochs:
        checked = _check_capture(acc, mon / f"epoch_{epoch}", epoch)
        assert checked == [(0, "ffn"), (0, "mha"), (1, "ffn"), (1, "mha")]
    for name in ("layers.0.gate_mha", "layers.1.gate_ffn"):
        assert sorted(e.step for e in acc.Histograms(f"gates/{name}")) == epochs
        assert sorted(_scalars(acc, f"gates/{name}/mean")) == epochs
    # 5 monitored queries of 3 videos (2 queries each): each video pooled once
    q = pd.read_csv(mon / "epoch_1" / "gate_stats_per_query.csv")
    one = q[q["name"] == "layers.0.gate_mha"]
    assert len(one) == 5 and one["vid"].nunique() == 3
    hist = {e.step: e.histogram_value for e in acc.Histograms("gates/layers.0.gate_mha")}[1]
    assert hist.num == one.drop_duplicates("vid")["count"].sum() < one["count"].sum()


def test_training_losses_metrics_and_options_as_the_original_writes_them(trained):
    acc = _events(trained / "tensorboard_log")
    summary = json.loads((trained / "train_summary.json").read_text())
    history = summary["history"]
    assert summary["tensorboard_log"] == str(trained / "tensorboard_log")
    # Train/lr is the learning rate of the epoch (lr_drop 1: 1e-4, then 1e-5)
    lr = _scalars(acc, "Train/lr")
    assert sorted(lr) == [1, 2] and lr[1] == pytest.approx(1e-4) and lr[2] == pytest.approx(1e-5)
    tags = set(acc.Tags()["scalars"])
    for entry in history:
        step = entry["epoch"] + 1
        for prefix, values in (("Train", entry["train_loss"]), ("Eval", entry["eval_loss"]),
                               ("Eval", entry["metrics"])):
            assert values
            for name, value in values.items():
                assert f"{prefix}/{name}" in tags, name
                assert _scalars(acc, f"{prefix}/{name}")[step] == pytest.approx(value, rel=1e-6, abs=1e-6)
    assert {"Train/loss_overall", "Train/loss_span", "Eval/loss_overall", "Eval/MR-full-mAP",
            "Eval/HL-min-VeryGood-mAP"} <= tags
    assert "hyperparameters/text_summary" in acc.Tags()["tensors"]
    text = acc.Tensors("hyperparameters/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| gating_type | clipwise |" in text and "| gate_monitor_every | 1 |" in text


# ------------------------------------------------------------------------------------------ user's loop
@pytest.fixture(scope="module")
def val_dataset(demo_data):
    return demo_split_dataset(demo_data[0], "val")


def test_gate_monitor_writer_in_a_user_loop_v2_film(val_dataset, tmp_path):
    """v2 FiLM gates: a sigmoid MHA gate (no frac_negative), tanh*alpha FFN gate and the beta shift."""
    model, _ = small_model("custom", "clipwise", seed=0, mha_gate_temp=2.0, ffn_gate_film=True)
    writer = SummaryWriter(str(tmp_path / "tb"))
    monitor = GateMonitor(model, DatasetBatches(val_dataset, n=4, batch_size=3), tmp_path / "mon", every=2,
                          plots=False, evolution_plots=False, writer=writer)
    assert monitor.capture(0)["tensorboard"]["histograms"][:3] == [
        "gates/layers.0.gate_mha", "gates/layers.0.gate_ffn", "gates/layers.0.gate_beta"]
    g = torch.Generator().manual_seed(0)
    for epoch in range(4):  # a "training" loop: the gates move every epoch
        with torch.no_grad():
            for p in model.fusion.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        out = monitor.step(epoch)
        assert (out is None) == (epoch not in (1, 3))
    acc = _events(tmp_path / "tb")  # flushed at every capture, before the writer is closed
    for epoch in (0, 2, 4):
        checked = _check_capture(acc, tmp_path / "mon" / f"epoch_{epoch}", epoch)
        assert len(checked) == 2 * 3
    tags = acc.Tags()["scalars"]
    assert "gates/layers.1.gate_mha/frac_negative" not in tags and "gates/layers.1.gate_ffn/frac_negative" in tags
    means = _scalars(acc, "gates/layers.0.gate_mha/mean")
    assert sorted(means) == [0, 2, 4] and len(set(means.values())) == 3
    writer.close()


def test_gate_histogram_buckets_outside_the_range_and_nan_by_hand():
    acc = GateStatsAccumulator("clipwise", 1, kinds=("mha", "ffn"), bins=4, value_range=(-0.5, 0.5))
    acc.update(1, {(0, "mha"): np.array([-0.9, -0.4, 0.0, 0.05, 0.7], np.float32),
                   (0, "ffn"): np.array([0.2, np.nan, 0.2, 0.2, 0.2], np.float32)}, vid="a")
    acc.update(2, {(0, "mha"): np.array([-0.9, -0.4, 0.0, 0.05, 0.7], np.float32),  # same video: pooled once
                   (0, "ffn"): np.array([0.2, np.nan, 0.2, 0.2, 0.2], np.float32)}, vid="a")
    acc.update(3, {(0, "mha"): np.array([0.5, 0.6], np.float32), (0, "ffn"): np.array([0.0, 0.0], np.float32)},
               vid="b")
    hists = gate_histograms(acc)
    h = hists[(0, "mha")]
    # below -0.5: one value (limit -0.5); bins [-.5,-.25) [-.25,0) [0,.25) [.25,.5]; above 0.5: 0.6, 0.7
    assert h["bucket_limits"] == pytest.approx([-0.5, -0.25, 0.0, 0.25, 0.5, 0.7])
    assert h["bucket_counts"] == [1, 1, 0, 2, 1, 2]
    x = np.array([-0.9, -0.4, 0.0, 0.05, 0.7, 0.5, 0.6], np.float32).astype(np.float64)
    assert (h["num"], h["min"], h["max"]) == (7, x.min(), x.max())
    assert h["sum"] == pytest.approx(x.sum()) and h["sum_squares"] == pytest.approx(x @ x)
    assert hists[(0, "ffn")] is None  # NaN values: no histogram

    class Recorder:
        def __init__(self):
            self.calls = []

        def add_histogram_raw(self, tag, global_step=None, **kw):
            self.calls.append(("hist", tag, global_step, kw["num"]))

        def add_scalar(self, tag, value, step):
            self.calls.append(("scalar", tag, step, value))

        def flush(self):
            pass

    rec = Recorder()
    out = write_gate_summaries(rec, acc, 7)
    assert out["histograms"] == ["gates/layers.0.gate_mha"] and out["skipped"] == ["layers.0.gate_ffn"]
    assert ("hist", "gates/layers.0.gate_mha", 7, 7) in rec.calls
    scalars = {c[1]: c[3] for c in rec.calls if c[0] == "scalar"}
    assert scalars["gates/layers.0.gate_mha/mean"] == pytest.approx(x.mean())
    # thresholds follow the declared range (tanh [-1, 1]), not the histogram range
    assert [scalars[f"gates/layers.0.gate_mha/{s}"] for s in GATE_SCALARS[2:]] == pytest.approx([3 / 7, 2 / 7, 2 / 7, 0])
    assert "gates/layers.0.gate_ffn/mean" not in scalars  # NaN: not written
    with pytest.raises(TypeError, match="SummaryWriter"):
        write_gate_summaries(object(), acc, 0)


# ------------------------------------------------------------------------------------------ optional dependency
def test_training_without_tensorboard_says_so_once_and_runs(demo_data, tmp_path, capsys, monkeypatch):
    root, _ = demo_data
    results = tmp_path / "run"
    stale = results / "tensorboard_log" / "events.out.tfevents.1.old.0"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"an earlier run's events")
    (results / "tensorboard_log" / "notes.txt").write_text("kept")
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    args = demo_train_args(root, results, "--n_epoch", "2", "--eval_epoch", "1", "--gate_monitor_every", "1",
                           "--gate_monitor_n", "2", "--gate_monitor_no_plots", "--overwrite")
    assert run_main(main, args) == 0
    captured = capsys.readouterr()
    notes = [line for line in captured.err.splitlines() if "TensorBoard logging is off" in line]
    assert len(notes) == 1 and "pip install tensorboard" in notes[0]
    assert "TensorBoard:" not in captured.out
    assert sorted(os.listdir(results / "tensorboard_log")) == ["notes.txt"]  # stale events of the old run removed
    assert (results / "gate_monitor" / "epoch_2" / "gate_stats_per_layer.csv").is_file()
    assert json.loads((results / "train_summary.json").read_text())["tensorboard_log"] is None


def test_no_tensorboard_flag_writes_no_event_files_and_stays_out_of_the_options(demo_data, tmp_path, capsys):
    root, _ = demo_data
    results = tmp_path / "run"
    assert run_main(main, demo_train_args(root, results, "--n_epoch", "1", "--no_tensorboard")) == 0
    assert "TensorBoard" not in capsys.readouterr().err
    assert not (results / "tensorboard_log").exists()
    saved = json.loads((results / "opt.json").read_text())
    assert "no_tensorboard" not in saved
    ckpt = torch.load(results / "model_latest.ckpt", weights_only=False)
    assert not hasattr(ckpt["opt"], "no_tensorboard")
