#!/usr/bin/env python3
"""Benchmark: what gate tracking and the full gate analysis cost, at QVHighlights scale (CPU).

    python benchmarks/bench_gate_tracking.py                 # default run (25-50 min on 2 cores)
    python benchmarks/bench_gate_tracking.py --quick         # smoke run (a few minutes)
    python benchmarks/bench_gate_tracking.py --gating_types elementwise --repeats 5 --batch_size 32

Plain Python that prints tables; not a test. Everything is built with project code:

* model: ``qd_detr.build_model(make_options(...))`` at the original default size (hidden 256, 8 heads,
  2 encoder / 2 text-to-video / 2 decoder layers, 4 AVIGATE fusion layers), one per gating type,
  random weights (seed 0), saved as a training checkpoint ``{"model", "epoch", "opt"}``;
* data: synthetic features in the QVHighlights layout, written to a temporary folder (deleted at the
  end): 517 videos of 75 clips (150 s) with SlowFast 2304 + CLIP 512 (+2 TEF) video and PANN 2048
  (+2 TEF) audio features, CLIP text features of 8-32 tokens x 512 per query, and labelled JSONL files
  of 1,550 queries (3 per video, the size of the QVHighlights val split) and 6,200 queries (12 per video).

Measurements:

1. In memory, per gating type: the same model and the same pre-collated batches (length-grouped as
   the pipeline batches them), ``torch.no_grad``, ``compute_neg=False``. Modes, interleaved batch by
   batch (every batch runs once in each mode, the order rotated from batch to batch):
   ``plain`` forward; ``tracking``: forward with ``qd_detr.gates.GateRecorder`` attached (per-query
   records built, padding trimmed; the sink only counts them); ``tracking+stats``: the recorder feeding
   ``gate_analysis.stats.GateStatsAccumulator``; ``predecessor``: the tracking of the predecessor branch
   (SPEC 4.1), re-implemented here: a hook per gating_function converting the whole (B, L, D) gate to
   numpy (global gates broadcast to (B, L, 256) copies), keeping every forward's arrays, and looping over
   the positions of batch element 0 in Python with ``float(gate_np[0, t, :].mean())``.
   Reported: per mode the median over repetitions of the time of a whole pass, and the median of the
   per-batch paired ratios (robust when other processes share the CPU).
2. From disk (``--pipeline_gating_types``, default elementwise): plain inference (``load_checkpoint`` +
   ``build_dataset`` + ``make_batches`` + ``qd_detr.inference.predict``) versus the full
   ``run_gate_analysis.py`` job (its ``main``: loading, inference with gate capture streamed to the gate
   store and the statistics, predictions, metrics, CSVs, plots, run.json), same JSONL, same feature
   folders, same checkpoint; whole runs alternated, medians. The pipeline's extra work is broken down by
   timing its components (wrapped at run time, exclusive times).
3. Peak memory (VmHWM, the peak resident set of a fresh process, read from /proc/self/status at its
   exit), elementwise gating, for the main JSONL and the 4x larger one: ``python run_gate_analysis.py`` at both sizes, ``python -m
   qd_detr.inference`` and the predecessor's tracking at the main size (both sizes with --memory_full).

Targets (elementwise gating, batch 32): tracking / plain <= 1.05, full pipeline / plain <= 1.30,
pipeline peak memory at 6,200 queries <= 1.10 x at 1,550 queries. A missed target is profiled
(cProfile) unless ``--no_profile``. Timings are only meaningful on an otherwise idle machine: the
CPU time other processes used is printed with every step.
"""
import argparse
import contextlib
import cProfile
import functools
import gc
import io
import json
import os
import platform
import pstats
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

GATING_TYPES = ("global", "clipwise", "elementwise")
TARGET_GATING = "elementwise"
DIMS = dict(slowfast=2304, clip=512, text=512, audio=2048)
N_CLIPS = 75                      # QVHighlights: 150 s videos, 2 s clips
QUERIES_PER_VIDEO = 3             # QVHighlights val: 1,550 queries over ~517 videos
TARGETS = {"tracking": 1.05, "pipeline": 1.30, "memory": 1.10}
MODES = ("plain", "tracking", "tracking+stats", "predecessor")
CHILD_ENV = {}  # extra environment of the child processes (OMP_NUM_THREADS with --threads)


def log(msg=""):
    print(msg, flush=True)


