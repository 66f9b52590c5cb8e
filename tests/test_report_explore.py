"""report.html's explorer: the embedded data equal the run's CSVs, gate store, predictions and labels; the page
stays self-contained; what it says when the labels are gone; per-query gating; and, where Chromium is installed,
the page in a real browser (loads without errors, sorting and selecting a row change what is shown)."""
import json
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from conftest import demo_data_args, run_gate_analysis_main, small_checkpoint
from gate_analysis.report import build_report
from gate_analysis.report_explore import ROW_LIMIT, decode_fixed, encode_fixed, explore_data
from gate_analysis.sink import GateSink
from gate_analysis.store import GateStoreWriter, load_gate_run
from qd_detr.annotations import read_jsonl

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _blobs(page):
    """(table, {video index: video}) parsed out of the page's inline JSON elements."""
    found = dict(re.findall(r"<script type='application/json' id='(gx-[^']+)'>(.*?)</script>", page, re.S))
    table = json.loads(found.pop("gx-data"))
    return table, {int(k[4:]): json.loads(v) for k, v in found.items()}


def _close(a, b, rel=5e-4):
    """4 significant digits: |a - b| <= rel |b| (None for NaN)."""
    if b is None or (isinstance(b, float) and np.isnan(b)):
        return a is None
    return a is not None and abs(a - b) <= rel * abs(b) + 1e-12


def _close_fixed(obj, values):
    """An ``encode_fixed`` array against the exact values: within half its last digit."""
    got, want = decode_fixed(obj), np.asarray(values, dtype=np.float64)
    return got.shape == want.shape and np.all(np.abs(got - want) <= 0.5 * 10.0 ** obj["e"] * (1 + 1e-9) + 1e-12)


@pytest.fixture(scope="module")
def run(demo_data, tmp_path_factory):
    """A labelled elementwise demo run (6 videos x 2 queries) with two interventions, no figures."""
    _, paths = demo_data
    root = tmp_path_factory.mktemp("explore")
    ckpt = small_checkpoint(root / "model.ckpt", "custom", "elementwise", seed=5)[0]
    out = root / "run"
    assert run_gate_analysis_main("--model_path", ckpt, *demo_data_args(paths), "--output_dir", out, "--batch_size",
                                  "4", "--device", "cpu", "--ablate", "zero", "audio_zero", "--no_plots",
                                  "--quiet") == 0
    return out, paths


def test_table_equals_the_csvs(run):
    out, _ = run
    table, videos = _blobs((out / "report.html").read_text())
    store = load_gate_run(out)
    q = table["views"]["queries"]
    keys = [c["k"] for c in q["columns"]]
    rows = {r[1]: dict(zip(keys, r[1:])) for r in q["rows"]}
    assert [r[1] for r in q["rows"]] == store.qids and table["n_videos"] == len(videos) == 6
    perf = pd.read_csv(out / "gate_performance.csv", dtype={"vid": str}).drop_duplicates("qid").set_index("qid")
    per_video = pd.read_csv(out / "gate_stats_per_video.csv", dtype={"vid": str})
    ablation = pd.read_csv(out / "ablation.csv", dtype={"vid": str})
    assert {"top1_iou", "mr_ap", "hl_ap_verygood", "layers.1.gate_ffn", "layers.all.gate_mha",
            "ab:zero@all:both", "ab:audio_zero"} <= set(keys)
    for qid, row in rows.items():
        assert row["vid"] == store.vids[qid] and row["n_clips"] == store.n_clips[qid]
        for metric in ("top1_iou", "r1_05", "mr_ap", "hl_hit1_verygood", "hl_ap_verygood"):
            assert _close(row[metric], float(perf.loc[qid, metric])), (qid, metric)
        assert row["length_bucket"] == perf.loc[qid, "length_bucket"]
        mine = per_video[per_video["vid"] == row["vid"]]
        for name, mean in zip(mine["name"], mine["mean"]):
            assert _close(row[name], mean), (qid, name)
        for kind in ("mha", "ffn"):
            assert _close(row[f"layers.all.gate_{kind}"], mine[mine["gate"] == kind]["mean"].abs().mean())
        for inter, delta in ablation[ablation["qid"] == qid][["intervention", "delta_mr_ap"]].itertuples(index=False):
            assert _close(row[f"ab:{inter}"], delta), (qid, inter)
    # one row per video in the other view, in the order of first appearance
    v = table["views"]["videos"]
    assert [r[1] for r in v["rows"]] == list(dict.fromkeys(store.vids[q] for q in store.qids))
    assert all(r[0] == i for i, r in enumerate(v["rows"]))


