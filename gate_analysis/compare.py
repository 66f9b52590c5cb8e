"""Gates across runs: output folders of earlier analyses (checkpoints, epochs, seeds, gating types).

``compare_runs(dirs)`` reads each folder's ``run.json`` (provenance, metrics; optional) and per-query
gate statistics (``gate_stats_per_query.csv``, or the gate store when the CSV is absent) and returns:

- ``gate_compare_runs.csv``: one row per run (label, gating type, epoch, checkpoint, metrics);
- ``gate_compare_layers.csv``: per run x layer x gate the distribution of per-query mean gates (mean,
  std, quartiles) and the mean within-query std: the evolution of per-layer means and spreads;
- ``gate_compare_queries.csv``: for the queries present in every run, per layer (and ``all``) x gate
  the query's mean gate in each run and its difference from the first run.

Runs are labelled by folder name (parent/name when names repeat) in the order given. Layers are the
union over runs (a run without a layer has no rows for it). ``run_compare_job`` is the standalone
``run_gate_analysis.py --compare_runs A B ... --output_dir D`` (no model needed).
"""
import datetime
import json
import os
import time

import numpy as np
import pandas as pd

from qd_detr.errors import ConfigError, DataError
from qd_detr.gates import ALL_LAYERS, GATE_KINDS, gate_name
from qd_detr.io import write_csv

from .lazy import lazy_attributes
from .manifest import write_run_json
from .outputs import (
    COMPARE_LAYERS_FILE,
    COMPARE_PLOTS,
    COMPARE_QUERIES_FILE,
    COMPARE_RUNS_FILE,
    GATES_DIR,
    GATES_META_FILE,
    RUN_FILE,
    STATS_CSV_FILES,
)
from .ranges import ranges_from_meta
from .stats_csv import gate_id_columns
from .store import load_gate_run

__all__ = ["one_row_per_video", "load_run_summary", "check_run_dirs", "compare_runs", "write_compare", "run_compare_job", "run_gate_ranges",
           "CSV_COLUMNS", "PLOT_FILES"]

BRIEF_KEYS = ("MR-full-mAP", "MR-full-R1@0.5", "MR-full-R1@0.7", "HL-min-VeryGood-mAP", "HL-min-VeryGood-Hit1")
_RUN = {"run": "Run index in the order given (0 = the first, the reference for differences).",
        "run_label": "Run label: the folder name (parent/name when names repeat)."}
_ID = gate_id_columns("the mean over layers of |the video's layer mean| (opposite signs do not cancel)")

CSV_COLUMNS = {
    COMPARE_RUNS_FILE: {
        **_RUN,
        "path": "Absolute path of the run's output folder.",
        "layout": "Fusion layout (run.json; '' when unknown).",
        "gating_type": "Gating type: global, clipwise or elementwise.",
        "fusion_layers": "Number of fusion layers.",
        "epoch": "Checkpoint epoch (run.json load report; empty when unknown).",
        "checkpoint": "Checkpoint path (run.json).",
        "checkpoint_sha256": "Checkpoint SHA-256 (run.json).",
        "data": "Annotation file (run.json).",
        "n_queries": "Queries with gates in the run.",
        **{k: f"Official {k} of the run (empty without labels)." for k in BRIEF_KEYS},
    },
    COMPARE_LAYERS_FILE: {
        **_RUN,
        **_ID,
        "n_videos": "Videos of the run (each counts once: its queries share their gates).",
        "mean": "Mean over videos of the per-video mean gate.",
        "std": "Std (ddof=0) over videos of the per-video mean gate (spread across videos).",
        "p25": "25th percentile of the per-video mean gate.",
        "median": "Median of the per-video mean gate.",
        "p75": "75th percentile of the per-video mean gate.",
        "mean_within_std": "Mean over videos of the within-video std of the gate (spread over clips/dims).",
    },
    COMPARE_QUERIES_FILE: {
        "qid": "The video's first query id in run 0 (one row per video and run; present in every run).",
        "vid": "Video id.",
        **_ID,
        **_RUN,
        "mean": "The video's mean gate in this run ('all': the mean over layers of |layer mean|).",
        "diff_vs_first": "mean minus the same video's mean in run 0.",
    },
}
PLOT_FILES = COMPARE_PLOTS


def _read_json(path):
    try:
        with open(path) as fh:
            return json.load(fh)
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None


def run_gate_ranges(run_dir, manifest=None):
    """{gate name: GateRange} declared by a run (run.json, else gates/meta.json); {} when it records none
    (gates of such a run are tanh [-1, 1])."""
    if manifest is None:
        manifest = _read_json(os.path.join(os.fspath(run_dir), RUN_FILE)) or {}
    return ranges_from_meta(manifest) or ranges_from_meta(_read_json(os.path.join(os.fspath(run_dir), GATES_DIR,
                                                                                   GATES_META_FILE)))