def _cpu_snapshot():
    """(wall s, busy CPU s of the whole machine from /proc/stat, CPU s of this process and its children)."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait
    except (OSError, ValueError, IndexError):
        busy = None
    t = os.times()
    return time.perf_counter(), busy, t.user + t.system + t.children_user + t.children_system


_LAST = [_cpu_snapshot()]


def load_note():
    """CPU used by *other* processes since the previous note (cores), and the 1-minute load average."""
    now, prev = _cpu_snapshot(), _LAST[0]
    _LAST[0] = now
    wall = now[0] - prev[0]
    try:
        one = os.getloadavg()[0]
    except OSError:
        one = float("nan")
    if now[1] is None or wall <= 0:
        return f"(load average {one:.1f})"
    others = max(0.0, (now[1] - prev[1]) - (now[2] - prev[2])) / wall
    warn = "  << other processes used the CPU: timings are noisy" if others > 0.25 else ""
    return f"(other processes: {others:.2f} cores; load average {one:.1f}){warn}"


# ------------------------------------------------------------------------------------------------
# environment, data, checkpoints
# ------------------------------------------------------------------------------------------------

def environment():
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    try:
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "qd_detr", "gate_analysis",
                                "run_gate_analysis.py"], capture_output=True, text=True, timeout=10).stdout.strip()
        source = f"git {commit}" + (" + uncommitted changes in qd_detr/gate_analysis" if dirty else "") if commit else ""
    except (OSError, subprocess.SubprocessError):
        source = ""
    return {"source": source or "not a git checkout", "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__,
            "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
            "cpu_count": os.cpu_count(), "cpu_affinity": affinity, "cpu": cpu, "platform": platform.platform()}


def _savez(path, **arrays):
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


def write_features(root, n_videos, n_text, seed=0):
    """QVHighlights-layout feature folders: ``n_videos`` videos of 75 clips, ``n_text`` query text files.

    Returns {"dirs": {...} (as ``resolve_feature_dirs`` returns them), "vids": [...]}."""
    rng = np.random.default_rng(seed)
    dirs = {k: os.path.join(root, k) for k in ("slowfast_features", "clip_features", "clip_text_features",
                                               "pann_features")}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
    vids = []
    for v in range(n_videos):
        start = 150 * v
        vid = f"bench{v:05d}xyz_{start:.1f}_{start + 150:.1f}"
        vids.append(vid)
        _savez(os.path.join(dirs["slowfast_features"], vid + ".npz"),
               features=rng.standard_normal((N_CLIPS, DIMS["slowfast"]), dtype=np.float32))
        _savez(os.path.join(dirs["clip_features"], vid + ".npz"),
               features=rng.standard_normal((N_CLIPS, DIMS["clip"]), dtype=np.float32))
        np.save(os.path.join(dirs["pann_features"], vid + ".npy"),
                np.abs(rng.standard_normal((N_CLIPS, DIMS["audio"]), dtype=np.float32)))
    for qid in range(1, n_text + 1):
        tokens = rng.standard_normal((int(rng.integers(8, 33)), DIMS["text"]), dtype=np.float32)
        _savez(os.path.join(dirs["clip_text_features"], f"qid{qid}.npz"),
               last_hidden_state=tokens, pooler_output=tokens.mean(axis=0))
    return {"dirs": {"v_feat_dirs": [dirs["slowfast_features"], dirs["clip_features"]],
                     "t_feat_dir": dirs["clip_text_features"], "a_feat_dir": dirs["pann_features"]},
            "vids": vids}


def write_jsonl(path, n_queries, vids, seed=1):
    """Labelled records qid 1..n_queries; query q uses video (q - 1) % len(vids) (150 s each)."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as fh:
        for qid in range(1, n_queries + 1):
            n = int(rng.integers(1, 31))                       # one window of 1-30 clips
            st = int(rng.integers(0, N_CLIPS - n - 1))
            rec = {"qid": qid, "query": f"benchmark query {qid}.", "duration": 2 * N_CLIPS,
                   "vid": vids[(qid - 1) % len(vids)], "relevant_windows": [[2 * st, 2 * (st + n)]],
                   "relevant_clip_ids": list(range(st, st + n)),
                   "saliency_scores": rng.integers(0, 5, size=(n, 3)).tolist()}
            fh.write(json.dumps(rec) + "\n")
    return path


def bench_options(gating_type, dirs):
    from qd_detr.config import make_options
    return make_options(v_feat_dim=DIMS["slowfast"] + DIMS["clip"] + 2, t_feat_dim=DIMS["text"],
                        a_feat_dim=DIMS["audio"] + 2, use_avigate_custom=True, gating_type=gating_type,
                        v_feat_dirs=dirs["v_feat_dirs"], t_feat_dir=dirs["t_feat_dir"],
                        a_feat_dir=dirs["a_feat_dir"])


def write_checkpoint(path, gating_type, dirs, seed=0):
    from qd_detr.model import build_model
    torch.manual_seed(seed)
    opt = bench_options(gating_type, dirs)
    model = build_model(opt).eval()
    torch.save({"model": model.state_dict(), "epoch": 0, "opt": opt}, path)
    return path, sum(p.numel() for p in model.parameters())


def feature_args(dirs):
    return ["--v_feat_dirs", *dirs["v_feat_dirs"], "--t_feat_dir", dirs["t_feat_dir"],
            "--a_feat_dir", dirs["a_feat_dir"]]


def dir_bytes(path):
    total = 0
    for base, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(base, f)) for f in files)
    return total


# ------------------------------------------------------------------------------------------------
# the predecessor's tracking (SPEC 4.1), re-implemented as the baseline
# ------------------------------------------------------------------------------------------------

class PredecessorTracker:
    """What ``AVIGATEFusionCustom._store_gate_values`` did after every layer: the full (B, L, .) gate as
    numpy (global gates broadcast to (B, L, D) copies), padding included; ``attention_gates`` /
    ``ffn_gates`` overwritten per call, every forward's arrays kept (``history``), and per position of
    batch element 0 a Python ``float(gate_np[0, t, :].mean())`` appended to ``query_gate_details``."""

    def __init__(self, fusion):
        self.fusion = fusion
        self.attention_gates, self.ffn_gates = {}, {}
        self.history = []
        self.query_gate_details = []
        self.current_sample_id = None
        self._handles = []

    def attach(self):
        if not self._handles:
            for layer, block in enumerate(self.fusion.fusion_layers):
                self._handles.append(block.gating_function.register_forward_hook(self._hook(layer)))
        return self

    def detach(self):
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, layer):
        def hook(module, args, output):
            batch, seq_len, dim = args[0].shape
            stored = {}
            for kind, gate in zip(("mha", "ffn"), output):
                gate_np = gate.detach().cpu().numpy()
                if gate_np.shape[1] == 1 and seq_len > 1:  # global [B, 1, 1] -> (B, L, D) copy
                    gate_np = np.broadcast_to(gate_np, (batch, seq_len, dim)).copy()
                else:
                    gate_np = gate_np.copy()
                stored[kind] = gate_np
                for query_idx in range(seq_len):
                    self.query_gate_details.append({
                        "sample_id": self.current_sample_id, "layer": layer, "gate_type": kind,
                        "qid": query_idx, "gate_value": float(gate_np[0, query_idx, :].mean())})
            self.attention_gates[layer] = stored["mha"]
            self.ffn_gates[layer] = stored["ffn"]
            self.history.append((self.current_sample_id, layer, stored["mha"], stored["ffn"]))
        return hook

    def nbytes(self):
        return sum(a.nbytes + b.nbytes for _, _, a, b in self.history)


