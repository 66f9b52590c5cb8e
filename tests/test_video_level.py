"""Gates belong to videos: the query-dependence check, per-video statistics, rankings that count each video once
and never split a tie, the all-layers value that does not let signs cancel, and the run's first file."""
import json

import numpy as np
import pandas as pd
import pytest

from conftest import demo_data_args, run_gate_analysis_main, small_checkpoint
from gate_analysis.plots import select_compare_qids
from gate_analysis.stats import GateStatsAccumulator
from gate_analysis_utils import load_gate_run


@pytest.fixture(scope="module")
def run_dir(demo_data, tmp_path_factory):
    """A labelled demo run (6 videos x 2 queries) with two interventions, no figures."""
    _, paths = demo_data
    root = tmp_path_factory.mktemp("video_level")
    ckpt = small_checkpoint(root / "model.ckpt", "custom", "clipwise", seed=3)[0]
    out = root / "run"
    argv = ["--model_path", ckpt, *demo_data_args(paths), "--output_dir", out, "--batch_size", "3", "--device", "cpu",
            "--ablate", "zero", "audio_zero", "--no_plots", "--quiet", "--top_n", "2"]
    assert run_gate_analysis_main(*argv) == 0
    return out


def test_the_run_says_gates_depend_on_the_video_only(run_dir):
    check = json.loads((run_dir / "run.json").read_text())["query_dependence"]
    assert check["videos"] == 6 and check["videos_with_several_queries"] == 6
    assert check["videos_with_query_dependent_gates"] == 0 and not check["depends_on_query"]
    assert check["max_relative_difference"] <= 1e-6
    summary = (run_dir / "summary.txt").read_text()
    assert "gates depend on the video only" in summary
    assert "Query dependence" in (run_dir / "report.html").read_text()


def test_per_video_table_has_one_row_per_video_and_gate(run_dir):
    per_video = pd.read_csv(run_dir / "gate_stats_per_video.csv", dtype={"vid": str})
    per_query = pd.read_csv(run_dir / "gate_stats_per_query.csv", dtype={"vid": str})
    assert len(per_video) == 6 * 2 * 2 and not per_video.duplicated(["vid", "layer", "gate"]).any()
    assert set(per_video["n_queries"]) == {2} and (per_video["query_spread"] <= 1e-6).all()
    for vid, sel in per_query.groupby("vid"):
        row = per_video[per_video["vid"] == vid].iloc[0]
        assert row["qids"].split() == [str(q) for q in dict.fromkeys(sel["qid"])]
    # the video-weighted layer statistics are those of the per-video means
    layer = pd.read_csv(run_dir / "gate_stats_per_layer.csv")
    video = layer[layer["weighting"] == "video"].set_index("name")
    assert (video["n_videos"] == 6).all() and (video["n_queries"] == 12).all()
    means = per_video.groupby("name")["mean"].mean()
    np.testing.assert_allclose(video.loc[means.index, "mean"], means, atol=1e-7)


def test_rankings_count_each_video_once_and_all_layers_use_magnitudes(run_dir):
    rankings = pd.read_csv(run_dir / "gate_rankings.csv", dtype={"vid": str, "layer": str})
    per_video = pd.read_csv(run_dir / "gate_stats_per_video.csv", dtype={"vid": str})
    for (_, _), sel in rankings.groupby(["layer", "gate"]):
        assert not sel["vid"].duplicated().any()
        assert not set(sel[sel["rank_type"] == "top"]["vid"]) & set(sel[sel["rank_type"] == "bottom"]["vid"])
    overall = rankings[rankings["layer"] == "all"]
    for _, row in overall.iterrows():
        sel = per_video[(per_video["vid"] == row["vid"]) & (per_video["gate"] == row["gate"])]
        assert row["value"] == pytest.approx(sel["mean"].abs().mean(), abs=1e-7)
    qids = select_compare_qids(rankings.assign(layer=rankings["layer"]), max_n=6)
    videos = per_video.drop_duplicates("qid").set_index("qid")["vid"]
    assert len(qids) == len({videos[q] for q in qids})  # one query per video


def _gates(value, t=3):
    return {(0, "mha"): np.full(t, value, np.float32), (0, "ffn"): np.full(t, -value, np.float32)}


def test_a_tie_is_never_split_across_top_and_bottom():
    acc = GateStatsAccumulator("clipwise", 1)
    for i, value in enumerate((0.9, 0.5, 0.5, 0.1)):  # the tie sits at the top/bottom cut
        acc.update(i + 1, _gates(value), vid=f"v{i}")
    r = acc.rankings(n=2)
    mha = r[(r["layer"].astype(str) == "0") & (r["gate"] == "mha")]
    top, bottom = mha[mha["rank_type"] == "top"], mha[mha["rank_type"] == "bottom"]
    assert list(top["vid"]) == ["v0", "v1"] and list(bottom["vid"]) == ["v3"]
    assert not set(top["value"]) & set(bottom["value"])


