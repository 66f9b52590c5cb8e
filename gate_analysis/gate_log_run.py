"""An analysis without a model: a gate log of the research code (``gate_analysis.gate_log``) -> ``GateSink``
(gate store, statistics, ground truth) -> CSVs, figures, the performance link (with ``--predictions``),
run.json, summary.txt and report.html, as the main job writes them.

    python run_gate_analysis.py --gate_log gate_logs_val_Nall.jsonl --data_path highlight_val_release.jsonl \\
        [--predictions hl_val_submission.jsonl] --output_dir gate_runs/from_log
    python run_gate_analysis.py --from_run gate_runs/val --export_gate_log gate_runs/val_gate_log.jsonl

A gate log records what the original capture recorded and nothing else; what it lacks is said in
run.json (``source.not_recorded``), summary.txt and the report, never filled in: no declared gate ranges
(every gate is read as tanh [-1, 1], ``ASSUMED_RANGE``), no FiLM shift ``beta`` (the capture hooks only
``(gate_mha, gate_ffn)``), no valid-clip count of per-query gates (taken from the predictions'
saliency lengths when ``--predictions`` is given), no batching, no model outputs.
"""
import datetime
import functools
import os
import platform
import shutil

import numpy as np

from qd_detr.annotations import read_jsonl
from qd_detr.cli import prepare_output_dir, prepare_output_file, stop_on_sigterm
from qd_detr.config import PER_QUERY_GATING_TYPES
from qd_detr.engine import evaluate
from qd_detr.errors import ConfigError, DataError
from qd_detr.gates import GateRange
from qd_detr.io import file_sha256, write_json, write_jsonl

from .analyses import Results, compare_step, ground_truth_step, performance_step
from .gate_log import GateLogReader, export_gate_log
from .manifest import clear_previous_outputs, complete_manifest, run_summary, write_run_json, write_summary
from .outputs import GATES_DIR, METRICS_FILE, PREDICTIONS_FILE, REPORT_FILE
from .pipeline import AnalysisConfig, RunState
from .ranges import ranges_as_dict
from .sink import GateSink

__all__ = ["ASSUMED_RANGE", "MODEL_ONLY_OPTIONS", "check_gate_log_args", "gate_log_main", "run_gate_log_analysis",
           "prepare_export"]

#: How the gates of a log are read: no checkpoint declares their ranges.
ASSUMED_RANGE = GateRange("tanh", -1.0, 1.0, off=0.0,
                          formula="not declared: a gate log has no checkpoint; read as tanh [-1, 1]")
#: Options that need a model, meaningless with --gate_log / --from_run.
MODEL_ONLY_OPTIONS = ("model_path", "demo", "device", "gating_type", "trust_checkpoint", "nheads", "fusion_n_heads",
                      "mha_gate_temp", "ssm_dilations", "ssm_diag_subtract", "v_feat_dirs", "t_feat_dir", "a_feat_dir",
                      "batch_size", "batching", "num_workers", "legacy_model", "original_predictions", "report_only",
                      "ablate", "ablate_layers", "ablate_gates", "ablate_seed", "contributions", "resume")
SHARD_QUERIES = 32  # queries per gate-store shard


class _LoggedQueries:
    """The analysed queries as the analysis steps read a dataset: their JSONL ``records``, none skipped."""

    def __init__(self, records):
        self.records = records
        self.skipped = []

    def __len__(self):
        return len(self.records)


def _flags(names):
    return ", ".join(f"--{n}" for n in names)


def check_gate_log_args(args, parser):
    """ConfigError for options that contradict --gate_log / --from_run / --predictions (``parser``: for
    the defaults of the model-only options)."""
    if args.predictions and not args.gate_log:
        raise ConfigError("--predictions goes with --gate_log (a run with a model computes its own predictions)")
    given = [n for n in MODEL_ONLY_OPTIONS if hasattr(args, n) and getattr(args, n) != parser.get_default(n)]
    if args.from_run:
        if not args.export_gate_log:
            raise ConfigError("--from_run DIR needs --export_gate_log FILE (the gate log to write)")
        if args.gate_log or given:
            raise ConfigError(f"--from_run only exports an output folder's gates: drop "
                              f"{_flags(['gate_log'] * bool(args.gate_log) + given)}")
        return
    if given:
        raise ConfigError(f"--gate_log analyses logged gates without a model (and is not resumable): drop "
                          f"{_flags(given)}, which have no effect with it")
    if not args.data_path:
        raise ConfigError("--gate_log needs --data_path JSONL (the vids and labels of the logged queries)")
    if args.max_samples is not None and args.max_samples <= 0:
        raise ConfigError(f"--max_samples must be a positive number of queries, got {args.max_samples}")
    if args.failure_cases and not args.predictions:
        raise ConfigError("--failure_cases with --gate_log needs --predictions FILE (top-1 IoU per query)")
    if args.subset_mode == "split" and not (args.subset and args.predictions):
        raise ConfigError("--subset_mode split with --gate_log needs --subset FILE and --predictions FILE")


