"""Every gate a layout has is recorded (FiLM's ``beta``), and the analysis follows each gate's declared range:
thresholds, histogram bins, colours and texts; v1 tanh statistics are unchanged; gate_ranges are stored in
meta.json and run.json (a store without them reads as tanh)."""
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import (
    FIXTURES,
    ROOT,
    analysis_config,
    demo_dataset,
    gates_one_by_one,
    requires_fixtures,
    run_fixture_analysis,
    small_checkpoint,
)
from gate_analysis import figures
from gate_analysis.interventions import clamp_gates, parse_interventions
from gate_analysis.pipeline import run_analysis
from gate_analysis.ranges import TANH, ranges_as_dict, thresholds
from gate_analysis.stats import GateStatsAccumulator, accumulate_gate_run
from gate_analysis.stats_csv import CSV_COLUMNS, csv_columns_markdown, write_stats_csvs
from gate_analysis.store import GateStoreWriter, load_gate_run
from qd_detr.dataset import collate, model_kwargs
from qd_detr.errors import ConfigError
from qd_detr.gates import GATE_KINDS, GateRange, GateRecorder, fusion_gate_kinds, fusion_gate_ranges

f32 = np.float32
FILM_KINDS = ("mha", "ffn", "beta")
SIGMOID = GateRange("sigmoid", 0.0, 2.0, formula="sigmoid(...) * scale")
FILM_FFN = GateRange("scaled_tanh", -0.3, 0.3, off=-1.0, film=True)
BETA = GateRange("scaled_tanh", -0.5, 0.5)


def _one_layer_film_acc(bins=20):
    ranges = {"layers.0.gate_mha": SIGMOID, "layers.0.gate_ffn": FILM_FFN, "layers.0.gate_beta": BETA.as_dict()}
    return GateStatsAccumulator("clipwise", 1, kinds=FILM_KINDS, bins=bins, gate_ranges=ranges)


# -- vocabulary and unit behaviour ------------------------------------------------------------------
def test_gate_kinds_come_from_qd_detr():
    import gate_analysis
    from gate_analysis import store
    assert store.GATE_KINDS is GATE_KINDS and gate_analysis.GATE_KINDS is GATE_KINDS and "beta" in GATE_KINDS
    assert GateStatsAccumulator("clipwise", 1).kinds == ("mha", "ffn")


def test_thresholds_follow_the_declared_range(tmp_path):
    acc = _one_layer_film_acc()
    # dyadic values (exact in float32); see the expected fractions below
    mha = np.array([1.0, 0.125, 0.0625, 1.9375, 0.5], f32)        # sigmoid (0, 2): 1.0 = 0.5 * scale
    ffn = np.array([0.0, 0.25, -0.125, 0.29, -0.0078125], f32)     # FiLM [-0.3, 0.3]: 0 is weight 1
    beta = np.array([0.25, -0.25, 0.0, 0.5, -0.490234375], f32)    # shift [-0.5, 0.5]
    acc.update(7, {(0, "mha"): mha, (0, "ffn"): ffn, (0, "beta"): beta}, vid="v")
    qs = acc.query_stats().set_index("gate")
    cols = ["frac_positive", "frac_negative", "frac_near_zero", "frac_saturated"]
    # sigmoid: positive > 0.2 (10% of scale) {1.0, 1.9375, 0.5}; no negative fraction; near zero <= 0.2;
    # saturated > 1.9 or < 0.1 (5% of scale from a bound) {1.9375, 0.0625}
    got = qs.loc["mha", cols].to_numpy(float)
    assert got[0] == 0.6 and math.isnan(got[1]) and got[2] == 0.4 and got[3] == 0.4
    # FiLM FFN gate: thresholds +-0.03 around 0 (weight 1), not around its off value -1
    assert qs.loc["ffn", cols].tolist() == [0.4, 0.2, 0.4, 0.2]
    assert qs.loc["beta", cols].tolist() == [0.4, 0.4, 0.2, 0.4]
    t = thresholds(SIGMOID)
    assert not t.has_negative and t.positive == pytest.approx(0.2) and not (t.near_low <= 1.0 <= t.near_high)
    # histograms: 20 bins over each gate's own range, as np.histogram
    h = acc.histograms()
    for kind, values, (lo, hi) in (("mha", mha, (0.0, 2.0)), ("ffn", ffn, (-0.3, 0.3)), ("beta", beta, (-0.5, 0.5))):
        b = h[(h.gate == kind) & (h.bin_type == "bin")]
        assert (b["bin_left"].iloc[0], b["bin_right"].iloc[-1]) == (lo, hi)
        np.testing.assert_array_equal(b["count"], np.histogram(values, 20, range=(lo, hi))[0])
    # the CSV leaves the impossible fraction empty (not 0)
    paths = write_stats_csvs(acc, tmp_path)
    layer = pd.read_csv(paths["per_layer"], keep_default_na=False)
    assert set(layer.loc[layer.gate == "mha", "frac_negative"]) == {""}
    assert "" not in set(layer.loc[layer.gate == "beta", "frac_negative"])
    assert set(layer["name"]) == {"layers.0.gate_mha", "layers.0.gate_ffn", "layers.0.gate_beta"}


