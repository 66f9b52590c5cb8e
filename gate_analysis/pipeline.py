"""The main job: inference with gate capture, streamed to an output folder, then statistics and plots.

    checkpoint + JSONL/features -> qd_detr (rebuild, batch, forward) -> GateRecorder (gates per query)
    -> [worker thread] GateStoreWriter (raw gates, one shard per batch) + GateStatsAccumulator +
       GroundTruthAccumulator (streamed statistics)
    -> [forked process] plots  |  predictions, metrics, CSVs, extended analyses -> report.html, run.json

Gates are not kept in memory: each batch's gates are written as one shard; only per-query summary
rows stay, and predictions wait in ``predictions.partial.jsonl``. ``run.json`` says ``"status":
"running"`` until every output is written, so an interrupted run never looks complete.
"""
import datetime
import functools
import json
import os
import platform
import shutil
import time

import torch

from qd_detr.checkpoint import file_sha256, load_checkpoint
from qd_detr.cli import architecture_options
from qd_detr.dataset import has_labels, read_jsonl
from qd_detr.errors import ConfigError, DataError
from qd_detr.gates import GateRecorder, fusion_gate_kinds, fusion_gate_ranges, fusion_gating_type, fusion_num_layers
from qd_detr.inference import build_dataset, evaluate, iterate_batches, make_batches, resolve_feature_dirs
from qd_detr.model import NoFusionError
from qd_detr.postprocess import submission_lines, write_json, write_jsonl
from qd_detr.research_options import describe_unknown

from .background import OrderedWorker, PlotJob, release_freed_memory
from .ground_truth import GroundTruthAccumulator
from .ranges import DEFAULT_KINDS, TANH, describe_ranges, ranges_as_dict, ranges_from_meta, resolve_ranges
from .stats import GateStatsAccumulator, write_stats_csvs
from .store import GateStoreWriter, iter_shard_queries

__all__ = ["AnalysisConfig", "run_analysis", "load_model_for_analysis", "PREDICTIONS_FILE", "METRICS_FILE"]

PREDICTIONS_FILE = "predictions.jsonl"
PARTIAL_PREDICTIONS_FILE = "predictions.partial.jsonl"
METRICS_FILE = "predictions_metrics.json"
RUN_FILE = "run.json"


class AnalysisConfig(dict):
    """Arguments of one analysis run (a dict with attribute access; stored in run.json)."""
    __getattr__ = dict.get


def load_model_for_analysis(cfg):
    """(model, opt, load report): through the legacy adapter with ``legacy_model``, else strictly."""
    if cfg.legacy_model:
        from legacy_model_adapter import load_legacy_model_with_gate_tracking
        model, opt, report = load_legacy_model_with_gate_tracking(
            cfg.model_path, gating_type=cfg.gating_type, device=cfg.device or "auto",
            trust_pickle=bool(cfg.trust_checkpoint), return_details=True, options=architecture_options(cfg))
        model.fusion.disable_gate_tracking()  # the pipeline attaches its own streaming recorder
    else:
        model, opt, report = load_checkpoint(cfg.model_path, device=cfg.device or "auto",
                                             trust_pickle=bool(cfg.trust_checkpoint), gating_type=cfg.gating_type,
                                             options=architecture_options(cfg))
    model.set_batching(cfg.batching or "query")
    if model.fusion is None:
        raise NoFusionError(f"{cfg.model_path}: the model has no audio-visual fusion module "
                            f"(layout: {model.layout}), so there are no fusion gates to analyse")
    return model, opt, report


def _write_run_json(path, manifest):
    write_json(path, manifest)


# Files a run writes (removed before a fresh run into an --overwrite folder, so nothing stale remains).
_OUTPUT_NAMES = (RUN_FILE, "summary.txt", "report.html", PREDICTIONS_FILE, METRICS_FILE, PARTIAL_PREDICTIONS_FILE,
                 "ablation.csv", "ablation_overall.csv")