# ------------------------------------------------------------------------------------------------
# 1. in-memory forward passes, interleaved batch by batch
# ------------------------------------------------------------------------------------------------

def preload_batches(opt, records, dirs, batch_size):
    """[(qids, model kwargs)] of the pipeline's batches, collated once (video/audio cached per video)."""
    from qd_detr.dataset import collate, model_kwargs
    from qd_detr.inference import build_dataset, make_batches
    dataset = build_dataset(opt, records, dirs)
    dataset.load_video = functools.lru_cache(maxsize=None)(dataset.load_video)
    dataset.load_audio = functools.lru_cache(maxsize=None)(dataset.load_audio)
    batches = make_batches(dataset, "query", batch_size, opt)
    out = []
    for b in batches:
        metas, inputs = collate([dataset[i] for i in b])
        out.append(([m["qid"] for m in metas], model_kwargs(inputs)))
    return out


class _Mode:
    """One way of running a forward; ``begin`` starts a repetition's state, ``info`` describes it."""

    def __init__(self, fusion, gating_type):
        self.fusion, self.gating_type = fusion, gating_type

    def begin(self):
        pass

    def attach(self):
        pass

    def detach(self):
        pass

    def before(self, qids):
        pass

    def info(self):
        return {}


class _Tracking(_Mode):
    def begin(self):
        from qd_detr.gates import GateRecorder
        self.n = 0
        self.recorder = GateRecorder(self.fusion, self.sink)

    def sink(self, records):
        self.n += len(records)

    def attach(self):
        self.recorder.attach()

    def detach(self):
        self.recorder.detach()

    def before(self, qids):
        self.recorder.set_ids(qids)

    def info(self):
        return {"records": self.n}


class _TrackingStats(_Tracking):
    def begin(self):
        from gate_analysis.stats import GateStatsAccumulator
        from qd_detr.gates import fusion_gate_kinds
        super().begin()
        self.acc = GateStatsAccumulator(self.gating_type, len(self.fusion.fusion_layers),
                                       kinds=fusion_gate_kinds(self.fusion))

    def sink(self, records):
        for r in records:
            self.acc.update(r.sample_id, r.gates, n_clips=r.n_clips)

    def info(self):
        return {"records": self.acc.n_queries, "state_bytes": sum(self.acc.state_nbytes().values())}


class _Predecessor(_Mode):
    def begin(self):
        self.tracker = None
        gc.collect()
        self.tracker = PredecessorTracker(self.fusion)

    def attach(self):
        self.tracker.attach()

    def detach(self):
        self.tracker.detach()

    def before(self, qids):
        self.tracker.current_sample_id = qids[0]

    def info(self):
        return {"kept_bytes": self.tracker.nbytes(), "details": len(self.tracker.query_gate_details)}


def make_modes(model, gating_type):
    f = model.fusion
    return {"plain": _Mode(f, gating_type), "tracking": _Tracking(f, gating_type),
            "tracking+stats": _TrackingStats(f, gating_type), "predecessor": _Predecessor(f, gating_type)}


def run_pass(model, mode, batches):
    """One untimed-bookkeeping pass of ``mode`` over ``batches`` (used for profiling)."""
    mode.begin()
    mode.attach()
    try:
        with torch.no_grad():
            for qids, inputs in batches:
                mode.before(qids)
                model(**inputs, compute_neg=False)
    finally:
        mode.detach()
    return mode.info()


def bench_inmemory(ckpt, batches, repeats):
    from qd_detr.checkpoint import load_checkpoint
    model, opt, _ = load_checkpoint(ckpt, device="cpu", batching="query")
    modes = make_modes(model, opt.gating_type)
    names = list(modes)
    with torch.no_grad():
        for m in modes.values():  # warm-up: allocator, oneDNN primitives, first-call costs
            m.begin()
            m.attach()
            m.before(batches[0][0])
            model(**batches[0][1], compute_neg=False)
            m.detach()
    totals = {n: [] for n in names}
    paired = {n: [] for n in names}
    infos = {}
    for r in range(repeats):
        for m in modes.values():
            m.begin()
        t_rep = {n: 0.0 for n in names}
        for b, (qids, inputs) in enumerate(batches):
            k = (b + r) % len(names)
            t_batch = {}
            for name in names[k:] + names[:k]:
                m = modes[name]
                m.attach()
                with torch.no_grad():
                    t0 = time.perf_counter()
                    m.before(qids)
                    model(**inputs, compute_neg=False)
                    t_batch[name] = time.perf_counter() - t0
                m.detach()
            for name, t in t_batch.items():
                t_rep[name] += t
                paired[name].append(t / t_batch["plain"])
        for name in names:
            totals[name].append(t_rep[name])
            infos[name] = modes[name].info()
        log(f"    rep {r + 1}/{repeats}: " + ", ".join(f"{n} {t_rep[n]:.1f} s" for n in names) + f"  {load_note()}")
        for m in modes.values():  # free the predecessor's arrays before the next repetition
            m.begin()
    return {n: {"times": totals[n], "median": statistics.median(totals[n]),
                "paired_ratio": statistics.median(paired[n]), **infos[n]} for n in names}


# ------------------------------------------------------------------------------------------------
# 2. from disk: plain inference vs the full run_gate_analysis.py job
# ------------------------------------------------------------------------------------------------

