"""What the benchmark scripts share: synthetic data and checkpoints, timing of plain inference and of the
full analysis, the predecessor's tracking, child-process peak memory, environment and load notes, tables.

Not a script. ``bench_tracking.py``, ``bench_pipeline.py``, ``bench_memory.py`` and ``bench_gate_tracking.py``
(all three) import it; everything is built with the project's public API:

* ``BenchData(root, n_videos)``: feature folders in the QVHighlights layout (``n_videos`` videos of 75 clips,
  SlowFast 2304 + CLIP 512 video, PANN 2048 audio, CLIP text 8-32 tokens x 512), labelled JSONL files of
  any number of queries (``jsonl(n)``; text features written on demand) and one random-weight checkpoint
  per gating type at the original default model size (``checkpoint(gating_type)``); ``case(gating_type, n)``
  bundles one of each as a ``Case``. ``build_case(root, gating_type, n)`` does it in one call.
* ``plain_inference(case, ...)`` (load + dataset + batches + ``qd_detr.inference.predict``) and
  ``full_pipeline(case, ...)`` (``gate_analysis.pipeline.run_analysis`` with the arguments of
  ``run_gate_analysis.py``, per-step wall times); ``time_plain_and_pipeline(case, ...)`` alternates whole
  runs of both and returns medians (optionally with ``--no_plots``).
* ``PredecessorTracker``: the predecessor branch's gate tracking (SPEC 4.1), re-implemented as the baseline.
* ``run_child``: a module or script in a fresh process, with its peak resident set (VmHWM).
"""
import argparse
import contextlib
import cProfile
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
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

GATING_TYPES = ("global", "clipwise", "elementwise")
TARGET_GATING = "elementwise"     # the gating type the targets are stated for
DIMS = dict(slowfast=2304, clip=512, text=512, audio=2048)
N_CLIPS = 75                      # QVHighlights: 150 s videos, 2 s clips
QUERIES_PER_VIDEO = 3             # QVHighlights val: 1,550 queries over ~517 videos
DEFAULT_QUERIES, QUICK_QUERIES = 1550, 256
TARGETS = {"tracking": 1.05, "pipeline": 1.30, "memory": 1.10}
CHILD_ENV = {}                    # extra environment of child processes (``set_threads``)


def log(msg=""):
    print(msg, flush=True)


# ------------------------------------------------------------------------------------------------
# environment and CPU load
# ------------------------------------------------------------------------------------------------

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


def environment():
    """Versions, threads, CPU and the code's git state, as a dict."""
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


def log_environment(env):
    log("== environment")
    log(f"  python {env['python']}, torch {env['torch']}, numpy {env['numpy']}; torch threads "
        f"{env['torch_threads']} (interop {env['torch_interop_threads']}), cpu_count {env['cpu_count']}, "
        f"affinity {env['cpu_affinity']}; {env['cpu']}; {env['platform']}")
    log(f"  code: {ROOT} ({env['source']})")


def set_threads(n):
    """Torch threads of this process and OMP/MKL threads of the child processes (None: leave the defaults)."""
    if n:
        torch.set_num_threads(n)
        CHILD_ENV.update(OMP_NUM_THREADS=str(n), MKL_NUM_THREADS=str(n))


# ------------------------------------------------------------------------------------------------
# synthetic data and checkpoints
# ------------------------------------------------------------------------------------------------

def _savez(path, **arrays):
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