def test_videos_equal_gate_store_predictions_and_labels(run):
    out, paths = run
    table, videos = _blobs((out / "report.html").read_text())
    store = load_gate_run(out)
    preds = {r["qid"]: r for r in map(json.loads, (out / "predictions.jsonl").read_text().splitlines())}
    labels = {r["qid"]: r for r in read_jsonl(paths["jsonl"]["val"])}
    ablation = pd.read_csv(out / "ablation.csv", dtype={"vid": str}, keep_default_na=False)
    assert table["gating_type"] == "elementwise" and [g["name"] for g in table["gates"]] == [
        f"layers.{layer}.gate_{kind}" for layer in (0, 1) for kind in ("mha", "ffn")]
    assert all(g["low"] == -1 and g["high"] == 1 and g["ref"] == 0 for g in table["gates"])
    for i, video in videos.items():
        qids = [q for q in store.qids if store.vids[q] == video["vid"]]
        assert [q["qid"] for q in video["queries"]] == qids and video["gate_qid"] == qids[0]
        assert video["n_clips"] == store.n_clips[qids[0]] and video["duration"] == labels[qids[0]]["duration"]
        for (layer, kind), arr in store.gates(qids[0]).items():
            lane = video["lanes"][f"layers.{layer}.gate_{kind}"]
            a = np.asarray(arr, dtype=np.float64)
            assert _close_fixed(lane["m"], a.mean(axis=1)) and _close_fixed(lane["s"], a.std(axis=1))
        for q in video["queries"]:
            lab, pred = labels[q["qid"]], preds[q["qid"]]
            assert q["query"] == lab["query"]
            assert q["gt"] == {"windows": lab["relevant_windows"], "clips": lab["relevant_clip_ids"],
                               "scores": lab["saliency_scores"]}
            assert len(q["pred"]["windows"]) == len(pred["pred_relevant_windows"])
            for got, want in zip(q["pred"]["windows"], pred["pred_relevant_windows"]):
                assert all(_close(g, w) for g, w in zip(got, want))
            assert _close_fixed(q["pred"]["saliency"], pred["pred_saliency_scores"])
            mine = ablation[ablation["qid"] == q["qid"]]
            assert [a[0] for a in q["ablation"]] == list(mine["intervention"]) == ["zero@all:both", "audio_zero"]
            for got, (_, want) in zip(q["ablation"], mine.iterrows()):
                for field, value in zip(table["ablation_fields"], got[1:]):
                    expected = want[field] if field == "audio_source_vid" else float(want[field])
                    assert value == expected if field == "audio_source_vid" else _close(value, expected)


def test_page_is_self_contained_and_the_correlation_wall_is_gone(run):
    out, _ = run
    page = (out / "report.html").read_text()
    assert "http://" not in page and "https://" not in page and "<link" not in page.lower()
    refs = re.findall(r"""(?:src|href)\s*=\s*['"]([^'"]*)['"]""", page)
    assert all(r.startswith("#") or r.startswith("data:image/png;base64,") for r in refs)
    scripts = re.findall(r"<script\b([^>]*)>", page)
    assert len(scripts) == 1 + 6 + 1 and all(s in ("", " type='application/json' id='gx-data'") or
                                            re.fullmatch(r" type='application/json' id='gx-v\d+'", s) for s in scripts)
    section = page.split(">Gates vs performance</h2>")[1].split("<h2")[0]
    assert section.count("<tr>") <= 11 and "gate_performance_correlations.csv" in section and "#explore" in section
    assert ">Explore videos and queries</h2>" in page


def test_labels_gone_or_changed_are_said(run):
    out, _ = run
    manifest = json.loads((out / "run.json").read_text())
    gone = dict(manifest, data={**manifest["data"], "path": str(out / "no_such.jsonl")})
    table, videos = _blobs(build_report(out, run=gone))
    assert any("is gone" in n and "no_such.jsonl" in n for n in table["notes"])
    assert all(q["gt"] is None and q["pred"] is not None for v in videos.values() for q in v["queries"])
    assert len(table["views"]["queries"]["rows"]) == 12 and videos[0]["duration"] is not None  # from the CSV
    changed = dict(manifest, data={**manifest["data"], "sha256": "0" * 64})
    table, videos = _blobs(build_report(out, run=changed))
    assert any("changed since the run" in n for n in table["notes"]) and videos[0]["queries"][0]["gt"] is not None


