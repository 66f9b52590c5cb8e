"""Tests for qd_detr.eval: reference reproduction, hand-computed cases, per-query metrics, CLI errors."""
import json

import numpy as np
import pytest

from conftest import FIXTURES, QVH_DATA, SHARED, run_python
from qd_detr.cli import run_main
from qd_detr.errors import DataError
from qd_detr.eval import eval_submission, main, per_query_metrics
from qd_detr.io import read_json_lines

needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared reference data not found at {SHARED}")


def flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = v
    return out


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ---------------------------------------------------------------- reference files
@needs_shared
def test_sample_reproduces_official_metrics():
    sub = read_json_lines(QVH_DATA / "standalone_eval_sample" / "sample_val_preds.jsonl")
    gt = read_json_lines(QVH_DATA / "highlight_val_release.jsonl")
    ref = json.loads((QVH_DATA / "standalone_eval_sample" / "sample_val_preds_metrics_raw.json").read_text())
    got = flatten(eval_submission(sub, gt))
    want = flatten(ref)
    assert got == want
    assert list(got) == list(want)  # same key order as the original JSON


@needs_shared
@pytest.mark.parametrize("ckpt", sorted(p.name for p in FIXTURES.glob("ckpt_*")) if FIXTURES.is_dir() else [])
def test_fixture_metrics_reproduced(ckpt):
    folder = FIXTURES / ckpt
    sub = read_json_lines(folder / "hl_val_submission.jsonl")
    gt = read_json_lines(FIXTURES / "data" / "highlight_val_release.jsonl")
    want = flatten(json.loads((folder / "hl_val_submission_metrics.json").read_text()))
    got = flatten(eval_submission(sub, gt))
    assert got == want and list(got) == list(want)
    # per-query metrics average back to the official numbers (their definitions are the same)
    rows = per_query_metrics(sub, gt)
    assert len(rows) == len(gt)
    assert round(np.mean([r["mr_ap"] for r in rows]), 2) == want["full/MR-mAP/average"]
    assert round(np.mean([r["mr_ap_075"] for r in rows]), 2) == want["full/MR-mAP/0.75"]
    assert round(100 * np.mean([r["r1_05"] for r in rows]), 2) == want["full/MR-R1/0.5"]
    assert round(np.mean([r["hl_hit1_verygood"] for r in rows]), 2) == want["HL-min-VeryGood/HL-Hit1"]
    assert round(np.mean([r["hl_ap_verygood"] for r in rows]), 2) == want["HL-min-VeryGood/HL-mAP"]


# ---------------------------------------------------------------- hand-checked moment retrieval
# q1: GT [0,10] (short). Preds (by score) [0,10] IoU 1 -> TP, [20,30] IoU 0 -> FP.
#     precision [1, 1/2], recall [1, 1] -> AP = 1 at every threshold. Top-1 IoU 1.
# q2: GT [0,20] (middle). Preds [0,10] (IoU 10/20 = 0.5), then [0,20] (IoU 1).
#     thr 0.5: TP, then FP (GT taken) -> AP 1.  thr >= 0.55: FP, TP -> precision [0, 1/2], recall [0, 1]
#     -> AP = 1 * 1/2 = 0.5.  Mean over 10 thresholds: (1 + 9 * 0.5) / 10 = 0.55. Top-1 IoU 0.5.
# q3: GT [0,40] (long) and [50,60] (short). Preds [50,60] s.9 (IoU 1 with [50,60]), [0,30] s.7
#     (IoU 30/40 = 0.75 with [0,40]), [100,110] s.1 (IoU 0).
#     thr <= 0.75 (6 thr): TP TP FP -> precision [1,1,2/3], recall [.5,1,1] -> AP = .5*1 + .5*1 = 1.
#     thr >= 0.8 (4 thr): TP FP FP -> recall stays .5 -> AP = .5.  Mean (6 + 4 * .5) / 10 = 0.8.
MR_GT = [{"qid": 1, "relevant_windows": [[0, 10]]},
         {"qid": 2, "relevant_windows": [[0, 20]]},
         {"qid": 3, "relevant_windows": [[0, 40], [50, 60]]}]