def videos_for(n_queries):
    """Videos of a JSONL of ``n_queries`` at the QVHighlights density (3 queries per video)."""
    return -(-n_queries // QUERIES_PER_VIDEO)


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
    """Options of the benchmark model: original default size, AVIGATE custom fusion of ``gating_type``."""
    from qd_detr.config import make_options
    return make_options(v_feat_dim=DIMS["slowfast"] + DIMS["clip"] + 2, t_feat_dim=DIMS["text"],
                        a_feat_dim=DIMS["audio"] + 2, use_avigate_custom=True, gating_type=gating_type,
                        v_feat_dirs=dirs["v_feat_dirs"], t_feat_dir=dirs["t_feat_dir"],
                        a_feat_dir=dirs["a_feat_dir"])


def write_checkpoint(path, gating_type, dirs, seed=0):
    """A training checkpoint ``{"model", "epoch", "opt"}`` of random weights; returns (path, parameter count)."""
    from qd_detr.model import build_model
    torch.manual_seed(seed)
    opt = bench_options(gating_type, dirs)
    model = build_model(opt).eval()
    torch.save({"model": model.state_dict(), "epoch": 0, "opt": opt}, path)
    return path, sum(p.numel() for p in model.parameters())


def fixture_dirs(data):
    """The feature folders of the shared fixtures' data folder ``data`` (``../shared/fixtures/data``)."""
    return {"v_feat_dirs": [os.path.join(data, "slowfast_features"), os.path.join(data, "clip_features")],
            "t_feat_dir": os.path.join(data, "clip_text_features"), "a_feat_dir": os.path.join(data, "pann_features")}


def fusion_fixtures(fixtures):
    """Names of the shared fixtures' checkpoint folders whose model has a fusion module (every ``ckpt_*`` with a
    ``model.ckpt`` but ``ckpt_main_plain``), sorted."""
    return sorted(n for n in os.listdir(fixtures) if n.startswith("ckpt_") and n != "ckpt_main_plain"
                  and os.path.exists(os.path.join(fixtures, n, "model.ckpt")))


def feature_args(dirs):
    """The feature-folder flags of the command-line tools."""
    return ["--v_feat_dirs", *dirs["v_feat_dirs"], "--t_feat_dir", dirs["t_feat_dir"], "--a_feat_dir", dirs["a_feat_dir"]]


def dir_bytes(path):
    total = 0
    for base, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(base, f)) for f in files)
    return total


@dataclass
class Case:
    """One benchmark input: a checkpoint of ``gating_type`` and a JSONL of ``n_queries`` over ``dirs``."""
    gating_type: str
    n_queries: int
    ckpt: str
    data_path: str
    dirs: dict


class BenchData:
    """Synthetic QVHighlights-layout data under ``root``; JSONL files and checkpoints written on first request.

    ``n_videos`` videos of 75 clips: ``slowfast_features/{vid}.npz`` (75, 2304), ``clip_features/{vid}.npz``
    (75, 512), ``pann_features/{vid}.npy`` (75, 2048); ``clip_text_features/qid{q}.npz`` (8-32, 512) for
    every query of every JSONL asked for. One random generator (``seed``) draws the videos, then the text
    features in qid order, so the files do not depend on the order or sizes of the requests.
    """

    def __init__(self, root, n_videos, seed=0):
        self.root = root
        t0 = time.perf_counter()
        self.rng = np.random.default_rng(seed)
        names = ("slowfast_features", "clip_features", "clip_text_features", "pann_features")
        folders = {k: os.path.join(root, k) for k in names}
        for d in folders.values():
            os.makedirs(d, exist_ok=True)
        self.dirs = {"v_feat_dirs": [folders["slowfast_features"], folders["clip_features"]],
                     "t_feat_dir": folders["clip_text_features"], "a_feat_dir": folders["pann_features"]}
        self.vids = []
        for v in range(n_videos):
            start = 150 * v
            vid = f"bench{v:05d}xyz_{start:.1f}_{start + 150:.1f}"
            self.vids.append(vid)
            _savez(os.path.join(folders["slowfast_features"], vid + ".npz"),
                   features=self.rng.standard_normal((N_CLIPS, DIMS["slowfast"]), dtype=np.float32))
            _savez(os.path.join(folders["clip_features"], vid + ".npz"),
                   features=self.rng.standard_normal((N_CLIPS, DIMS["clip"]), dtype=np.float32))
            np.save(os.path.join(folders["pann_features"], vid + ".npy"),
                    np.abs(self.rng.standard_normal((N_CLIPS, DIMS["audio"]), dtype=np.float32)))
        self.n_text = 0
        self.jsonls, self.ckpts, self.params = {}, {}, {}
        self.seconds = time.perf_counter() - t0

    def texts(self, n):
        """Text features of qids 1..n (those missing written now)."""
        t0 = time.perf_counter()
        for qid in range(self.n_text + 1, n + 1):
            tokens = self.rng.standard_normal((int(self.rng.integers(8, 33)), DIMS["text"]), dtype=np.float32)
            _savez(os.path.join(self.dirs["t_feat_dir"], f"qid{qid}.npz"),
                   last_hidden_state=tokens, pooler_output=tokens.mean(axis=0))
        self.n_text = max(self.n_text, n)
        self.seconds += time.perf_counter() - t0

    def jsonl(self, n_queries):
        """Path of ``highlight_val_{n}.jsonl``: labelled queries 1..n over the videos (cyclic)."""
        if n_queries not in self.jsonls:
            self.texts(n_queries)
            self.jsonls[n_queries] = write_jsonl(os.path.join(self.root, f"highlight_val_{n_queries}.jsonl"),
                                                 n_queries, self.vids)
        return self.jsonls[n_queries]

    def checkpoint(self, gating_type):
        """Path of ``model_{gating_type}.ckpt`` (random weights, seed 0); its parameter count in ``params``."""
        if gating_type not in self.ckpts:
            t0 = time.perf_counter()
            path = os.path.join(os.path.dirname(self.root), f"model_{gating_type}.ckpt")
            self.ckpts[gating_type], self.params[gating_type] = write_checkpoint(path, gating_type, self.dirs)
            self.seconds += time.perf_counter() - t0
        return self.ckpts[gating_type]

    def case(self, gating_type, n_queries):
        return Case(gating_type, n_queries, self.checkpoint(gating_type), self.jsonl(n_queries), self.dirs)

    def describe(self):
        return (f"{fmt_bytes(dir_bytes(self.root))} of features and JSONL written in {self.seconds:.1f} s; "
                "parameters: " + ", ".join(f"{gt} {k / 1e6:.2f} M" for gt, k in sorted(self.params.items())))


