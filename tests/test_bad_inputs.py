"""Issue 8: bad input never crashes, misleads or loses results.

Every command-line tool is run as a subprocess (``sys.executable``, cwd = project root) on real files built
here: checkpoints saved with project code and then tampered with, and copies of the generated demo data,
then broken. Each bad input must be answered with

* exit code 2 (``test_legacy_model.py`` and ``legacy_model_guide.py``: 1 for a model that was read but is
  incompatible, as their docstrings promise),
* exactly ONE line on stderr, ``error: <message>`` (or ``incompatible: <message>`` with exit code 1), that
  names the file and the problem,
* no traceback, and no output that could pass for a result (no predictions, no temporary files, an earlier
  analysis left untouched).

A checkpoint that carries an arbitrary pickled object (``os.system("touch MARKER")``) must be refused by
every tool with a message naming ``--trust_checkpoint``, and the payload must not run.

The same checks in-process: the loader refuses the malicious pickle in both torch formats (and a control proves
the payload is live), lists each key problem, and the atomic writers leave neither a temporary file nor a
half-written result.

Speed: each subprocess spends ~3 s importing torch, so the subprocesses of the selected cases run
concurrently in a small pool the first time a test asks for a result (``cli_results``), and a case whose code
path two CLIs share (e.g. run_gate_analysis.py and inference both use ``load_checkpoint``) runs on one of them
(``test_every_case_reaches_every_kind_of_cli`` checks the coverage). Most bad inputs fail before a model runs.
Tests that fail because of a file owned elsewhere are ``xfail(strict=True)`` with the needed fix as the reason.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest
import torch

from conftest import SCRIPT_ENV, demo_data_args, run_python, save_checkpoint, small_checkpoint, small_model

ENV = dict(SCRIPT_ENV, MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
POOL_WORKERS = max(2, min(4, (os.cpu_count() or 2) + 1))
TIMEOUT = 600

CLI = {
    "run_gate_analysis": ["run_gate_analysis.py"],
    "test_legacy_model": ["test_legacy_model.py"],
    "legacy_model_guide": ["legacy_model_guide.py", "--non-interactive"],
    "test_gate_analysis": ["test_gate_analysis.py"],
    "inference": ["-m", "qd_detr.inference"],
    "eval": ["-m", "qd_detr.eval"],
}
MODEL_CLIS = ("run_gate_analysis", "test_legacy_model", "legacy_model_guide", "inference")
LEGACY_CLIS = ("test_legacy_model", "legacy_model_guide")  # exit 1 = incompatible model

# Runs a command without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH, so that root (uid 0, as in CI containers)
# cannot write into a folder without write permission either: the "unwritable output folder" case.
DROP_DAC_CAPS = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH: out of the bounding set ...
    if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
        sys.exit("cannot drop capabilities: errno %d" % ctypes.get_errno())
class Hdr(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
class Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]
hdr, data = Hdr(0x20080522, 0), (Data * 2)()
if libc.capget(ctypes.byref(hdr), data) != 0:
    sys.exit("capget failed")
for name in ("effective", "permitted", "inheritable"):  # ... and out of this process
    setattr(data[0], name, getattr(data[0], name) & ~0b110 & 0xFFFFFFFF)
if libc.capset(ctypes.byref(hdr), data) != 0:
    sys.exit("capset failed")
os.execv(sys.argv[1], sys.argv[1:])
"""


# ------------------------------------------------------------------------------------------------
# a malicious pickle
# ------------------------------------------------------------------------------------------------

