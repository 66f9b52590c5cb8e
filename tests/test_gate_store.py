"""Gate store: lossless round trip, order, resume, index/meta content, atomic files, frame()."""
import json
import os

import numpy as np
import pandas as pd
import pytest

from gate_analysis import GateStoreWriter, load_gate_run
from qd_detr.gates import gate_name

LAYERS = 3
KINDS = ("mha", "ffn")


def make_gates(rng, gating_type, t, d=8, layers=LAYERS):
    shape = {"global": (1,), "clipwise": (t,), "elementwise": (t, d)}[gating_type]
    return {(l, k): rng.uniform(-1, 1, size=shape).astype(np.float32) for l in range(layers) for k in KINDS}


def write_run(path, gating_type, queries, batch=3, **kw):
    w = GateStoreWriter(path, gating_type, LAYERS, hidden_dim=8 if gating_type == "elementwise" else None, **kw)
    for i, (qid, vid, gates, t) in enumerate(queries):
        w.add(qid, vid, gates, n_clips=t)
        if (i + 1) % batch == 0:
            w.flush()
    w.close()
    return w


def make_queries(gating_type, n=7, seed=0):
    rng = np.random.default_rng(seed)
    qids = [int(q) for q in rng.permutation(np.arange(100, 100 + 5 * n, 5))]  # not sorted: order must be kept
    out = []
    for q in qids:
        t = int(rng.integers(1, 12))
        out.append((q, f"vid_{q}_0.0_150.0", make_gates(rng, gating_type, t), t))
    return out


def tmp_leftovers(root):
    return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if ".tmp" in f]


@pytest.mark.parametrize("gating_type", ["global", "clipwise", "elementwise"])
def test_round_trip_exact(tmp_path, gating_type):
    queries = make_queries(gating_type)
    write_run(tmp_path / "run", gating_type, queries)
    run = load_gate_run(tmp_path / "run")
    assert run.qids == [q for q, *_ in queries]  # recorded order, not sorted
    assert run.gating_type == gating_type
    assert run.layers == list(range(LAYERS)) and run.kinds == KINDS
    for qid, vid, gates, t in queries:
        assert run.vids[qid] == vid
        for (layer, kind), arr in gates.items():
            got = run.gate(qid, layer, kind)
            assert got.dtype == np.float32
            expected_shape = {"global": (1,), "clipwise": (t,), "elementwise": (t, 8)}[gating_type]
            assert got.shape == expected_shape
            np.testing.assert_array_equal(got, arr)  # bit-exact float32
    # iter_queries yields the same, in order
    seen = [(q, v) for q, v, _ in run.iter_queries()]
    assert seen == [(q, v) for q, v, *_ in queries]
    # also openable from the gates/ folder itself
    assert load_gate_run(tmp_path / "run" / "gates").qids == run.qids
    assert tmp_leftovers(tmp_path) == []


@pytest.mark.parametrize("gating_type", ["global", "clipwise", "elementwise"])
def test_index_and_meta(tmp_path, gating_type):
    queries = make_queries(gating_type, n=7)
    write_run(tmp_path, gating_type, queries, batch=3, extra_meta={"split": "val"})
    gates_dir = tmp_path / "gates"
    shards = sorted(p.name for p in gates_dir.glob("shard_*.npz"))
    assert shards == ["shard_00000.npz", "shard_00001.npz", "shard_00002.npz"]  # 3 + 3 + 1 queries
    index = pd.read_csv(gates_dir / "index.csv")
    assert list(index.columns) == ["qid", "vid", "n_clips", "shard"]
    assert index["qid"].tolist() == [q for q, *_ in queries]
    assert index["n_clips"].tolist() == [t for *_, t in queries]
    assert index["shard"].tolist() == ["shard_00000.npz"] * 3 + ["shard_00001.npz"] * 3 + ["shard_00002.npz"]
    meta = json.loads((gates_dir / "meta.json").read_text())
    assert meta["complete"] is True and meta["n_queries"] == 7 and meta["format_version"] == 1
    assert meta["gating_type"] == gating_type and meta["num_layers"] == LAYERS
    assert meta["layers"] == [0, 1, 2] and meta["kinds"] == ["mha", "ffn"]
    assert meta["hidden_dim"] == (8 if gating_type == "elementwise" else None)
    assert "shape_convention" in meta and meta["extra"] == {"split": "val"}
    # shards are plain npz readable by numpy alone, keys "{qid}/layers.{l}.gate_{kind}"
    qid, _, gates, _ = queries[0]
    with np.load(gates_dir / "shard_00000.npz") as z:
        np.testing.assert_array_equal(z[f"{qid}/layers.2.gate_ffn"], gates[(2, "ffn")])