_OUTPUT_DIRS = ("plots", "ablation")


def _clear_previous_outputs(out):
    for name in os.listdir(out):
        path = os.path.join(out, name)
        if name in _OUTPUT_DIRS and os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.isfile(path) and (name in _OUTPUT_NAMES or (name.startswith("gate_") and name.endswith(".csv"))):
            os.remove(path)


def _check_resumable(run_json, manifest):
    """The earlier manifest of an interrupted run that ``manifest`` may continue, or an error."""
    if not os.path.isfile(run_json):
        raise ConfigError(f"{run_json}: nothing to resume (no run.json in the output folder)")
    with open(run_json) as fh:
        previous = json.load(fh)
    if previous.get("status") == "complete":
        raise ConfigError(f"{run_json}: the run is already complete; nothing to resume")
    for section, key in (("checkpoint", "sha256"), ("data", "sha256"), ("data", "n_queries"),
                         ("batching", "policy"), ("batching", "n_batches"), ("batching", "batch_size")):
        if previous.get(section, {}).get(key) != manifest[section][key]:
            raise ConfigError(f"{run_json}: cannot resume: {section} {key} was {previous.get(section, {}).get(key)!r}, "
                              f"now {manifest[section][key]!r} (rerun with the same arguments, or --overwrite)")
    manifest["resumed_from"] = previous.get("progress", {})
    return previous


def _read_partial_lines(partial):
    """Prediction lines of the partial file, up to a line cut by an interruption."""
    lines = []
    if os.path.exists(partial):
        with open(partial) as fh:
            for text in fh:
                try:
                    lines.append(json.loads(text))
                except ValueError:
                    break  # a line cut by the interruption: its batch has no shard either
    return lines


def _resume_state(out, partial, acc, gt, previous):
    """(prediction lines, loop stats) of the batches an interrupted run completed; feeds ``acc`` and ``gt``."""
    if previous is None:
        return [], {}
    stored = set()
    for qid, vid, n_clips, gates in iter_shard_queries(out):
        acc.update(qid, gates, vid=vid, n_clips=n_clips)
        gt.add("gate", qid, gates, n_clips=n_clips)
        stored.add(qid)
    lines = [line for line in _read_partial_lines(partial) if line["qid"] in stored]
    write_jsonl(partial, lines)  # drop predictions whose gate shard was never written
    return lines, {"exact_reruns": previous.get("progress", {}).get("exact_reruns", 0)}