MR_SUB = [{"qid": 1, "pred_relevant_windows": [[0, 10, 0.9], [20, 30, 0.5]]},
          {"qid": 2, "pred_relevant_windows": [[0, 10, 0.8], [0, 20, 0.6]]},
          {"qid": 3, "pred_relevant_windows": [[50, 60, 0.9], [0, 30, 0.7], [100, 110, 0.1]]}]
THR = ["0.5", "0.55", "0.6", "0.65", "0.7", "0.75", "0.8", "0.85", "0.9", "0.95"]


def test_mr_hand_case_full_and_buckets():
    res = eval_submission(MR_SUB, MR_GT)
    full = res["full"]
    # thr 0.5: (1+1+1)/3; 0.55-0.75: (1+.5+1)/3 = 83.33; 0.8-0.95: (1+.5+.5)/3 = 66.67
    assert full["MR-mAP"] == dict(zip(THR, [100.0] + [83.33] * 5 + [66.67] * 4), average=78.33)  # (1+.55+.8)/3
    # top-1 IoUs 1, 0.5, 1: R1@0.5 = 3/3, above 0.5 = 2/3
    assert full["MR-R1"] == dict(zip(THR, [100.0] + [66.67] * 9))
    # short: q1 [0,10] and q3 [50,60] (its top-scored pred hits it; then 2 FPs -> AP 1) -> 100
    assert res["short"]["MR-mAP"]["average"] == 100.0 and res["short"]["MR-R1"]["0.95"] == 100.0
    # middle: q2 alone -> 55.0; R1: top-1 IoU 0.5
    assert res["middle"]["MR-mAP"]["average"] == 55.0
    assert res["middle"]["MR-R1"]["0.5"] == 100.0 and res["middle"]["MR-R1"]["0.7"] == 0.0
    # long: q3 with GT [0,40] only: FP, TP(IoU .75), FP -> precision [0,1/2,1/3], recall [0,1,1]
    #   -> AP .5 for 6 thresholds, 0 above -> 6*.5/10 = 30; top-1 [50,60] vs [0,40] IoU 0 -> R1 0
    assert res["long"]["MR-mAP"]["average"] == 30.0 and res["long"]["MR-mAP"]["0.8"] == 0.0
    assert res["long"]["MR-R1"]["0.5"] == 0.0
    assert list(res) == ["brief", "full", "long", "middle", "short"]
    assert res["brief"] == {"MR-full-R1@0.5": 100.0, "MR-full-R1@0.7": 66.67, "MR-full-mAP": 78.33,
                            "MR-full-mAP@0.5": 100.0, "MR-full-mAP@0.75": 83.33, "MR-long-mAP": 30.0,
                            "MR-middle-mAP": 55.0, "MR-short-mAP": 100.0}
    assert list(res["brief"]) == sorted(res["brief"])


def test_empty_buckets_are_omitted():
    # q2 alone: only a middle window, so the short and long buckets have no GT window
    res = eval_submission(MR_SUB[1:2], MR_GT[1:2])
    assert list(res) == ["brief", "full", "middle"]
    assert "MR-short-mAP" not in res["brief"] and "MR-long-mAP" not in res["brief"]
    assert res["brief"]["MR-middle-mAP"] == res["brief"]["MR-full-mAP"] == 55.0
    assert res["full"]["MR-mAP"]["0.5"] == 100.0 and res["full"]["MR-mAP"]["0.55"] == 50.0


def test_mr_interpolated_precision():
    # GT [0,10], [20,30]; ranked preds: miss, hit, hit -> precision [0, 1/2, 2/3], recall [0, .5, 1].
    # The VOC envelope raises the precision at recall .5 to 2/3: AP = .5 * 2/3 + .5 * 2/3 = 66.67
    # (without the envelope it would be .5 * .5 + .5 * 2/3 = 58.33). Only the short bucket has windows.
    gt = [{"qid": 1, "relevant_windows": [[0, 10], [20, 30]]}]
    sub = [{"qid": 1, "pred_relevant_windows": [[50, 60, 0.9], [0, 10, 0.8], [20, 30, 0.7]]}]
    res = eval_submission(sub, gt)
    assert res["full"]["MR-mAP"] == dict(zip(THR, [66.67] * 10), average=66.67)
    assert list(res) == ["brief", "full", "short"]


