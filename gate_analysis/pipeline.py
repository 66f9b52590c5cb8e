"""The main job: inference with gate capture, streamed to an output folder, then statistics, the extended
analyses and the report. ``run_analysis`` runs ``STEPS`` in order on one ``RunState``:

    check_arguments     every option that needs no model (data, --subset, --compare_samples, --ablate
                        syntax, --compare_runs folders, --original_predictions, --resume)
    load_model          checkpoint -> model (strict; through the legacy adapter with --legacy_model)
    build_batches       JSONL + features -> dataset -> batches
    check_model_options the options that need the model (--ablate layers and gates, reproduction file)
    start_run           run.json "running" (an earlier run's outputs cleared, or its progress resumed)
    capture_gates       the main pass: qd_detr (forward) -> GateRecorder -> [worker thread] GateSink
                        (gate store + statistics + ground truth); run.json "interrupted" when it stops
    start_plots         [forked process] the gate figures, drawn while the steps below run
    write_predictions   predictions.jsonl, predictions_metrics.json
    write_statistics    gate_*.csv of the statistics
    run_analyses        contributions, ablation, ground truth, performance, comparison (gate_analysis.analyses)
    finish_run          reproduction, report.html, run.json "complete", summary.txt

Gates are not kept in memory: each batch's gates are written as one shard; only per-query summary
rows stay, and predictions wait in ``predictions.partial.jsonl``. ``run.json`` says ``"status":
"running"`` until every output is written, so an interrupted run never looks complete.
"""
import contextlib
import functools
import json
import os
import sys
import time
from dataclasses import dataclass, field

from tqdm import tqdm

from qd_detr.annotations import has_labels, read_jsonl
from qd_detr.batching import make_batches
from qd_detr.checkpoint import load_checkpoint
from qd_detr.cli import architecture_options
from qd_detr.dataset import build_dataset
from qd_detr.engine import evaluate, iterate_batches
from qd_detr.errors import ConfigError, DataError, NoFusionError
from qd_detr.features import resolve_feature_dirs
from qd_detr.gates import (
    GATE_KINDS,
    GateRecorder,
    fusion_gate_kinds,
    fusion_gate_ranges,
    fusion_gating_type,
    fusion_num_layers,
)
from qd_detr.io import write_json, write_jsonl
from qd_detr.postprocess import submission_lines

from .analyses import EXTENDED_STEPS, run_extended_analyses
from .background import FigurePool, OrderedWorker, release_freed_memory
from .contributions import ContributionWriter
from .manifest import (
    check_resumable,
    clear_previous_outputs,
    complete_manifest,
    format_summary,
    new_manifest,
    read_resumable,
    remove_stale_files,
    run_summary,
    write_run_json,
    write_summary,
)
from .outputs import (
    CONTRIBUTIONS_FILE,
    CONTRIBUTIONS_PARTIAL,
    GATES_DIR,
    METRICS_FILE,
    PARTIAL_PREDICTIONS_FILE,
    PREDICTIONS_FILE,
    REPORT_FILE,
)
from .performance import QueryMetrics
from .sink import GateSink

__all__ = ["AnalysisConfig", "RunState", "run_analysis", "load_model_for_analysis", "STEPS", "check_arguments",
           "load_model", "build_batches", "check_model_options", "start_run", "capture_gates", "start_plots",
           "write_predictions", "write_statistics", "run_analyses", "finish_run", "format_summary",
           "PREDICTIONS_FILE", "METRICS_FILE"]


class AnalysisConfig(dict):
    """Arguments of one analysis run (a dict with attribute access; stored in run.json)."""
    __getattr__ = dict.get