class Payload:
    """Unpickling this runs ``touch <marker>`` (what a booby-trapped checkpoint could do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def save_malicious_checkpoint(path, marker, legacy_format=False):
    model, opt = small_model("custom", "clipwise", seed=5)
    return save_checkpoint(path, model, opt, legacy_format=legacy_format, extra_state=Payload(marker))


# ------------------------------------------------------------------------------------------------
# the workspace: real files, then broken copies
# ------------------------------------------------------------------------------------------------

class Workspace:
    """Every input file of the cases, in one temporary folder; each broken file is built once."""

    def __init__(self, base, demo_root, demo_paths):
        self.base = Path(base)
        self.data = self.base / "data"
        shutil.copytree(demo_root, self.data)
        self.jsonl = self.data / "highlight_val_release.jsonl"
        self.records = [json.loads(line) for line in self.jsonl.read_text().splitlines() if line.strip()]
        self.dims = demo_paths["dims"]
        self.feats = self.feature_args()
        self.markers = self.base / "markers"
        self.markers.mkdir()
        self.built = {}

        self.ckpt, model, self.opt = small_checkpoint(self.base / "good.ckpt", "custom", "clipwise", seed=1)
        self.state_dict = model.state_dict()

    def path(self, *parts):
        return self.base.joinpath(*parts)

    def feature_args(self, slowfast=None, clip=None, text=None, audio=None):
        d = self.data
        return ["--v_feat_dirs", str(slowfast or d / "slowfast_features"), str(clip or d / "clip_features"),
                "--t_feat_dir", str(text or d / "clip_text_features"),
                "--a_feat_dir", str(audio or d / "pann_features")]

    def once(self, name, build):
        """Build an input file once (several CLIs share it)."""
        if name not in self.built:
            self.built[name] = build()
        return self.built[name]

    # -- checkpoints ------------------------------------------------------------------------------
    def tampered_ckpt(self, name, change):
        def build():
            sd = dict(self.state_dict)
            change(sd)
            return save_checkpoint(self.path(name), sd, self.opt)
        return self.once(name, build)

    def raw_ckpt(self, name, obj):
        def build():
            torch.save(obj() if callable(obj) else obj, self.path(name))
            return self.path(name)
        return self.once(name, build)

    # -- annotation files ---------------------------------------------------------------------------
    def jsonl_variant(self, name, lines):
        def build():
            p = self.path(name)
            p.write_text("".join(line + "\n" for line in lines))
            return p
        return self.once(name, build)

    def record_lines(self):
        return [json.dumps(r) for r in self.records]

    # -- feature folders ------------------------------------------------------------------------------
    def feature_copy(self, name, subdir, change):
        """A copy of one feature folder with ``change(folder)`` applied."""
        def build():
            folder = self.path(name)
            shutil.copytree(self.data / subdir, folder)
            change(folder)
            return folder
        return self.once(name, build)


def _write_npz(path, **arrays):
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


# ------------------------------------------------------------------------------------------------
# cases
# ------------------------------------------------------------------------------------------------

@dataclass
class Spec:
    """One subprocess run and what it must answer."""
    argv: list
    code: int = 2
    needles: tuple = ()               # regexes the one stderr line must contain (case-insensitive)
    out: Optional[Path] = None        # output location, checked for leftovers afterwards
    check: Optional[Callable] = None  # extra assertions: check(proc, spec)
    unwritable: bool = False          # run without the capabilities that let root write anywhere
    success: bool = False             # a run that must succeed (skip_missing, atomic writes)


@dataclass
class Case:
    name: str
    cli: str
    build: Callable  # build(ws, out) -> Spec
    xfail: Optional[str] = None
    reuse: Optional[str] = None  # the name of a case of the same CLI whose run this one checks further

    @property
    def id(self):
        return f"{self.cli}-{self.name}"


def model_argv(ws, cli, out, ckpt=None, data=None, feats=None, extra=()):
    """Arguments of a model CLI with the good inputs unless others are given."""
    ckpt, data = str(ckpt or ws.ckpt), str(data or ws.jsonl)
    feats = ws.feats if feats is None else feats
    if cli in ("run_gate_analysis", "legacy_model_guide"):
        return ["--model_path", ckpt, "--data_path", data, "--output_dir", str(out), "--device", "cpu", "--quiet",
                "--no_plots", *feats, *extra]
    if cli == "test_legacy_model":
        return ["--model_path", ckpt, "--data_path", data, "--device", "cpu", *feats, *extra]
    if cli == "inference":
        out.mkdir(parents=True, exist_ok=True)
        return ["--model_path", ckpt, "--data_path", data, "--output_path", str(out / "pred.jsonl"), "--device", "cpu",
                "--quiet", *feats, *extra]
    raise AssertionError(cli)


def _q(path):
    """Regex matching a path as printed (absolute or as given)."""
    return re.escape(os.path.basename(os.fspath(path)))


CASES = []


def case(name, clis, xfail=None, reuse=None):
    """Register ``build(ws, cli, out) -> Spec`` for each CLI; ``xfail``: {cli: reason}; ``reuse``: check the
    run of that case (``build`` then returns only the checks)."""
    def register(build):
        for cli in clis:
            CASES.append(Case(name, cli, lambda ws, out, cli=cli: build(ws, cli, out), (xfail or {}).get(cli), reuse))
        return build
    return register


# --- checkpoints ---------------------------------------------------------------------------------

@case("ckpt_missing_file", MODEL_CLIS)
def _(ws, cli, out):
    ckpt = ws.path("no_such_model.ckpt")
    return Spec(model_argv(ws, cli, out, ckpt=ckpt), needles=(_q(ckpt), "not found"), out=out)


@case("ckpt_is_a_directory", ("test_legacy_model", "inference"))
def _(ws, cli, out):
    ckpt = ws.once("ckpt_dir", lambda: (ws.path("model_dir.ckpt").mkdir(), ws.path("model_dir.ckpt"))[1])
    return Spec(model_argv(ws, cli, out, ckpt=ckpt), needles=(_q(ckpt), "directory|folder"), out=out)


@case("ckpt_random_bytes", ("run_gate_analysis", "legacy_model_guide"))
def _(ws, cli, out):
    def build():
        p = ws.path("random.ckpt")
        p.write_bytes(np.random.default_rng(0).bytes(4096))
        return p
    ckpt = ws.once("random", build)
    return Spec(model_argv(ws, cli, out, ckpt=ckpt), needles=(_q(ckpt), "not a (readable )?(PyTorch )?checkpoint"),
                out=out)


@case("ckpt_truncated", ("test_legacy_model", "inference"))
def _(ws, cli, out):
    def build():
        p = ws.path("truncated.ckpt")
        data = Path(ws.ckpt).read_bytes()
        p.write_bytes(data[: len(data) // 2])  # an interrupted download
        return p
    ckpt = ws.once("truncated", build)
    return Spec(model_argv(ws, cli, out, ckpt=ckpt), needles=(_q(ckpt), "truncated|corrupt"), out=out)


@case("ckpt_no_model_weights", ("run_gate_analysis", "legacy_model_guide"))
def _(ws, cli, out):
    ckpt = ws.raw_ckpt("no_weights.ckpt", lambda: {"epoch": 3, "opt": argparse.Namespace(**vars(ws.opt)),
                                                   "optimizer": {"state": {}, "param_groups": []}})
    return Spec(model_argv(ws, cli, out, ckpt=ckpt), needles=(_q(ckpt), "no model weights"), out=out)


@case("ckpt_malicious_pickle", MODEL_CLIS)
def _(ws, cli, out):
    marker = ws.markers / f"PWNED_{cli}"
    ckpt = ws.once(f"malicious_{cli}", lambda: save_malicious_checkpoint(ws.path(f"malicious_{cli}.ckpt"), marker))

    def check(proc, spec):
        assert not marker.exists(), "the pickled payload ran"
    return Spec(model_argv(ws, cli, out, ckpt=ckpt), needles=(_q(ckpt), "--trust_checkpoint", "refused"),
                out=out, check=check)


def _no_fusion_ckpt(ws):
    return ws.once("video_only", lambda: small_checkpoint(ws.path("video_only.ckpt"), "video_only", seed=2)[0])


@case("ckpt_no_fusion_module", MODEL_CLIS)
def _(ws, cli, out):
    ckpt = _no_fusion_ckpt(ws)
    # inference needs no gates; asking for a gating type is asking for gates
    extra = ["--gating_type", "clipwise"] if cli == "inference" else []
    feats = ws.feature_args()[:-2]  # the video-only model reads no audio
    return Spec(model_argv(ws, cli, out, ckpt=ckpt, feats=feats, extra=extra), code=1 if cli in LEGACY_CLIS else 2,
                needles=(_q(ckpt), "no (audio-visual )?fusion module"), out=out)


@case("ckpt_gating_type_conflict", ("run_gate_analysis", "test_legacy_model", "legacy_model_guide"))
def _(ws, cli, out):
    return Spec(model_argv(ws, cli, out, extra=["--gating_type", "global"]),
                needles=(_q(ws.ckpt), "conflicts", "global", "clipwise"), out=out)


MISSING_KEY = "fusion.fusion_layers.1.gating_function.mlp_mha.2.weight"
UNEXPECTED_KEY = "fusion.fusion_layers.0.extra_scale"
MISSHAPED_KEY = "input_txt_proj.0.net.1.weight"


def _drop_key(sd):
    del sd[MISSING_KEY]


def _add_key(sd):
    sd[UNEXPECTED_KEY] = torch.ones(1)


def _reshape_key(sd):
    sd[MISSHAPED_KEY] = torch.zeros(sd[MISSHAPED_KEY].shape[0], sd[MISSHAPED_KEY].shape[1] + 4)


def _key_case(name, clis, change, problem, key):
    """``name``: the good checkpoint with ``change`` applied to its state dict (saved as ``{name without
    ckpt_}.ckpt``); the one error line names the file, the problem (a regex) and the key. The legacy tools
    answer 1: the file was read, the model is incompatible."""
    @case(name, clis)
    def _(ws, cli, out):
        ckpt = ws.tampered_ckpt(f"{name.removeprefix('ckpt_')}.ckpt", change)
        return Spec(model_argv(ws, cli, out, ckpt=ckpt), code=1 if cli in LEGACY_CLIS else 2,
                    needles=(_q(ckpt), problem, re.escape(key)), out=out)


_key_case("ckpt_missing_key", ("run_gate_analysis", "test_legacy_model", "legacy_model_guide"), _drop_key,
          "missing", MISSING_KEY)
_key_case("ckpt_unexpected_key", ("inference", "test_legacy_model"), _add_key,
          "unexpected|unknown|not recogni[sz]ed", UNEXPECTED_KEY)
_key_case("ckpt_misshaped_key", ("run_gate_analysis", "test_legacy_model"), _reshape_key,
          "mis-?shaped|shape", MISSHAPED_KEY)


# --- annotation files ----------------------------------------------------------------------------

@case("jsonl_missing_file", ("inference", "legacy_model_guide"))
def _(ws, cli, out):
    data = ws.path("no_such_data.jsonl")
    return Spec(model_argv(ws, cli, out, data=data), needles=(_q(data), "not found"), out=out)


@case("jsonl_is_a_directory", ("run_gate_analysis",))
def _(ws, cli, out):
    data = ws.once("jsonl_dir", lambda: (ws.path("data_dir.jsonl").mkdir(), ws.path("data_dir.jsonl"))[1])
    return Spec(model_argv(ws, cli, out, data=data), needles=(_q(data), "directory|folder"), out=out)


@case("jsonl_malformed_line", ("run_gate_analysis", "test_legacy_model", "legacy_model_guide"))
def _(ws, cli, out):
    lines = ws.record_lines()
    lines[2] = lines[2][: len(lines[2]) // 2]  # line 3 cut in the middle
    data = ws.jsonl_variant("malformed.jsonl", lines)
    return Spec(model_argv(ws, cli, out, data=data), needles=(_q(data), r"(:3:|line 3\b)", "malformed|JSON"), out=out)


@case("jsonl_missing_field", ("inference", "legacy_model_guide"))
def _(ws, cli, out):
    records = [dict(r) for r in ws.records]
    del records[1]["vid"]
    data = ws.jsonl_variant("missing_field.jsonl", [json.dumps(r) for r in records])
    return Spec(model_argv(ws, cli, out, data=data), needles=(_q(data), r"(:2:|line 2\b)", "'vid'", "missing"),
                out=out)


@case("jsonl_empty_dataset", ("run_gate_analysis", "legacy_model_guide"))
def _(ws, cli, out):
    data = ws.jsonl_variant("empty.jsonl", ["", "   "])
    return Spec(model_argv(ws, cli, out, data=data), needles=(_q(data), "no records|empty|no queries"), out=out)


# --- features ----------------------------------------------------------------------------------

def _missing_text_feature(ws):
    """A copy of the text feature folder without the 2nd query's file."""
    qid = ws.records[1]["qid"]
    folder = ws.feature_copy("text_missing_one", "clip_text_features",
                             lambda d: os.remove(d / f"qid{qid}.npz"))
    return folder, folder / f"qid{qid}.npz", qid


