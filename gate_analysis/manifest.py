"""``run.json`` and ``summary.txt`` of an analysis run: what the run is (arguments, checkpoint, data,
model, batching, environment), its status, and resuming an interrupted run.

``run.json`` is written by ``write_run_json`` alone, with one of three statuses: ``"running"`` from
the start of the main pass until every output is written, ``"interrupted"`` when a step stops
(Ctrl-C, bad data) and ``"complete"`` last, so an interrupted or failed run never looks complete.
``--resume`` continues a run in either unfinished state (also after a kill, which leaves "running").
"""
import datetime
import json
import os
import platform
import shutil
import time

import numpy as np
import torch

from qd_detr.annotations import has_labels
from qd_detr.errors import ConfigError
from qd_detr.gates import fusion_gate_kinds, fusion_gate_ranges, fusion_gating_type, fusion_num_layers
from qd_detr.io import TMP_PREFIX, file_sha256, write_json, write_text
from qd_detr.research_options import describe_unknown

from .outputs import GATES_DIR, PREDICTIONS_FILE, REPORT_FILE, RUN_FILE, RUN_OUTPUT_DIRS, SUMMARY_FILE, is_run_output
from .ranges import TANH, describe_ranges, ranges_as_dict, ranges_from_meta, resolve_ranges

__all__ = ["STATUSES", "query_dependence_text", "new_manifest", "write_run_json", "read_resumable", "check_resumable",
           "remove_stale_files", "clear_previous_outputs", "complete_manifest", "format_summary", "run_summary",
           "write_summary"]

STATUSES = ("running", "interrupted", "complete")
# what must be equal for an interrupted run to be continued: (section, key) of run.json
_RESUME_KEYS = (("checkpoint", "sha256"), ("data", "sha256"), ("data", "n_queries"),
                ("batching", "policy"), ("batching", "n_batches"), ("batching", "batch_size"))


def _now():
    return datetime.datetime.now().isoformat(timespec="seconds")


def new_manifest(cfg, model, load_report, dirs, records, dataset, batches):
    """The manifest of a run about to start (status ``"running"``)."""
    fusion = model.fusion
    return {
        "status": "running",
        "started": _now(),
        "arguments": {k: v for k, v in cfg.items()},
        "checkpoint": {"path": os.path.abspath(cfg.model_path), "sha256": file_sha256(cfg.model_path),
                       "load_report": load_report},
        "data": {"path": os.path.abspath(cfg.data_path), "sha256": file_sha256(cfg.data_path),
                 "feature_dirs": dirs, "n_records": len(records), "n_queries": len(dataset),
                 "skipped_missing_features": [list(map(str, s)) for s in getattr(dataset, "skipped", [])]},
        "model": {"layout": model.layout, "gating_type": fusion_gating_type(fusion),
                  "fusion_layers": fusion_num_layers(fusion), "hidden_dim": model.hidden_dim,
                  "gate_kinds": list(fusion_gate_kinds(fusion))},
        "gate_ranges": ranges_as_dict(fusion_gate_ranges(fusion)),  # declared: thresholds, bins, colours follow
        "batching": {"policy": cfg.batching or "query", "n_batches": len(batches),
                     "batch_size": max(len(b) for b in batches)},
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "device": str(next(model.parameters()).device)},
    }


def write_run_json(output_dir, manifest, status=None, **updates):
    """Write ``run.json`` (the only writer): ``manifest`` updated with ``status`` (one of ``STATUSES``) and
    ``updates`` first. Returns its path."""
    if status is not None:
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        manifest["status"] = status
    manifest.update(updates)
    return write_json(os.path.join(output_dir, RUN_FILE), manifest)


def read_resumable(output_dir, contributions=False):
    """The manifest of the interrupted run in ``output_dir`` that ``--resume`` may continue, or None when the
    run stopped before it wrote run.json (it then simply starts); ConfigError when the run is complete, or
    ``contributions`` is asked for a run started without them. The run may have stopped in any step
    (Ctrl-C, a kill, a crash): run.json then says "interrupted" or still "running"."""
    run_json = os.path.join(output_dir, RUN_FILE)
    if not os.path.isfile(run_json):
        return None
    try:
        with open(run_json) as fh:
            previous = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{run_json}: cannot resume: unreadable run.json ({exc}); rerun with --overwrite") from None
    if previous.get("status") == "complete":
        raise ConfigError(f"{run_json}: the run is already complete; nothing to resume")
    if contributions and not (previous.get("arguments") or {}).get("contributions"):
        raise ConfigError("cannot add --contributions when resuming a run started without it "
                          "(rerun with --overwrite, or resume without --contributions)")
    return previous