def test_flush_writes_one_shard_per_call_and_buffer_is_emptied(tmp_path):
    rng = np.random.default_rng(1)
    w = GateStoreWriter(tmp_path, "clipwise", LAYERS)
    assert w.flush() is None  # nothing buffered
    w.add(1, "a", make_gates(rng, "clipwise", 4))
    path = w.flush()
    assert os.path.basename(path) == "shard_00000.npz" and w.flush() is None  # the buffer was emptied
    # meta exists but says incomplete until close()
    assert json.loads((tmp_path / "gates" / "meta.json").read_text())["complete"] is False
    with pytest.raises(ValueError, match="incomplete"):
        load_gate_run(tmp_path)
    w.close()
    assert load_gate_run(tmp_path).qids == [1]


def test_duplicate_qid_and_bad_shapes(tmp_path):
    rng = np.random.default_rng(2)
    w = GateStoreWriter(tmp_path, "clipwise", LAYERS)
    w.add(5, "a", make_gates(rng, "clipwise", 4))
    with pytest.raises(ValueError, match="duplicated qid 5"):
        w.add(5, "b", make_gates(rng, "clipwise", 4))
    w.flush()
    with pytest.raises(ValueError, match="duplicated qid 5"):  # also after a flush
        w.add(5, "b", make_gates(rng, "clipwise", 4))
    bad = make_gates(rng, "clipwise", 4)
    bad[(1, "ffn")] = bad[(1, "ffn")][:3]
    with pytest.raises(ValueError, match="layers.1.gate_ffn"):
        w.add(6, "c", bad)
    missing = make_gates(rng, "clipwise", 4)
    del missing[(2, "mha")]
    with pytest.raises(ValueError, match="layers.2.gate_mha"):
        w.add(7, "c", missing)
    with pytest.raises(TypeError, match="qid must be an int"):
        w.add("auto_0", "c", make_gates(rng, "clipwise", 4))
    w.close()
    assert load_gate_run(tmp_path).qids == [5]


def test_existing_store_needs_resume_or_overwrite(tmp_path):
    queries = make_queries("clipwise", n=2)
    write_run(tmp_path, "clipwise", queries)
    with pytest.raises(FileExistsError, match="resume=True"):
        GateStoreWriter(tmp_path, "clipwise", LAYERS)
    w = GateStoreWriter(tmp_path, "clipwise", LAYERS, overwrite=True)
    w.close()
    assert load_gate_run(tmp_path).qids == []


@pytest.mark.parametrize("gating_type", ["clipwise", "elementwise"])
def test_resume_appends_after_crash(tmp_path, gating_type):
    queries = make_queries(gating_type, n=8, seed=3)
    first, second = queries[:5], queries[5:]
    hd = 8 if gating_type == "elementwise" else None
    # a run that dies after two flushed batches, with one query still buffered and a stale temp file
    w = GateStoreWriter(tmp_path, gating_type, LAYERS, hidden_dim=hd)
    for i, (qid, vid, g, t) in enumerate(first):
        w.add(qid, vid, g)
        if i in (1, 3):
            w.flush()
    (tmp_path / "gates" / ".tmp-999-shard_00002.npz").write_bytes(b"partial")
    del w  # never closed: the 5th query (buffered) is lost
    with pytest.raises(ValueError, match="incomplete"):
        load_gate_run(tmp_path)
    with pytest.raises(ValueError, match="gating_type"):
        GateStoreWriter(tmp_path, "global" if gating_type != "global" else "clipwise", LAYERS, resume=True)
    w = GateStoreWriter(tmp_path, gating_type, LAYERS, hidden_dim=hd, resume=True)
    assert w.n_queries == 4  # rebuilt from the complete shards
    with pytest.raises(ValueError, match="duplicated qid"):
        w.add(first[0][0], "x", first[0][2])
    for qid, vid, g, t in [first[4]] + second:
        w.add(qid, vid, g)
    w.close()
    run = load_gate_run(tmp_path)
    assert run.qids == [q for q, *_ in queries]
    for qid, vid, g, t in queries:
        assert run.vids[qid] == vid
        np.testing.assert_array_equal(run.gate(qid, 2, "mha"), g[(2, "mha")])
    assert sorted(p.name for p in (tmp_path / "gates").glob("shard_*.npz")) == [
        "shard_00000.npz", "shard_00001.npz", "shard_00002.npz"]
    assert tmp_leftovers(tmp_path) == []