def run_analysis(cfg, progress=True, log=print):
    """Run the whole analysis described by ``cfg``; returns the run manifest (also in run.json)."""
    t0 = time.time()
    out = cfg.output_dir
    records = read_jsonl(cfg.data_path)
    if cfg.max_samples is not None:
        if cfg.max_samples <= 0:
            raise ConfigError(f"--max_samples must be positive, got {cfg.max_samples}")
        records = records[:cfg.max_samples]
    subset_info = None
    if cfg.subset:  # --subset FILE: restrict the run to its qids, or (split) compare in/out at the end
        from .performance import apply_subset
        records, subset_info = apply_subset(records, cfg.subset, cfg.subset_mode or "restrict")
    model, opt, load_report = load_model_for_analysis(cfg)
    device = next(model.parameters()).device
    dirs = resolve_feature_dirs(opt, cfg.model_path, cfg.v_feat_dirs, cfg.t_feat_dir, cfg.a_feat_dir)
    dataset = build_dataset(opt, records, dirs, skip_missing=bool(cfg.skip_missing))
    if len(dataset) == 0:
        raise DataError(f"{cfg.data_path}: no query left to analyse (all skipped for missing features)")
    batches = make_batches(dataset, cfg.batching or "query", cfg.batch_size, opt)
    fusion = model.fusion
    gating_type, num_layers = fusion_gating_type(fusion), fusion_num_layers(fusion)
    layers = list(range(num_layers))
    interventions = _check_extended_options(cfg, num_layers, records, fusion_gate_kinds(fusion))
    reproduction = None  # proof against the original run's predictions: file and data checked before the run
    if cfg.legacy_model or cfg.original_predictions:
        from .reproduction import prepare_reproduction
        reproduction = prepare_reproduction(cfg.model_path, opt, dict(cfg), cfg.original_predictions)

    manifest = {
        "status": "running",
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "arguments": {k: v for k, v in cfg.items()},
        "checkpoint": {"path": os.path.abspath(cfg.model_path), "sha256": file_sha256(cfg.model_path),
                       "load_report": load_report},
        "data": {"path": os.path.abspath(cfg.data_path), "sha256": file_sha256(cfg.data_path),
                 "feature_dirs": dirs, "n_records": len(records), "n_queries": len(dataset),
                 "skipped_missing_features": [list(map(str, s)) for s in getattr(dataset, "skipped", [])]},
        "model": {"layout": model.layout, "gating_type": gating_type, "fusion_layers": num_layers,
                  "hidden_dim": model.hidden_dim, "gate_kinds": list(fusion_gate_kinds(fusion))},
        "gate_ranges": ranges_as_dict(fusion_gate_ranges(fusion)),  # declared: thresholds, bins, colours follow
        "batching": {"policy": cfg.batching or "query", "n_batches": len(batches),
                     "batch_size": max(len(b) for b in batches)},
        "environment": {"torch": torch.__version__, "python": platform.python_version(), "device": str(device)},
    }
    run_json = os.path.join(out, RUN_FILE)
    previous = _check_resumable(run_json, manifest) if cfg.resume else None
    if previous is None:
        _clear_previous_outputs(out)
    _write_run_json(run_json, manifest)

    meta = {r["qid"]: r for r in dataset.records}
    kinds = fusion_gate_kinds(model.fusion)
    gate_ranges = fusion_gate_ranges(model.fusion)
    writer = GateStoreWriter(out, gating_type, num_layers, hidden_dim=model.hidden_dim, resume=bool(cfg.resume),
                             overwrite=not cfg.resume, kinds=kinds, gate_ranges=gate_ranges,
                             extra_meta={"model_path": os.path.abspath(cfg.model_path)})
    acc = GateStatsAccumulator(gating_type, layers, kinds=kinds, gate_ranges=gate_ranges)
    gt = GroundTruthAccumulator(dataset.records, gating_type, layers, kinds)
    partial = os.path.join(out, PARTIAL_PREDICTIONS_FILE)
    lines, loop_stats = _resume_state(out, partial, acc, gt, previous)
    done = {line["qid"] for line in lines}
    n_done, lines = len(lines), None  # predictions live in the partial file until the end
    todo = [b for b in batches if not all(dataset.records[i]["qid"] in done for i in b)]
    contrib = _contribution_writer(cfg, out, previous, done)

    def consume(gate_records):
        for rec in gate_records:
            vid = meta[rec.sample_id]["vid"]
            writer.add(rec.sample_id, vid, rec.gates, n_clips=rec.n_clips)
            acc.update(rec.sample_id, rec.gates, vid=vid, n_clips=rec.n_clips)
            gt.add("gate", rec.sample_id, rec.gates, n_clips=rec.n_clips)
            if contrib is not None:
                contrib.add(rec, vid)

    def flush_shard():
        writer.flush()
        release_freed_memory()  # the batch's gate arrays: keeps the peak flat over long runs

    worker = OrderedWorker()  # gate bookkeeping overlaps the next forward pass
    recorder = GateRecorder(fusion, lambda gate_records: worker.submit(consume, gate_records),
                            capture_contributions=contrib is not None)
    try:
        with recorder, open(partial, "a") as partial_fh:
            for metas, inputs, outputs in iterate_batches(
                    model, dataset, todo, device, num_workers=cfg.num_workers or 0, progress=progress,
                    desc="gate analysis", before_forward=lambda metas, _: recorder.set_ids([m["qid"] for m in metas]),
                    suspend=recorder.paused, stats=loop_stats):
                batch_lines = submission_lines(metas, outputs, inputs["src_vid_mask"])
                # predictions first, then the gate shard: a batch counts as done once its shard exists
                partial_fh.writelines(json.dumps(line) + "\n" for line in batch_lines)
                partial_fh.flush()
                os.fsync(partial_fh.fileno())
                worker.submit(flush_shard)
                n_done += len(batch_lines)
                manifest["progress"] = {"queries_done": n_done, "exact_reruns": loop_stats.get("exact_reruns", 0)}
        worker.close()
        writer.close()
        if contrib is not None:
            contrib.finish()
    except BaseException:
        worker.close(cancel=True)  # queued batches are dropped: their shards never exist, so resume redoes them
        if contrib is not None:
            contrib.close()
        manifest.update(status="interrupted", progress={"queries_done": n_done,
                                                        "exact_reruns": loop_stats.get("exact_reruns", 0)})
        _write_run_json(run_json, manifest)
        raise

    lines = _read_partial_lines(partial)
    order = {r["qid"]: i for i, r in enumerate(dataset.records)}
    plots = None
    if not cfg.no_plots:
        compare = cfg.compare_samples
        if compare is not None and len(compare) == 0:
            compare = None  # plot_all picks the top and bottom queries
        missing = [q for q in (compare or []) if q not in order]
        if missing:
            raise ConfigError(f"--compare_samples: qid(s) {missing} are not in {cfg.data_path}")
        examples = None
        if gt.labelled:  # the ground-truth examples need no table: drawn with the main figures
            from .ground_truth import plot_examples
            examples = functools.partial(plot_examples, dataset.records, output_dir=out)
        plots = PlotJob(acc, out, compare, more=examples)  # drawn while the tables below are computed
    try:
        lines.sort(key=lambda line: order[line["qid"]])
        write_jsonl(os.path.join(out, PREDICTIONS_FILE), lines)
        os.remove(partial)
        metrics = evaluate(lines, dataset.records)
        if metrics is not None:
            write_json(os.path.join(out, METRICS_FILE), metrics)
        csvs = write_stats_csvs(acc, out, top_n=cfg.top_n or 10)
        extended = _run_extended_analyses(cfg, model, dataset, batches, device, acc, gt, lines, metrics,
                                          interventions, subset_info, manifest, progress, log)
        plot_paths = plots.result() if plots is not None else []
    finally:
        if plots is not None:
            plots.cancel()

    layer_table = acc.layer_stats()
    manifest.update({
        "status": "complete",
        "finished": datetime.datetime.now().isoformat(timespec="seconds"),
        "seconds": round(time.time() - t0, 2),
        "counts": {"queries": len(lines), "gate_arrays": len(lines) * num_layers * len(kinds),
                   "skipped": len(getattr(dataset, "skipped", [])),
                   "exact_reruns": loop_stats.get("exact_reruns", 0)},
        "metrics_brief": (metrics or {}).get("brief"),
        "has_labels": all(has_labels(r) for r in dataset.records),
        "files": {"predictions": PREDICTIONS_FILE, "metrics": METRICS_FILE if metrics else None,
                  "gates": "gates/", "csv": {k: os.path.relpath(v, out) for k, v in csvs.items()},
                  "plots": [os.path.relpath(p, out) for p in plot_paths]},
    })
    if reproduction is not None:
        manifest["reproduction"] = reproduction.run(model, progress=progress)
    _finish_extended(manifest, extended, out)
    _write_run_json(run_json, manifest)
    summary = format_summary(manifest, layer_table, acc.rankings(n=min(5, cfg.top_n or 10)), out)
    summary += "".join("\n  " + line for line in extended["summary"])
    with open(os.path.join(out, "summary.txt"), "w") as fh:
        fh.write(summary + "\n")
    log(summary)
    return manifest