def test_tanh_statistics_are_the_fixed_numbers(tmp_path):
    """v1 gates: thresholds +-0.1, |g| <= 0.1, |g| > 0.95 and 200 bins over [-1, 1], with or without
    declared tanh ranges (byte-identical CSVs)."""
    rng = np.random.default_rng(0)
    edge = np.array([0.1, -0.1, 0.95, -0.95, 1.0, -1.0, 0.0], f32)  # float32 neighbours of the thresholds
    lengths = rng.integers(3, 30, size=12)
    queries = {q: {(l, k): np.concatenate([np.tanh(rng.normal(size=int(lengths[q]))).astype(f32), edge])
                   for l in range(2) for k in ("mha", "ffn")} for q in range(12)}
    plain = GateStatsAccumulator("clipwise", 2)
    declared = GateStatsAccumulator("clipwise", 2, gate_ranges={f"layers.{l}.gate_{k}": TANH.as_dict()
                                                                  for l in range(2) for k in ("mha", "ffn")})
    for q, g in queries.items():
        plain.update(q, g)
        declared.update(q, g)
    qs = plain.query_stats()
    for (q, g) in queries.items():
        for (layer, kind), v in g.items():
            v = v.astype(np.float64)  # exact comparisons (float32(0.1) > 0.1)
            r = qs[(qs.qid == q) & (qs.layer == layer) & (qs.gate == kind)].iloc[0]
            assert r["frac_positive"] == np.mean(v > 0.1) and r["frac_negative"] == np.mean(v < -0.1)
            assert r["frac_near_zero"] == np.mean(np.abs(v) <= 0.1)
            assert r["frac_saturated"] == np.mean(np.abs(v) > 0.95)
    b = plain.histograms()
    np.testing.assert_array_equal(b.loc[(b.name == "layers.0.gate_mha") & (b.bin_type == "bin"), "bin_left"],
                                  np.linspace(-1, 1, 201)[:-1])
    a = write_stats_csvs(plain, tmp_path / "a")
    d = write_stats_csvs(declared, tmp_path / "d")
    for key in a:
        assert open(a[key], "rb").read() == open(d[key], "rb").read(), key