def test_context_manager_exception_keeps_flushed_data_resumable(tmp_path):
    rng = np.random.default_rng(4)
    with pytest.raises(RuntimeError):
        with GateStoreWriter(tmp_path, "clipwise", LAYERS) as w:
            w.add(1, "a", make_gates(rng, "clipwise", 3))
            raise RuntimeError("model crashed")
    with pytest.raises(ValueError, match="incomplete"):
        load_gate_run(tmp_path)
    with GateStoreWriter(tmp_path, "clipwise", LAYERS, resume=True) as w:
        w.add(2, "b", make_gates(rng, "clipwise", 3))
    assert load_gate_run(tmp_path).qids == [1, 2]


def test_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        load_gate_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no gate store"):
        load_gate_run(tmp_path / "empty")
    queries = make_queries("clipwise", n=3)
    write_run(tmp_path / "r", "clipwise", queries)
    run = load_gate_run(tmp_path / "r")
    with pytest.raises(KeyError, match="qid 12345"):
        run.gate(12345, 0, "mha")
    with pytest.raises(KeyError, match="layer 7"):
        run.gate(queries[0][0], 7, "mha")
    with pytest.raises(KeyError, match="gate kind 'xyz'"):
        run.gate(queries[0][0], 0, "xyz")
    os.remove(tmp_path / "r" / "gates" / "index.csv")
    with pytest.raises(ValueError, match="index.csv"):
        load_gate_run(tmp_path / "r")


def test_lazy_shard_cache_is_bounded(tmp_path):
    queries = make_queries("clipwise", n=9)
    write_run(tmp_path, "clipwise", queries, batch=1)  # 9 shards
    run = load_gate_run(tmp_path, max_open_shards=2)
    for qid, *_ in queries:
        run.gate(qid, 0, "mha")
        assert len(run._open) <= 2
    run.close()
    assert run._open == {}


@pytest.mark.parametrize("gating_type", ["global", "clipwise", "elementwise"])
def test_frame(tmp_path, gating_type):
    rng = np.random.default_rng(5)
    g1, g2 = make_gates(rng, gating_type, 3), make_gates(rng, gating_type, 2)
    w = GateStoreWriter(tmp_path, gating_type, LAYERS)
    w.add(11, "v11", g1)
    w.add(7, "v7", g2)
    w.close()
    run = load_gate_run(tmp_path)
    df = run.frame()
    assert list(df.columns) == ["qid", "vid", "layer", "gate", "name", "clip", "dim", "value"]
    per_gate = {"global": 1, "clipwise": 3, "elementwise": 3 * 8}[gating_type]
    per_gate2 = {"global": 1, "clipwise": 2, "elementwise": 2 * 8}[gating_type]
    assert len(df) == 2 * LAYERS * (per_gate + per_gate2)
    assert df["qid"].iloc[0] == 11 and df["qid"].iloc[-1] == 7  # recorded order
    sel = df[(df.qid == 11) & (df.layer == 1) & (df.gate == "ffn")]
    assert (sel["name"] == gate_name(1, "ffn")).all() and (sel["vid"] == "v11").all()
    np.testing.assert_array_equal(sel["value"].to_numpy(), g1[(1, "ffn")].reshape(-1).astype(np.float64))
    if gating_type == "global":
        assert (df["clip"] == -1).all() and (df["dim"] == -1).all()
    elif gating_type == "clipwise":
        assert sel["clip"].tolist() == [0, 1, 2] and (sel["dim"] == -1).all()
    else:
        assert sel["clip"].tolist() == np.repeat([0, 1, 2], 8).tolist()
        assert sel["dim"].tolist() == list(range(8)) * 3
        red = run.frame(qids=[11], reduce_dims=True)
        s = red[(red.layer == 1) & (red.gate == "ffn")]
        assert s["clip"].tolist() == [0, 1, 2] and (s["dim"] == -1).all()
        np.testing.assert_allclose(s["value"].to_numpy(), g1[(1, "ffn")].astype(np.float64).mean(axis=1))
    assert run.frame(qids=[7])["qid"].unique().tolist() == [7]