def prepare_export(args):
    """The checked path of ``--export_gate_log`` on a run with a model (written once the run is complete)."""
    if args.report_only:
        raise ConfigError("--export_gate_log with --report_only: use --from_run DIR --export_gate_log FILE")
    if args.compare_runs and not (args.model_path or args.data_path or args.demo or args.gate_log):
        raise ConfigError("--export_gate_log with --compare_runs alone: a comparison has no gates to export")
    return prepare_output_file(args.export_gate_log, overwrite=args.overwrite)


def gate_log_main(args, parser, log=print):
    """The ``run_gate_analysis.py`` entry for --gate_log (import) and --from_run (export); exit code."""
    check_gate_log_args(args, parser)
    if args.from_run:
        target = prepare_export(args)
        info = export_gate_log(args.from_run, target, progress=not args.quiet)
        log(f"wrote {info['n_records']} records ({info['gating_type']} gating, {', '.join(info['keys'])}) to {target}")
        return 0
    target = prepare_export(args) if args.export_gate_log else None
    if args.output_dir is None:
        stem = os.path.splitext(os.path.basename(args.gate_log))[0]
        args.output_dir = os.path.join("gate_analysis_results", f"{stem}_{datetime.datetime.now():%Y%m%d_%H%M%S}")
    created = not os.path.exists(args.output_dir)
    args.output_dir = prepare_output_dir(args.output_dir, overwrite=args.overwrite)
    try:
        with stop_on_sigterm():
            run_gate_log_analysis(AnalysisConfig(vars(args)), progress=not args.quiet, log=log)
    except BaseException:
        _remove_partial(args.output_dir, created)
        raise
    if target is not None:
        info = export_gate_log(args.output_dir, target, progress=not args.quiet)
        log(f"gate log: {info['n_records']} records written to {target}")
    return 0


def _remove_partial(out, created):
    """What a failed or stopped gate-log run wrote (it cannot be resumed: rerun it)."""
    if created:
        shutil.rmtree(out, ignore_errors=True)
    elif os.path.isdir(out):
        clear_previous_outputs(out)
        shutil.rmtree(os.path.join(out, GATES_DIR), ignore_errors=True)


# -- the run -------------------------------------------------------------------------------------------
def _read_inputs(cfg):
    """(JSONL records, {qid: prediction line} or None, subset info, the qids --subset keeps or None)."""
    records = read_jsonl(cfg.data_path)
    predictions = None
    if cfg.predictions:
        from .reproduction import read_original_predictions
        predictions = {line["qid"]: line for line in read_original_predictions(cfg.predictions)}
    info, keep = None, None
    if cfg.subset:
        from .performance import apply_subset
        kept, info = apply_subset(records, cfg.subset, cfg.subset_mode or "restrict")
        keep = {r["qid"] for r in kept}
    return records, predictions, info, keep


def _stream(cfg, reader, records, predictions, keep, out):
    """Every logged query into a ``GateSink``: (sink, analysed qids in log order, skipped qids, n not in subset)."""
    by_qid = {r["qid"]: r for r in records}
    sink, analysed, skipped, outside = None, [], [], 0
    for entry in reader:
        rec = by_qid.get(entry.qid)
        if rec is None:
            if not cfg.skip_missing:
                raise DataError(f"{reader.path}: line {entry.lineno}: qid {entry.qid} is not in {cfg.data_path} "
                                "(the data of another split?); pass --skip_missing to skip such queries")
            skipped.append(entry.qid)
            continue
        if keep is not None and entry.qid not in keep:
            outside += 1
            continue
        if entry.vid and rec.get("vid") and entry.vid != rec["vid"]:
            raise DataError(f"{reader.path}: line {entry.lineno}: qid {entry.qid} has vid {entry.vid!r}, but "
                            f"{cfg.data_path} says {rec['vid']!r} (another data file?)")
        n_clips = entry.n_clips
        if predictions is not None:
            line = predictions.get(entry.qid)
            if line is None:
                raise DataError(f"{cfg.predictions}: no prediction for qid {entry.qid} (line {entry.lineno} of "
                                f"{reader.path}); the predictions must be those of the logged run")
            if n_clips is None and reader.layout.gating_type in PER_QUERY_GATING_TYPES:
                n_clips = len(line["pred_saliency_scores"])  # one saliency score per valid clip
        if sink is None:
            lay = reader.layout
            ranges = {(layer, kind): ASSUMED_RANGE for layer in range(lay.num_layers) for kind in lay.kinds}
            sink = GateSink(out, lay.gating_type, lay.num_layers, kinds=lay.kinds, gate_ranges=ranges,
                            hidden_dim=lay.hidden_dim, records=records, overwrite=True,
                            extra_meta={"source": "gate log", "gate_log": os.path.abspath(reader.path),
                                        "gate_ranges_declared": False})
        sink.add(entry.qid, entry.vid or rec.get("vid", ""), entry.gates, n_clips=n_clips)
        analysed.append(entry.qid)
        if len(analysed) % SHARD_QUERIES == 0:
            sink.flush()
        if cfg.max_samples and len(analysed) >= cfg.max_samples:
            break
    if sink is None:
        raise DataError(f"{reader.path}: no logged query left to analyse ({len(skipped)} not in {cfg.data_path}, "
                        f"{outside} outside --subset)")
    sink.close()
    return sink, analysed, skipped, outside