def build_case(root, gating_type, n_queries, n_videos=None):
    """Data of ``n_queries`` (over ``n_videos``, default 3 queries per video) and a checkpoint of ``gating_type``
    under ``root`` (``root/data`` and ``root/model_{gating_type}.ckpt``)."""
    data = BenchData(os.path.join(root, "data"), n_videos or videos_for(n_queries))
    return data.case(gating_type, n_queries)


# ------------------------------------------------------------------------------------------------
# plain inference and the full pipeline
# ------------------------------------------------------------------------------------------------

def plain_inference(case, batch_size, exact=None):
    """What a plain inference run does before writing: load, dataset, batches, predictions.
    ``exact=False`` skips the exact re-runs of ambiguous rows (``qd_detr.inference.iterate_batches``)."""
    from qd_detr.checkpoint import load_checkpoint
    from qd_detr.dataset import read_jsonl
    from qd_detr.inference import build_dataset, make_batches, predict
    model, opt, _ = load_checkpoint(case.ckpt, device="cpu", batching="query")
    dataset = build_dataset(opt, read_jsonl(case.data_path), case.dirs)
    batches = make_batches(dataset, "query", batch_size, opt)
    stats = {}
    lines = predict(model, dataset, batches, torch.device("cpu"), progress=False, stats=stats, exact=exact)
    return {"queries": len(lines), "exact_reruns": stats.get("exact_reruns", 0)}


def pipeline_argv(case, batch_size, out_dir, no_plots=False):
    """``run_gate_analysis.py`` arguments of the full job on ``case``."""
    return ["--model_path", case.ckpt, "--data_path", case.data_path, *feature_args(case.dirs),
            "--output_dir", out_dir, "--device", "cpu", "--batch_size", str(batch_size), "--quiet",
            *(["--no_plots"] if no_plots else [])]


def full_pipeline(case, batch_size, out_dir, no_plots=False):
    """The full gate analysis into ``out_dir``, configured as ``run_gate_analysis.main`` does it (its parser,
    ``prepare_output_dir``, ``AnalysisConfig(vars(args))``), run by ``run_analysis`` with step timings.

    Returns {"queries", "exact_reruns", "output_bytes", "gate_bytes", "steps": {step name: seconds}}."""
    from gate_analysis.pipeline import AnalysisConfig, run_analysis
    from qd_detr.cli import prepare_output_dir
    from run_gate_analysis import get_args_parser
    args = get_args_parser().parse_args(pipeline_argv(case, batch_size, out_dir, no_plots))
    args.output_dir = prepare_output_dir(args.output_dir, overwrite=args.overwrite)
    steps = {}
    with contextlib.redirect_stdout(io.StringIO()):
        manifest = run_analysis(AnalysisConfig(vars(args)), progress=False, log=lambda *a, **k: None, timings=steps)
    return {"queries": manifest["counts"]["queries"], "exact_reruns": manifest["counts"]["exact_reruns"],
            "output_bytes": dir_bytes(out_dir), "gate_bytes": dir_bytes(os.path.join(out_dir, "gates")),
            "steps": steps}


def timed(fn, *args, **kwargs):
    """(seconds, result) of one call, after a garbage collection."""
    gc.collect()
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - t0, result


def warm_up(case, batch_size, scratch, no_plots=False):
    """One plain and one full run (imports, allocator, page cache); returns the seconds both took."""
    t0 = time.perf_counter()
    plain_inference(case, batch_size)
    out = os.path.join(scratch, "warmup")
    try:
        full_pipeline(case, batch_size, out, no_plots=no_plots)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return time.perf_counter() - t0