def test_meta_json_records_the_ranges_and_old_stores_read_as_tanh(tmp_path):
    ranges = {"layers.0.gate_mha": SIGMOID, "layers.0.gate_ffn": FILM_FFN, "layers.0.gate_beta": BETA}
    gates = {(0, "mha"): np.array([1.0, 0.5], f32), (0, "ffn"): np.array([0.1, 0.2], f32),
             (0, "beta"): np.array([-0.1, 0.3], f32)}
    with GateStoreWriter(tmp_path / "new", "clipwise", 1, kinds=FILM_KINDS, gate_ranges=ranges) as w:
        w.add(1, "v", gates)
    meta = json.loads((tmp_path / "new" / "gates" / "meta.json").read_text())
    assert meta["kinds"] == list(FILM_KINDS) and meta["gate_ranges"] == ranges_as_dict(ranges)
    run = load_gate_run(tmp_path / "new")
    assert run.gate_range(0, "mha") == SIGMOID and run.gate_ranges["layers.0.gate_ffn"].film
    np.testing.assert_array_equal(run.gate(1, 0, "beta"), gates[(0, "beta")])
    assert set(run.frame()["name"]) == {"layers.0.gate_mha", "layers.0.gate_ffn", "layers.0.gate_beta"}
    acc = accumulate_gate_run(run)  # thresholds and bins from meta.json
    assert acc.hist_ranges[(0, "mha")] == (0.0, 2.0) and math.isnan(acc.query_stats()["frac_negative"].iloc[0])
    with pytest.raises(ValueError, match="gate_ranges"):
        GateStoreWriter(tmp_path / "new", "clipwise", 1, kinds=FILM_KINDS, resume=True,
                        gate_ranges={**ranges, "layers.0.gate_mha": GateRange("sigmoid", 0.0, 1.0)})
    with pytest.raises(ValueError, match="gate kinds"):
        GateStoreWriter(tmp_path / "bad", "clipwise", 1, kinds=("mha", "ffn_beta"))
    # a store written before ranges were recorded: tanh [-1, 1]
    with GateStoreWriter(tmp_path / "old", "clipwise", 1) as w:
        w.add(1, "v", {k: v for k, v in gates.items() if k[1] != "beta"})
    path = tmp_path / "old" / "gates" / "meta.json"
    old = json.loads(path.read_text())
    del old["gate_ranges"]
    path.write_text(json.dumps(old))
    run = load_gate_run(tmp_path / "old")
    assert set(run.gate_ranges.values()) == {TANH}
    assert accumulate_gate_run(run).hist_ranges == {(0, "mha"): (-1.0, 1.0), (0, "ffn"): (-1.0, 1.0)}


def test_colour_convention_follows_the_range():
    ranges = {(0, "mha"): SIGMOID, (0, "ffn"): FILM_FFN, (0, "beta"): BETA}
    cmap, norm, diverging = figures.cmap_norm(figures.panel_scale(None, "mha", ranges, 0))
    assert not diverging and (norm.vmin, norm.vmax) == (0.0, 2.0) and cmap.name.startswith("Reds")
    assert "sequential 0 to 2" in figures.value_label(figures.panel_scale(None, "mha", ranges, 0))
    for kind in ("ffn", "beta"):
        sc = figures.panel_scale(None, kind, ranges, 0)
        cmap, norm, diverging = figures.cmap_norm(sc)
        assert diverging and sc.centre == 0.0 and cmap.name.startswith("RdBu") and (norm.vmin, norm.vmax) == (
            ranges[(0, kind)].low, ranges[(0, kind)].high)
    assert "weight 1, not off" in figures.value_label(figures.panel_scale(None, "ffn", ranges, 0))
    # without declared ranges: tanh [-1, 1], diverging around 0
    sc = figures.panel_scale(None, "mha", None)
    assert (sc.lo, sc.hi, sc.centre) == (-1.0, 1.0, 0.0)


def test_readme_csv_documentation_is_generated_from_csv_columns():
    readme = (ROOT / "README.md").read_text()
    assert csv_columns_markdown() in readme
    assert "'beta'" in CSV_COLUMNS["gate_stats_per_query.csv"]["gate"]


# -- a FiLM model built with qd_detr's code, through the whole pipeline ------------------------------
@pytest.fixture(scope="module")
def film_run(demo_data, tmp_path_factory):
    _, paths = demo_data
    tmp = tmp_path_factory.mktemp("film")
    ckpt, model, opt = small_checkpoint(tmp / "model.ckpt", "custom", "clipwise", seed=5, mha_gate_temp=2.0,
                                        ffn_gate_film=True)
    out = tmp / "out"
    out.mkdir()
    cfg = analysis_config(ckpt, paths, out, batch_size=4, batching="query", top_n=3, contributions=True,
                          ablate=["zero"], ablate_layers=["all"], ablate_gates=["both", "all"])
    manifest = run_analysis(cfg, progress=False, log=lambda msg: None)
    return model, opt, paths, out, manifest