def format_summary(manifest, layer_table, rankings, out):
    """Short human summary: per-layer mean/std of each gate, what the values mean for this layout (from
    the declared ranges; tanh [-1, 1] when the manifest has none), top/bottom queries, where files are."""
    m = manifest["model"]
    lines = [f"Gate analysis of {manifest['counts']['queries']} queries: {m['layout']} fusion, "
             f"{m['gating_type']} gating, {m['fusion_layers']} layers ({manifest['batching']['policy']} batching)"]
    q = layer_table[layer_table["weighting"] == "query"] if "weighting" in layer_table else layer_table
    for _, row in q.iterrows():
        lines.append(f"  {row['name']:<18} mean {row['mean']:+.4f}  std {row['std']:.4f}  (over per-query means)")
    keys = list(dict.fromkeys(zip(q["layer"].astype(int), q["gate"].astype(str)))) if len(q) else []
    declared = ranges_from_meta(manifest)
    ranges = resolve_ranges(declared, sorted({l for l, _ in keys}), list(dict.fromkeys(k for _, k in keys)))
    if keys:
        note = "" if declared or all(r == TANH for r in ranges.values()) else " (no declared ranges: read as tanh)"
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
                qids = sel[sel["rank_type"] == rank_type]["qid"].tolist()
                if qids:
                    lines.append(f"  {rank_type} queries by mean {kind} gate (all layers): {qids}")
    load_report = manifest.get("checkpoint", {}).get("load_report", {})
    if load_report.get("fusion_variant"):
        opts = ", ".join(f"{k} {v['value']}" for k, v in load_report.get("gate_options", {}).items())
        lines.append(f"  fusion variant {load_report['fusion_variant']}" + (f" ({opts})" if opts else ""))
    lines.append("  " + describe_unknown(load_report.get("unknown_options", [])))
    skipped = manifest["counts"].get("skipped", 0)
    if skipped:
        lines.append(f"  skipped {skipped} queries with missing feature files (listed in run.json)")
    adapter = manifest["checkpoint"]["load_report"].get("legacy_adapter")
    if adapter:
        lines.append("  " + adapter["summary"])
    if manifest.get("reproduction"):
        lines.append("  reproduction " + manifest["reproduction"]["message"])
    lines.append(f"  outputs in {out}: run.json, {PREDICTIONS_FILE}, gate_*.csv, gates/, plots/")
    return "\n".join(lines)