def test_per_query_gating_stores_one_value_per_query(tmp_path):
    """A global store and predictions written directly (no CSVs, no labels): each query's value in the lanes,
    and a query text that cannot end the page's script element."""
    values = {1: 0.25, 2: 0.25, 3: -0.5}
    with GateStoreWriter(tmp_path, gating_type="global", num_layers=1) as w:
        for qid, vid in ((1, "a"), (2, "a"), (3, "b")):
            w.add(qid, vid, {(0, "mha"): np.float32([values[qid]]), (0, "ffn"): np.float32([-values[qid]])},
                  n_clips=10)
    text = "a </script><b>dog</b> & 'cat'"
    (tmp_path / "predictions.jsonl").write_text("".join(json.dumps(
        {"qid": q, "query": text, "vid": "a", "pred_relevant_windows": [[0, 4, 0.9], [2, 8, 0.5]],
         "pred_saliency_scores": [0.1 * t for t in range(10)]}) + "\n" for q in (1, 2)))
    (tmp_path / "run.json").write_text(json.dumps({"status": "complete", "model": {"gating_type": "global"}}))
    page = build_report(tmp_path)
    assert "</script><b>" not in page
    table, videos = _blobs(page)
    assert table["gating_type"] == "global" and [r[1] for r in table["views"]["queries"]["rows"]] == [1, 2, 3]
    assert videos[0]["lanes"]["layers.0.gate_mha"] == {"g": [[1, 0.25], [2, 0.25]]}
    assert videos[1]["lanes"]["layers.0.gate_ffn"] == {"g": [[3, 0.5]]}
    assert any("names no data file" in n for n in table["notes"])
    assert any("gate_performance.csv" in n for n in table["notes"])
    first, third = videos[0]["queries"][0], videos[1]["queries"][0]
    assert first["query"] == text and first["gt"] is None and first["pred"]["windows"] == [[0, 4, 0.9], [2, 8, 0.5]]
    assert _close_fixed(first["pred"]["saliency"], [0.1 * t for t in range(10)])
    assert third["pred"] is None and videos[1]["n_clips"] == 10


def test_lanes_built_during_the_run_equal_those_read_back_from_the_store(run):
    """The run's report takes its lanes from the sink (no store read-back); a report built from the folder alone
    (``--report_only``) reads them from the store: the same data, to the byte."""
    out, _ = run
    manifest = json.loads((out / "run.json").read_text())
    table, videos = _blobs((out / "report.html").read_text())
    from_store = explore_data(out, manifest)
    assert json.dumps(from_store[0], sort_keys=True) == json.dumps(table, sort_keys=True)
    assert [json.dumps(v, sort_keys=True) for v in from_store[1]] == \
        [json.dumps(videos[i], sort_keys=True) for i in range(len(videos))]


@pytest.mark.parametrize("gating_type", ["global", "clipwise", "elementwise"])
def test_sink_lanes_equal_store_lanes_and_unseen_videos_are_read(tmp_path, gating_type):
    """A sink's ``LaneAccumulator`` gives each video the lanes read back from its store (first query per video for
    per-clip gating, every query for per-query gating, a video without vid per query; float64 gates, which the
    store keeps as float32, for the global and elementwise cases); a video whose queries it did not all see
    (here: one added to the store directly) is read from the store instead."""
    rng = np.random.default_rng(3)
    shape = {"global": lambda t: (1,), "clipwise": lambda t: (t,), "elementwise": lambda t: (t, 8)}[gating_type]
    queries = [(1, "a", 5), (2, "b", 7), (3, "a", 5), (4, "", 6), (5, "", 4), (6, "c", 3)]
    sink = GateSink(tmp_path, gating_type, 2, hidden_dim=8)
    for i, (qid, vid, t) in enumerate(queries):
        dtype = np.float32 if gating_type == "clipwise" else np.float64
        gates = {(layer, kind): (rng.normal(size=shape(t)) * 3).astype(dtype) for layer in (0, 1)
                 for kind in ("mha", "ffn")}
        if qid == 6:  # behind the accumulator's back
            sink.store.add(qid, vid, gates, n_clips=t)
        else:
            sink.add(qid, vid, gates, n_clips=t)
        if i % 2:
            sink.flush()
    sink.close()
    run_json = {"status": "complete", "model": {"gating_type": gating_type}}
    read, built = explore_data(tmp_path, run_json), explore_data(tmp_path, run_json, lanes=sink.lanes)
    assert [v["vid"] for v in read[1]] == ["a", "b", "", "", "c"]
    assert json.dumps(read, sort_keys=True) == json.dumps(built, sort_keys=True)
    assert sink.lanes.lanes("c", [6]) is None and sink.lanes.lanes("a", [1, 3]) is not None
    assert sink.lanes.lanes("a", [3, 1]) is None  # another first query
    assert (sink.lanes.lanes("a", [1]) is None) == (gating_type == "global")  # per-query lanes: all the queries