def test_film_run_records_beta_everywhere(film_run):
    model, opt, paths, out, manifest = film_run
    assert fusion_gate_kinds(model.fusion) == FILM_KINDS
    names = {f"layers.{l}.gate_{k}" for l in (0, 1) for k in FILM_KINDS}
    run = load_gate_run(out)
    assert run.kinds == FILM_KINDS
    for name in ("gate_stats_per_query.csv", "gate_stats_per_layer.csv", "gate_histograms.csv",
                 "gate_stats_per_clip_position.csv", "gate_ground_truth.csv", "gate_contributions.csv"):
        df = pd.read_csv(out / name)
        assert set(df["name"]) >= names, name
    rk = pd.read_csv(out / "gate_rankings.csv")
    assert {"layers.0.gate_beta", "layers.all.gate_beta"} <= set(rk["name"])
    assert (out / "plots" / "query_clip_heatmap_layers.1.gate_beta.png").is_file()
    assert manifest["counts"]["gate_arrays"] == manifest["counts"]["queries"] * 2 * 3
    # the stored beta equals the model's own shift for each query alone
    got = gates_one_by_one(model, demo_dataset(opt, paths), range(3))
    assert len(got) == 3
    for qid, record in got.items():
        for layer in (0, 1):
            want = record.gates[(layer, "beta")]
            assert run.gate(qid, layer, "beta").shape == want.shape == (record.n_clips,)
            np.testing.assert_allclose(run.gate(qid, layer, "beta"), want, atol=1e-6, rtol=0)


def test_film_run_follows_the_declared_ranges(film_run):
    model, opt, paths, out, manifest = film_run
    declared = ranges_as_dict(fusion_gate_ranges(model.fusion))
    run_json = json.loads((out / "run.json").read_text())
    meta = json.loads((out / "gates" / "meta.json").read_text())
    assert run_json["gate_ranges"] == meta["gate_ranges"] == declared and len(declared) == 6
    assert run_json["model"]["gate_kinds"] == list(FILM_KINDS)
    assert declared["layers.0.gate_mha"]["activation"] == "sigmoid" and declared["layers.1.gate_ffn"]["film"]
    pq = pd.read_csv(out / "gate_stats_per_query.csv")
    assert pq.loc[pq.gate == "mha", "frac_negative"].isna().all()
    assert pq.loc[pq.gate != "mha", "frac_negative"].notna().all()
    h = pd.read_csv(out / "gate_histograms.csv")
    b = h[(h.name == "layers.0.gate_mha") & (h.bin_type == "bin")]
    high = declared["layers.0.gate_mha"]["high"]
    assert b["bin_left"].iloc[0] == 0.0 and b["bin_right"].iloc[-1] == pytest.approx(high)
    summary = (out / "summary.txt").read_text()
    assert "never negative" in summary and "weight 1" in summary and "not off" in summary and "gate_beta" in summary
    report = (out / "report.html").read_text()
    assert "gate_beta" in report and "not off" in report and "never negative" in report
    # with FiLM, audio is off only when beta is clamped too: zero@all:all is the audio-off reference
    joined = pd.read_csv(out / "gate_performance_ablation.csv", keep_default_na=False)
    assert set(pd.read_csv(out / "ablation.csv")["intervention"]) == {"zero@all:both", "zero@all:all"}
    assert set(joined["intervention"]) == {"zero@all:both", "zero@all:all"}  # every intervention is joined
    assert json.loads((out / "run.json").read_text())["analyses"]["ablation"]["reference"] == "zero@all:all"