# -- beyond gate values: interventions, contributions, ground truth, performance, comparison ----------
def _check_extended_options(cfg, num_layers, records, kinds=DEFAULT_KINDS):
    """Validate the options of the extended analyses before the main pass; returns the interventions."""
    interventions = []
    if cfg.ablate:
        from .ablation import parse_interventions
        interventions = parse_interventions(cfg.ablate, cfg.ablate_layers, cfg.ablate_gates, num_layers, kinds)
    if cfg.failure_cases and not any(has_labels(r) for r in records):
        raise ConfigError(f"--failure_cases needs labelled queries (relevant_windows); {cfg.data_path} has none")
    return interventions


def _contribution_writer(cfg, out, previous, done):
    """The streaming writer of gate_contributions.csv (``--contributions``), or None."""
    from .ablation import CONTRIBUTIONS_PARTIAL, ContributionWriter
    if not cfg.contributions:
        stale = os.path.join(out, CONTRIBUTIONS_PARTIAL)
        if os.path.exists(stale):
            os.remove(stale)
        return None
    if previous is not None and not (previous.get("arguments") or {}).get("contributions"):
        raise ConfigError("cannot add --contributions when resuming a run started without it "
                          "(rerun with --overwrite, or resume without --contributions)")
    return ContributionWriter(out, keep_qids=done if previous is not None else None)