@dataclass
class RunState:
    """What the steps of one run hand to each other; each step fills in its part."""
    cfg: AnalysisConfig
    progress: bool = True
    log: object = print
    started: float = field(default_factory=time.time)
    records: list = None        # check_arguments: the JSONL records to analyse (--max_samples, --subset)
    subset_info: dict = None    # --subset: what apply_subset found
    previous: dict = None       # --resume: the interrupted run's manifest
    model: object = None        # load_model
    opt: object = None
    load_report: dict = None
    device: object = None
    feature_dirs: dict = None   # build_batches
    dataset: object = None
    batches: list = None
    batches_todo: list = None   # start_run: the batches still to run (all but those a resumed run completed)
    interventions: list = field(default_factory=list)  # check_model_options
    reproduction: object = None
    manifest: dict = None       # start_run
    sink: GateSink = None
    contributions: ContributionWriter = None
    loop_stats: dict = field(default_factory=dict)     # capture_gates
    n_done: int = 0
    query_metrics: object = None  # capture_gates: performance.QueryMetrics of the predicted lines
    lines: list = None          # write_predictions
    metrics: dict = None
    csvs: dict = None           # write_statistics
    figure_pool: object = None  # load_model: the figure processes (background.FigurePool) until start_plots
    plot_job: object = None     # start_plots
    plot_paths: list = field(default_factory=list)
    results: object = None      # run_analyses: analyses.Results
    complete: bool = False      # finish_run: run.json says "complete"

    phase_bar: object = None    # the progress bar of the steps after the main pass

    @contextlib.contextmanager
    def phase(self, label):
        """One step after the main pass: named on the progress bar while it runs, counted when it ends."""
        if self.phase_bar is not None:
            self.phase_bar.set_description(label)
        yield
        if self.phase_bar is not None:
            self.phase_bar.update(1)

    @property
    def out(self):
        return self.cfg.output_dir

    @property
    def plots(self):
        return not self.cfg.no_plots

    @property
    def brief(self):
        return (self.metrics or {}).get("brief")

    @property
    def fusion(self):
        return self.model.fusion


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


# -- before the model ---------------------------------------------------------------------------------
def _compare_qids(cfg):
    """The --compare_samples ids, or None (no ids: plot_all picks the top and bottom queries)."""
    return cfg.compare_samples or None


def _check_compare_samples(cfg, records, why="are not in"):
    missing = [q for q in (_compare_qids(cfg) or []) if q not in {r["qid"] for r in records}]
    if missing:
        raise ConfigError(f"--compare_samples: qid(s) {missing} {why} {cfg.data_path}")


def check_arguments(run):
    """Read the data and check every option that needs no model, so a mistake stops the run before the
    checkpoint is loaded."""
    cfg = run.cfg
    records = read_jsonl(cfg.data_path)
    if cfg.max_samples is not None:
        if cfg.max_samples <= 0:
            raise ConfigError(f"--max_samples must be positive, got {cfg.max_samples}")
        records = records[:cfg.max_samples]
    if cfg.subset:  # --subset FILE: restrict the run to its qids, or (split) compare in/out at the end
        from .performance import apply_subset
        records, run.subset_info = apply_subset(records, cfg.subset, cfg.subset_mode or "restrict")
    run.records = records
    _check_compare_samples(cfg, records)
    if cfg.failure_cases and not any(has_labels(r) for r in records):
        raise ConfigError(f"--failure_cases needs labelled queries (relevant_windows); {cfg.data_path} has none")
    if cfg.ablate:
        from .interventions import parse_interventions, swap_sources
        parse_interventions(cfg.ablate, cfg.ablate_layers, cfg.ablate_gates, None, GATE_KINDS)  # model: later
        if "audio_swap" in cfg.ablate:
            swap_sources(records, cfg.ablate_seed or 0)
    if cfg.compare_runs:
        from .compare import check_run_dirs
        check_run_dirs(cfg.compare_runs, cfg.output_dir)
    if cfg.original_predictions:
        from .reproduction import read_original_predictions
        read_original_predictions(cfg.original_predictions)
    if cfg.resume:
        run.previous = read_resumable(cfg.output_dir, contributions=bool(cfg.contributions))


# -- the model, the data and the options that need them -------------------------------------------
def load_model(run):
    """The figure processes (``background.FigurePool``, forked before the model and its data take memory and
    before any thread exists: they import matplotlib while this process loads and runs the model), then the
    checkpoint's model (``load_model_for_analysis``) and the device it is on."""
    if run.plots:
        run.figure_pool = FigurePool()
    run.model, run.opt, run.load_report = load_model_for_analysis(run.cfg)
    run.device = next(run.model.parameters()).device


