"""test_legacy_model.py's report (issue 14): the text and --json renderings agree field by field, the whole
report is printed whenever the checkpoint is readable (a data or prediction-file problem is its own named
part, exit 2), the reason of a failure is printed once, and the closing command is one that runs.
Also the JSON-lines reader's message for a file that is one JSON document (array, pretty-printed object)."""
import json
import re
import shlex

import pytest
import torch

import test_legacy_model as compat_cli  # the top-level script (pytest collects only tests/)
from conftest import (
    FIXTURE_DATA,
    FIXTURE_NAMES,
    FIXTURES,
    demo_feature_args,
    fixture_feature_args,
    requires_fixtures,
    run_gate_analysis_main,
    save_checkpoint,
    small_model,
)
from gate_analysis.compat import (
    DATA_OPTIONS,
    PLACEHOLDERS,
    check_compatibility,
    format_report,
    report_json,
)
from gate_analysis.reproduction_report import format_reproduction

LABEL = re.compile(r"^  (\S.{11}) (.*)$")


def _sections(lines):
    """{label: [contents]} of the report's "  label        contents" lines."""
    out = {}
    for line in lines[1:-1]:
        m = LABEL.match(line)
        assert m, f"line without a label: {line!r}"
        out.setdefault(m.group(1).strip(), []).append(m.group(2))
    return out


def _one(sections, label, pattern):
    (text,) = sections[label]
    m = re.fullmatch(pattern, text)
    assert m, (label, pattern, text)
    return m.groups()