def plain_inference(ckpt, data_path, dirs, batch_size, exact=None):
    """What a plain inference run does before writing: load, dataset, batches, predictions.
    ``exact=False`` skips the exact re-runs of ambiguous rows (``qd_detr.inference.iterate_batches``)."""
    from qd_detr.checkpoint import load_checkpoint
    from qd_detr.dataset import read_jsonl
    from qd_detr.inference import build_dataset, make_batches, predict
    model, opt, _ = load_checkpoint(ckpt, device="cpu", batching="query")
    dataset = build_dataset(opt, read_jsonl(data_path), dirs)
    batches = make_batches(dataset, "query", batch_size, opt)
    stats = {}
    lines = predict(model, dataset, batches, torch.device("cpu"), progress=False, stats=stats, exact=exact)
    return {"queries": len(lines), "exact_reruns": stats.get("exact_reruns", 0)}


def pipeline_argv(ckpt, data_path, dirs, batch_size, out_dir):
    return ["--model_path", ckpt, "--data_path", data_path, *feature_args(dirs), "--output_dir", out_dir,
            "--device", "cpu", "--batch_size", str(batch_size), "--quiet"]


def full_pipeline(ckpt, data_path, dirs, batch_size, out_dir):
    import run_gate_analysis
    with contextlib.redirect_stdout(io.StringIO()):
        code = run_gate_analysis.main(pipeline_argv(ckpt, data_path, dirs, batch_size, out_dir))
    if code:
        raise RuntimeError(f"run_gate_analysis.main returned {code}")
    with open(os.path.join(out_dir, "run.json")) as fh:
        manifest = json.load(fh)
    return {"queries": manifest["counts"]["queries"], "exact_reruns": manifest["counts"]["exact_reruns"],
            "output_bytes": dir_bytes(out_dir), "gate_bytes": dir_bytes(os.path.join(out_dir, "gates"))}