@case("feature_file_missing", ("run_gate_analysis", "test_legacy_model", "legacy_model_guide"))
def _(ws, cli, out):
    folder, missing, qid = _missing_text_feature(ws)
    return Spec(model_argv(ws, cli, out, feats=ws.feature_args(text=folder)),
                needles=(_q(missing), "not found", "skip_missing"), out=out)


def _check_skipped_run(ws, out, missing_qid):
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["counts"]["skipped"] == 1 and manifest["counts"]["queries"] == len(ws.records) - 1
    assert [str(missing_qid)] == [s[0] for s in manifest["data"]["skipped_missing_features"]]
    return manifest


@case("feature_file_missing_skipped", ("run_gate_analysis",))
def _(ws, cli, out):
    folder, missing, qid = _missing_text_feature(ws)

    def check(proc, spec):
        _check_skipped_run(ws, out, qid)
        assert str(qid) not in {str(json.loads(x)["qid"]) for x in (out / "predictions.jsonl").read_text().splitlines()}
    return Spec(model_argv(ws, cli, out, feats=ws.feature_args(text=folder), extra=["--skip_missing"]), code=0,
                out=out, check=check, success=True)


@case("feature_file_missing_skipped_summary", ("run_gate_analysis",), reuse="feature_file_missing_skipped")
def _(ws, cli, out):
    folder, missing, qid = _missing_text_feature(ws)

    def check(proc, spec):
        summary = (spec.out / "summary.txt").read_text()
        assert re.search(r"skipped\s+1\b", summary), summary
        assert re.search(r"skipped\s+1\b", proc.stdout + proc.stderr)
    return check