def build_batches(run):
    """The dataset of the records (features from the checkpoint's or the given folders) and its batches."""
    cfg = run.cfg
    run.feature_dirs = resolve_feature_dirs(run.opt, cfg.model_path, cfg.v_feat_dirs, cfg.t_feat_dir, cfg.a_feat_dir)
    run.dataset = build_dataset(run.opt, run.records, run.feature_dirs, skip_missing=bool(cfg.skip_missing))
    if len(run.dataset) == 0:
        raise DataError(f"{cfg.data_path}: no query left to analyse (all skipped for missing features)")
    run.batches = make_batches(run.dataset, cfg.batching or "query", cfg.batch_size, run.opt)
    if len(run.dataset) < len(run.records):
        _check_compare_samples(cfg, run.dataset.records, why="were skipped (missing feature files) in")


def check_model_options(run):
    """The interventions against the model's layers and gate kinds; the original run's predictions
    (``--legacy_model`` / ``--original_predictions``) read and matched with the data."""
    cfg, fusion = run.cfg, run.fusion
    if cfg.ablate:
        from .interventions import parse_interventions
        run.interventions = parse_interventions(cfg.ablate, cfg.ablate_layers, cfg.ablate_gates,
                                                fusion_num_layers(fusion), fusion_gate_kinds(fusion))
    if cfg.legacy_model or cfg.original_predictions:
        from .reproduction import prepare_reproduction
        run.reproduction = prepare_reproduction(cfg.model_path, run.opt, dict(cfg), cfg.original_predictions)


# -- the main pass ------------------------------------------------------------------------------------
def _reopen_finished_capture(out, contributions):
    """A run stopped after its main pass: put its predictions (and contributions) back into the partial files
    the pass writes, so resuming treats every batch as done and redoes only the steps after it."""
    partial, final = os.path.join(out, PARTIAL_PREDICTIONS_FILE), os.path.join(out, PREDICTIONS_FILE)
    if not os.path.exists(partial) and os.path.exists(final):
        os.replace(final, partial)
    stale_metrics = os.path.join(out, METRICS_FILE)
    if os.path.exists(stale_metrics):
        os.remove(stale_metrics)
    contrib_partial, contrib_final = os.path.join(out, CONTRIBUTIONS_PARTIAL), os.path.join(out, CONTRIBUTIONS_FILE)
    if contributions and not os.path.exists(contrib_partial) and os.path.exists(contrib_final):
        os.replace(contrib_final, contrib_partial)


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


def start_run(run):
    """run.json "running"; the gate sink (resuming the store of an interrupted run) and, with
    ``--contributions``, the contributions writer."""
    cfg, out, fusion = run.cfg, run.out, run.fusion
    run.manifest = new_manifest(cfg, run.model, run.load_report, run.feature_dirs, run.records, run.dataset,
                                run.batches)
    if run.previous is not None:
        check_resumable(out, run.previous, run.manifest)
        remove_stale_files(out)  # temporary files of writes a kill cut short
        _reopen_finished_capture(out, bool(cfg.contributions))
    else:
        clear_previous_outputs(out)
    write_run_json(out, run.manifest, "running")
    run.sink = GateSink(out, fusion_gating_type(fusion), fusion_num_layers(fusion), hidden_dim=run.model.hidden_dim,
                        kinds=fusion_gate_kinds(fusion), gate_ranges=fusion_gate_ranges(fusion),
                        extra_meta={"model_path": os.path.abspath(cfg.model_path)}, records=run.dataset.records,
                        resume=bool(cfg.resume), overwrite=not cfg.resume)
    done = set()
    if run.previous is not None:  # the batches the interrupted run completed: statistics from their shards
        stored = run.sink.restore()
        partial = os.path.join(out, PARTIAL_PREDICTIONS_FILE)
        lines = [line for line in _read_partial_lines(partial) if line["qid"] in stored]
        write_jsonl(partial, lines)  # drop predictions whose gate shard was never written
        done = {line["qid"] for line in lines}
        run.n_done = len(lines)
        run.loop_stats = {"exact_reruns": (run.previous.get("progress") or {}).get("exact_reruns", 0)}
    stale = os.path.join(out, CONTRIBUTIONS_PARTIAL)
    if cfg.contributions:
        run.contributions = ContributionWriter(out, keep_qids=done if run.previous is not None else None)
    elif os.path.exists(stale):
        os.remove(stale)
    run.batches_todo = [b for b in run.batches if not all(run.dataset.records[i]["qid"] in done for i in b)]