def check_resumable(output_dir, previous, manifest):
    """ConfigError unless ``manifest`` (this run) may continue ``previous``; records ``resumed_from``."""
    run_json = os.path.join(output_dir, RUN_FILE)
    for section, key in _RESUME_KEYS:
        if previous.get(section, {}).get(key) != manifest[section][key]:
            raise ConfigError(f"{run_json}: cannot resume: {section} {key} was {previous.get(section, {}).get(key)!r}, "
                              f"now {manifest[section][key]!r} (rerun with the same arguments, or --overwrite)")
    manifest["resumed_from"] = previous.get("progress") or {}


def remove_stale_files(output_dir):
    """Remove the temporary files (``qd_detr.io.TMP_PREFIX``) that writes cut short by a kill left in the output
    folder and its run folders."""
    folders = [output_dir] + [os.path.join(output_dir, d) for d in (*RUN_OUTPUT_DIRS, GATES_DIR)]
    for folder in folders:
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            if name.startswith(TMP_PREFIX):
                path = os.path.join(folder, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def clear_previous_outputs(output_dir):
    """Remove what an earlier run wrote into ``output_dir`` (``outputs.RUN_OUTPUT_FILES``, every ``gate_*.csv``
    and the plots and ablation folders), so nothing stale remains after a fresh run."""
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if name in RUN_OUTPUT_DIRS and os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.isfile(path) and is_run_output(name):
            os.remove(path)


def complete_manifest(manifest, started, lines, num_layers, kinds, dataset, loop_stats, metrics, files):
    """Add what a finished run records: times, counts, the brief metrics, labels and the file map."""
    manifest.update({
        "status": "complete",
        "finished": _now(),
        "seconds": round(time.time() - started, 2),
        "counts": {"queries": len(lines), "gate_arrays": len(lines) * num_layers * len(kinds),
                   "skipped": len(getattr(dataset, "skipped", [])),
                   "exact_reruns": loop_stats.get("exact_reruns", 0)},
        "metrics_brief": (metrics or {}).get("brief"),
        "has_labels": all(has_labels(r) for r in dataset.records),
        "files": files,
    })
    return manifest


def query_dependence_text(check, batching=None):
    """One sentence on whether the run's gates depend on the query (``GateStatsAccumulator.query_dependence``)."""
    several, differing = check["videos_with_several_queries"], check["videos_with_query_dependent_gates"]
    if several == 0:
        return ("every video has one query in this run, so whether gates depend on the query cannot be checked; "
                "statistics count each video once")
    if not differing:
        return (f"gates depend on the video only: each of the {several} videos with several queries got the same "
                f"gates for all its queries (largest difference {check['max_relative_difference']:.1e} of the "
                "gate range, float rounding); statistics, rankings and heatmaps count each video once")
    why = (" (--batching original: queries are batched with other videos, and batch padding changes the gates: "
           "the gates are batch-dependent)" if batching == "original" else "")
    return (f"gates differ between the queries of one video in {differing} of {several} videos (largest difference "
            f"{check['max_relative_difference']:.2g} of the gate range){why}; such a video counts once per distinct "
            "set of gates")


def format_summary(manifest, layer_table, rankings, out):
    """Short human summary: per-layer mean/std of each gate, what the values mean for this layout (from
    the declared ranges; tanh [-1, 1] when the manifest has none), top/bottom queries, where files are."""
    m = manifest["model"]
    lines = [f"Gate analysis of {manifest['counts']['queries']} queries: {m['layout']} fusion, "
             f"{m['gating_type']} gating, {m['fusion_layers']} layers ({manifest['batching']['policy']} batching)"]
    q = layer_table[layer_table["weighting"] == "video"] if "weighting" in layer_table else layer_table
    if manifest.get("query_dependence"):
        lines.append(f"  {query_dependence_text(manifest['query_dependence'], manifest['batching']['policy'])}")
    for _, row in q.iterrows():
        lines.append(f"  {row['name']:<18} mean {row['mean']:+.4f}  std {row['std']:.4f}  (over per-video means)")
    for kind in dict.fromkeys(q["gate"]) if len(q) else []:  # over all layers: opposite signs must not cancel
        means = q[q["gate"] == kind]["mean"].to_numpy(float)
        if len(means) > 1:
            signs = ("signs differ between layers and cancel in the latter" if (means > 0).any() and (means < 0).any()
                     else "the same sign in every layer")
            lines.append(f"  {'all layers gate_' + kind:<18} mean |layer mean| {np.abs(means).mean():.4f}  "
                         f"(mean of the layer means {means.mean():+.4f}: {signs})")
    keys = list(dict.fromkeys(zip(q["layer"].astype(int), q["gate"].astype(str)))) if len(q) else []
    declared = ranges_from_meta(manifest)
    ranges = resolve_ranges(declared, sorted({l for l, _ in keys}), list(dict.fromkeys(k for _, k in keys)))
    if keys:
        note = "" if declared or all(r == TANH for r in ranges.values()) else " (no declared ranges: read as tanh)"
        if (manifest.get("source") or {}).get("gate_ranges_declared") is False:
            note = " (not declared in a gate log: read as tanh [-1, 1])"
        lines.append(f"  reading the gates{note} (thresholds: 10% of each gate's range):")
        lines += [f"    {line}" for line in describe_ranges({k: ranges[k] for k in keys})]
    if manifest.get("metrics_brief"):
        b = manifest["metrics_brief"]
        lines.append("  metrics: " + ", ".join(f"{k} {b[k]}" for k in ("MR-full-mAP", "MR-full-R1@0.5",
                                                                         "HL-min-VeryGood-mAP") if k in b))
    if rankings is not None and len(rankings):
        overall = rankings[rankings["layer"].astype(str) == "all"]
        for kind in dict.fromkeys(overall["gate"]):
            sel = overall[overall["gate"] == kind]
            for rank_type in ("top", "bottom"):
                vids = sel[sel["rank_type"] == rank_type]["vid"].tolist()
                if vids:
                    lines.append(f"  {rank_type} videos by mean |{kind} gate| over layers: {', '.join(vids)}")
    load_report = manifest.get("checkpoint", {}).get("load_report", {})
    if load_report.get("fusion_variant"):
        opts = ", ".join(f"{k} {v['value']}" for k, v in load_report.get("gate_options", {}).items())
        lines.append(f"  fusion variant {load_report['fusion_variant']}" + (f" ({opts})" if opts else ""))
    if manifest.get("checkpoint", {}).get("path"):  # a gate-log run has no checkpoint, hence no saved options
        lines.append("  " + describe_unknown(load_report.get("unknown_options", [])))
    skipped = manifest["counts"].get("skipped", 0)
    if skipped:
        lines.append(f"  skipped {skipped} queries with missing feature files (listed in run.json)")
    adapter = manifest["checkpoint"]["load_report"].get("legacy_adapter")
    if adapter:
        lines.append("  " + adapter["summary"])
    if manifest.get("reproduction"):
        lines.append("  reproduction " + manifest["reproduction"]["message"])
    lines.append(f"  outputs in {out}: {REPORT_FILE} (open it first), {RUN_FILE}, {PREDICTIONS_FILE}, gate_*.csv, "
                 "gates/, plots/")
    return "\n".join(lines)


def write_summary(output_dir, text):
    """Write ``summary.txt`` atomically (``text`` plus a final newline); returns its path."""
    return write_text(os.path.join(output_dir, SUMMARY_FILE), text + "\n")


def run_summary(manifest, layer_table, rankings, out):
    """summary.txt: ``format_summary``, the analyses' lines (``manifest["analysis_summary"]``) and, last, the
    report to open first."""
    summary = format_summary(manifest, layer_table, rankings, out)
    summary += "".join("\n  " + line for line in manifest.get("analysis_summary") or [])
    return summary + f"\n  report: {os.path.join(out, REPORT_FILE)}"