def time_plain_and_pipeline(case, batch_size, repeats, scratch, no_plots=(False,), indent="    "):
    """Whole runs of plain inference and of the full pipeline (once per ``no_plots`` value), alternated
    ``repeats`` times (the order reversed every other repetition).

    Returns {"plain predict": {"times", "median", "queries", "exact_reruns"}, "full pipeline" (and/or
    "full pipeline, --no_plots"): {..., "output_bytes", "gate_bytes", "steps": {step: median s}}}."""
    names = ["plain predict"] + ["full pipeline" + (", --no_plots" if flag else "") for flag in no_plots]
    times = {n: [] for n in names}
    infos, steps = {}, {n: [] for n in names[1:]}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            if name == "plain predict":
                seconds, infos[name] = timed(plain_inference, case, batch_size)
            else:
                out = os.path.join(scratch, f"pipeline_{r}")
                try:
                    seconds, infos[name] = timed(full_pipeline, case, batch_size, out, no_plots=name.endswith("plots"))
                finally:
                    shutil.rmtree(out, ignore_errors=True)
                steps[name].append(infos[name].pop("steps"))
            times[name].append(seconds)
            log(f"{indent}rep {r + 1}/{repeats} {name:<31} {seconds:7.1f} s  {load_note()}")
    result = {n: {"times": times[n], "median": statistics.median(times[n]), **infos[n]} for n in names}
    for name, runs in steps.items():
        result[name]["steps"] = {k: statistics.median(run.get(k, 0.0) for run in runs) for k in runs[0]}
    return result


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
        self.handles = []

    def attach(self):
        if not self.handles:
            for layer, block in enumerate(self.fusion.fusion_layers):
                self.handles.append(block.gating_function.register_forward_hook(self.hook(layer)))
        return self

    def detach(self):
        for h in self.handles:
            h.remove()
        self.handles = []

    def hook(self, layer):
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
# child processes with their peak memory
# ------------------------------------------------------------------------------------------------

# Children are started through this launcher, which writes the process's VmHWM (peak resident set
# of its own address space, from /proc/self/status) at exit. ``ru_maxrss`` from wait4 is not used: on
# Linux it is at least the parent's RSS at fork time (exec keeps the pre-exec high-water mark).
LAUNCHER = r"""
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
    """Run a module (``kind="module"``) or script in a fresh process (cwd: the repository root; output to
    ``log_path``); returns (seconds, peak RSS bytes or -1, exit code)."""
    hwm_file = log_path + ".hwm"
    path = os.pathsep.join([ROOT, BENCH_DIR] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    env = dict(os.environ, PYTHONPATH=path, BENCH_HWM_FILE=hwm_file, **CHILD_ENV)
    with open(log_path, "wb") as log_fh:
        t0 = time.perf_counter()
        code = subprocess.call([sys.executable, "-c", LAUNCHER, kind, target, *args], cwd=ROOT, stdout=log_fh,
                               stderr=subprocess.STDOUT, env=env)
        seconds = time.perf_counter() - t0
    try:
        with open(hwm_file) as fh:
            peak = int(fh.read().strip()) * 1024
    except (OSError, ValueError):
        peak = -1
    return seconds, peak, code


# ------------------------------------------------------------------------------------------------
# profiling, tables, targets
# ------------------------------------------------------------------------------------------------

def profile_call(fn, top=20, focus=r"gates\.py|stats\.py|store\.py|sink\.py|plots.*\.py|pipeline\.py|bench_"):
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
    st = pstats.Stats(prof, stream=buf)
    gates_py = os.path.join("qd_detr", "gates.py")
    # cumulative time of the gates.py functions entered from outside gates.py (the hooks, incl. their sink)
    inside = sum(ct for (f, _, _), (_, _, _, ct, callers) in st.stats.items()
                 if f.endswith(gates_py) and not any(c[0].endswith(gates_py) for c in callers))
    buf.write(f"time inside qd_detr/gates.py, entered from outside it (gate capture hooks, incl. the sink they call; "
              f"main thread): {inside:.3f} s of {total:.3f} s ({100 * inside / total:.2f}%)\n")
    st.strip_dirs().sort_stats("cumulative")
    st.print_stats(top)
    buf.write(f"--- restricted to the gate-analysis code ({focus}) ---\n")
    st.print_stats(focus, top)
    return total, buf.getvalue()


def fmt_bytes(b):
    return f"{b / 2**20:,.0f} MiB" if b >= 2**20 else f"{b / 2**10:,.0f} KiB"


def print_table(header, rows):
    """Columns 0, 1 and the last left-aligned, the others right-aligned."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = "  ".join(f"{{:{'<' if i in (0, 1) or i == len(widths) - 1 else '>'}{w}}}" for i, w in enumerate(widths))
    log(line.format(*header).rstrip())
    log("  ".join("-" * w for w in widths))
    for row in rows:
        log(line.format(*row).rstrip())