def test_qid_mismatch_and_match_number_false():
    sub = MR_SUB + [{"qid": 99, "pred_relevant_windows": [[0, 2, 1.0]]}]
    with pytest.raises(DataError, match="1 \\(e.g. 99\\) only in the submission"):
        eval_submission(sub, MR_GT)
    with pytest.raises(DataError, match="only in the ground truth"):
        eval_submission(MR_SUB[:2], MR_GT)
    assert eval_submission(sub, MR_GT, match_number=False) == eval_submission(MR_SUB, MR_GT)


def test_bad_records_raise_data_error():
    with pytest.raises(DataError, match="qid 2: missing field 'pred_relevant_windows'"):
        eval_submission([MR_SUB[0], {"qid": 2}, MR_SUB[2]], MR_GT)
    with pytest.raises(DataError, match="ground truth: qid 3: 'relevant_windows' must be"):
        eval_submission(MR_SUB, MR_GT[:2] + [{"qid": 3, "relevant_windows": []}])
    with pytest.raises(DataError, match="qid 1 appears more than once"):
        eval_submission(MR_SUB + MR_SUB[:1], MR_GT)


# ---------------------------------------------------------------- hand-checked highlight detection
# h1: duration 8 -> 4 clips; labels clip1 [4,2,0], clip2 [1,4,4]; predictions [.1,.9,.5,.3] (argmax clip 1).
#   VeryGood (>=4): annotator a positives {1}, b {2}, c {2}.  Hit1: clip 1 has a 4 from a -> 1.
#   AP a: positive ranked 1st -> 1.  AP b, c: positive ranked 2nd -> precision 1/2 -> 0.5.
#   Fair (>=2): a {1}, b {1,2}, c {2} -> AP 1, 1, 0.5; hit 1.
# h2: duration 4 -> 2 clips; clip0 [4,4,4], clip1 [0,4,0]; 3 predictions [.2,.1,.9]: argmax clip 2 does not
#   exist -> hit 0 (not the last clip's labels). AP uses the predictions cut to 2 clips: a and c have the one
#   positive clip 0 ranked first (.2 > .1) -> 1; b has both clips positive -> 1 (all labels equal).
HL_GT = [{"qid": "h1", "duration": 8, "relevant_clip_ids": [1, 2], "saliency_scores": [[4, 2, 0], [1, 4, 4]]},
         {"qid": "h2", "duration": 4, "relevant_clip_ids": [0, 1], "saliency_scores": [[4, 4, 4], [0, 4, 0]]}]
HL_SUB = [{"qid": "h1", "pred_saliency_scores": [0.1, 0.9, 0.5, 0.3]},
          {"qid": "h2", "pred_saliency_scores": [0.2, 0.1, 0.9]}]


def test_hl_hand_case():
    res = eval_submission(HL_SUB, HL_GT)
    assert list(res) == ["brief", "HL-min-Fair", "HL-min-Good", "HL-min-VeryGood"]
    # VeryGood: mAP = (1 + .5 + .5 + 1 + 1 + 1) / 6 = 83.33; Hit1 = (1 + 0) / 2 = 50
    assert res["HL-min-VeryGood"] == {"HL-mAP": 83.33, "HL-Hit1": 50.0}
    # Fair: mAP = (1 + 1 + .5 + 1 + 1 + 1) / 6 = 91.67; Hit1 = 50
    assert res["HL-min-Fair"] == {"HL-mAP": 91.67, "HL-Hit1": 50.0}
    assert list(res["brief"])[:2] == ["HL-min-Fair-mAP", "HL-min-Fair-Hit1"]
    assert res["brief"]["HL-min-VeryGood-mAP"] == 83.33
    # h1 alone: VeryGood mAP = (1 + .5 + .5) / 3 = 66.67, Hit1 100
    assert eval_submission(HL_SUB[:1], HL_GT[:1])["HL-min-VeryGood"] == {"HL-mAP": 66.67, "HL-Hit1": 100.0}