def load_run_summary(run_dir, manifest=None):
    """{path, manifest, gating_type, per_query, gate_ranges} of an analysis output folder; DataError if it has
    no gates. ``manifest`` replaces the folder's run.json (e.g. for the run still being written)."""
    path = os.path.abspath(os.fspath(run_dir))
    if not os.path.isdir(path):
        raise DataError(f"{path}: run folder not found")
    if manifest is None:
        manifest = _read_json(os.path.join(path, RUN_FILE)) or {}
    csv_path = os.path.join(path, STATS_CSV_FILES["per_query"])
    gating_type = (manifest.get("model") or {}).get("gating_type")
    if os.path.isfile(csv_path):
        pq = pd.read_csv(csv_path, usecols=["qid", "vid", "layer", "gate", "mean", "std"], dtype={"vid": str},
                         keep_default_na=False)
    else:
        try:
            run = load_gate_run(path)
        except (FileNotFoundError, ValueError) as exc:
            raise DataError(f"{path}: not a gate-analysis output folder ({exc})") from None
        from .stats import accumulate_gate_run
        pq = accumulate_gate_run(run).query_stats()[["qid", "vid", "layer", "gate", "mean", "std"]]
        gating_type = gating_type or run.gating_type
    if len(pq) == 0:
        raise DataError(f"{path}: the run has no gates")
    if gating_type is None:
        meta = _read_json(os.path.join(path, GATES_DIR, GATES_META_FILE)) or {}
        gating_type = meta.get("gating_type", "")
    pq = pq.astype({"qid": np.int64, "vid": str, "layer": np.int64, "gate": str})
    return {"path": path, "manifest": manifest, "gating_type": gating_type or "", "per_query": pq,
            "gate_ranges": run_gate_ranges(path, manifest)}


def _labels(paths):
    names = [os.path.basename(p.rstrip(os.sep)) or p for p in paths]
    if len(set(names)) < len(names):
        names = [os.path.join(os.path.basename(os.path.dirname(p)), os.path.basename(p)) for p in paths]
    if len(set(names)) < len(names):
        names = [f"{i}:{n}" for i, n in enumerate(names)]
    return names


def check_run_dirs(run_dirs, output_dir=None):
    """Check ``--compare_runs`` folders before any work: each exists and holds gate statistics
    (``gate_stats_per_query.csv`` or a gate store), none is given twice (``output_dir``, the run being
    written, counts as one of them). Raises the errors ``compare_runs`` would raise later."""
    paths = [os.path.abspath(os.fspath(d)) for d in run_dirs] + ([os.path.abspath(output_dir)] if output_dir else [])
    if len(set(paths)) < len(paths):
        raise ConfigError("--compare_runs: the same run folder is given twice")
    for path in paths[:len(run_dirs)]:
        if not os.path.isdir(path):
            raise DataError(f"{path}: run folder not found")
        if not (os.path.isfile(os.path.join(path, STATS_CSV_FILES["per_query"]))
                or os.path.isfile(os.path.join(path, GATES_DIR, GATES_META_FILE))):
            raise DataError(f"{path}: not a gate-analysis output folder (no {STATS_CSV_FILES['per_query']} and no "
                            f"{GATES_DIR}/meta.json)")


def one_row_per_video(per_query):
    """The rows of each video's first query in a per-query statistics frame (queries without a video kept):
    every layout computes the gates from video and audio, so a video's queries repeat its gates."""
    vid = per_query["vid"].fillna("").astype(str)
    dup = per_query.assign(vid=vid).duplicated(subset=["vid", "layer", "gate"], keep="first") & (vid != "")
    return per_query[~dup].reset_index(drop=True)