class ComponentTimer:
    """Wrap functions/methods at run time and accumulate their exclusive wall times per label."""

    def __init__(self):
        self.seconds = {}
        self.calls = {}
        self._stack = []
        self._patches = []

    def wrap(self, owner, attr, label):
        original = getattr(owner, attr, None)
        if original is None:
            return
        timer = self

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            frame = [time.perf_counter(), 0.0]
            timer._stack.append(frame)
            try:
                return original(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - frame[0]
                timer._stack.pop()
                timer.seconds[label] = timer.seconds.get(label, 0.0) + elapsed - frame[1]
                timer.calls[label] = timer.calls.get(label, 0) + 1
                if timer._stack:
                    timer._stack[-1][1] += elapsed
        self._patches.append((owner, attr, original))
        setattr(owner, attr, wrapper)

    def restore(self):
        for owner, attr, original in reversed(self._patches):
            setattr(owner, attr, original)
        self._patches = []


PIPELINE_COMPONENTS = (
    # (module, owner attribute path, label)
    ("gate_analysis.pipeline", "load_model_for_analysis", "load checkpoint"),
    ("gate_analysis.pipeline", "file_sha256", "sha256 of checkpoint + JSONL"),
    ("qd_detr.gates", "GateRecorder._build_records", "gate capture (GateRecorder records)"),
    ("gate_analysis.store", "GateStoreWriter.add", "gate store: add (validate, buffer)"),
    ("gate_analysis.store", "GateStoreWriter.flush", "gate store: write shard per batch"),
    ("gate_analysis.store", "GateStoreWriter.close", "gate store: index + meta"),
    ("gate_analysis.stats", "GateStatsAccumulator.update", "statistics: update per query"),
    ("gate_analysis.pipeline", "submission_lines", "prediction lines"),
    ("gate_analysis.pipeline", "write_jsonl", "write predictions"),
    ("gate_analysis.pipeline", "evaluate", "metrics (official eval)"),
    ("gate_analysis.pipeline", "write_stats_csvs", "statistics CSVs"),
    ("gate_analysis.plots", "plot_all", "plots"),
    ("gate_analysis.ground_truth", "GroundTruthAccumulator.add", "ground truth: per query"),
    ("gate_analysis.ground_truth", "GroundTruthAccumulator.write", "ground truth: tables + CSVs"),
    ("gate_analysis.ground_truth", "plot_ground_truth", "ground truth: plots"),
    ("gate_analysis.performance", "performance_table", "performance link: tables"),
    ("gate_analysis.performance", "correlation_table", "performance link: tables"),
    ("gate_analysis.performance", "write_performance", "performance link: tables"),
    ("gate_analysis.performance", "plot_performance", "performance link: plots"),
    ("gate_analysis.report", "write_report", "report.html"),
    ("gate_analysis.pipeline", "_write_run_json", "run.json"),
    ("gate_analysis.pipeline", "format_summary", "summary"),
)


@contextlib.contextmanager
def instrument_pipeline():
    import importlib
    timer = ComponentTimer()
    for module_name, path, label in PIPELINE_COMPONENTS:
        try:
            owner = importlib.import_module(module_name)
        except ImportError:
            continue
        *parents, attr = path.split(".")
        for p in parents:
            owner = getattr(owner, p, None)
        if owner is not None:
            timer.wrap(owner, attr, label)
    try:
        yield timer
    finally:
        timer.restore()


def bench_pipeline(ckpt, data_path, dirs, batch_size, repeats, scratch):
    names = ("plain predict", "full pipeline")
    times = {n: [] for n in names}
    infos, parts = {}, []
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            gc.collect()
            if name == "plain predict":
                t0 = time.perf_counter()
                infos[name] = plain_inference(ckpt, data_path, dirs, batch_size)
                times[name].append(time.perf_counter() - t0)
            else:
                out = os.path.join(scratch, f"pipeline_{r}")
                try:
                    with instrument_pipeline() as timer:
                        t0 = time.perf_counter()
                        infos[name] = full_pipeline(ckpt, data_path, dirs, batch_size, out)
                        times[name].append(time.perf_counter() - t0)
                    parts.append(dict(timer.seconds))
                finally:
                    shutil.rmtree(out, ignore_errors=True)
            log(f"    rep {r + 1}/{repeats} {name:<14} {times[name][-1]:7.1f} s  {load_note()}")
    gc.collect()
    t0 = time.perf_counter()  # once: what the exact re-runs of ambiguous rows cost inside "plain predict"
    infos["no_exact"] = plain_inference(ckpt, data_path, dirs, batch_size, exact=False)
    no_exact = time.perf_counter() - t0
    log(f"    once      plain predict without exact re-runs {no_exact:7.1f} s  {load_note()}")
    result = {n: {"times": times[n], "median": statistics.median(times[n]), **infos[n]} for n in names}
    result["plain predict, no exact re-runs"] = {"times": [no_exact], "median": no_exact, **infos["no_exact"]}
    labels = [label for _, _, label in PIPELINE_COMPONENTS]
    result["components"] = {label: statistics.median(p.get(label, 0.0) for p in parts) for label in labels}
    return result


# ------------------------------------------------------------------------------------------------
# 3. peak memory in fresh processes
# ------------------------------------------------------------------------------------------------

def child_predecessor(args):
    """Child process: plain inference from disk with the predecessor's tracking attached."""
    from qd_detr.checkpoint import load_checkpoint
    from qd_detr.dataset import read_jsonl
    from qd_detr.inference import build_dataset, iterate_batches, make_batches
    dirs = {"v_feat_dirs": args.v_feat_dirs, "t_feat_dir": args.t_feat_dir, "a_feat_dir": args.a_feat_dir}
    model, opt, _ = load_checkpoint(args.model_path, device="cpu", batching="query")
    dataset = build_dataset(opt, read_jsonl(args.data_path), dirs)
    batches = make_batches(dataset, "query", args.batch_size, opt)
    tracker = PredecessorTracker(model.fusion).attach()

    def before(metas, _):
        tracker.current_sample_id = metas[0]["qid"]
    n = 0
    for metas, _, _ in iterate_batches(model, dataset, batches, torch.device("cpu"), progress=False,
                                       before_forward=before):
        n += len(metas)
    print(json.dumps({"queries": n, "kept_bytes": tracker.nbytes(), "details": len(tracker.query_gate_details)}))
    return 0


# Children are started through this launcher, which writes the process's VmHWM (peak resident set
# of its own address space, from /proc/self/status) at exit. ``ru_maxrss`` from wait4 is not used: on
# Linux it is at least the parent's RSS at fork time (exec keeps the pre-exec high-water mark).
_LAUNCHER = r"""
import atexit, os, runpy, sys
def _hwm(path=os.environ["BENCH_HWM_FILE"]):
    with open("/proc/self/status") as fh:
        kib = next(line.split()[1] for line in fh if line.startswith("VmHWM:"))
    with open(path, "w") as out:
        out.write(kib)
atexit.register(_hwm)
kind, target = sys.argv[1], sys.argv[2]
sys.argv = [target] + sys.argv[3:]
if kind == "module":
    runpy.run_module(target, run_name="__main__", alter_sys=True)
else:
    runpy.run_path(target, run_name="__main__")
"""


def run_child(kind, target, args, log_path):
    """Run a module (``kind="module"``) or script in a fresh process; (seconds, peak RSS bytes, exit code)."""
    hwm_file = log_path + ".hwm"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), BENCH_HWM_FILE=hwm_file,
               **CHILD_ENV)
    with open(log_path, "wb") as log_fh:
        t0 = time.perf_counter()
        code = subprocess.call([sys.executable, "-c", _LAUNCHER, kind, target, *args], cwd=ROOT, stdout=log_fh,
                               stderr=subprocess.STDOUT, env=env)
        seconds = time.perf_counter() - t0
    try:
        with open(hwm_file) as fh:
            peak = int(fh.read().strip()) * 1024
    except (OSError, ValueError):
        peak = -1
    return seconds, peak, code


def bench_memory(ckpt, data_paths, dirs, batch_size, scratch, full):
    """{process: {n_queries: {"seconds", "peak_bytes", ...}}}."""
    small = min(data_paths)
    results = {}
    for n, data_path in sorted(data_paths.items()):
        cmds = {"full pipeline": ("script", os.path.join(ROOT, "run_gate_analysis.py"),
                                  pipeline_argv(ckpt, data_path, dirs, batch_size, os.path.join(scratch, f"mem_{n}")))}
        if full or n == small:
            cmds["plain inference"] = ("module", "qd_detr.inference", [
                "--model_path", ckpt, "--data_path", data_path, *feature_args(dirs),
                "--output_path", os.path.join(scratch, f"pred_{n}.jsonl"), "--device", "cpu",
                "--batch_size", str(batch_size), "--quiet", "--overwrite"])
            cmds["predecessor"] = ("script", os.path.abspath(__file__), [
                "--_child", "predecessor", "--model_path", ckpt, "--data_path", data_path, *feature_args(dirs),
                "--batch_size", str(batch_size)])
        for kind, (how, target, child_args) in cmds.items():
            log_path = os.path.join(scratch, f"child_{kind.replace(' ', '_')}_{n}.log")
            seconds, peak, code = run_child(how, target, child_args, log_path)
            with open(log_path, errors="replace") as fh:
                tail = fh.read()[-3000:]
            if code != 0:
                raise RuntimeError(f"child {kind} ({n} queries) failed with exit code {code}:\n{tail}")
            if peak < 0:
                raise RuntimeError(f"child {kind} ({n} queries) did not report its peak memory:\n{tail}")
            extra = {}
            if kind == "full pipeline":
                extra["gate_bytes"] = dir_bytes(os.path.join(scratch, f"mem_{n}", "gates"))
                shutil.rmtree(os.path.join(scratch, f"mem_{n}"), ignore_errors=True)
            if kind == "predecessor":
                extra.update(json.loads(tail.strip().splitlines()[-1]))
            results.setdefault(kind, {})[n] = {"seconds": seconds, "peak_bytes": peak, **extra}
            log(f"    {kind:<16} {n:>6} queries: {seconds:7.1f} s, peak RSS {peak / 2**20:7,.0f} MiB  {load_note()}")
    return results