def test_hl_interpolation_quirk():
    # 5 clips ranked .9 .. .5; positives (score 4 by everyone) at ranks 1, 4, 5; P = 3.
    # Curve from the lowest threshold (sklearn 0.24 order, then (1, 0) appended):
    #   precision [3/5, 2/4, 1/3, 1/2, 1/1, 1], recall [1, 2/3, 1/3, 1/3, 1/3, 0].
    # The reference "interpolates" with a running max from that end: [.6, .6, .6, .6, 1, 1], then averages the
    # precision where recall changes next (indices 0, 1, 4): (.6 + .6 + 1) / 3 = 73.33 (raw: 70.0).
    gt = [{"qid": 1, "duration": 10, "relevant_clip_ids": [0, 3, 4], "saliency_scores": [[4, 4, 4]] * 3}]
    sub = [{"qid": 1, "pred_saliency_scores": [0.9, 0.8, 0.7, 0.6, 0.5]}]
    assert eval_submission(sub, gt)["HL-min-VeryGood"] == {"HL-mAP": 73.33, "HL-Hit1": 100.0}


def test_hl_clip_id_out_of_range():
    gt = [dict(HL_GT[1], relevant_clip_ids=[0, 2])]  # 2 clips only
    with pytest.raises(DataError, match="relevant_clip_ids must lie in \\[0, 2\\)"):
        eval_submission(HL_SUB[1:], gt)


# ---------------------------------------------------------------- per-query metrics
def test_per_query_metrics_hand_case():
    gt = [dict(g, **h) for g, h in zip(MR_GT[:2], [dict(HL_GT[0], qid=1), dict(HL_GT[1], qid=2)])] + [
        MR_GT[2], {"qid": 4, "duration": 10}, {"qid": 5, "relevant_windows": [[0, 2]]}]  # 4 unlabelled, 5 unpredicted
    sub = [dict(s, pred_saliency_scores=h["pred_saliency_scores"]) for s, h in zip(MR_SUB[:2], HL_SUB)] + [
        dict(MR_SUB[2], pred_saliency_scores=[0.0]), {"qid": 4, "pred_relevant_windows": [[0, 2, 1.0]],
                                                      "pred_saliency_scores": [0.0]}]
    gt[2] = dict(gt[2], duration=2, relevant_clip_ids=[0], saliency_scores=[[0, 0, 1]])
    rows = {r["qid"]: r for r in per_query_metrics(sub, gt)}
    assert list(rows) == [1, 2, 3]
    q1, q2, q3 = rows[1], rows[2], rows[3]
    assert (q1["top1_iou"], q1["r1_05"], q1["r1_07"], q1["mr_ap"]) == (1.0, 1, 1, 100.0)
    # q2: top-1 IoU 10/20; AP 1 at 0.5, 0.5 above -> mean 55; at 0.75: 50
    assert (q2["top1_iou"], q2["r1_05"], q2["r1_07"]) == (0.5, 1, 0)
    assert q2["mr_ap"] == pytest.approx(55.0) and q2["mr_ap_05"] == 100.0 and q2["mr_ap_075"] == 50.0
    # q3: AP 1 for thresholds <= 0.75 (0.75 is reached exactly), 0.5 above -> 80
    assert q3["mr_ap"] == pytest.approx(80.0) and q3["mr_ap_075"] == 100.0
    assert [rows[q]["length_bucket"] for q in (1, 2, 3)] == ["short", "middle", "long"]  # q3: longest is 40 s
    # HL (VeryGood): q1 = h1: hit 100, AP (1+.5+.5)/3; q2 = h2: hit 0, AP 100
    assert q1["hl_hit1_verygood"] == 100.0 and q1["hl_ap_verygood"] == pytest.approx(200 / 3)
    assert q2["hl_hit1_verygood"] == 0.0 and q2["hl_ap_verygood"] == 100.0
    # q3: one clip scored [0,0,1]: no annotator reaches 4 -> hit 0, AP 0 (all labels negative)
    assert q3["hl_hit1_verygood"] == 0.0 and q3["hl_ap_verygood"] == 0.0