def test_clamping_every_film_gate_switches_audio_off(film_run):
    model, opt, paths, out, _ = film_run
    fusion = model.fusion
    dataset = demo_dataset(opt, paths)
    _, inputs = collate([dataset[0], dataset[1]])
    kwargs = model_kwargs(inputs)
    silent = {**kwargs, "src_aud": torch.zeros_like(kwargs["src_aud"])}

    def logits(kw, values):
        with clamp_gates(fusion, values), torch.no_grad():
            return model(**kw)["pred_logits"]

    every = {(l, k): 0.0 for l in (0, 1) for k in FILM_KINDS}
    both = {key: v for key, v in every.items() if key[1] != "beta"}
    torch.testing.assert_close(logits(kwargs, every), logits(silent, every), rtol=0, atol=0)
    assert not torch.equal(logits(kwargs, both), logits(silent, both))  # the FiLM shift still carries audio
    seen = []
    with GateRecorder(fusion, seen.extend), clamp_gates(fusion, {(1, "beta"): 0.125}), torch.no_grad():
        model(**kwargs)
    np.testing.assert_allclose(seen[0].gates[(1, "beta")], 0.125, atol=1e-6)
    with pytest.raises(ConfigError, match="inside its range"):
        with clamp_gates(fusion, {(0, "beta"): 1.0}):
            pass
    ivs = {iv.name: iv for iv in parse_interventions(["zero"], ["all"], ["both", "all", "beta"], 2, FILM_KINDS)}
    assert set(ivs) == {"zero@all:both", "zero@all:all", "zero@all:beta"}
    assert ivs["zero@all:all"].audio_off and not ivs["zero@all:both"].audio_off
    (v1,) = parse_interventions(["zero"], ["all"], ["all"], 2)
    assert v1.name == "zero@all:both" and v1.audio_off
    with pytest.raises(ConfigError, match="no beta gate"):
        parse_interventions(["zero"], ["all"], ["beta"], 2)


# -- the original research code's checkpoints ----------------------------------------------------------
@requires_fixtures
def test_v2_film_fixture_records_beta_as_the_original_code(tmp_path):
    out = tmp_path / "v2"
    run_fixture_analysis("ckpt_v2_clipwise_film", out)
    ref = np.load(FIXTURES / "ckpt_v2_clipwise_film" / "reference_outputs_bs1.npz")
    run = load_gate_run(out)
    assert run.kinds == FILM_KINDS
    worst = 0.0
    for qid in ref["__qids__"]:
        valid = ref[f"{qid}/video_mask"].astype(bool)
        for layer in (0, 1):
            want = ref[f"{qid}/layer{layer}/gate_beta"].reshape(-1)[valid]
            got = run.gate(int(qid), layer, "beta")
            assert got.shape == want.shape
            worst = max(worst, float(np.abs(got - want).max()))
    assert worst <= 1e-6
    ranges = json.loads((out / "run.json").read_text())["gate_ranges"]
    assert ranges["layers.0.gate_mha"]["activation"] == "sigmoid" and ranges["layers.1.gate_ffn"]["film"]
    assert ranges == json.loads((out / "gates" / "meta.json").read_text())["gate_ranges"]
    pq = pd.read_csv(out / "gate_stats_per_query.csv")
    assert set(pq["gate"]) == set(FILM_KINDS) and pq.loc[pq.gate == "mha", "frac_negative"].isna().all()
    assert "not off" in (out / "summary.txt").read_text()


@requires_fixtures
def test_diagstrip_ssm_fixture_has_a_sigmoid_mha_gate(tmp_path):
    out = tmp_path / "ssm"
    run_fixture_analysis("ckpt_ssm_diagstrip", out)
    run = load_gate_run(out)
    assert run.gate_range(0, "mha").activation == "sigmoid" and run.gate_range(0, "ffn") == TANH
    layer = pd.read_csv(out / "gate_stats_per_layer.csv")
    assert layer.loc[layer.gate == "mha", "frac_negative"].isna().all()
    assert layer.loc[layer.gate == "ffn", "frac_negative"].notna().all()
    h = pd.read_csv(out / "gate_histograms.csv")
    assert h.loc[(h.name == "layers.0.gate_mha") & (h.bin_type == "bin"), "bin_left"].iloc[0] == 0.0
