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
from qd_detr.postprocess import write_json

from .ranges import ranges_from_meta
from .store import GATE_KINDS, atomic_write_csv, gate_name, load_gate_run

__all__ = ["load_run_summary", "compare_runs", "write_compare", "plot_compare", "run_compare_job", "CSV_COLUMNS",
           "PLOT_FILES"]

ALL = "all"
BRIEF_KEYS = ("MR-full-mAP", "MR-full-R1@0.5", "MR-full-R1@0.7", "HL-min-VeryGood-mAP", "HL-min-VeryGood-Hit1")
_RUN = {"run": "Run index in the order given (0 = the first, the reference for differences).",
        "run_label": "Run label: the folder name (parent/name when names repeat)."}
_ID = {"layer": "Fusion layer index ('all': the query's mean over its layers).",
       "gate": "Gate kind: 'mha' (audio branch), 'ffn' (FFN branch) or 'beta' (v2 FiLM shift).",
       "name": "Dotted gate name 'layers.{layer}.gate_{gate}'."}

CSV_COLUMNS = {
    "gate_compare_runs.csv": {
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
    "gate_compare_layers.csv": {
        **_RUN,
        **_ID,
        "n_queries": "Queries of the run.",
        "mean": "Mean over queries of the per-query mean gate.",
        "std": "Std (ddof=0) over queries of the per-query mean gate (spread across queries).",
        "p25": "25th percentile of the per-query mean gate.",
        "median": "Median of the per-query mean gate.",
        "p75": "75th percentile of the per-query mean gate.",
        "mean_within_std": "Mean over queries of the within-query std of the gate (spread over clips/dims).",
    },
    "gate_compare_queries.csv": {
        "qid": "QVHighlights query id (present in every run).",
        **_ID,
        **_RUN,
        "mean": "The query's mean gate in this run ('all': mean of its layer means).",
        "diff_vs_first": "mean minus the same query's mean in run 0.",
    },
}
PLOT_FILES = {"layers": "compare_layer_evolution.png", "queries": "compare_query_differences.png"}


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
        manifest = _read_json(os.path.join(os.fspath(run_dir), "run.json")) or {}
    return ranges_from_meta(manifest) or ranges_from_meta(_read_json(os.path.join(os.fspath(run_dir), "gates",
                                                                                   "meta.json")))


def load_run_summary(run_dir, manifest=None):
    """{path, manifest, gating_type, per_query, gate_ranges} of an analysis output folder; DataError if it has
    no gates. ``manifest`` replaces the folder's run.json (e.g. for the run still being written)."""
    path = os.path.abspath(os.fspath(run_dir))
    if not os.path.isdir(path):
        raise DataError(f"{path}: run folder not found")
    if manifest is None:
        manifest = _read_json(os.path.join(path, "run.json")) or {}
    csv_path = os.path.join(path, "gate_stats_per_query.csv")
    gating_type = (manifest.get("model") or {}).get("gating_type")
    if os.path.isfile(csv_path):
        pq = pd.read_csv(csv_path, usecols=["qid", "layer", "gate", "mean", "std"])
    else:
        try:
            run = load_gate_run(path)
        except (FileNotFoundError, ValueError) as exc:
            raise DataError(f"{path}: not a gate-analysis output folder ({exc})") from None
        from .stats import accumulate_gate_run
        pq = accumulate_gate_run(run).query_stats()[["qid", "layer", "gate", "mean", "std"]]
        gating_type = gating_type or run.gating_type
    if len(pq) == 0:
        raise DataError(f"{path}: the run has no gates")
    if gating_type is None:
        meta = _read_json(os.path.join(path, "gates", "meta.json")) or {}
        gating_type = meta.get("gating_type", "")
    pq = pq.astype({"qid": np.int64, "layer": np.int64, "gate": str})
    return {"path": path, "manifest": manifest, "gating_type": gating_type or "", "per_query": pq,
            "gate_ranges": run_gate_ranges(path, manifest)}


def _labels(paths):
    names = [os.path.basename(p.rstrip(os.sep)) or p for p in paths]
    if len(set(names)) < len(names):
        names = [os.path.join(os.path.basename(os.path.dirname(p)), os.path.basename(p)) for p in paths]
    if len(set(names)) < len(names):
        names = [f"{i}:{n}" for i, n in enumerate(names)]
    return names


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
        pq = s["per_query"]
        run_rows.append({"run": i, "run_label": label, "path": s["path"], "layout": (m.get("model") or {}).get("layout", ""),
                         "gating_type": s["gating_type"], "fusion_layers": int(pq["layer"].nunique()),
                         "epoch": ((m.get("checkpoint") or {}).get("load_report") or {}).get("epoch"),
                         "checkpoint": (m.get("checkpoint") or {}).get("path", ""),
                         "checkpoint_sha256": (m.get("checkpoint") or {}).get("sha256", ""),
                         "data": (m.get("data") or {}).get("path", ""), "n_queries": int(pq["qid"].nunique()),
                         **{k: brief.get(k) for k in BRIEF_KEYS}})
        for (layer, kind), sel in pq.groupby(["layer", "gate"], sort=True):
            v = sel["mean"].to_numpy(float)
            layer_rows.append({"run": i, "run_label": label, "layer": int(layer), "gate": kind,
                               "name": gate_name(layer, kind), "n_queries": len(v), "mean": float(np.mean(v)),
                               "std": float(np.std(v)), "p25": float(np.percentile(v, 25)),
                               "median": float(np.median(v)), "p75": float(np.percentile(v, 75)),
                               "mean_within_std": float(sel["std"].mean())})
        q = pq[["qid", "layer", "gate", "mean"]].copy()
        allq = q.groupby(["qid", "gate"], sort=False)["mean"].mean().reset_index()
        allq["layer"] = ALL
        q["layer"] = q["layer"].astype(object)
        q = pd.concat([q, allq[q.columns]], ignore_index=True)
        q["run"], q["run_label"] = i, label
        per_query.append(q)
    common = set.intersection(*[set(s["per_query"]["qid"]) for s in summaries])
    queries = pd.concat(per_query, ignore_index=True)
    queries = queries[queries["qid"].isin(common)]
    queries["layer_s"] = queries["layer"].astype(str)
    first = queries[queries["run"] == 0].set_index(["qid", "layer_s", "gate"])["mean"]
    ref = first.reindex(pd.MultiIndex.from_frame(queries[["qid", "layer_s", "gate"]])).to_numpy(float)
    queries["diff_vs_first"] = queries["mean"].to_numpy(float) - ref
    queries["name"] = [gate_name(l, k) for l, k in zip(queries["layer"], queries["gate"])]
    order0 = {q: k for k, q in enumerate(dict.fromkeys(summaries[0]["per_query"]["qid"]))}
    queries["_q"] = queries["qid"].map(order0)
    queries["_l"] = [99999 if l == ALL else int(l) for l in queries["layer"]]
    queries["_g"] = [GATE_KINDS.index(g) if g in GATE_KINDS else 9 for g in queries["gate"]]
    queries = queries.sort_values(["_q", "_l", "_g", "run"], kind="stable")
    queries = queries[list(CSV_COLUMNS["gate_compare_queries.csv"])].reset_index(drop=True)
    runs = pd.DataFrame(run_rows, columns=list(CSV_COLUMNS["gate_compare_runs.csv"]))
    layers = pd.DataFrame(layer_rows, columns=list(CSV_COLUMNS["gate_compare_layers.csv"]))
    return runs, layers, queries


def write_compare(output_dir, runs, layers, queries):
    """Write the three CSVs; returns {file name: path}."""
    paths = {}
    for name, df in zip(CSV_COLUMNS, (runs, layers, queries)):
        paths[name] = atomic_write_csv(df, os.path.join(output_dir, name), float_format="%.9g")
    return paths


def plot_compare(runs, layers, queries, output_dir, max_queries=80, gate_ranges=None):
    """Per-layer mean ± spread across runs, and per-query differences vs the first run; returns paths.
    Gate axes and colours cover every run's declared ranges (``gate_ranges``: one {gate name: GateRange}
    per run; default: read from the runs' folders; tanh [-1, 1] for runs that declare none)."""
    from . import plots as P
    plt = P.plt
    if gate_ranges is None:
        gate_ranges = [run_gate_ranges(path) if os.path.isdir(str(path)) else {} for path in runs["path"]]
    per_run = [g or None for g in gate_ranges] or [None]
    out = os.path.join(output_dir, "plots")
    os.makedirs(out, exist_ok=True)
    kinds = [k for k in GATE_KINDS if (layers["gate"] == k).any()]
    run_labels = list(runs["run_label"])
    x = np.arange(len(run_labels))
    fig, axes = plt.subplots(2, len(kinds), figsize=(max(5.5, 1.1 * len(x) + 3) * len(kinds), 7.2),
                             layout=P.LAYOUT, squeeze=False, sharex=True)
    cmap = plt.get_cmap("viridis")
    all_layers = sorted(layers["layer"].unique())
    for j, kind in enumerate(kinds):
        for c, layer in enumerate(all_layers):
            s = layers[(layers["gate"] == kind) & (layers["layer"] == layer)].set_index("run").reindex(x)
            color = cmap(c / max(len(all_layers) - 1, 1))
            axes[0, j].plot(x, s["mean"], "o-", color=color, label=f"layer {layer}")
            axes[0, j].fill_between(x, s["p25"], s["p75"], color=color, alpha=0.15)
            axes[1, j].plot(x, s["std"], "o-", color=color, label=f"layer {layer}: across queries")
            axes[1, j].plot(x, s["mean_within_std"], "x:", color=color)
        sc = P._union_scale([P._scale(None, kind, g) for g in per_run])
        P._value_lim(axes[0, j], sc, layers.loc[layers["gate"] == kind, ["p25", "p75", "mean"]].to_numpy())
        P._zero_line(axes[0, j], sc, axis="y")
        axes[0, j].set_ylabel("mean of per-query mean gate\n(band: IQR over queries)")
        axes[0, j].set_title(P._kind_label(kind, sc.rng), fontsize=10, loc="left")
        axes[0, j].legend(fontsize=7)
        axes[1, j].set_ylim(bottom=0)
        axes[1, j].set_ylabel("spread: std across queries (o)\nmean std within a query (x)")
        axes[1, j].set_xticks(x, run_labels, rotation=25, ha="right", fontsize=8)
        axes[1, j].set_xlabel("run")
    fig.suptitle("Per-layer gates across runs", fontsize=12)
    paths = [P._save(fig, os.path.join(out, PLOT_FILES["layers"]))]

    allq = queries[queries["layer"].astype(str) == ALL]
    if len(allq):
        fig, axes = plt.subplots(1, len(kinds), figsize=(max(5, 0.9 * len(x) + 3.5) * len(kinds),
                                                         P._heatmap_height(min(allq["qid"].nunique(), max_queries))),
                                 layout=P.LAYOUT, squeeze=False)
        for ax, kind in zip(axes[0], kinds):
            sc = P._union_scale([P._scale(None, kind, g) for g in per_run])
            cmap_g, norm, _ = P._cmap_norm(sc)
            mat = allq[allq["gate"] == kind].pivot_table(index="qid", columns="run", values="mean", sort=False)
            if len(mat) > max_queries:
                mat = mat.iloc[P._subsample(len(mat), max_queries)]
            im = ax.imshow(mat.to_numpy(float), aspect="auto", cmap=cmap_g, norm=norm, interpolation="nearest")
            ax.set_xticks(np.arange(mat.shape[1]), [run_labels[r] for r in mat.columns], rotation=25, ha="right",
                          fontsize=8)
            ax.set_yticks(np.arange(len(mat)), [f"qid {q}" for q in mat.index], fontsize=6)
            d = allq[(allq["gate"] == kind) & (allq["run"] == allq["run"].max())]["diff_vs_first"]
            ax.set_title(f"{gate_name(ALL, kind)} per query\nlast vs first run: mean |diff| {d.abs().mean():.3f}",
                         fontsize=9, loc="left")
            P._colorbar(fig, im, ax, sc, "query mean gate")
        fig.suptitle(f"Per-query mean gate in each run ({allq['qid'].nunique()} queries present in all runs)",
                     fontsize=11)
        paths.append(P._save(fig, os.path.join(out, PLOT_FILES["queries"])))
    return paths


def run_compare_job(run_dirs, output_dir, plots=True, log=print):
    """Standalone comparison: CSVs, plots, ``run.json`` (kind "compare") and ``report.html`` in ``output_dir``."""
    t0 = time.time()
    runs, layers, queries = compare_runs(run_dirs)
    files = write_compare(output_dir, runs, layers, queries)
    plot_paths = plot_compare(runs, layers, queries, output_dir) if plots else []
    manifest = {"kind": "compare", "status": "complete",
                "finished": datetime.datetime.now().isoformat(timespec="seconds"),
                "seconds": round(time.time() - t0, 2),
                "runs": [{"label": r.run_label, "path": r.path, "gating_type": r.gating_type} for r in runs.itertuples()],
                "counts": {"runs": len(runs), "common_queries": int(queries["qid"].nunique())},
                "files": {"csv": {k: os.path.relpath(v, output_dir) for k, v in files.items()},
                          "plots": [os.path.relpath(p, output_dir) for p in plot_paths]}}
    write_json(os.path.join(output_dir, "run.json"), manifest)
    from .report import write_report
    report = write_report(output_dir)
    log(f"Compared {len(runs)} runs ({manifest['counts']['common_queries']} queries in all): "
        f"{', '.join(runs['run_label'])}\n  outputs in {output_dir}: {', '.join(files)}, plots/, {os.path.basename(report)}")
    return manifest