#: The interpreter's thread switch interval (s) while the model runs beside the gate bookkeeping thread (Python's
#: default 0.005): the forward pass gets the GIL back within 0.5 ms after each torch op instead of waiting up to
#: 5 ms for the bookkeeping thread. Measured at 512 elementwise queries (3 alternated pairs): 41.0 vs 44.9 s.
CAPTURE_SWITCH_INTERVAL = 0.0005


def capture_gates(run):
    """Forward every remaining batch with a ``GateRecorder``; its records go to the sink on a worker thread
    (overlapping the next forward), predictions to the partial file. A batch counts as done once its
    shard exists; on any stop, run.json says "interrupted" and ``--resume`` continues from there."""
    cfg, out, sink, contrib = run.cfg, run.out, run.sink, run.contributions
    meta = {r["qid"]: r for r in run.dataset.records}
    stats = run.loop_stats

    def consume(gate_records):
        for rec in gate_records:
            vid = meta[rec.sample_id]["vid"]
            sink.add(rec.sample_id, vid, rec.gates, n_clips=rec.n_clips)
            if contrib is not None:
                contrib.add(rec, vid)

    def flush_shard(batch_lines):
        sink.flush()
        run.query_metrics.add(batch_lines)  # the official per-query metrics, off the main thread
        release_freed_memory()  # the batch's gate arrays: keeps the peak flat over long runs

    def progress():
        return {"queries_done": run.n_done, "exact_reruns": stats.get("exact_reruns", 0)}

    run.query_metrics = QueryMetrics(run.dataset.records)
    worker = OrderedWorker()  # gate bookkeeping overlaps the next forward pass
    recorder = GateRecorder(run.fusion, lambda gate_records: worker.submit(consume, gate_records),
                            capture_contributions=contrib is not None)
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(CAPTURE_SWITCH_INTERVAL)
    try:
        with recorder, open(os.path.join(out, PARTIAL_PREDICTIONS_FILE), "a") as partial_fh:
            for metas, inputs, outputs in iterate_batches(
                    run.model, run.dataset, run.batches_todo, run.device, num_workers=cfg.num_workers or 0,
                    progress=run.progress, desc="gate analysis", suspend=recorder.paused, stats=stats,
                    before_forward=lambda metas, _: recorder.set_ids([m["qid"] for m in metas])):
                batch_lines = submission_lines(metas, outputs, inputs["src_vid_mask"])
                # predictions first, then the gate shard: a batch counts as done once its shard exists
                partial_fh.writelines(json.dumps(line) + "\n" for line in batch_lines)
                partial_fh.flush()
                os.fsync(partial_fh.fileno())
                worker.submit(flush_shard, batch_lines)
                run.n_done += len(batch_lines)
                run.manifest["progress"] = progress()
        worker.close()
        sink.close()
        if contrib is not None:
            contrib.finish()
    except BaseException:
        worker.close(cancel=True)  # queued batches are dropped: their shards never exist, so resume redoes them
        if contrib is not None:
            contrib.close()
        raise
    finally:
        sys.setswitchinterval(switch_interval)


# -- after the main pass ------------------------------------------------------------------------------
def start_plots(run):
    """The gate figures (and the ground-truth examples, which need no table) in a background process."""
    if not run.plots:
        return
    examples = None
    if run.sink.ground_truth.labelled:
        from .plots_ground_truth import plot_examples
        examples = functools.partial(plot_examples, run.dataset.records, output_dir=run.out)
    run.plot_job = run.sink.start_plots(_compare_qids(run.cfg), more=examples, pool=run.figure_pool)
    run.figure_pool = None  # the job owns it now


def write_predictions(run):
    """predictions.jsonl in data order (the partial file removed) and, with labels, predictions_metrics.json."""
    partial = os.path.join(run.out, PARTIAL_PREDICTIONS_FILE)
    order = {r["qid"]: i for i, r in enumerate(run.dataset.records)}
    run.lines = sorted(_read_partial_lines(partial), key=lambda line: order[line["qid"]])
    write_jsonl(os.path.join(run.out, PREDICTIONS_FILE), run.lines)
    os.remove(partial)
    run.metrics = evaluate(run.lines, run.dataset.records)
    if run.metrics is not None:
        write_json(os.path.join(run.out, METRICS_FILE), run.metrics)