# ------------------------------------------------------------------------------------------------
# profiling of misses
# ------------------------------------------------------------------------------------------------

def profile_call(fn, top=20, focus=r"gates\.py|stats\.py|store\.py|plots\.py|pipeline\.py|bench_gate"):
    """(seconds, text): cProfile top functions by cumulative time, overall and in the gate code."""
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    try:
        fn()
    finally:
        prof.disable()
    total = time.perf_counter() - t0
    buf = io.StringIO()
    buf.write(f"total {total:.3f} s under the profiler\n")
    st = pstats.Stats(prof, stream=buf).strip_dirs().sort_stats("cumulative")
    hooks = sum(v[3] for (f, _, name), v in st.stats.items()
                if f == "gates.py" and name in ("_on_fusion_start", "_on_fusion_end", "hook", "set_ids"))
    buf.write(f"time inside the GateRecorder hooks (incl. the sink): {hooks:.3f} s of {total:.3f} s "
              f"({100 * hooks / total:.2f}%)\n")
    st.print_stats(top)
    buf.write(f"--- restricted to the gate-analysis code ({focus}) ---\n")
    st.print_stats(focus, top)
    return total, buf.getvalue()


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------

def fmt_bytes(b):
    return f"{b / 2**20:,.0f} MiB" if b >= 2**20 else f"{b / 2**10:,.0f} KiB"