@case("feature_file_missing_skipped", ("inference",))
def _(ws, cli, out):
    folder, missing, qid = _missing_text_feature(ws)

    def check(proc, spec):
        lines = [json.loads(x) for x in (out / "pred.jsonl").read_text().splitlines()]
        assert len(lines) == len(ws.records) - 1 and qid not in {x["qid"] for x in lines}
        assert re.search(r"skipped 1 quer", proc.stderr), proc.stderr
        assert sorted(p.name for p in out.iterdir()) == ["pred.jsonl", "pred_metrics.json"]  # no temp file
    return Spec(model_argv(ws, cli, out, feats=ws.feature_args(text=folder), extra=["--skip_missing"]), code=0,
                out=out, check=check, success=True)


@case("feature_folder_missing", ("inference", "legacy_model_guide"))
def _(ws, cli, out):
    folder = ws.path("no_such_audio_features")
    return Spec(model_argv(ws, cli, out, feats=ws.feature_args(audio=folder)), needles=(_q(folder), "not found"),
                out=out)


@case("feature_dim_mismatch", ("inference", "legacy_model_guide"))
def _(ws, cli, out):
    """An audio folder of another dataset: 20-dim instead of the checkpoint's 12 (+2 TEF)."""
    def change(folder):
        for f in folder.glob("*.npy"):
            np.save(f, np.abs(np.random.default_rng(1).normal(size=(np.load(f).shape[0], 20))).astype(np.float32))
    folder = ws.feature_copy("audio_dim20", "pann_features", change)
    return Spec(model_argv(ws, cli, out, feats=ws.feature_args(audio=folder)),
                needles=("audio_dim20", "dim", "a_feat_dim"), out=out)


def _first_vid(ws):
    return ws.records[0]["vid"]


@case("feature_nan", ("run_gate_analysis", "test_legacy_model", "legacy_model_guide"))
def _(ws, cli, out):
    vid = _first_vid(ws)

    def change(folder):
        with np.load(folder / f"{vid}.npz") as z:
            feats = z["features"].copy()
        feats[1, 3] = np.nan
        _write_npz(folder / f"{vid}.npz", features=feats)
    folder = ws.feature_copy("slowfast_nan", "slowfast_features", change)
    return Spec(model_argv(ws, cli, out, feats=ws.feature_args(slowfast=folder)),
                needles=("slowfast_nan", re.escape(vid), "NaN"), out=out)