def test_per_query_top1_is_first_listed_window():
    # R1 (official and per query) uses the first listed window; AP ranks by score.
    sub = [{"qid": 1, "pred_relevant_windows": [[20, 30, 0.5], [0, 10, 0.9]]}]
    row = per_query_metrics(sub, MR_GT[:1])[0]
    assert row["top1_iou"] == 0.0 and row["r1_05"] == 0 and row["mr_ap"] == 100.0
    assert row["hl_ap_verygood"] is None


# ---------------------------------------------------------------- reader and command line
def test_read_jsonl_reports_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"qid": 1}\n\n{"qid": 2,\n')
    with pytest.raises(DataError, match=f"{p}: line 3: malformed JSON"):
        read_json_lines(p)
    p.write_text('{"qid": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match="line 2: expected a JSON object"):
        read_json_lines(p)
    p.write_bytes(b'{"qid": 1}\n{"qid": 2}\n{"q": "\xff"}\n')
    with pytest.raises(DataError, match="line 3: not UTF-8"):
        read_json_lines(p)
    p.write_text('\ufeff{"qid": 1}\n\n')  # a byte-order mark is accepted; blank lines are skipped
    assert read_json_lines(p) == [{"qid": 1}]


@pytest.fixture
def files(tmp_path):
    sub = write_jsonl(tmp_path / "sub.jsonl", MR_SUB)
    gt = write_jsonl(tmp_path / "gt.jsonl", MR_GT)
    return tmp_path, sub, gt


def run_cli(capsys, argv):
    code = run_main(main, argv)
    return code, capsys.readouterr()


def test_cli_writes_metrics(files, capsys):
    tmp, sub, gt = files
    out = tmp / "m.json"
    argv = ["--submission_path", str(sub), "--gt_path", str(gt), "--save_path", str(out)]
    code, cap = run_cli(capsys, argv + ["--not_verbose"])
    assert code == 0 and cap.err == ""
    assert json.loads(out.read_text()) == eval_submission(MR_SUB, MR_GT)
    assert json.loads(cap.out) == eval_submission(MR_SUB, MR_GT)["brief"]
    assert sorted(p.name for p in tmp.iterdir()) == ["gt.jsonl", "m.json", "sub.jsonl"]  # no temp file left
    code, cap = run_cli(capsys, argv)  # verbose: progress on stderr, stdout stays the brief JSON
    assert code == 0 and "[eval] MR full: 3/3 queries" in cap.err
    assert json.loads(cap.out) == eval_submission(MR_SUB, MR_GT)["brief"]


@pytest.mark.parametrize("case", ["missing", "folder", "malformed", "no_field", "mismatch", "save_folder"])
def test_cli_bad_input(files, capsys, case):
    tmp, sub, gt = files
    save = tmp / "m.json"
    expect = {"missing": "file not found", "folder": "is a folder", "malformed": "line 2: malformed JSON",
              "no_field": "missing field 'pred_relevant_windows'", "mismatch": "differ",
              "save_folder": "is a folder"}[case]
    if case == "missing":
        sub = tmp / "nope.jsonl"
    elif case == "folder":
        sub = tmp
    elif case == "malformed":
        sub.write_text(json.dumps(MR_SUB[0]) + "\n{oops\n")
    elif case == "no_field":
        write_jsonl(sub, [MR_SUB[0], {"qid": 2}, MR_SUB[2]])
    elif case == "mismatch":
        write_jsonl(sub, MR_SUB[:2])
    else:
        save = tmp
    code, cap = run_cli(capsys, ["--submission_path", str(sub), "--gt_path", str(gt), "--save_path", str(save)])
    lines = cap.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in cap.err
    assert expect in lines[0]
    if case != "save_folder":
        assert str(sub) in lines[0]
    assert not (tmp / "m.json").exists()


def test_cli_subprocess_exit_code(files):
    tmp, sub, gt = files
    proc = run_python("-m", "qd_detr.eval", "--submission_path", tmp / "nope.jsonl", "--gt_path", gt, "--save_path",
                      tmp / "m.json")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {tmp / 'nope.jsonl'}: file not found"]