def assert_renderings_agree(report, lines):
    """Every field the text report shows equals the --json report's (parsed back from its JSON)."""
    rep = json.loads(report_json(report))
    assert lines[0] == f"Compatibility report for {rep['model_path']}"
    sec = _sections(lines)
    ck = rep["checkpoint"]
    fmt, size, entries, epoch = _one(sec, "format", r"(.*) \(([\d.]+) MB\), entries (.*), epoch (\S+)")
    assert (fmt, float(size), entries, epoch) == (ck["format"], round(ck["size_bytes"] / 1e6, 1),
                                                  ", ".join(ck["entries"] or []) or "-", str(ck["epoch"]))
    assert sec["options"] == [ck["options_source"] or "none stored (bare weights)"]
    for name, o in (rep["options"] or {}).items():  # each saved option: its value, in the part that says its use
        token = f"{name}={json.dumps(o['value'])}"
        label = "saved data" if name in DATA_OPTIONS else "saved, used" if o["used"] else "not used"
        shown = [text for text in sec[label] if re.search(rf"(^|, ){re.escape(token)}(,|:|$)", text)]
        assert len(shown) == 1, (name, label, sec.get(label))
        if not o["used"]:
            assert o["why_not_used"] and o["why_not_used"] in shown[0]
        elif name in ("gating_type", "fusion_layers", "fusion_n_heads"):  # a used option is what the model has
            assert o["value"] == rep[name], name
    assert sum(len(sec.get(label, [])) for label in ("saved, used", "not used", "saved data")) == \
        (0 if not rep["options"] else len({"saved data" if n in DATA_OPTIONS else "saved, used" if o["used"]
                                           else o["why_not_used"] for n, o in rep["options"].items()}))
    (layout,) = _one(sec, "layout", r"(\S+): .*")
    assert layout == rep["layout"]
    n, groups, unmatched = _one(sec, "keys", r"(\d+) tensors; (.*); unmatched (\d+); renames .*")
    assert int(n) == ck["n_tensors"] and int(unmatched) == len(rep["keys"]["unmatched"])
    assert groups == ", ".join(f"{g} {k}" for g, k in rep["keys"]["groups"].items())
    if "key_match" in rep:
        got = _one(sec, "strict load", r"(\d+) matched, (\d+) missing, (\d+) unexpected, (\d+) mis-shaped; "
                                       r"([\d,]+) parameters")
        km = rep["key_match"]
        assert [int(x.replace(",", "")) for x in got] == [km["matched"], km["missing"], km["unexpected"],
                                                          km["mis_shaped"], rep["n_parameters"]]
    if rep.get("gating_type"):
        gating, source, layers, heads = _one(sec, "gating", r"(\S+) \(from (.*)\); (\d+) fusion layers?, (\d+) heads?")
        assert (gating, source, int(layers), int(heads)) == (rep["gating_type"], rep["gating_type_source"],
                                                             rep["fusion_layers"], rep["fusion_n_heads"])
    else:
        assert "gating" not in sec
    if "weights" in rep:
        assert _one(sec, "weights", r"(\d+)/(\d+) tensors identical .*") == (
            str(rep["weights"]["identical"]), str(rep["weights"]["compared"]))
        eq = rep["equivalence"]
        b, clips, text, modes = _one(sec, "probe", r"(\d+) samples, clips (\[.*\]), text (\[.*\]): max abs diff "
                                                   r"tracked vs untracked: (.*) \(tolerance .*\)")
        assert (int(b), json.loads(clips), json.loads(text)) == (eq["probe"]["batch_size"], eq["probe"]["video_clips"],
                                                                 eq["probe"]["text_tokens"])
        assert [m.split()[0] for m in modes.split(", ")] == list(eq["modes"])
        assert all(float(m.split()[1]) == pytest.approx(r["max_abs_diff"], rel=1e-2, abs=1e-12)
                   for m, r in zip(modes.split(", "), eq["modes"].values()))
        layers = [re.fullmatch(r"layer (\d+) (\w+): module output .*, recorded (\[.*\])", t).groups()
                  for t in sec["gates"]]
        assert [(int(l), k, json.loads(s)) for l, k, s in layers] == [
            (g["layer"], g["kind"], g["recorded_shapes"]) for g in rep["gates"]["layers"]]
    part = rep.get("data")
    if part is None:
        assert "data" not in sec
    elif part["status"] == "not given":
        assert sec["data"][0].startswith("not given")
    elif part["status"] == "problem":
        assert sec["data"] == [f"PROBLEM: {part['problem']}"]
    else:
        assert sec["data"][0].startswith(f"ok: {part['data_path']} ({part['n_queries']} quer")
    rb = rep.get("real_batch")
    if rb:
        qids, clips = _one(sec, "real batch", r"qids (\[.*?\]), clips (\[.*?\]): .*")
        assert (json.loads(qids), json.loads(clips)) == (rb["qids"], rb["video_clips"])
        assert rb["passed"] == (part["status"] == "ok")
    res = rep.get("reproduction")
    if res is None:
        assert "reproduction" not in sec
    elif res["status"] == "error":
        assert sec["reproduction"] == [f"PROBLEM: {res['message']}"]
    else:
        assert [f"  reproduction {t}" for t in sec["reproduction"]] == format_reproduction(res)
    cmd, verdict = rep.get("next_command"), lines[-1]
    if cmd:
        assert sec.get("fill in", []) == [f"{name}: {why}" for name, why in cmd["fill_in"].items()]
        assert verdict.endswith(": " + cmd["text"]) and cmd["complete"] == (not cmd["fill_in"])
        assert shlex.split(cmd["text"])[2:] == cmd["argv"][2:]
    head = {"compatible": "COMPATIBLE: ", "incompatible": "INCOMPATIBLE (at stage "}.get(rep["status"])
    if rep["problem"] in ("data", "reproduction") and rep["status"] != "incompatible":
        head = f"{rep['problem'].upper()} PROBLEM (at stage {rep['stage']}): the checkpoint is compatible"
    assert verdict.startswith(head or "NOT CHECKED ("), verdict
    assert (rep["exit_code"], rep["compatible"]) == ({"compatible": 0, "incompatible": 1}.get(rep["status"], 2),
                                                     rep["status"] == "compatible" or rep["problem"] in ("data",
                                                                                                         "reproduction")
                                                     and rep["status"] != "incompatible")


# ------------------------------------------------------------------------------------------------
# every fixture: one report, two renderings
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fixture_reports():
    """check_compatibility of each fixture with the fixture data (real batch and reproduction), cached."""
    cache = {}

    def get(name):
        if name not in cache:
            feats = fixture_feature_args()
            data = {"data_path": str(FIXTURE_DATA / "highlight_val_release.jsonl"), "v_feat_dirs": feats[1:3],
                    "t_feat_dir": feats[4], "a_feat_dir": feats[6]}
            cache[name] = check_compatibility(FIXTURES / name / "model.ckpt", device="cpu", data=data, batch_size=2,
                                              reproduction={"original_predictions": None})
        return cache[name]
    return get