def _run_extended_analyses(cfg, model, dataset, batches, device, acc, gt, lines, metrics, interventions, subset_info,
                           manifest, progress, log):
    """Contributions, interventions, ground truth, performance link, failure cases, subset split and run
    comparison (each when its options and the data allow). Returns {"analyses", "files", "plots", "summary"}."""
    from . import ablation as AB
    from . import ground_truth as GT
    from . import performance as PF
    from .store import gate_name
    out, records, plots = cfg.output_dir, dataset.records, not cfg.no_plots
    result = {"analyses": {}, "files": {}, "plots": [], "summary": []}
    files, plot_paths, summary, analyses = result["files"], result["plots"], result["summary"], result["analyses"]
    brief = (metrics or {}).get("brief")

    contrib = contrib_summary = None
    if cfg.contributions:
        contrib = AB.load_contributions(out)
        contrib_summary = AB.contribution_summary(contrib)
        files["contributions"] = AB.CONTRIBUTIONS_FILE
        if plots:
            plot_paths += AB.plot_contributions(contrib, out, gate_ranges=acc.gate_ranges)
        t = AB.contrib_layer_table(contrib)
        summary.append("effective contribution (median over clips): " + ", ".join(
            f"{gate_name(r.layer, r.gate)} {r.median:.3g}" for r in t.itertuples()))

    ablation_pq, reference = None, None
    if interventions:
        means = AB.dataset_mean_gates(acc) if any(iv.value == "mean" for iv in interventions) else None
        ablation_pq, ablation_ov, info = AB.run_ablation(
            model, dataset, batches, device, interventions, lines, output_dir=out, gate_means=means,
            seed=cfg.ablate_seed or 0, progress=progress, num_workers=cfg.num_workers or 0, base_brief=brief)
        reference = AB.reference_intervention(interventions).name
        analyses["ablation"] = {"interventions": [iv.name for iv in interventions], "reference": reference,
                                "seed": cfg.ablate_seed or 0, "runs": info}
        files.update(ablation="ablation.csv", ablation_overall="ablation_overall.csv", ablation_predictions="ablation/")
        if plots:
            plot_paths += AB.plot_ablation(ablation_pq, ablation_ov, out, kinds=acc.kinds)
        for iv in interventions:
            b = info[iv.name]["metrics_brief"]
            if b and brief and "MR-full-mAP" in b:
                summary.append(f"ablation {iv.name}: MR-full-mAP {brief['MR-full-mAP']} -> {b['MR-full-mAP']} "
                               f"({b['MR-full-mAP'] - brief['MR-full-mAP']:+.2f}), HL-min-VeryGood-mAP "
                               f"{b.get('HL-min-VeryGood-mAP')} ({info[iv.name]['seconds']} s)")
            else:
                sel = ablation_pq[ablation_pq["intervention"] == iv.name]
                summary.append(f"ablation {iv.name}: top-1 window changed for "
                               f"{int((sel['top1_window_iou_vs_base'] < 1).sum())}/{len(sel)} queries")

    gt.add_contributions(contrib)
    gt_pq, gt_ov, gt_files = gt.write(out)
    if gt_files:
        files.update(ground_truth="gate_ground_truth.csv", ground_truth_overall="gate_ground_truth_overall.csv")
        if plots:
            plot_paths += GT.plot_ground_truth(gt_pq, gt_ov, out, records=records, across=gt.across_queries(),
                                               n_examples=0, gate_ranges=acc.gate_ranges)  # examples: PlotJob
        pooled = gt_ov[(gt_ov["scope"] == "pooled") & (gt_ov["statistic"] == "auroc_inside")
                       & (gt_ov["measure"] == "gate")]
        if len(pooled):
            summary.append("gate AUROC inside vs outside relevant windows (pooled clips): " + ", ".join(
                f"{r.name} {r.value:.3f}" for r in pooled.itertuples()))
        elif gt.gating_type not in ("clipwise", "elementwise"):
            summary.append(f"ground truth: {GT.GLOBAL_NOTE}")
    else:
        summary.append("ground truth and performance link: skipped (the data has no labels)")

    if any(r.get("relevant_windows") for r in records):
        qs = acc.query_stats()
        perf = PF.performance_table(lines, records, qs, contrib_summary, ablation_pq, reference)
        corr = PF.correlation_table(perf, ablation_pq)
        frames = {"gate_performance.csv": perf, "gate_performance_correlations.csv": corr}
        if cfg.failure_cases:
            per_query = perf.drop_duplicates("qid")
            pairs = PF.failure_cases(per_query, cfg.failure_cases)
            frames["gate_failure_pairs.csv"] = pairs
            frames["gate_failure_comparison.csv"] = PF.failure_comparison(pairs, perf)
            analyses["failure_cases"] = {"requested": cfg.failure_cases, "pairs": len(pairs),
                                         "success_top1_iou": PF.SUCCESS_IOU}
            summary.append(f"failure cases: {len(pairs)} of {cfg.failure_cases} worst queries matched to successes "
                           f"(successful queries, top-1 IoU >= {PF.SUCCESS_IOU}: "
                           f"{int((per_query['top1_iou'] >= PF.SUCCESS_IOU).sum())})")
            if plots and len(pairs):
                plot_paths.append(PF.plot_failure_cases(pairs, perf, out, gate_ranges=acc.gate_ranges))
        if subset_info and subset_info["mode"] == "split":
            feats = PF.query_gate_features(qs, contrib_summary)
            comp = PF.subset_comparison(PF.read_subset(cfg.subset), feats, perf, ablation_pq, lines, records)
            frames["gate_subset_comparison.csv"] = comp
            if plots:
                plot_paths.append(PF.plot_subset_comparison(comp, out, os.path.basename(cfg.subset),
                                                            gate_ranges=acc.gate_ranges))
        files.update({k.rsplit(".", 1)[0]: k for k in PF.write_performance(out, frames)})
        if plots and len(perf):
            plot_paths += PF.plot_performance(perf, corr, out, gate_ranges=acc.gate_ranges)
    elif subset_info and subset_info["mode"] == "split":
        feats = PF.query_gate_features(acc.query_stats(), contrib_summary)
        comp = PF.subset_comparison(PF.read_subset(cfg.subset), feats, None, ablation_pq)
        PF.write_performance(out, {"gate_subset_comparison.csv": comp})
        files["gate_subset_comparison"] = "gate_subset_comparison.csv"
    if subset_info:
        analyses["subset"] = subset_info
        summary.append(f"subset {subset_info['mode']}: {subset_info['n_in_data']} listed queries in the data "
                       f"({subset_info['n_missing_from_data']} listed but absent)")

    if cfg.compare_runs:
        from .compare import compare_runs, plot_compare, write_compare
        current = {**manifest, "metrics_brief": brief}
        runs, layers_df, queries = compare_runs(list(cfg.compare_runs) + [out], overrides={out: current})
        files.update({k.rsplit(".", 1)[0]: k for k in write_compare(out, runs, layers_df, queries)})
        if plots:
            plot_paths += plot_compare(runs, layers_df, queries, out)
        summary.append(f"compared with {len(cfg.compare_runs)} earlier run(s): {queries['qid'].nunique()} queries "
                       f"in all runs")
    return result


def _finish_extended(manifest, extended, out):
    """Record the extended analyses in the manifest and write report.html (before run.json is complete)."""
    from .report import write_report
    manifest["analyses"] = extended["analyses"]
    manifest["files"].update(extended["files"])
    manifest["files"]["plots"] += [os.path.relpath(p, out) for p in extended["plots"]]
    manifest["files"]["report"] = "report.html"
    write_report(out, run=manifest)
    extended["summary"].append(f"report: {os.path.join(out, 'report.html')}")