def compare_runs(run_dirs, overrides=None):
    """(runs, layers, queries) DataFrames with the columns of ``CSV_COLUMNS``; needs >= 2 runs.
    ``overrides``: {run folder: manifest} used instead of those folders' run.json."""
    if len(run_dirs) < 2:
        raise ConfigError(f"--compare_runs needs at least two run folders, got {len(run_dirs)}")
    over = {os.path.abspath(k): v for k, v in (overrides or {}).items()}
    summaries = [load_run_summary(d, over.get(os.path.abspath(d))) for d in run_dirs]
    if len({s["path"] for s in summaries}) < len(summaries):
        raise ConfigError("--compare_runs: the same run folder is given twice")
    labels = _labels([s["path"] for s in summaries])
    run_rows, layer_rows, per_query = [], [], []
    for i, (s, label) in enumerate(zip(summaries, labels)):
        m = s["manifest"]
        brief = m.get("metrics_brief") or {}
        pq = one_row_per_video(s["per_query"])
        run_rows.append({"run": i, "run_label": label, "path": s["path"], "layout": (m.get("model") or {}).get("layout", ""),
                         "gating_type": s["gating_type"], "fusion_layers": int(pq["layer"].nunique()),
                         "epoch": ((m.get("checkpoint") or {}).get("load_report") or {}).get("epoch"),
                         "checkpoint": (m.get("checkpoint") or {}).get("path", ""),
                         "checkpoint_sha256": (m.get("checkpoint") or {}).get("sha256", ""),
                         "data": (m.get("data") or {}).get("path", ""), "n_queries": int(s["per_query"]["qid"].nunique()),
                         **{k: brief.get(k) for k in BRIEF_KEYS}})
        for (layer, kind), sel in pq.groupby(["layer", "gate"], sort=True):
            v = sel["mean"].to_numpy(float)
            layer_rows.append({"run": i, "run_label": label, "layer": int(layer), "gate": kind,
                               "name": gate_name(layer, kind), "n_videos": len(v), "mean": float(np.mean(v)),
                               "std": float(np.std(v)), "p25": float(np.percentile(v, 25)),
                               "median": float(np.median(v)), "p75": float(np.percentile(v, 75)),
                               "mean_within_std": float(sel["std"].mean())})
        q = pq[["qid", "vid", "layer", "gate", "mean"]].copy()
        allq = q.assign(mean=q["mean"].abs()).groupby(["qid", "vid", "gate"], sort=False)["mean"].mean().reset_index()
        allq["layer"] = ALL_LAYERS
        q["layer"] = q["layer"].astype(object)
        q = pd.concat([q, allq[q.columns]], ignore_index=True)
        q["run"], q["run_label"] = i, label
        per_query.append(q)
    queries = pd.concat(per_query, ignore_index=True)
    queries["_v"] = [v if v else f"qid {q}" for q, v in zip(queries["qid"], queries["vid"])]  # the video's key
    common = set.intersection(*[set(queries.loc[queries["run"] == i, "_v"]) for i in range(len(summaries))])
    queries = queries[queries["_v"].isin(common)].copy()
    queries["layer_s"] = queries["layer"].astype(str)
    run0 = queries[queries["run"] == 0]
    first = run0.set_index(["_v", "layer_s", "gate"])["mean"]
    ref = first.reindex(pd.MultiIndex.from_frame(queries[["_v", "layer_s", "gate"]])).to_numpy(float)
    queries["diff_vs_first"] = queries["mean"].to_numpy(float) - ref
    queries["qid"] = queries["_v"].map(dict(zip(run0["_v"], run0["qid"])))  # run 0's query names the video
    queries["name"] = [gate_name(l, k) for l, k in zip(queries["layer"], queries["gate"])]
    order0 = {v: k for k, v in enumerate(dict.fromkeys(run0["_v"]))}
    queries["_q"] = queries["_v"].map(order0)
    queries["_l"] = [99999 if l == ALL_LAYERS else int(l) for l in queries["layer"]]
    queries["_g"] = [GATE_KINDS.index(g) if g in GATE_KINDS else 9 for g in queries["gate"]]
    queries = queries.sort_values(["_q", "_l", "_g", "run"], kind="stable")
    queries = queries[list(CSV_COLUMNS[COMPARE_QUERIES_FILE])].reset_index(drop=True)
    runs = pd.DataFrame(run_rows, columns=list(CSV_COLUMNS[COMPARE_RUNS_FILE]))
    layers = pd.DataFrame(layer_rows, columns=list(CSV_COLUMNS[COMPARE_LAYERS_FILE]))
    return runs, layers, queries


def write_compare(output_dir, runs, layers, queries):
    """Write the three CSVs; returns {file name: path}."""
    paths = {}
    for name, df in zip(CSV_COLUMNS, (runs, layers, queries)):
        paths[name] = write_csv(df, os.path.join(output_dir, name), float_format="%.9g")
    return paths


def run_compare_job(run_dirs, output_dir, plots=True, log=print):
    """Standalone comparison: CSVs, plots, ``run.json`` (kind "compare") and ``report.html`` in ``output_dir``."""
    t0 = time.time()
    runs, layers, queries = compare_runs(run_dirs)
    files = write_compare(output_dir, runs, layers, queries)
    plot_paths = []
    if plots:
        from .plots_compare import plot_compare
        plot_paths = plot_compare(runs, layers, queries, output_dir)
    manifest = {"kind": "compare", "status": "complete",
                "finished": datetime.datetime.now().isoformat(timespec="seconds"),
                "seconds": round(time.time() - t0, 2),
                "runs": [{"label": r.run_label, "path": r.path, "gating_type": r.gating_type} for r in runs.itertuples()],
                "counts": {"runs": len(runs), "common_queries": int(queries["qid"].nunique())},
                "files": {"csv": {k: os.path.relpath(v, output_dir) for k, v in files.items()},
                          "plots": [os.path.relpath(p, output_dir) for p in plot_paths]}}
    write_run_json(output_dir, manifest, "complete")
    from .report import write_report
    report = write_report(output_dir)
    log(f"Compared {len(runs)} runs ({manifest['counts']['common_queries']} queries in all): "
        f"{', '.join(runs['run_label'])}\n  outputs in {output_dir}: {', '.join(files)}, plots/, {os.path.basename(report)}")
    return manifest


# the figures live in gate_analysis.plots_compare (matplotlib, imported on first use)
_PLOT_NAMES = ("plot_compare",)
__all__ += _PLOT_NAMES
__getattr__ = lazy_attributes(__name__, "gate_analysis.plots_compare", _PLOT_NAMES)