@requires_fixtures
@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_text_and_json_reports_agree_for_every_fixture(fixture_reports, name):
    report, code = fixture_reports(name)
    assert code == report["exit_code"]
    assert_renderings_agree(report, format_report(report))
    assert_renderings_agree(report, format_report(report, reason=False))
    if name == "ckpt_main_plain":
        assert code == 1 and report["problem"] == "checkpoint" and report.get("next_command") is None
    else:
        assert code == 0 and report["data"]["status"] == "ok" and report["next_command"]["complete"]


@requires_fixtures
def test_older_avigate_layout_options_are_marked_not_used(capsys):
    """The older one-layer, eight-head AVIGATEFusion: saved fusion_layers 4 / fusion_n_heads 4 are options the
    model never reads; --json and the text say so, and both say 1 layer, 8 heads."""
    argv = ["--model_path", str(FIXTURES / "ckpt_avigate_legacy" / "model.ckpt"), "--device", "cpu",
            "--skip_reproduction"]
    assert compat_cli.main([*argv, "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert compat_cli.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert (rep["fusion_layers"], rep["fusion_n_heads"]) == (1, 8)
    for name in ("fusion_layers", "fusion_n_heads", "gating_type"):
        assert not rep["options"][name]["used"] and "use_avigate_custom" in rep["options"][name]["why_not_used"]
    assert rep["options"]["use_avigate"] == {"value": True, "used": True, "why_not_used": None}
    assert "  gating       global (from layout (AVIGATEFusion gates are global)); 1 fusion layer, 8 heads" in lines
    not_used = [line for line in lines if line.startswith("  not used ")]
    assert len(not_used) == 1 and 'gating_type="global", fusion_layers=4, fusion_n_heads=4: not read' in not_used[0]
    assert_renderings_agree(rep, lines)


# ------------------------------------------------------------------------------------------------
# data problems are a part of the full report
# ------------------------------------------------------------------------------------------------

@requires_fixtures
def test_data_without_feature_flags_gives_the_full_report(capsys):
    """Finding 4: --data_path without feature flags (the saved ../features folders do not exist here)."""
    argv = ["--model_path", str(FIXTURES / "ckpt_custom_clipwise" / "model.ckpt"), "--device", "cpu",
            "--data_path", str(FIXTURE_DATA / "highlight_val_release.jsonl")]
    code = compat_cli.main(argv)
    out, err = capsys.readouterr()
    assert code == 2
    lines = out.splitlines()
    for label in ("strict load", "gating", "weights", "probe", "gates"):
        assert any(line.startswith(f"  {label} ") for line in lines), label
    (data_line,) = [line for line in lines if line.startswith("  data ")]
    assert "PROBLEM: ../features/slowfast_features: video feature folder not found (tried " in data_line
    assert lines[-1].startswith("DATA PROBLEM (at stage data): the checkpoint is compatible")
    assert err.startswith("error: data problem: ../features/slowfast_features: video feature folder not found")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err

    assert compat_cli.main([*argv, "--json"]) == 2
    out, err = capsys.readouterr()
    rep = json.loads(out)
    assert rep["compatible"] and rep["problem"] == "data" and rep["exit_code"] == 2 and rep["stage"] == "data"
    assert rep["equivalence"]["passed"] and rep["data"]["status"] == "problem" and "real_batch" not in rep
    assert rep["reproduction"]["status"] == "not_checked"  # it would need the same features
    cmd = rep["next_command"]
    assert not cmd["complete"] and set(cmd["fill_in"]) == {PLACEHOLDERS[f] for f in
                                                            ("--v_feat_dirs", "--t_feat_dir", "--a_feat_dir")}
    assert "../features/slowfast_features (tried ../features/slowfast_features, " in cmd["fill_in"]["VIDEO_FEATURE_DIRS"]
    assert_renderings_agree(rep, lines)

    # the same with the feature flags: compatible, and the next command names every folder
    assert compat_cli.main([*argv, *fixture_feature_args(), "--json", "--skip_reproduction"]) == 0
    rep = json.loads(capsys.readouterr().out)
    cmd = shlex.split(rep["next_command"]["text"])
    assert rep["next_command"]["complete"] and cmd[1].endswith("run_gate_analysis.py")
    given = fixture_feature_args()
    assert cmd[cmd.index("--v_feat_dirs") + 1:cmd.index("--v_feat_dirs") + 3] == given[1:3]
    assert cmd[cmd.index("--a_feat_dir") + 1] == given[6] and cmd[cmd.index("--t_feat_dir") + 1] == given[4]


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, demo_data):
    """A small checkpoint whose saved options name the demo data like a training run does, the audio folder
    relative to the repo root (results/run/ -> root), and the same model with a missing saved audio folder."""
    root, paths = demo_data
    tmp = tmp_path_factory.mktemp("saved_run")
    model, opt = small_model("custom", "clipwise", seed=41)
    opt.eval_path, opt.v_feat_dirs, opt.t_feat_dir = paths["jsonl"]["val"], paths["v_feat_dirs"], paths["t_feat_dir"]
    (tmp / "results" / "run").mkdir(parents=True)
    (tmp / "features").symlink_to(root)
    opt.a_feat_dir = "features/pann_features"  # found from the checkpoint's grandparent only
    good = save_checkpoint(tmp / "results" / "run" / "model_best.ckpt", model, opt)
    opt.a_feat_dir = "../elsewhere/pann_features"
    (tmp / "other").mkdir()
    missing = save_checkpoint(tmp / "other" / "model_best.ckpt", model, opt)
    return tmp, good, missing, paths


def test_next_command_is_complete_and_runs(capsys, saved_run, tmp_path):
    tmp, good, _, paths = saved_run
    assert compat_cli.main(["--model_path", str(good), "--device", "cpu", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    cmd = rep["next_command"]
    assert cmd["complete"] and cmd["fill_in"] == {} and rep["data"]["status"] == "not given"
    argv = shlex.split(cmd["text"])
    assert argv[0] == "python" and argv[1].endswith("run_gate_analysis.py") and "--legacy_model" in argv
    assert argv[argv.index("--a_feat_dir") + 1] == str(tmp / "features" / "pann_features")
    assert argv[argv.index("--data_path") + 1] == paths["jsonl"]["val"]
    out = tmp_path / "analysis"
    assert run_gate_analysis_main(*argv[2:], "--output_dir", out, "--device", "cpu", "--no_plots", "--quiet",
                                  "--max_samples", "3") == 0
    assert json.loads((out / "run.json").read_text())["status"] == "complete"


def test_missing_saved_folder_is_a_placeholder_naming_the_paths_tried(capsys, saved_run):
    tmp, _, missing, paths = saved_run
    assert compat_cli.main(["--model_path", str(missing), "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    tried = ["../elsewhere/pann_features", str(tmp / "elsewhere" / "pann_features"),
             str(tmp.parent / "elsewhere" / "pann_features"), str(tmp.parent.parent / "elsewhere" / "pann_features")]
    assert (f"  fill in      AUDIO_FEATURE_DIR: the checkpoint's audio feature folder not found: "
            f"../elsewhere/pann_features (tried {', '.join(tried)})") in out.splitlines()
    verdict = out.splitlines()[-1]
    assert verdict.startswith("COMPATIBLE: gates can be analysed; next, with AUDIO_FEATURE_DIR filled in: python ")
    assert "--a_feat_dir AUDIO_FEATURE_DIR" in verdict and "--v_feat_dirs " + shlex.join(paths["v_feat_dirs"]) in verdict

    # with --data_path and no audio flag: the real batch cannot run; full report, exit 2, the data part names it
    assert compat_cli.main(["--model_path", str(missing), "--device", "cpu", "--data_path",
                            paths["jsonl"]["val"]]) == 2
    out, err = capsys.readouterr()
    assert "  data         PROBLEM: ../elsewhere/pann_features: audio feature folder not found" in out
    assert out.splitlines()[-1].startswith("DATA PROBLEM (at stage data)")
    assert err.startswith("error: data problem: ../elsewhere/pann_features: audio feature folder not found")
    assert len(err.strip().splitlines()) == 1

    # the flag fixes it: the real batch runs and the command carries the folder given
    argv = ["--model_path", str(missing), "--device", "cpu", "--data_path", paths["jsonl"]["val"],
            *demo_feature_args(paths["root"]), "--json"]
    assert compat_cli.main(argv) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["data"]["status"] == "ok" and rep["real_batch"]["passed"] and rep["next_command"]["complete"]
    assert "--a_feat_dir " + paths["a_feat_dir"] in rep["next_command"]["text"]


def test_unreadable_jsonl_is_the_data_part(capsys, saved_run, tmp_path):
    _, good, _, paths = saved_run
    bad = tmp_path / "val.json"
    bad.write_text(json.dumps([json.loads(x) for x in open(paths["jsonl"]["val"]).read().splitlines()], indent=2))
    code = compat_cli.main(["--model_path", str(good), "--device", "cpu", "--data_path", str(bad), "--json"])
    out, err = capsys.readouterr()
    rep = json.loads(out)
    assert code == 2 and rep["compatible"] and rep["problem"] == "data" and rep["equivalence"]["passed"]
    assert rep["data"]["problem"] == f"{bad}: is a JSON array of 12 items, not JSONL; expected JSONL: one JSON " \
                                     "object per line"
    assert err.strip() == f"error: data problem: {rep['data']['problem']} (the checkpoint itself is compatible)"
    assert rep["next_command"]["argv"][rep["next_command"]["argv"].index("--data_path") + 1] == str(bad)
    assert rep["reproduction"]["status"] == "not_checked"


def test_bad_prediction_file_keeps_the_report(capsys, saved_run, tmp_path):
    _, good, _, paths = saved_run
    bad = tmp_path / "preds.jsonl"
    bad.write_text("[1, 2]\n")
    code = compat_cli.main(["--model_path", str(good), "--device", "cpu", "--original_predictions", str(bad)])
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert code == 2 and any(line.startswith("  probe ") for line in lines)
    assert f"  reproduction PROBLEM: {bad}: is a JSON array of 2 items, not JSONL" in out
    assert lines[-1].startswith("REPRODUCTION PROBLEM (at stage reproduce): the checkpoint is compatible")
    assert err.startswith(f"error: {bad}: is a JSON array of 2 items") and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------------
# the reason of a failure is printed once
# ------------------------------------------------------------------------------------------------

def test_incompatible_reason_is_printed_once(capsys, tmp_path):
    model, opt = small_model("custom", "clipwise", seed=42)
    sd = dict(model.state_dict())
    key = "fusion.fusion_layers.1.gating_function.mlp_mha.0.weight"
    del sd[key]
    ckpt = save_checkpoint(tmp_path / "t.ckpt", sd, opt)
    code = compat_cli.main(["--model_path", str(ckpt), "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 1 and (out + err).count(key) == 1 and key in err
    assert out.splitlines()[-1] == "INCOMPATIBLE (at stage load); the reason is on stderr"
    assert err.startswith("incompatible: ") and len(err.strip().splitlines()) == 1
    assert any(line.startswith("  keys ") for line in out.splitlines())

    torch.save(model.state_dict(), tmp_path / "bare.ckpt")  # exit 2 on a readable file: the report, reason once
    code = compat_cli.main(["--model_path", str(tmp_path / "bare.ckpt"), "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 2 and out.splitlines()[-1] == "NOT CHECKED (unreadable or bad input, at stage load); the reason " \
                                                 "is on stderr"
    assert "--gating_type" in err and "--gating_type" not in out and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------------
# the JSON-lines reader
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("content, message", [
    (json.dumps([{"qid": 1}, {"qid": 2}], indent=2), "is a JSON array of 2 items, not JSONL; expected JSONL: one JSON "
                                                      "object per line"),
    (json.dumps([{"qid": 1}]) + "\n", "is a JSON array of 1 item, not JSONL; expected JSONL"),
    ("[\n  {\"qid\": 1},\n", "starts with '[' like a JSON array, not JSONL; expected JSONL"),
    (json.dumps({"qid": 1, "query": "a"}, indent=2), "holds one JSON object spread over several lines (pretty-printed "
                                                     "JSON), not JSONL; expected JSONL: one JSON object per line"),
    ('{"qid": 1}\n{"qid": 2,\n', "line 2: malformed JSON (Expecting property name enclosed in double quotes, column 1); "
                                 "expected JSONL: one JSON object per line"),
    ('{"qid": 1}\n[1]\n', "line 2: expected a JSON object, got list; expected JSONL"),
], ids=["array", "array_one_line", "broken_array", "pretty_object", "malformed_line", "list_line"])
def test_json_document_instead_of_jsonl_is_named(tmp_path, content, message):
    from qd_detr.errors import DataError
    from qd_detr.io import read_json_lines
    path = tmp_path / "x.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as info:
        read_json_lines(path)
    assert str(info.value).startswith(f"{path}: {message}")