@case("feature_inf", ("inference",))
def _(ws, cli, out):
    vid = ws.records[-1]["vid"]  # the last query: found only when the model already ran on the others

    def change(folder):
        feats = np.load(folder / f"{vid}.npy")
        feats[0, 0] = np.inf
        np.save(folder / f"{vid}.npy", feats)
    folder = ws.feature_copy("audio_inf", "pann_features", change)
    return Spec(model_argv(ws, cli, out, feats=ws.feature_args(audio=folder), extra=["--batch_size", "2"]),
                needles=("audio_inf", re.escape(vid), "NaN|Inf"), out=out)


# --- options and output folders ------------------------------------------------------------------

@case("max_samples_zero", ("run_gate_analysis", "legacy_model_guide"))
def _(ws, cli, out):
    return Spec(model_argv(ws, cli, out, extra=["--max_samples", "0"]), needles=("--max_samples", "positive"),
                out=out)


def _previous_analysis(ws, out):
    """An earlier, complete analysis in ``out`` (its files must survive)."""
    out.mkdir(parents=True)
    (out / "run.json").write_text(json.dumps({"status": "complete", "note": "weeks of work"}))
    (out / "gate_stats_per_query.csv").write_text("qid,layer\n1,0\n")
    (out / "summary.txt").write_text("earlier summary\n")
    return {p.name: p.read_bytes() for p in out.iterdir()}


@case("output_exists_no_overwrite", ("run_gate_analysis", "legacy_model_guide"))
def _(ws, cli, out):
    before = _previous_analysis(ws, out)

    def check(proc, spec):
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before, "the earlier analysis was changed"
    return Spec(model_argv(ws, cli, out), needles=(_q(out), "--overwrite"), out=out, check=check)


@case("output_exists_no_overwrite", ("inference",))
def _(ws, cli, out):
    argv = model_argv(ws, cli, out)
    (out / "pred.jsonl").write_text('{"qid": 1, "earlier": true}\n')

    def check(proc, spec):
        assert (out / "pred.jsonl").read_text() == '{"qid": 1, "earlier": true}\n'
        assert sorted(p.name for p in out.iterdir()) == ["pred.jsonl"]
    return Spec(argv, needles=("pred.jsonl", "--overwrite"), out=out, check=check)


def _readonly_dir(ws, name):
    d = ws.path(name)
    d.mkdir()
    d.chmod(0o555)
    return d


@case("output_unwritable", ("run_gate_analysis", "legacy_model_guide"))
def _(ws, cli, out):
    out = _readonly_dir(ws, f"readonly_{cli}")

    def check(proc, spec):
        assert out.is_dir(), "the user's output folder was deleted"
        assert "compatibility check" not in proc.stdout, "the checks ran before the output folder was validated"
    return Spec(model_argv(ws, cli, out), needles=(_q(out), "not writable|permission"), out=out, unwritable=True,
                check=check)


@case("output_unwritable", ("inference",))
def _(ws, cli, out):
    out = _readonly_dir(ws, f"readonly_{cli}")
    argv = model_argv(ws, cli, out)
    return Spec(argv, needles=(_q(out), "not writable|permission"), out=out, unwritable=True)


@case("output_unwritable", ("test_gate_analysis",))
def _(ws, cli, out):
    out = _readonly_dir(ws, f"readonly_{cli}")
    return Spec(["--quick", "--output_dir", str(out)], needles=(_q(out), "not writable|permission"), out=out,
                unwritable=True)


# --- eval (no checkpoint, no features) --------------------------------------------------------------