def print_table(header, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = "  ".join(f"{{:{'<' if i in (0, 1) or i == len(widths) - 1 else '>'}{w}}}" for i, w in enumerate(widths))
    log(line.format(*header).rstrip())
    log("  ".join("-" * w for w in widths))
    for row in rows:
        log(line.format(*row).rstrip())


def report(results):
    s = results["settings"]
    n = s["n_queries"]
    log("")
    log("=" * 110)
    env = results["environment"]
    log(f"RESULTS ({n} queries x {s['clips']} clips, batch {s['batch_size']}; torch {env['torch']}, "
        f"{env['torch_threads']} threads, {env['cpu_count']} CPUs)")
    if "inmemory" in results:
        log("")
        log("1. In memory: one pass over all batches (median s over repetitions), ratio to plain; "
            "'paired' = median over batches of the per-batch ratio")
        rows = []
        for gt, r in results["inmemory"].items():
            base = r["plain"]["median"]
            for mode in MODES:
                m = r[mode]
                note = ""
                if mode == "tracking":
                    note = f"{m['records']} per-query records per pass (sink counts them)"
                elif mode == "tracking+stats":
                    note = f"statistics state {fmt_bytes(m['state_bytes'])}"
                elif mode == "predecessor":
                    note = (f"keeps {fmt_bytes(m['kept_bytes'])} of gate arrays per pass, "
                            f"{m['details']:,} per-position dicts")
                rows.append([gt, mode, f"{m['median']:.2f}", f"{m['median'] / base:.3f}", f"{m['paired_ratio']:.3f}",
                             f"{m['median'] / n * 1e3:.1f}", len(m["times"]), note])
        print_table(["gating", "mode", "median s", "x plain", "paired", "ms/query", "reps", "notes"], rows)
    if "pipeline" in results:
        log("")
        log("2. From disk: plain inference (load + dataset + predict) vs full run_gate_analysis.py job (median s)")
        rows = []
        for gt, r in results["pipeline"].items():
            base = r["plain predict"]["median"]
            for mode in ("plain predict, no exact re-runs", "plain predict", "full pipeline"):
                m = r[mode]
                note = f"exact re-runs {m['exact_reruns']}"
                if mode == "full pipeline":
                    note += f"; output {fmt_bytes(m['output_bytes'])} (gates/ {fmt_bytes(m['gate_bytes'])})"
                rows.append([gt, mode, f"{m['median']:.1f}", f"{m['median'] / base:.3f}",
                             f"{m['median'] / n * 1e3:.1f}", " ".join(f"{t:.1f}" for t in m["times"]), note])
        print_table(["gating", "run", "median s", "x plain", "ms/query", "all runs (s)", "notes"], rows)
        for gt, r in results["pipeline"].items():
            plain, pipe = r["plain predict"]["median"], r["full pipeline"]["median"]
            no_exact = r["plain predict, no exact re-runs"]["median"]
            log(f"   {gt}: pipeline - plain = {pipe - plain:.1f} s ({100 * (pipe - plain) / plain:.1f}% of plain predict, "
                f"{100 * (pipe - plain) / no_exact:.1f}% of plain predict without exact re-runs); the exact re-runs of "
                f"{r['plain predict']['exact_reruns']} queries cost {plain - no_exact:.1f} s in both")
        for gt, r in results["pipeline"].items():
            comp = r["components"]
            base = r["plain predict"]["median"]
            extra = sum(comp.values()) - comp.get("load checkpoint", 0.0)
            log(f"   {gt}: pipeline components (exclusive s, median over runs; % of plain predict):")
            rows = [["", label, f"{sec:.2f}", f"{100 * sec / base:.1f}%"] for label, sec in comp.items() if sec > 0]
            rows.append(["", "sum excluding checkpoint loading", f"{extra:.2f}", f"{100 * extra / base:.1f}%"])
            print_table(["", "component", "s", "% plain"], rows)
    if "memory" in results:
        log("")
        small, big = s["n_queries_memory"]
        log(f"3. Peak memory (VmHWM of a fresh process, {s['memory_gating']} gating), {small} vs {big} queries")
        rows = []
        for kind, r in results["memory"].items():
            a, b = r.get(small), r.get(big)
            note = ""
            if "gate_bytes" in a:
                note = f"gates/ on disk {fmt_bytes(a['gate_bytes'])}" + (f" / {fmt_bytes(b['gate_bytes'])}" if b else "")
            if "kept_bytes" in a:
                note = f"gate arrays kept {fmt_bytes(a['kept_bytes'])}" + (f" / {fmt_bytes(b['kept_bytes'])}" if b else "")
            rows.append([kind, f"{a['peak_bytes'] / 2**20:,.0f}", f"{b['peak_bytes'] / 2**20:,.0f}" if b else "-",
                         f"{b['peak_bytes'] / a['peak_bytes']:.3f}" if b else "-", f"{a['seconds']:.0f}",
                         f"{b['seconds']:.0f}" if b else "-", note])
        print_table(["process", f"MiB @{small}", f"MiB @{big}", "ratio", f"s @{small}", f"s @{big}", "notes"], rows)
    log("")
    log(f"Targets ({TARGET_GATING} gating):")
    checks = []
    if TARGET_GATING in results.get("inmemory", {}):
        r = results["inmemory"][TARGET_GATING]
        checks.append(("tracking / plain (median pass)", r["tracking"]["median"] / r["plain"]["median"],
                       TARGETS["tracking"]))
        checks.append(("tracking / plain (paired per batch)", r["tracking"]["paired_ratio"], TARGETS["tracking"]))
    if TARGET_GATING in results.get("pipeline", {}):
        r = results["pipeline"][TARGET_GATING]
        checks.append(("full pipeline / plain predict", r["full pipeline"]["median"] / r["plain predict"]["median"],
                       TARGETS["pipeline"]))
    if "memory" in results:
        small, big = s["n_queries_memory"]
        r = results["memory"]["full pipeline"]
        checks.append((f"pipeline peak memory {big} / {small} queries", r[big]["peak_bytes"] / r[small]["peak_bytes"],
                       TARGETS["memory"]))
    for name, value, target in checks:
        log(f"  {name:<44} {value:6.3f}  (target <= {target:.2f})  {'met' if value <= target else 'MISSED'}")
    results["targets"] = [{"name": nm, "value": v, "target": t, "met": v <= t} for nm, v, t in checks]
    log(f"total benchmark time {results['total_seconds'] / 60:.1f} min")


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------

def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 256 queries (1,024 for the memory check), 1 repetition")
    p.add_argument("--gating_types", nargs="+", choices=GATING_TYPES, default=list(GATING_TYPES),
                   help="gating types of the in-memory comparison (default: all three)")
    p.add_argument("--pipeline_gating_types", nargs="*", choices=GATING_TYPES, default=[TARGET_GATING],
                   help="gating types of the from-disk comparison (default: elementwise; none to skip)")
    p.add_argument("--repeats", type=int, default=None,
                   help=f"repetitions for {TARGET_GATING} gating, in memory and from disk (default 3; --quick 1)")
    p.add_argument("--other_repeats", type=int, default=1,
                   help="in-memory repetitions for the other gating types (default 1)")
    p.add_argument("--batch_size", type=int, default=32, help="queries per forward (default 32)")
    p.add_argument("--n_queries", type=int, default=None, help="queries of the main JSONL (default 1550)")
    p.add_argument("--memory_scale", type=int, default=4, help="the larger JSONL of the memory check is this x bigger")
    p.add_argument("--memory_full", action="store_true",
                   help="also run plain inference and the predecessor at the larger size")
    p.add_argument("--skip", nargs="*", default=[], choices=("inmemory", "pipeline", "memory"), help="parts to skip")
    p.add_argument("--no_profile", action="store_true", help="do not profile missed targets")
    p.add_argument("--workdir", default=None, help="folder for the generated data (default: a new temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the generated data")
    p.add_argument("--json", default=None, help="also write all results to this JSON file")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads here and OMP_NUM_THREADS of the child processes (default: torch's default); "
                        "1 gives steadier numbers when other processes share the CPU")
    # child-process mode (memory of the predecessor baseline)
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model_path", help=argparse.SUPPRESS)
    p.add_argument("--data_path", help=argparse.SUPPRESS)
    p.add_argument("--v_feat_dirs", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--t_feat_dir", help=argparse.SUPPRESS)
    p.add_argument("--a_feat_dir", help=argparse.SUPPRESS)
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        CHILD_ENV.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    if args._child == "predecessor":
        return child_predecessor(args)

    n_queries = args.n_queries or (256 if args.quick else 1550)
    repeats = args.repeats or (1 if args.quick else 3)
    n_big = n_queries * args.memory_scale
    n_videos = -(-n_queries // QUERIES_PER_VIDEO)
    do = {part: part not in args.skip for part in ("inmemory", "pipeline", "memory")}
    do["pipeline"] = do["pipeline"] and bool(args.pipeline_gating_types)
    results = {"environment": environment(), "settings": {"threads": args.threads,
        "n_queries": n_queries, "n_queries_memory": [n_queries, n_big], "n_videos": n_videos, "clips": N_CLIPS,
        "batch_size": args.batch_size, "repeats": repeats, "other_repeats": args.other_repeats,
        "gating_types": args.gating_types, "pipeline_gating_types": args.pipeline_gating_types,
        "memory_gating": TARGET_GATING, "dims": DIMS}}

    env = results["environment"]
    log("== environment")
    log(f"  python {env['python']}, torch {env['torch']}, numpy {env['numpy']}; torch threads "
        f"{env['torch_threads']} (interop {env['torch_interop_threads']}), cpu_count {env['cpu_count']}, "
        f"affinity {env['cpu_affinity']}; {env['cpu']}; {env['platform']}")
    log(f"  code: {ROOT} ({env['source']})")
    log(f"  {n_queries} queries over {n_videos} videos x {N_CLIPS} clips (memory check: also {n_big}); "
        f"batch {args.batch_size}; repetitions: {repeats} for {TARGET_GATING}, {args.other_repeats} for other "
        f"gating types in memory  {load_note()}")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-up below on kill
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_gate_tracking_")
    os.makedirs(workdir, exist_ok=True)
    t_start = time.perf_counter()
    try:
        log(f"== data and checkpoints (in {workdir})")
        t0 = time.perf_counter()
        feats = write_features(os.path.join(workdir, "data"), n_videos, n_big if do["memory"] else n_queries)
        dirs, vids = feats["dirs"], feats["vids"]
        data_main = write_jsonl(os.path.join(workdir, "data", f"highlight_val_{n_queries}.jsonl"), n_queries, vids)
        n_warm = min(n_queries, 2 * args.batch_size)
        data_warm = write_jsonl(os.path.join(workdir, "data", f"highlight_val_{n_warm}.jsonl"), n_warm, vids)
        data_big = (write_jsonl(os.path.join(workdir, "data", f"highlight_val_{n_big}.jsonl"), n_big, vids)
                    if do["memory"] else None)
        wanted = set(args.gating_types if do["inmemory"] else [])
        wanted |= set(args.pipeline_gating_types if do["pipeline"] else [])
        wanted |= {TARGET_GATING} if do["memory"] else set()
        ckpts, params = {}, {}
        for gt in sorted(wanted):
            ckpts[gt], params[gt] = write_checkpoint(os.path.join(workdir, f"model_{gt}.ckpt"), gt, dirs)
        results["params"] = params
        log(f"  wrote {fmt_bytes(dir_bytes(os.path.join(workdir, 'data')))} of features in "
            f"{time.perf_counter() - t0:.1f} s; parameters: " + ", ".join(f"{gt} {k / 1e6:.2f} M" for gt, k in params.items()))
        scratch = os.path.join(workdir, "scratch")
        os.makedirs(scratch, exist_ok=True)
        from qd_detr.dataset import read_jsonl

        if do["inmemory"]:
            log("== 1. in memory: same model and batches, no_grad, compute_neg=False, modes interleaved per batch")
            t0 = time.perf_counter()
            batches = preload_batches(bench_options(args.gating_types[0], dirs), read_jsonl(data_main), dirs,
                                      args.batch_size)
            log(f"  collated {len(batches)} batches in {time.perf_counter() - t0:.1f} s  {load_note()}")
            results["inmemory"] = {}
            for gt in args.gating_types:
                log(f"  -- {gt}")
                reps = repeats if gt == TARGET_GATING else args.other_repeats
                results["inmemory"][gt] = bench_inmemory(ckpts[gt], batches, reps)
            r = results["inmemory"].get(TARGET_GATING)
            if r and not args.no_profile and min(r["tracking"]["median"] / r["plain"]["median"],
                                                 r["tracking"]["paired_ratio"]) > TARGETS["tracking"]:
                from qd_detr.checkpoint import load_checkpoint
                model, _, _ = load_checkpoint(ckpts[TARGET_GATING], device="cpu")
                total, text = profile_call(lambda: run_pass(model, make_modes(model, TARGET_GATING)["tracking"],
                                                            batches))
                results["profile_tracking"] = text
                log(f"  tracking missed its target: cProfile of one pass ({total:.1f} s under the profiler)\n{text}")
            del batches
            gc.collect()

        if do["pipeline"]:
            log("== 2. from disk: plain inference (load + dataset + predict) vs run_gate_analysis.py (the full job)")
            results["pipeline"] = {}
            for gt in args.pipeline_gating_types:
                log(f"  -- {gt}")
                t0 = time.perf_counter()  # warm-up (imports, allocator); the feature files are in the page cache
                plain_inference(ckpts[gt], data_warm, dirs, args.batch_size)
                out = os.path.join(scratch, "warmup")
                full_pipeline(ckpts[gt], data_warm, dirs, args.batch_size, out)
                shutil.rmtree(out, ignore_errors=True)
                log(f"    warm-up on {n_warm} queries {time.perf_counter() - t0:.1f} s")
                reps = repeats if gt == TARGET_GATING else args.other_repeats
                results["pipeline"][gt] = bench_pipeline(ckpts[gt], data_main, dirs, args.batch_size, reps, scratch)
            r = results["pipeline"].get(TARGET_GATING)
            if r and not args.no_profile and r["full pipeline"]["median"] / r["plain predict"]["median"] > TARGETS["pipeline"]:
                out = os.path.join(scratch, "profile_pipeline")
                total, text = profile_call(lambda: full_pipeline(ckpts[TARGET_GATING], data_main, dirs,
                                                                 args.batch_size, out), top=30)
                shutil.rmtree(out, ignore_errors=True)
                results["profile_pipeline"] = text
                log(f"  the full pipeline missed its target: cProfile of one run ({total:.1f} s under the profiler)\n{text}")

        if do["memory"]:
            log(f"== 3. peak memory of fresh processes ({TARGET_GATING} gating; VmHWM at exit)")
            results["memory"] = bench_memory(ckpts[TARGET_GATING], {n_queries: data_main, n_big: data_big}, dirs,
                                             args.batch_size, scratch, args.memory_full)
        results["total_seconds"] = time.perf_counter() - t_start
        report(results)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(results, fh, indent=2, default=str)
            log(f"results written to {args.json}")
    finally:
        if args.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
