"""Tests for qd_detr.dataset and qd_detr.demo_data.

The fidelity bar is (a): the model inputs must equal the digest of the inputs QD-DETR-exp's own
dataset + collate produced for the fixture val split (``/work/shared/fixtures/data``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FIXTURE_DATA, QVH_DATA
from qd_detr.dataset import (
    QVHighlightsDataset,
    collate,
    has_labels,
    length_grouped_batches,
    model_kwargs,
    move_to_device,
    read_jsonl,
    sequential_batches,
    temporal_endpoint_features,
)
from qd_detr.demo_data import make_demo_dataset
from qd_detr.errors import ConfigError, DataError

needs_fixtures = pytest.mark.skipif(
    not (FIXTURE_DATA / "val_model_inputs_digest_audio.npz").is_file(),
    reason=f"fixture data not found under {FIXTURE_DATA}")


def fixture_dataset(audio: bool, **kw) -> QVHighlightsDataset:
    return QVHighlightsDataset(
        read_jsonl(FIXTURE_DATA / "highlight_val_release.jsonl"),
        [FIXTURE_DATA / "slowfast_features", FIXTURE_DATA / "clip_features"], FIXTURE_DATA / "clip_text_features",
        a_feat_dir=FIXTURE_DATA / "pann_features" if audio else None, **kw)


# ----------------------------------------------------------------------------------------------
# (a) fidelity against the original pipeline's digest
# ----------------------------------------------------------------------------------------------

@needs_fixtures
@pytest.mark.parametrize("audio", [True, False], ids=["audio", "noaudio"])
def test_val_inputs_match_original_digest(audio):
    digest = np.load(FIXTURE_DATA / f"val_model_inputs_digest_{'audio' if audio else 'noaudio'}.npz")
    ds = fixture_dataset(audio, v_feat_dim=2818, t_feat_dim=512, a_feat_dim=2050 if audio else None)
    qids = [r["qid"] for r in read_jsonl(FIXTURE_DATA / "highlight_val_release.jsonl")]
    assert ds.qids == qids and len(qids) == 16
    streams = ["src_vid", "src_aud"] if audio else ["src_vid"]
    worst = {}
    for i, qid in enumerate(qids):
        metas, inputs = collate([ds[i]])
        assert metas[0]["qid"] == qid
        txt = inputs["src_txt"][0].numpy()
        ref = digest[f"{qid}/src_txt"]
        assert txt.shape == ref.shape and txt.dtype == np.float32
        worst["src_txt"] = max(worst.get("src_txt", 0.0), float(np.abs(txt - ref).max()))
        assert inputs["src_txt_mask"].eq(1).all()
        for name in streams:
            x = inputs[name][0].numpy()
            assert inputs[f"{name}_mask"].eq(1).all()
            parts = {"head8": x[:, :8], "tail4": x[:, -4:], "rowsum": x.astype(np.float64).sum(1)}
            for suffix, got in parts.items():
                ref = digest[f"{qid}/{name}_{suffix}"]
                assert got.shape == ref.shape, (qid, name, suffix, got.shape, ref.shape)
                key = f"{name}_{suffix}"
                worst[key] = max(worst.get(key, 0.0), float(np.abs(got - ref).max()))
        expected_l = (46 if audio else 47) if qid in (5007, 5008, 5009) else None
        if expected_l is not None:
            assert inputs["src_vid"].shape[1] == expected_l
    for key, diff in worst.items():
        tol = 1e-5 if key.endswith("rowsum") else 1e-6
        assert diff <= tol, (key, diff)


@needs_fixtures
def test_fixture_feature_dims_and_edge_cases():
    ds = fixture_dataset(True)
    lengths = dict(zip(ds.qids, ds.ctx_lengths()))
    assert lengths[5007] == 46  # audio has one row less than the 47 video clips
    assert lengths[5000] == 75  # slowfast has 76 rows, cut to max_v_l and min length
    assert dict(zip(ds.qids, fixture_dataset(False).ctx_lengths()))[5007] == 47
    item = ds[ds.qids.index(5007)]["model_inputs"]
    assert item["video_feat"].shape == (46, 2818) and item["audio_feat"].shape == (46, 2050)
    # TEF identical on both streams, as the original appends the same tensor
    assert torch.equal(item["video_feat"][:, -2:], item["audio_feat"][:, -2:])


@needs_fixtures
def test_batched_collate_equals_bs1_rows_and_zero_padding():
    ds = fixture_dataset(True)
    metas, batch = collate([ds[i] for i in range(len(ds))])
    assert batch["src_vid"].shape[:2] == (16, 75) and batch["src_txt"].shape[:2] == (16, 20)
    for i in range(len(ds)):
        _, one = collate([ds[i]])
        for name in ("src_txt", "src_vid", "src_aud"):
            n = one[name].shape[1]
            assert torch.equal(batch[name][i, :n], one[name][0])
            assert batch[name][i, n:].abs().sum() == 0
            assert batch[f"{name}_mask"][i, :n].eq(1).all() and batch[f"{name}_mask"][i, n:].eq(0).all()


@needs_fixtures
def test_fixture_labels():
    ds = fixture_dataset(True)
    assert ds.load_labels
    i = ds.qids.index(5000)
    rec = ds.records[i]
    lab = ds[i]["model_inputs"]
    ctx_l = 75
    st, ed = rec["relevant_windows"][0]
    spans = lab["span_labels"]
    assert spans.dtype == torch.float32 and spans.shape == (len(rec["relevant_windows"]), 2)
    assert spans[0, 0].item() == pytest.approx((st + ed) / 2 / (ctx_l * 2), abs=1e-7)
    assert spans[0, 1].item() == pytest.approx((ed - st) / (ctx_l * 2), abs=1e-7)
    sal = lab["saliency_all_labels"]
    assert sal.shape == (ctx_l,)
    for cid, s in zip(rec["relevant_clip_ids"], rec["saliency_scores"]):
        assert sal[cid] == sum(s)
    assert sal.sum() == sum(map(sum, rec["saliency_scores"]))
    pos, neg = lab["saliency_pos_labels"], lab["saliency_neg_labels"]
    assert len(pos) == len(neg) == 2
    assert pos[1] in rec["relevant_clip_ids"] and neg[1] not in rec["relevant_clip_ids"]
    assert sum(rec["saliency_scores"][rec["relevant_clip_ids"].index(pos[0])]) == max(map(sum, rec["saliency_scores"]))
    # eval mode: the random part is a function of (seed, qid) only
    again = fixture_dataset(True)[i]["model_inputs"]
    assert again["saliency_pos_labels"] == pos and again["saliency_neg_labels"] == neg
    _, inputs = collate([ds[0], ds[1]])
    t = inputs["targets"]
    assert [type(d["spans"]) for d in t["span_labels"]] == [torch.Tensor, torch.Tensor]
    assert t["saliency_pos_labels"].dtype == torch.long and t["saliency_pos_labels"].shape == (2, 2)
    assert t["saliency_all_labels"].dtype == torch.float32
    assert set(model_kwargs(inputs)) == {"src_txt", "src_txt_mask", "src_vid", "src_vid_mask",
                                         "src_aud", "src_aud_mask"}


@needs_fixtures
def test_fixture_without_labels_and_with_normalisation_off():
    ds = fixture_dataset(False, load_labels=False, normalize_v=False, normalize_t=False)
    item = ds[0]["model_inputs"]
    assert set(item) == {"query_feat", "video_feat"}
    raw = np.load(FIXTURE_DATA / "clip_text_features" / f"qid{ds.qids[0]}.npz")["last_hidden_state"]
    assert np.array_equal(item["query_feat"].numpy(), raw[:32].astype(np.float32))
    _, inputs = collate([ds[0]])
    assert "targets" not in inputs


# ----------------------------------------------------------------------------------------------
# (b) the real QVHighlights annotation files
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("split,count,labelled",
                         [("train", 7218, True), ("val", 1550, True), ("test", 1542, False)])
def test_real_annotations(split, count, labelled):
    path = QVH_DATA / f"highlight_{split}_release.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not available")
    recs = read_jsonl(path)
    assert len(recs) == count
    assert all(has_labels(r) == labelled for r in recs)
    assert len({r["qid"] for r in recs}) == count


# ----------------------------------------------------------------------------------------------
# small synthetic feature trees for unit tests
# ----------------------------------------------------------------------------------------------

SF, CL, TX, AU = 6, 4, 5, 3  # tiny dims: slowfast, clip, text, audio


def _write_tree(root: Path, videos: dict, texts: dict) -> dict:
    """videos: vid -> (n_sf, n_clip, n_audio) rows; texts: qid -> n_tokens."""
    rng = np.random.default_rng(0)
    dirs = {k: root / k for k in ("sf", "clip", "txt", "aud")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    for vid, (n_sf, n_cl, n_au) in videos.items():
        np.savez(dirs["sf"] / f"{vid}.npz", features=rng.normal(size=(n_sf, SF)).astype(np.float32))
        np.savez(dirs["clip"] / f"{vid}.npz", features=rng.normal(size=(n_cl, CL)).astype(np.float32))
        np.save(dirs["aud"] / f"{vid}.npy", np.abs(rng.normal(size=(n_au, AU))).astype(np.float32))
    for qid, n in texts.items():
        np.savez(dirs["txt"] / f"qid{qid}.npz", last_hidden_state=rng.normal(size=(n, TX)).astype(np.float32),
                 pooler_output=rng.normal(size=(TX,)).astype(np.float32))
    return dirs


def _rec(qid, vid, duration=20, labels=True):
    r = {"qid": qid, "query": f"q{qid}", "duration": duration, "vid": vid}
    if labels:
        r.update(relevant_windows=[[2, 6]], relevant_clip_ids=[1, 2], saliency_scores=[[1, 2, 3], [4, 4, 4]])
    return r


@pytest.fixture
def tree(tmp_path):
    dirs = _write_tree(tmp_path, {"va": (10, 10, 10), "vb": (7, 8, 9), "vc": (5, 5, 4)},
                       {1: 3, 2: 6, 3: 4})
    recs = [_rec(1, "va"), _rec(2, "vb"), _rec(3, "vc")]
    return dirs, recs


def _ds(dirs, recs, audio=True, **kw):
    return QVHighlightsDataset(recs, [dirs["sf"], dirs["clip"]], dirs["txt"],
                               a_feat_dir=dirs["aud"] if audio else None, **kw)


# ----------------------------------------------------------------------------------------------
# (c) collate, batching helpers, preparation details
# ----------------------------------------------------------------------------------------------

def test_collate_padding_and_masks(tree):
    dirs, recs = tree
    ds = _ds(dirs, recs)
    items = [ds[i] for i in range(3)]
    lens_v = [len(it["model_inputs"]["video_feat"]) for it in items]
    lens_t = [len(it["model_inputs"]["query_feat"]) for it in items]
    assert lens_v == [10, 7, 4] and lens_t == [3, 6, 4]
    metas, inp = collate(items)
    assert [m["qid"] for m in metas] == [1, 2, 3]
    assert inp["src_vid"].shape == (3, 10, SF + CL + 2)
    assert inp["src_aud"].shape == (3, 10, AU + 2)
    assert inp["src_txt"].shape == (3, 6, TX)
    for name, lens in (("src_vid", lens_v), ("src_aud", lens_v), ("src_txt", lens_t)):
        x, m = inp[name], inp[f"{name}_mask"]
        assert x.dtype == torch.float32 and m.dtype == torch.float32
        for b, n in enumerate(lens):
            assert m[b].tolist() == [1.0] * n + [0.0] * (x.shape[1] - n)
            assert x[b, n:].eq(0).all()
            key = {"src_vid": "video_feat", "src_aud": "audio_feat", "src_txt": "query_feat"}[name]
            assert torch.equal(x[b, :n], items[b]["model_inputs"][key])
    t = inp["targets"]
    assert [tuple(d["spans"].shape) for d in t["span_labels"]] == [(1, 2)] * 3
    assert t["saliency_all_labels"].shape == (3, 10)
    assert t["saliency_all_labels"][2, 4:].eq(0).all()
    assert t["saliency_all_labels"][0, :3].tolist() == [0.0, 6.0, 12.0]
    moved = move_to_device(inp, "cpu")
    assert torch.equal(moved["src_vid"], inp["src_vid"]) and isinstance(moved["targets"]["span_labels"], list)
    no_audio = collate([_ds(dirs, recs, audio=False)[i] for i in range(3)])[1]
    assert "src_aud" not in no_audio and no_audio["src_vid"].shape == (3, 10, SF + CL + 2)
    assert no_audio["src_vid_mask"].sum(1).tolist() == [10, 7, 5]


def test_preparation_matches_formula(tree):
    dirs, recs = tree
    ds = _ds(dirs, recs)
    v = ds[1]["model_inputs"]  # vb: sf 7 rows, clip 8, audio 9 -> ctx_l 7
    sf = np.load(dirs["sf"] / "vb.npz")["features"][:7]
    cl = np.load(dirs["clip"] / "vb.npz")["features"][:7]
    au = np.load(dirs["aud"] / "vb.npy")[:7]
    norm = lambda x: x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-5)
    np.testing.assert_array_equal(v["video_feat"][:, :SF].numpy(), norm(sf))
    np.testing.assert_array_equal(v["video_feat"][:, SF:SF + CL].numpy(), norm(cl))
    np.testing.assert_array_equal(v["audio_feat"][:, :AU].numpy(), norm(au))
    tef = v["video_feat"][:, -2:]
    starts = np.arange(7, dtype=np.float32) / np.float32(7)
    np.testing.assert_array_equal(tef[:, 0].numpy(), starts)
    np.testing.assert_array_equal(tef[:, 1].numpy(), starts + np.float32(1 / 7))
    assert torch.equal(temporal_endpoint_features(7), tef)
    # max_v_l and max_q_l truncate; "video" without "tef" adds nothing
    small = _ds(dirs, recs, max_v_l=3, max_q_l=2, ctx_mode="video")
    it = small[1]["model_inputs"]
    assert it["video_feat"].shape == (3, SF + CL) and it["audio_feat"].shape == (3, AU)
    assert it["query_feat"].shape == (2, TX)
    only_tef = QVHighlightsDataset(recs, [], dirs["txt"], ctx_mode="tef", max_v_l=9)
    assert torch.equal(only_tef[0]["model_inputs"]["video_feat"], temporal_endpoint_features(9))


def test_text_3d_quirk(tmp_path):
    """(1, L, D) text: the original cuts the batch axis, so tokens beyond max_q_l survive."""
    dirs = _write_tree(tmp_path, {"va": (4, 4, 4)}, {})
    tokens = np.random.default_rng(1).normal(size=(40, TX)).astype(np.float32)
    np.savez(dirs["txt"] / "qid1.npz", last_hidden_state=tokens[None])
    ds = _ds(dirs, [_rec(1, "va")], load_labels=False)
    assert ds[0]["model_inputs"]["query_feat"].shape == (40, TX)
    np.savez(dirs["txt"] / "qid1.npz", last_hidden_state=tokens)
    assert ds[0]["model_inputs"]["query_feat"].shape == (32, TX)


def test_labels_window_subsampling_and_training_rng(tree):
    dirs, recs = tree
    rec = dict(recs[0], relevant_windows=[[0, 2], [4, 6], [8, 10], [12, 14]],
               relevant_clip_ids=[0, 2, 4, 6], saliency_scores=[[1, 1, 1], [2, 2, 2], [3, 3, 3], [4, 4, 4]])
    before = json.dumps(rec)
    ds = _ds(dirs, [rec], max_windows=2)
    lab = ds[0]["model_inputs"]
    assert lab["span_labels"].shape == (2, 2)
    assert json.dumps(rec) == before  # the record is not shuffled in place
    assert lab["saliency_pos_labels"][0] == 6 and lab["saliency_neg_labels"][0] == 0
    a = _ds(dirs, [rec], training=True, seed=3)
    b = _ds(dirs, [rec], training=True, seed=3)
    draws_a = [tuple(a[0]["model_inputs"]["saliency_neg_labels"]) for _ in range(20)]
    draws_b = [tuple(b[0]["model_inputs"]["saliency_neg_labels"]) for _ in range(20)]
    assert draws_a == draws_b and len(set(draws_a)) > 1
    # a relevant clip id equal to ctx_l grows saliency_all_labels by one, like the original
    edge = dict(recs[2], relevant_clip_ids=[3, 4], saliency_scores=[[1, 1, 1], [2, 2, 2]])
    sal = _ds(dirs, [edge])[0]["model_inputs"]["saliency_all_labels"]  # vc: ctx_l 4
    assert sal.tolist() == [0, 0, 0, 3, 6]


def test_load_labels_auto_and_required(tree):
    dirs, recs = tree
    assert _ds(dirs, recs).load_labels
    mixed = [recs[0], _rec(2, "vb", labels=False)]
    assert not _ds(dirs, mixed).load_labels
    with pytest.raises(DataError, match="qid 2"):
        _ds(dirs, mixed, load_labels=True)


def test_batching_helpers():
    assert sequential_batches(7, 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert sequential_batches(0, 3) == []
    lengths = [75, 30, 75, 47, 30, 60]
    batches = length_grouped_batches(lengths, 2)
    assert batches == [[1, 4], [3, 5], [0, 2]]
    assert sorted(i for b in batches for i in b) == list(range(6))
    assert length_grouped_batches(lengths, 2) == batches
    with pytest.raises(ValueError):
        sequential_batches(3, 0)
    with pytest.raises(ValueError):
        length_grouped_batches(lengths, 0)


# ----------------------------------------------------------------------------------------------
# (d) error cases
# ----------------------------------------------------------------------------------------------

GOOD = '{"qid": 1, "query": "a", "vid": "v", "duration": 10}'


@pytest.mark.parametrize("lines,pattern", [
    ([GOOD, '{"qid": 2, "query": "a", "vid": "v" "duration": 10}'], r"line 2: malformed JSON"),
    ([GOOD, "", "[1, 2]"], r"line 3: expected a JSON object"),
    (['{"qid": 1, "query": "a", "vid": "v"}'], r"line 1: missing required field 'duration'"),
    (['{"query": "a", "vid": "v", "duration": 3}'], r"line 1: missing required field 'qid'"),
    (['{"qid": "7", "query": "a", "vid": "v", "duration": 10}'], r"line 1: field 'qid' must be an integer"),
    (['{"qid": true, "query": "a", "vid": "v", "duration": 10}'], r"line 1: field 'qid' must be an integer"),
    (['{"qid": 1, "query": "a", "vid": "v", "duration": "10"}'], r"line 1: field 'duration' must be a"),
    (['{"qid": 1, "query": "a", "vid": "v", "duration": -4}'], r"line 1: field 'duration' must be positive"),
    ([GOOD, GOOD], r"line 2: duplicate qid 1"),
    (['{"qid": 1, "query": "a", "vid": "v", "duration": 10, "relevant_windows": [[1]]}'],
     r"line 1: field 'relevant_windows'"),
    (['{"qid": 1, "query": "a", "vid": "v", "duration": 10, "relevant_clip_ids": [1, 2],'
      ' "saliency_scores": [[1, 1, 1]]}'], r"line 1: 'saliency_scores' has 1 entries"),
    (["", "  ", ""], r"no records"),
])
def test_read_jsonl_errors(tmp_path, lines, pattern):
    path = tmp_path / "ann.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=pattern) as info:
        read_jsonl(path)
    assert str(path) in str(info.value)


def test_read_jsonl_paths_and_blank_lines(tmp_path):
    with pytest.raises(DataError, match="not found") as info:
        read_jsonl(tmp_path / "nope.jsonl")
    assert "nope.jsonl" in str(info.value)
    with pytest.raises(DataError, match="is a folder"):
        read_jsonl(tmp_path)
    path = tmp_path / "ok.jsonl"
    path.write_text("\n" + GOOD + "\n\n" + GOOD.replace('"qid": 1', '"qid": 2') + "\n\n")
    recs = read_jsonl(path)
    assert [r["qid"] for r in recs] == [1, 2] and not has_labels(recs[0])
    bad = tmp_path / "bin.jsonl"
    bad.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DataError, match="bin.jsonl"):
        read_jsonl(bad)
    assert read_jsonl(path, required=("qid",))


def test_missing_feature_files(tree):
    dirs, recs = tree
    (dirs["clip"] / "vb.npz").unlink()
    with pytest.raises(DataError, match=r"vb\.npz.*not found") as info:
        _ds(dirs, recs)
    assert str(dirs["clip"] / "vb.npz") in str(info.value)
    ds = _ds(dirs, recs, skip_missing=True)
    assert ds.qids == [1, 3] and ds.skipped == [(2, str(dirs["clip"] / "vb.npz"))]
    (dirs["txt"] / "qid1.npz").unlink()
    (dirs["aud"] / "vc.npy").unlink()
    with pytest.raises(DataError, match="all 3 queries were skipped"):
        _ds(dirs, recs, skip_missing=True)
    with pytest.raises(DataError, match="directory not found"):
        QVHighlightsDataset(recs, [dirs["sf"], dirs["sf"] / "missing"], dirs["txt"])


def test_file_removed_after_construction(tree):
    dirs, recs = tree
    ds = _ds(dirs, recs)
    (dirs["aud"] / "va.npy").unlink()
    with pytest.raises(DataError, match=r"va\.npy"):
        ds[0]


@pytest.mark.parametrize("which", ["sf", "clip", "aud", "txt"])
@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_non_finite_features(tree, which, bad_value):
    dirs, recs = tree
    if which == "txt":
        path = dirs["txt"] / "qid1.npz"
        arr = np.load(path)["last_hidden_state"].copy()
        arr[1, 2] = bad_value
        np.savez(path, last_hidden_state=arr)
    elif which == "aud":
        path = dirs["aud"] / "va.npy"
        arr = np.load(path)
        arr[9, 0] = bad_value  # a row the model uses
        np.save(path, arr)
    else:
        path = dirs[which] / "va.npz"
        arr = np.load(path)["features"].copy()
        arr[0, 0] = bad_value
        np.savez(path, features=arr)
    ds = _ds(dirs, recs)
    with pytest.raises(DataError, match="NaN/Inf") as info:
        ds[0]
    assert str(path) in str(info.value)


def test_dimension_checks(tree):
    dirs, recs = tree
    v_dim, a_dim = SF + CL + 2, AU + 2
    ok = _ds(dirs, recs, v_feat_dim=v_dim, t_feat_dim=TX, a_feat_dim=a_dim)
    assert ok[2]["model_inputs"]["video_feat"].shape[1] == v_dim
    with pytest.raises(DataError) as info:  # checked up front from the file headers
        _ds(dirs, recs, v_feat_dim=2818)
    msg = str(info.value)
    assert f"dim {v_dim}" in msg and "2818" in msg and str(dirs["sf"] / "va.npz") in msg
    with pytest.raises(DataError) as info:
        _ds(dirs, recs, t_feat_dim=512)
    assert f"dim {TX}" in str(info.value) and "512" in str(info.value) and "qid1.npz" in str(info.value)
    with pytest.raises(DataError) as info:
        _ds(dirs, recs, a_feat_dim=2050)
    assert f"dim {a_dim}" in str(info.value) and "2050" in str(info.value) and "va.npy" in str(info.value)
    # a later item whose file disagrees fails when loaded, naming its file
    np.savez(dirs["clip"] / "vc.npz", features=np.ones((5, CL + 1), np.float32))
    ds = _ds(dirs, recs, v_feat_dim=v_dim)
    with pytest.raises(DataError) as info:
        ds[2]
    assert str(dirs["clip"] / "vc.npz") in str(info.value) and f"dim {v_dim + 1}" in str(info.value)
    with pytest.raises(ConfigError):
        _ds(dirs, recs, audio=False, a_feat_dim=a_dim)


def test_malformed_feature_files(tree):
    dirs, recs = tree
    cases = []
    p = dirs["sf"] / "va.npz"
    np.savez(p, feats=np.ones((10, SF), np.float32))
    cases.append((p, "has no key 'features'"))
    p = dirs["clip"] / "vb.npz"
    p.write_bytes(b"not a zip file at all")
    cases.append((p, "cannot read feature file"))
    p = dirs["aud"] / "vc.npy"
    np.save(p, np.ones((4, 2, AU), np.float32))
    cases.append((p, "2-D"))
    ds = _ds(dirs, recs)
    for (path, pattern), idx in zip(cases, range(3)):
        with pytest.raises(DataError, match=pattern) as info:
            ds[idx]
        assert str(path) in str(info.value)
    p = dirs["txt"] / "qid1.npz"
    np.savez(p, last_hidden_state=np.ones((2, 3, TX), np.float32))
    with pytest.raises(DataError, match="batch dim of 1") as info:
        ds[0]
    assert str(p) in str(info.value)


def test_bad_records_and_config(tree):
    dirs, recs = tree
    with pytest.raises(DataError, match=r"records\[1\].*'vid'"):
        _ds(dirs, [recs[0], {"qid": 9}])
    with pytest.raises(DataError, match="empty"):
        _ds(dirs, [])
    with pytest.raises(ConfigError):
        _ds(dirs, recs, ctx_mode="none")
    with pytest.raises(ConfigError):
        _ds(dirs, recs, txt_drop_ratio=0.5)
    ds = _ds(dirs, recs, training=True, txt_drop_ratio=0.5, seed=0)
    q = ds[1]["model_inputs"]["query_feat"]
    assert (q.abs().sum(1) == 0).sum() == 3  # round(6 * 0.5) tokens zeroed


# ----------------------------------------------------------------------------------------------
# (e) demo data
# ----------------------------------------------------------------------------------------------

def _tree_bytes(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_demo_data_deterministic(tmp_path):
    kw = dict(n_videos=3, queries_per_video=2, seed=5, slowfast_dim=12, clip_dim=8, text_dim=8, audio_dim=10)
    a = make_demo_dataset(tmp_path / "a", **kw)
    b = make_demo_dataset(tmp_path / "b", **kw)
    files_a, files_b = _tree_bytes(tmp_path / "a"), _tree_bytes(tmp_path / "b")
    assert files_a == files_b and len(files_a) == 2 + 3 * 2 * 3 + 2 * 3 * 2
    assert a["qids"] == b["qids"]
    c = make_demo_dataset(tmp_path / "c", **dict(kw, seed=6))
    assert _tree_bytes(tmp_path / "c") != files_a and c["dims"] == {"v_feat_dim": 22, "t_feat_dim": 8,
                                                                   "a_feat_dim": 12}


def test_demo_data_defaults_load_and_cover_buckets(tmp_path):
    import time
    t0 = time.perf_counter()
    paths = make_demo_dataset(tmp_path)
    assert time.perf_counter() - t0 < 2.0
    splits = {s: read_jsonl(p) for s, p in paths["jsonl"].items()}
    assert set(splits) == {"train", "val"} and all(len(r) == 24 for r in splits.values())
    vids = {s: {r["vid"] for r in recs} for s, recs in splits.items()}
    assert len(vids["train"]) == len(vids["val"]) == 8 and not vids["train"] & vids["val"]
    buckets = set()
    for rec in splits["val"]:
        assert rec["duration"] % 2 == 0 and 30 <= rec["duration"] <= 150
        assert any(s == [4, 4, 4] for s in rec["saliency_scores"])
        assert all(0 <= v <= 4 and isinstance(v, int) for s in rec["saliency_scores"] for v in s)
        assert all(len(s) == 3 for s in rec["saliency_scores"])
        ids = []
        for st, ed in rec["relevant_windows"]:
            assert st % 2 == 0 and ed % 2 == 0 and 0 <= st < ed <= rec["duration"] - 4
            length = ed - st
            buckets.add("short" if length <= 10 else "middle" if length <= 30 else "long")
            ids += list(range(st // 2, ed // 2))
        assert sorted(ids) == rec["relevant_clip_ids"]
    assert buckets == {"short", "middle", "long"}

    rec = splits["val"][0]
    sf = np.load(Path(paths["slowfast_features"]) / f"{rec['vid']}.npz")["features"]
    cl = np.load(Path(paths["clip_features"]) / f"{rec['vid']}.npz")["features"]
    au = np.load(Path(paths["pann_features"]) / f"{rec['vid']}.npy")
    txt = np.load(Path(paths["clip_text_features"]) / f"qid{rec['qid']}.npz")
    n = rec["duration"] // 2
    assert sf.shape == (n, 2304) and cl.shape == (n, 512) and au.shape == (n, 2048)
    assert sf.dtype == cl.dtype == au.dtype == np.float32 and (au >= 0).all()
    assert txt["pooler_output"].shape == (512,) and 8 <= txt["last_hidden_state"].shape[0] <= 20

    ds = QVHighlightsDataset(paths["jsonl"]["val"], paths["v_feat_dirs"], paths["t_feat_dir"],
                             paths["a_feat_dir"], **paths["dims"])
    assert ds.load_labels and len(ds) == 24
    metas, inputs = collate([ds[i] for i in range(len(ds))])
    assert inputs["src_vid"].shape[2] == 2818 and inputs["src_aud"].shape[2] == 2050
    # the signal: text concept shows up in relevant CLIP clips, audio separates relevant clips
    rel = torch.zeros(inputs["src_vid_mask"].shape)
    for i, m in enumerate(metas):
        rel[i, m["relevant_clip_ids"]] = 1
    valid = inputs["src_vid_mask"] > 0
    sim = torch.einsum("bld,bd->bl", inputs["src_vid"][:, :, 2304:2816], inputs["src_txt"].sum(1))
    assert sim[(rel > 0) & valid].mean() > sim[(rel == 0) & valid].mean() + 1.0
    # audio marks clips relevant to *any* query of the video
    any_rel = torch.zeros_like(rel)
    for i, m in enumerate(metas):
        for other in metas:
            if other["vid"] == m["vid"]:
                any_rel[i, other["relevant_clip_ids"]] = 1
    aud = inputs["src_aud"][:, :, :-2]
    direction = aud[(any_rel > 0) & valid].mean(0) - aud[(any_rel == 0) & valid].mean(0)
    proj = aud @ direction
    assert proj[(any_rel > 0) & valid].min() > proj[(any_rel == 0) & valid].max()


def test_demo_data_tiny_and_test_split(tmp_path):
    paths = make_demo_dataset(tmp_path, n_videos=1, queries_per_video=1, split_names=("val", "test"),
                              slowfast_dim=4, clip_dim=3, text_dim=3, audio_dim=5)
    val, test = read_jsonl(paths["jsonl"]["val"]), read_jsonl(paths["jsonl"]["test"])
    lengths = [ed - st for st, ed in val[0]["relevant_windows"]]
    assert any(x <= 10 for x in lengths) and any(10 < x <= 30 for x in lengths) and any(x > 30 for x in lengths)
    assert not has_labels(test[0]) and val[0]["vid"] != test[0]["vid"]
    ds = QVHighlightsDataset(test, paths["v_feat_dirs"], paths["t_feat_dir"], paths["a_feat_dir"],
                             **paths["dims"])
    assert not ds.load_labels and ds[0]["model_inputs"]["video_feat"].shape[1] == 9