def _eval_files(ws):
    def build():
        sub = ws.path("eval_sub.jsonl")
        lines = []
        for r in ws.records:
            n = int(r["duration"] // 2)
            lines.append({"qid": r["qid"], "query": r["query"], "vid": r["vid"],
                          "pred_relevant_windows": [[w[0], w[1], 0.9] for w in r["relevant_windows"]],
                          "pred_saliency_scores": [float(i % 5) for i in range(n)]})
        sub.write_text("".join(json.dumps(x) + "\n" for x in lines))
        return sub
    return ws.once("eval_sub", build)


def eval_argv(ws, out, sub=None, gt=None):
    out.mkdir(parents=True, exist_ok=True)
    return ["--submission_path", str(sub or _eval_files(ws)), "--gt_path", str(gt or ws.jsonl),
            "--save_path", str(out / "metrics.json"), "--not_verbose"]


def _eval_case(name, make, needles):
    @case(name, ("eval",))
    def _(ws, cli, out):
        sub, gt = make(ws)
        return Spec(eval_argv(ws, out, sub, gt), needles=needles(sub, gt), out=out)


_eval_case("submission_missing_file", lambda ws: (ws.path("no_such_sub.jsonl"), None),
           lambda s, g: (_q(s), "not found"))
_eval_case("submission_random_bytes", lambda ws: (ws.once("random_sub", lambda: (
    ws.path("random_sub.jsonl").write_bytes(b"\xff\xfe" + np.random.default_rng(2).bytes(2000)),
    ws.path("random_sub.jsonl"))[1]), None), lambda s, g: (_q(s), "UTF-8|malformed"))
_eval_case("submission_malformed_line", lambda ws: (ws.jsonl_variant("eval_malformed.jsonl", [
    *_eval_files(ws).read_text().splitlines()[:2], '{"qid": 99, "pred_relevant_windows": [[0, 2']), None),
    lambda s, g: (_q(s), r"line 3\b", "malformed"))
_eval_case("submission_missing_field", lambda ws: (ws.jsonl_variant("eval_nofield.jsonl", [
    json.dumps({k: v for k, v in json.loads(x).items() if k != "pred_relevant_windows" or i != 1})
    for i, x in enumerate(_eval_files(ws).read_text().splitlines())]), None),
    lambda s, g: (_q(s), "missing field 'pred_relevant_windows'"))
_eval_case("gt_missing_field", lambda ws: (None, ws.jsonl_variant("gt_noduration.jsonl", [
    json.dumps({k: v for k, v in r.items() if k != "duration"}) for r in ws.records])),
    lambda s, g: (_q(g), "'duration'"))
_eval_case("gt_empty", lambda ws: (None, ws.jsonl_variant("gt_empty.jsonl", [])),
           lambda s, g: (_q(g), "no records|empty"))


@case("output_unwritable", ("eval",))
def _(ws, cli, out):
    out = _readonly_dir(ws, f"readonly_{cli}")
    return Spec(eval_argv(ws, out), needles=(_q(out), "not writable|permission"), out=out, unwritable=True)


@case("success_leaves_no_temp_files", ("eval",))
def _(ws, cli, out):
    def check(proc, spec):
        assert sorted(p.name for p in out.iterdir()) == ["metrics.json"]
        assert "brief" in json.loads((out / "metrics.json").read_text())
    return Spec(eval_argv(ws, out), code=0, out=out, check=check, success=True)


# ------------------------------------------------------------------------------------------------
# running
# ------------------------------------------------------------------------------------------------

def _can_drop_caps():
    return run_python("-c", DROP_DAC_CAPS, sys.executable, "-c", "pass", timeout=60).returncode == 0


@pytest.fixture(scope="module")
def ws(demo_data, tmp_path_factory):
    base = tmp_path_factory.mktemp("bad_inputs")
    yield Workspace(base, *demo_data)
    for root, dirs, _ in os.walk(base):  # the read-only folders of the cases, so that pytest can clean up
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o755)


def _selected_case_ids(request):
    ids = set()
    for item in request.session.items:
        callspec = getattr(item, "callspec", None)
        if getattr(item, "module", None) is request.module and callspec and "case" in callspec.params:
            ids.add(callspec.params["case"].id)
    return ids