def write_statistics(run):
    """The statistics CSVs of the sink."""
    run.csvs = run.sink.write_csvs(top_n=run.cfg.top_n or 10)


def run_analyses(run):
    """The extended analyses (``gate_analysis.analyses``); then wait for the figures."""
    run.results = run_extended_analyses(run)
    with run.phase("figures"):
        if run.plot_job is not None:
            run.plot_paths = run.plot_job.result()


def finish_run(run):
    """The reproduction verdict, report.html, run.json "complete" and summary.txt (also logged)."""
    from .report import write_report
    out, res, acc = run.out, run.results, run.sink.stats
    files = {"predictions": PREDICTIONS_FILE, "metrics": METRICS_FILE if run.metrics else None,
             "gates": GATES_DIR + "/", "csv": {k: os.path.relpath(v, out) for k, v in run.csvs.items()},
             "plots": [os.path.relpath(p, out) for p in run.plot_paths]}
    manifest = complete_manifest(run.manifest, run.started, run.lines, len(acc.layers), acc.kinds, run.dataset,
                                 run.loop_stats, run.metrics, files)
    manifest["query_dependence"] = acc.query_dependence()
    if run.reproduction is not None:
        manifest["reproduction"] = run.reproduction.run(run.model, progress=run.progress)
    manifest["analyses"] = res.analyses
    files.update(res.files)
    files["plots"] += [os.path.relpath(p, out) for p in res.plots]
    files["report"] = REPORT_FILE
    manifest["analysis_summary"] = list(res.summary)
    write_report(out, run=manifest, lanes=run.sink.lanes)
    summary = run_summary(manifest, acc.layer_stats(), acc.rankings(n=min(5, run.cfg.top_n or 10)), out)
    write_summary(out, summary)
    write_run_json(out, manifest, "complete")  # last: only a run with every output says "complete"
    run.complete = True
    run.log(summary)


#: What the progress bar shows while the steps after the main pass run (run_analyses names its own parts).
PHASE_LABELS = {start_plots: "figures (started)", write_predictions: "predictions and metrics",
                write_statistics: "statistics CSVs", finish_run: "report"}

#: The steps of ``run_analysis``, in order; the figures are drawn from ``start_plots`` to ``run_analyses``.
STEPS = (check_arguments, load_model, build_batches, check_model_options, start_run, capture_gates, start_plots,
         write_predictions, write_statistics, run_analyses, finish_run)


def run_analysis(cfg, progress=True, log=print, timings=None):
    """Run the whole analysis described by ``cfg`` (``STEPS``); returns the run manifest (also in run.json).

    ``timings``: a dict that receives each step's wall time in seconds, keyed by the step's name (the figures
    run in the background from ``start_plots``; the wait for them is part of ``run_analyses``)."""
    run = RunState(cfg, progress=progress, log=log)
    after = STEPS[STEPS.index(capture_gates) + 1:]
    for step in STEPS:
        start = time.perf_counter()
        if step is after[0] and progress:  # one bar over the steps after the main pass, ending at its total
            run.phase_bar = tqdm(total=len(after) - 1 + len(EXTENDED_STEPS) + 1, desc="after the forward pass",
                                 unit="step", file=sys.stderr)
        try:
            if step in PHASE_LABELS:
                with run.phase(PHASE_LABELS[step]):
                    step(run)
            else:
                step(run)
        except BaseException:
            _stop_figures(run)
            if run.manifest is not None and not run.complete:
                # any step after start_run: what the run has is kept and --resume continues from it
                run.manifest["interrupted_in"] = step.__name__
                write_run_json(run.out, run.manifest, "interrupted", progress=run.manifest.get("progress"))
            raise
        finally:
            if timings is not None:
                timings[step.__name__] = time.perf_counter() - start
            if step is after[-1] and run.phase_bar is not None:
                run.phase_bar.close()
    _stop_figures(run)
    return run.manifest


def _stop_figures(run):
    """Stop the figure processes still running (a finished job has ended them already)."""
    for job in (run.plot_job, run.figure_pool):
        if job is not None:
            job.cancel()