def test_page_script_is_valid_javascript(run, tmp_path):
    """Where node is installed, its syntax check of the page's one script (the browser test needs Chromium)."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node not installed: no syntax check of the page's script")
    scripts = re.findall(r"<script>(.*?)</script>", (run[0] / "report.html").read_text(), re.S)
    assert len(scripts) == 1
    (tmp_path / "page.js").write_text(scripts[0])
    proc = subprocess.run([node, "--check", str(tmp_path / "page.js")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_fixed_point_encoding():
    obj = encode_fixed([0.123456, -0.0004, float("nan"), 1.5])
    assert obj["e"] == -3 and obj["v"] == [123, 0, None, 1500]
    assert encode_fixed([12345.0])["v"] == [1234] and encode_fixed([12345.0])["e"] == 1
    assert encode_fixed([0.0, 0.0]) == {"e": 0, "v": [0, 0]}
    np.testing.assert_allclose(decode_fixed(encode_fixed([3.14159e-5, 1e-6])), [3.142e-5, 1e-6], rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# a real browser (Chromium from the system packages), skipped where none is installed
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    path = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if path is None:
        pytest.skip("no headless browser (chromium) installed")
    return path


def _open(browser, page, fragment, profile):
    """The page's DOM after loading ``page#fragment`` headlessly, without its scripts: (DOM, console errors)."""
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
           "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", "--dump-dom", page.as_uri() + fragment]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line and ("Uncaught" in line or "rror" in line)]
    return re.sub(r"<script\b.*?</script>", "", proc.stdout, flags=re.S), console


def _shown(dom):
    """What the page shows: state, errors, rows (qid, classes), the sorted column, the opened video."""
    state = re.search(r'<div id="gx" data-state="(\w+)"', dom)
    errors = re.search(r'<pre id="gx-errors"[^>]*>(.*?)</pre>', dom, re.S)
    body = re.search(r'<table id="gx-table">.*?<tbody>(.*?)</tbody>', dom, re.S)
    rows = re.findall(r'<tr data-v="\d+" data-qid="(-?\d+)"(?: class="([^"]*)")?>', body.group(1) if body else "")
    sorted_by = re.findall(r'<th data-key="([^"]+)" class="[^"]*(gx-asc|gx-desc)"', dom)
    head = re.search(r'<h3 class="gx-head" data-vid="([^"]*)" data-qid="(-?\d+)"', dom)
    lanes = re.search(r'<svg id="gx-svg"[^>]*data-lanes="(\d+)"', dom)
    return {"state": state and state.group(1), "errors": errors.group(1).strip() if errors else None,
            "qids": [int(q) for q, _ in rows], "selected": [int(q) for q, c in rows if "gx-sel" in c],
            "sorted": sorted_by, "video": head and (head.group(1), int(head.group(2))),
            "lanes": int(lanes.group(1)) if lanes else None}


def test_report_in_a_headless_browser(run, browser, tmp_path):
    out, _ = run
    page = out / "report.html"
    table, _ = _blobs(page.read_text())
    q = table["views"]["queries"]
    col = [c["k"] for c in q["columns"]].index("top1_iou") + 1
    recorded = [r[1] for r in q["rows"]]
    iou = {r[1]: r[col] for r in q["rows"]}
    vid = {r[1]: r[2] for r in q["rows"]}

    dom, console = _open(browser, page, "", tmp_path / "p0")
    first = _shown(dom)
    assert first["state"] == "ready" and first["errors"] == "" and not console, (first, console)
    assert first["qids"] == recorded[:ROW_LIMIT] and first["video"] is None and not first["sorted"]

    # click the top-1 IoU header twice (descending; ties keep their order, empty values last), then the first row
    dom, console = _open(browser, page, "#gx:click=th:top1_iou,th:top1_iou,row:0", tmp_path / "p1")
    shown = _shown(dom)
    known = [x for x in recorded if iou[x] is not None]
    expected = sorted(known, key=lambda x: iou[x], reverse=True) + [x for x in recorded if iou[x] is None]
    assert shown["state"] == "ready" and shown["errors"] == "" and not console, (shown, console)
    assert shown["qids"] == expected and shown["qids"] != first["qids"]
    assert shown["sorted"] == [("top1_iou", "gx-desc")] and shown["selected"] == [expected[0]]
    assert shown["video"] == (vid[expected[0]], expected[0]) and shown["lanes"] == len(table["gates"])

    dom, _ = _open(browser, page, "#gx:filter=top1_iou%3E0", tmp_path / "p2")
    assert _shown(dom)["qids"] == [x for x in recorded if (iou[x] or 0) > 0]