def _run(spec, drop_caps):
    prefix = ["-c", DROP_DAC_CAPS, sys.executable] if spec.unwritable and drop_caps else []
    return run_python(*prefix, *spec.argv, env=ENV, stdin=subprocess.DEVNULL, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def cli_results(request, ws):
    """{case id: (spec, completed process or skip reason)} of the selected cases, run concurrently."""
    selected = _selected_case_ids(request)
    reused = {f"{c.cli}-{c.reuse}" for c in CASES if c.reuse and c.id in selected}
    wanted = [c for c in CASES if (c.id in selected or c.id in reused) and not c.reuse]
    root_needs_caps = os.geteuid() == 0
    drop_caps = root_needs_caps and _can_drop_caps()
    specs = {}
    for c in wanted:
        out = ws.path("out", c.id)
        out.parent.mkdir(exist_ok=True)
        spec = c.build(ws, out)
        spec.argv = [*CLI[c.cli], *map(str, spec.argv)]
        if spec.unwritable and root_needs_caps and not drop_caps:
            specs[c.id] = (spec, "running as root and cannot drop CAP_DAC_OVERRIDE: every folder is writable")
        else:
            specs[c.id] = (spec, None)
    runnable = {k: s for k, (s, skip) in specs.items() if skip is None}
    # slow runs (those that succeed) first, so they overlap with the many quick failures
    order = sorted(runnable, key=lambda k: not runnable[k].success)
    with ThreadPoolExecutor(max_workers=POOL_WORKERS) as pool:
        futures = {k: pool.submit(_run, runnable[k], drop_caps) for k in order}
        return {k: (spec, futures[k].result() if skip is None else skip) for k, (spec, skip) in specs.items()}


# Temporary files of atomic writes. (run_gate_analysis.py keeps predictions.partial.jsonl of a run stopped by bad
# data on purpose: run.json then says "interrupted" and --resume continues from it.)
TEMP_PATTERN = re.compile(r"\.tmp|~$")


def _leftovers(out):
    if out is None or not out.exists():
        return []
    return [str(p) for p in out.rglob("*") if TEMP_PATTERN.search(p.name)]


def assert_one_line_error(proc, spec):
    stderr, stdout = proc.stderr, proc.stdout
    shown = f"exit {proc.returncode}\n--- stderr:\n{stderr[-3000:]}\n--- stdout:\n{stdout[-1500:]}"
    assert "Traceback" not in stderr and "Traceback" not in stdout, shown
    assert proc.returncode == spec.code, shown
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, "expected exactly one line on stderr\n" + shown
    line = lines[0]
    # exit 1 (an incompatible model): test_legacy_model.py says "incompatible: ", the guide "error: "
    assert line.startswith(("incompatible: ", "error: ") if spec.code == 1 else "error: "), shown
    for needle in spec.needles:
        assert re.search(needle, line, flags=re.IGNORECASE), f"{needle!r} not in the error line\n{shown}"


CASE_PARAMS = [pytest.param(c, id=c.id, marks=[pytest.mark.xfail(strict=True, reason=c.xfail)] if c.xfail else [])
               for c in CASES]


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_cli_bad_input(case, cli_results, ws):
    if case.reuse:
        spec, proc = cli_results[f"{case.cli}-{case.reuse}"]
        if isinstance(proc, str):
            pytest.skip(proc)
        case.build(ws, spec.out)(proc, spec)
        return
    spec, proc = cli_results[case.id]
    if isinstance(proc, str):
        pytest.skip(proc)
    if spec.success:
        shown = f"exit {proc.returncode}\n--- stderr:\n{proc.stderr[-3000:]}"
        assert proc.returncode == spec.code and "Traceback" not in proc.stderr, shown
    else:
        assert_one_line_error(proc, spec)
        if case.cli == "inference" and spec.out is not None and spec.out.is_dir():
            assert not (spec.out / "pred.jsonl").exists() or spec.check is not None, "predictions written on error"
        if spec.out is not None and (spec.out / "run.json").exists() and spec.check is None:
            assert json.loads((spec.out / "run.json").read_text()).get("status") != "complete"
            assert not (spec.out / "predictions.jsonl").exists(), "final predictions written on error"
    assert not _leftovers(spec.out), _leftovers(spec.out)
    if spec.check is not None:
        spec.check(proc, spec)


ISSUE_CASES = {  # issue 8, item 1 -> the case names here
    "missing file": ("ckpt_missing_file", "jsonl_missing_file"),
    "directory given for a file": ("ckpt_is_a_directory", "jsonl_is_a_directory"),
    "random bytes": ("ckpt_random_bytes",),
    "truncated checkpoint": ("ckpt_truncated",),
    "no model weights": ("ckpt_no_model_weights",),
    "no fusion module when gates are asked for": ("ckpt_no_fusion_module",),
    "missing, unexpected or mis-shaped keys": ("ckpt_missing_key", "ckpt_unexpected_key", "ckpt_misshaped_key"),
    "gating type conflicts with the checkpoint": ("ckpt_gating_type_conflict",),
    "malformed JSONL": ("jsonl_malformed_line",),
    "record missing a required field": ("jsonl_missing_field",),
    "missing feature file": ("feature_file_missing", "feature_file_missing_skipped"),
    "feature dimension disagrees": ("feature_dim_mismatch",),
    "NaN or Inf in features": ("feature_nan",),
    "empty dataset": ("jsonl_empty_dataset",),
    "--max_samples <= 0": ("max_samples_zero",),
    "unwritable output folder": ("output_unwritable",),
    "existing output folder without --overwrite": ("output_exists_no_overwrite",),
}
# CLIs that share the code a case exercises: run_gate_analysis.py and inference load with
# qd_detr.checkpoint.load_checkpoint and read data with qd_detr.dataset; the legacy tools read checkpoints with
# gate_analysis.legacy.inspect_checkpoint and have their own data steps.
FAMILIES = {"load_checkpoint": ("run_gate_analysis", "inference"),
            "legacy": ("test_legacy_model", "legacy_model_guide")}
EVERY_CLI = ("ckpt_missing_file", "ckpt_malicious_pickle", "ckpt_no_fusion_module")  # each model CLI runs these


def test_every_case_reaches_every_kind_of_cli():
    """Each bad input of the issue runs through both loader families (every model CLI for the cases listed in
    EVERY_CLI); every CLI is exercised. Cases whose code path is shared are spread over the CLIs of a family to keep
    this file's runtime under ~3 minutes (each subprocess costs ~3 s of torch import)."""
    assert {c.cli for c in CASES} == set(CLI)
    by_name = {}
    for c in CASES:
        by_name.setdefault(c.name, set()).add(c.cli)
    for problem, names in ISSUE_CASES.items():
        clis = set().union(*(by_name.get(n, set()) for n in names))
        assert clis, problem
        if problem.startswith(("--max_samples", "unwritable", "existing")):
            continue
        for family, members in FAMILIES.items():
            assert clis & set(members), f"{problem}: no {family} CLI"
    for name in EVERY_CLI:
        assert set(MODEL_CLIS) <= by_name[name], name
    assert {"eval", "test_gate_analysis"} <= by_name["output_unwritable"]


# ------------------------------------------------------------------------------------------------
# in-process: the loader itself (fast, every key problem separately, both pickle formats)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("legacy_format", [False, True], ids=["zip", "legacy_pickle"])
def test_malicious_pickle_is_refused_and_its_payload_does_not_run(tmp_path, legacy_format):
    from qd_detr.checkpoint import load_checkpoint, read_checkpoint
    from qd_detr.errors import CheckpointError
    marker = tmp_path / "PWNED"
    ckpt = save_malicious_checkpoint(tmp_path / "evil.ckpt", marker, legacy_format=legacy_format)
    for load in (read_checkpoint, load_checkpoint):
        with pytest.raises(CheckpointError, match="--trust_checkpoint") as info:
            load(ckpt)
        assert str(ckpt) in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()


def test_the_payload_is_live(tmp_path):
    """Control: full unpickling (what --trust_checkpoint allows) does run the payload, so the tests above
    prove something."""
    from qd_detr.checkpoint import read_checkpoint
    marker = tmp_path / "PWNED"
    ckpt = save_malicious_checkpoint(tmp_path / "evil.ckpt", marker)
    read_checkpoint(ckpt, trust_pickle=True)
    assert marker.exists()


@pytest.mark.parametrize("change,needles", [
    (_drop_key, ("1 missing key", MISSING_KEY)),
    (_add_key, ("1 unexpected key", UNEXPECTED_KEY)),
    (_reshape_key, ("1 mis-shaped key", MISSHAPED_KEY)),
], ids=["missing", "unexpected", "misshaped"])
def test_key_problems_are_listed(tmp_path, change, needles):
    from qd_detr.checkpoint import load_checkpoint
    from qd_detr.errors import CheckpointError
    model, opt = small_model("custom", "clipwise", seed=1)
    sd = dict(model.state_dict())
    change(sd)
    ckpt = save_checkpoint(tmp_path / "bad.ckpt", sd, opt)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(ckpt)
    message = str(info.value)
    assert str(ckpt) in message and "\n" not in message
    for needle in needles:
        assert needle in message


# ------------------------------------------------------------------------------------------------
# in-process: atomic writers leave the earlier file intact and no temporary file, on success or failure
# ------------------------------------------------------------------------------------------------

class _Boom(Exception):
    pass


def test_postprocess_writers_are_atomic(tmp_path, monkeypatch):
    from qd_detr import io as qd_io
    from qd_detr import postprocess
    path = tmp_path / "pred.jsonl"
    postprocess.write_jsonl(path, [{"qid": 1}])
    postprocess.write_json(tmp_path / "m.json", {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "pred.jsonl"]

    def boom(*a, **k):
        raise _Boom("disk full")
    monkeypatch.setattr(qd_io.json, "dumps", boom)  # the writers postprocess re-exports live in qd_detr.io
    monkeypatch.setattr(qd_io.json, "dump", boom)
    with pytest.raises(_Boom):
        postprocess.write_jsonl(path, [{"qid": 2}])
    with pytest.raises(_Boom):
        postprocess.write_json(tmp_path / "m.json", {"a": 2})
    assert path.read_text() == '{"qid": 1}\n' and json.loads((tmp_path / "m.json").read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "pred.jsonl"]


def test_eval_writer_is_atomic(tmp_path, monkeypatch):
    from qd_detr import eval as qd_eval
    from qd_detr import io as qd_io
    from qd_detr.errors import ConfigError
    path = str(tmp_path / "metrics.json")
    qd_eval.write_metrics({"a": 1}, path)
    assert os.listdir(tmp_path) == ["metrics.json"]

    def fail_replace(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(qd_io.os, "replace", fail_replace)  # write_metrics writes with qd_detr.io.write_json
    with pytest.raises(ConfigError, match="metrics.json"):
        qd_eval.write_metrics({"a": 2}, path)
    assert json.loads(Path(path).read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_inference_writes_nothing_when_the_model_fails(tmp_path, demo_data, monkeypatch, capsys):
    """A failure in the middle of inference leaves the earlier predictions file as it was."""
    from qd_detr import inference
    _, paths = demo_data
    ckpt, _, _ = small_checkpoint(tmp_path / "model.ckpt", "custom", "clipwise", seed=1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "pred.jsonl").write_text("earlier\n")

    def failing_predict(*a, **k):
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(inference, "predict", failing_predict)
    with pytest.raises(OSError):
        inference.main(["--model_path", str(ckpt), *demo_data_args(paths), "--output_path", str(out / "pred.jsonl"),
                        "--overwrite", "--device", "cpu", "--quiet"])
    assert (out / "pred.jsonl").read_text() == "earlier\n" and os.listdir(out) == ["pred.jsonl"]


def test_inference_keeps_an_earlier_metrics_file(tmp_path, capsys):
    """PRED_metrics.json beside the predictions is an output too: replaced only with --overwrite."""
    from qd_detr import inference
    from qd_detr.cli import run_main
    (tmp_path / "pred_metrics.json").write_text("{}")
    code = run_main(inference.main, ["--model_path", str(tmp_path / "m.ckpt"), "--data_path", str(tmp_path / "d.jsonl"),
                                     "--output_path", str(tmp_path / "pred.jsonl")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "pred_metrics.json" in err[0] and "--overwrite" in err[0]
    assert (tmp_path / "pred_metrics.json").read_text() == "{}"