def _not_recorded(layout, predictions, n_clips_known):
    """What the gate log does not hold, one sentence each."""
    notes = []
    if "beta" not in layout.kinds:
        notes.append("gate_beta: the original capture records only the gating function's (gate_mha, gate_ffn); "
                     "a v2 FiLM model's shift beta is not in the log (and its gate_ffn then weights the FFN branch "
                     "by 1 + g, which the log does not say)")
    notes.append("gate ranges: not declared without the checkpoint; thresholds (frac_*), histogram bins and colours "
                 "read every gate as tanh [-1, 1] (v2 and diagstrip MHA gates are sigmoids in (0, scale) in the "
                 "research code)")
    if layout.gating_type in PER_QUERY_GATING_TYPES and not n_clips_known:
        notes.append("n_clips: per-query gates do not show the valid clips (-1 in the CSVs; the ground truth has no "
                     "fraction of relevant clips); --predictions supplies them")
    if predictions is None:
        notes.append("predictions and metrics: not in a gate log; pass --predictions FILE (e.g. the run's "
                     "hl_val_submission.jsonl) for the metrics and the performance link")
    notes.append("model: no model ran, so no effective contributions, interventions, reproduction or batching "
                 "(the research code's inference.py batches eval_bsz queries in file order: --batching original)")
    return notes


def _observed(acc):
    """{gate name: {min, max, outside_assumed}} of the clip-weighted statistics."""
    table = acc.layer_stats()
    rows = table[table["weighting"] == "clip"]
    return {r.name: {"min": float(r.min), "max": float(r.max),
                     "outside_assumed_range": int(r.n_underflow) + int(r.n_overflow)} for r in rows.itertuples()}