def test_query_dependent_gates_are_detected_and_counted_per_distinct_set():
    acc = GateStatsAccumulator("clipwise", 1)
    acc.update(1, _gates(0.3), vid="a")
    acc.update(2, _gates(0.3), vid="a")       # a repeat: aggregated once
    acc.update(3, _gates(0.7), vid="b")
    acc.update(4, _gates(0.2), vid="b")       # differs from the video's first query
    check = acc.query_dependence()
    assert check["depends_on_query"] and check["videos_with_query_dependent_gates"] == 1
    assert check["max_relative_difference"] == pytest.approx(0.5)
    video = acc.layer_stats().query("weighting == 'video' and gate == 'mha'").iloc[0]
    assert video["n_videos"] == 3 and video["n_queries"] == 4
    assert video["mean"] == pytest.approx((0.3 + 0.7 + 0.2) / 3)


def test_gates_of_a_run_accept_the_qid_as_int_or_string(run_dir):
    run = load_gate_run(run_dir)
    qid = run.qids[0]
    np.testing.assert_array_equal(run.gate(str(qid), 0, "mha"), run.gate(qid, 0, "mha"))
    assert str(qid) in run and np.int64(qid) in run
    with pytest.raises(KeyError, match="not in the gate run"):
        run.gate("99999", 0, "mha")


def test_only_the_tables_a_gating_type_has_are_written(run_dir):
    assert not (run_dir / "gate_stats_per_dim.csv").exists()  # clipwise: no feature dims
    assert (run_dir / "gate_stats_per_clip_position.csv").exists()


def test_performance_link_joins_every_intervention(run_dir):
    joined = pd.read_csv(run_dir / "gate_performance_ablation.csv")
    assert list(dict.fromkeys(joined["intervention"])) == ["zero@all:both", "audio_zero"]
    perf = pd.read_csv(run_dir / "gate_performance.csv")
    assert len(joined) == 2 * len(perf)


def test_the_final_line_names_the_report_and_report_only_rebuilds_it(run_dir, capsys):
    summary = (run_dir / "summary.txt").read_text()
    assert summary.rstrip().splitlines()[-1].strip() == f"report: {run_dir / 'report.html'}"
    (run_dir / "report.html").unlink()
    (run_dir / "summary.txt").unlink()
    assert run_gate_analysis_main("--report_only", run_dir, "--quiet") == 0
    assert (run_dir / "summary.txt").read_text() == summary
    assert "Gate statistics per layer" in (run_dir / "report.html").read_text()


def test_report_only_refuses_an_unfinished_folder(tmp_path, capsys):
    (tmp_path / "run.json").write_text(json.dumps({"status": "interrupted"}))
    assert run_gate_analysis_main("--report_only", tmp_path) == 2
    err = capsys.readouterr().err
    assert "not complete" in err and "--resume" in err and "Traceback" not in err


def test_every_progress_bar_ends_at_its_total(demo_data, tmp_path, capsys):
    """The forward pass, the exact re-runs, every intervention and the steps after the main pass each show a bar,
    and each bar's last state is n/n (no 7/8 left on screen)."""
    import re
    _, paths = demo_data
    ckpt = small_checkpoint(tmp_path / "model.ckpt", "custom", "clipwise", seed=3)[0]
    argv = ["--model_path", ckpt, *demo_data_args(paths), "--output_dir", tmp_path / "run", "--batch_size", "4",
            "--device", "cpu", "--ablate", "zero", "--no_plots"]
    assert run_gate_analysis_main(*argv) == 0
    from gate_analysis.analyses import STEP_LABELS
    from gate_analysis.pipeline import PHASE_LABELS
    phases = {*PHASE_LABELS.values(), *STEP_LABELS.values(), "figures", "after the forward pass"}
    err = capsys.readouterr().err
    last = {}
    for piece in re.split(r"[\r\n]", err):
        m = re.match(r"\s*(.*?):\s+\d+%\|.*?\|\s*(\d+)/(\d+)", piece)
        if m:  # the bar of the steps after the main pass renames itself: one key for it
            last["steps" if m.group(1) in phases else m.group(1)] = (m.group(1), int(m.group(2)), int(m.group(3)))
    assert {"gate analysis", "ablation zero@all:both", "steps"} <= set(last), err[-2000:]
    assert last["steps"][0] == "report"
    assert all(done == total for _, done, total in last.values()), last