def check_targets(checks):
    """Print (name, value, target) checks; returns them as dicts for the JSON results."""
    for name, value, target in checks:
        log(f"  {name:<44} {value:6.3f}  (target <= {target:.2f})  {'met' if value <= target else 'MISSED'}")
    return [{"name": nm, "value": v, "target": t, "met": v <= t} for nm, v, t in checks]


# ------------------------------------------------------------------------------------------------
# arguments and the run around a benchmark
# ------------------------------------------------------------------------------------------------

def base_arguments():
    """Flags every benchmark script takes (an argparse parent)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: {QUICK_QUERIES} queries (the memory check: x --memory_scale), 1 repetition")
    p.add_argument("--batch_size", type=int, default=32, help="queries per forward (default 32)")
    p.add_argument("--n_queries", type=int, default=None, help=f"queries of the main JSONL (default {DEFAULT_QUERIES})")
    p.add_argument("--workdir", default=None, help="folder for the generated data (default: a new temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the generated data")
    p.add_argument("--json", default=None, help="also write all results to this JSON file")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads here and OMP_NUM_THREADS of the child processes (default: torch's default); "
                        "1 gives steadier numbers when other processes share the CPU")
    return p


def timing_arguments():
    """Flags of the timed comparisons (in memory, from disk)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--repeats", type=int, default=None,
                   help=f"repetitions for {TARGET_GATING} gating, in memory and from disk (default 3; --quick 1)")
    p.add_argument("--other_repeats", type=int, default=1,
                   help="repetitions for the other gating types (default 1)")
    p.add_argument("--no_profile", action="store_true", help="do not profile missed targets")
    return p


def settings(args):
    """Sizes and repetitions the flags ask for."""
    n = args.n_queries or (QUICK_QUERIES if args.quick else DEFAULT_QUERIES)
    out = {"threads": args.threads, "n_queries": n, "n_videos": videos_for(n), "clips": N_CLIPS,
           "batch_size": args.batch_size, "dims": DIMS}
    if hasattr(args, "repeats"):
        out.update(repeats=args.repeats or (1 if args.quick else 3), other_repeats=args.other_repeats)
    return out


@contextlib.contextmanager
def bench_session(args, prefix, run_settings, n_videos, describe):
    """Environment logged, threads set, a work folder (``--workdir`` or a temp folder, removed at the end
    unless ``--keep``, also on SIGTERM) with ``data/`` (``BenchData`` of ``n_videos``) and ``scratch/``; logs
    ``describe()`` first; yields (BenchData, scratch, results) and at the end records the parameter counts and
    the total time in ``results`` (and ``--json``)."""
    set_threads(args.threads)
    results = {"environment": environment(), "settings": run_settings}
    log_environment(results["environment"])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-up below on kill
    workdir = args.workdir or tempfile.mkdtemp(prefix=prefix)
    os.makedirs(workdir, exist_ok=True)
    t_start = time.perf_counter()
    try:
        log(describe())
        log(f"== data (in {workdir})")
        data = BenchData(os.path.join(workdir, "data"), n_videos)
        scratch = os.path.join(workdir, "scratch")
        os.makedirs(scratch, exist_ok=True)
        yield data, scratch, results
        results["params"] = data.params
        results["total_seconds"] = time.perf_counter() - t_start
        log(f"total benchmark time {results['total_seconds'] / 60:.1f} min")
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(results, fh, indent=2, default=str)
            log(f"results written to {args.json}")
    finally:
        if args.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def bench_run(args, prefix):
    """``bench_session`` with the sizes and repetitions of the common flags (``settings``)."""
    s = settings(args)

    def describe():
        return (f"  {s['n_queries']} queries over {s['n_videos']} videos x {N_CLIPS} clips; batch {s['batch_size']}"
                + (f"; repetitions: {s['repeats']} for {TARGET_GATING}, {s['other_repeats']} for other gating types"
                   if "repeats" in s else "") + f"  {load_note()}")
    with bench_session(args, prefix, s, s["n_videos"], describe) as session:
        yield session