def run_gate_log_analysis(cfg, progress=True, log=print):
    """The model-less analysis of ``cfg.gate_log`` into ``cfg.output_dir`` (an empty or cleared folder);
    returns the manifest (also in run.json)."""
    started = datetime.datetime.now()
    t0 = started.timestamp()
    out = cfg.output_dir
    records, predictions, subset_info, keep = _read_inputs(cfg)
    reader = GateLogReader(cfg.gate_log, progress=progress)
    if cfg.compare_runs:
        from .compare import check_run_dirs
        check_run_dirs(cfg.compare_runs, out)
    clear_previous_outputs(out)
    sink, analysed, skipped, outside = _stream(cfg, reader, records, predictions, keep, out)
    lay, acc = reader.layout, sink.stats
    chosen = set(analysed)
    queries = [r for r in records if r["qid"] in chosen]  # data order, as the main job keeps them
    missing = [q for q in (cfg.compare_samples or []) if q not in chosen]
    if missing:
        raise ConfigError(f"--compare_samples: qid(s) {missing} are not among the analysed queries of {cfg.gate_log}")
    csvs = sink.write_csvs(top_n=cfg.top_n or 10)
    lines, metrics = None, None
    if predictions is not None:
        lines = [predictions[r["qid"]] for r in queries]
        write_jsonl(os.path.join(out, PREDICTIONS_FILE), lines)
        metrics = evaluate(lines, queries)
        if metrics is not None:
            write_json(os.path.join(out, METRICS_FILE), metrics)
    n_clips_known = lay.has_n_clips or predictions is not None
    source = {"kind": "gate log", "path": os.path.abspath(cfg.gate_log), "sha256": file_sha256(cfg.gate_log),
              "model_ran": False, "n_records_read": reader.n_records, "n_analysed": len(analysed),
              "stopped_at_max_samples": bool(cfg.max_samples and len(analysed) >= cfg.max_samples),
              "skipped_missing_from_data": skipped, "outside_subset": outside,
              "optional_keys": [k for k, on in (("gate_beta", "beta" in lay.kinds), ("n_clips", lay.has_n_clips)) if on],
              "gate_ranges_declared": False, "gate_ranges_assumed": "tanh [-1, 1] for every gate",
              "observed_ranges": _observed(acc),
              "predictions": None if predictions is None else {
                  "path": os.path.abspath(cfg.predictions), "sha256": file_sha256(cfg.predictions),
                  "n_lines": len(predictions), "n_used": len(lines)},
              "not_recorded": _not_recorded(lay, predictions, n_clips_known)}
    manifest = {
        "status": "running", "started": started.isoformat(timespec="seconds"), "kind": "gate log import",
        "arguments": {k: v for k, v in cfg.items() if k not in MODEL_ONLY_OPTIONS}, "source": source,
        "checkpoint": {"path": None, "sha256": None, "load_report": {}, "note": "no model ran: gates from the gate log"},
        "data": {"path": os.path.abspath(cfg.data_path), "sha256": file_sha256(cfg.data_path), "feature_dirs": None,
                 "n_records": len(records), "n_queries": len(analysed), "skipped_missing_features": []},
        "model": {"layout": "unknown", "gating_type": lay.gating_type, "fusion_layers": lay.num_layers,
                  "hidden_dim": lay.hidden_dim, "gate_kinds": list(lay.kinds)},
        "gate_ranges": ranges_as_dict(sink.store.gate_ranges),
        "batching": {"policy": "unrecorded", "n_batches": None, "batch_size": None},
        "environment": {"python": platform.python_version(), "numpy": np.__version__},
    }
    write_run_json(out, manifest, "running")
    run = RunState(cfg, progress=False, log=log)
    run.records, run.dataset, run.sink, run.lines, run.metrics = queries, _LoggedQueries(queries), sink, lines, metrics
    run.subset_info, run.manifest, run.csvs = subset_info, manifest, csvs
    plots = []
    if run.plots:
        examples = None
        if sink.ground_truth.labelled:
            from .plots_ground_truth import plot_examples
            examples = functools.partial(plot_examples, queries, output_dir=out)
        plots = sink.plot(compare_qids=cfg.compare_samples or None, more=examples)
    res = Results()
    ground_truth_step(run, res)
    if lines is not None:
        performance_step(run, res)
    compare_step(run, res)
    files = {"predictions": PREDICTIONS_FILE if lines is not None else None, "metrics": METRICS_FILE if metrics else None,
             "gates": GATES_DIR + "/", "csv": {k: os.path.relpath(v, out) for k, v in csvs.items()},
             "plots": [os.path.relpath(p, out) for p in plots + res.plots], **res.files, "report": REPORT_FILE}
    complete_manifest(manifest, t0, analysed, lay.num_layers, lay.kinds, run.dataset, {}, metrics, files)
    manifest["counts"].pop("exact_reruns", None)
    manifest["query_dependence"] = acc.query_dependence()
    manifest["analyses"] = res.analyses
    manifest["analysis_summary"] = _summary_lines(source, cfg) + list(res.summary)
    from .report import write_report
    write_report(out, run=manifest, lanes=sink.lanes)
    summary = run_summary(manifest, acc.layer_stats(), acc.rankings(n=min(5, cfg.top_n or 10)), out)
    write_summary(out, summary)
    write_run_json(out, manifest, "complete")
    log(summary)
    return manifest


def _summary_lines(source, cfg):
    stop = f" (stopped at --max_samples {cfg.max_samples})" if source["stopped_at_max_samples"] else ""
    lines = [f"source: gate log {source['path']} (sha256 {source['sha256'][:12]}...), no model ran; "
             f"{source['n_analysed']} of the {source['n_records_read']} records read analysed{stop}"]
    if source["skipped_missing_from_data"]:
        lines.append(f"skipped {len(source['skipped_missing_from_data'])} logged queries whose qid is not in "
                     f"{cfg.data_path} (--skip_missing; listed in run.json)")
    outside = {name: r["outside_assumed_range"] for name, r in source["observed_ranges"].items()
               if r["outside_assumed_range"]}
    if outside:
        lines.append("values outside the assumed range [-1, 1] (histogram under/overflow, never clipped): " +
                     ", ".join(f"{k} {v}" for k, v in outside.items()))
    lines += [f"not in the gate log: {note}" for note in source["not_recorded"]]
    if source["predictions"] is None:
        lines.append("performance link: skipped (no --predictions)")
    return lines
