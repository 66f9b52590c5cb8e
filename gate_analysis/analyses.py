"""The analyses beyond gate values, run after the main pass of ``gate_analysis.pipeline``: effective
contributions, interventions, ground truth, the performance link (with failure cases and the subset
split) and the comparison with earlier runs, each when its options and the data allow.

Each step reads the run's state (``pipeline.RunState``: options, model, dataset, batches, the sink's
statistics and ground truth, predictions, metrics) and adds to one ``Results``: the CSVs it wrote
(``files``), figures (``plots``), run.json entries (``analyses``) and lines of the summary (``summary``).
"""
import os
from dataclasses import dataclass, field

from qd_detr.gates import gate_name

from . import ablation as AB
from . import ground_truth as GT
from . import performance as PF
from .background import as_paths
from .contributions import contrib_layer_table, contribution_summary, load_contributions
from .gate_arrays import PER_CLIP_GATING_TYPES
from .interventions import dataset_mean_gates, reference_intervention
from .outputs import (
    ABLATION_DIR,
    ABLATION_FILE,
    ABLATION_OVERALL_FILE,
    CONTRIBUTIONS_FILE,
    FAILURE_COMPARISON_FILE,
    FAILURE_PAIRS_FILE,
    GROUND_TRUTH_FILE,
    GROUND_TRUTH_OVERALL_FILE,
    PERFORMANCE_ABLATION_FILE,
    PERFORMANCE_CORRELATIONS_FILE,
    PERFORMANCE_FILE,
    SUBSET_COMPARISON_FILE,
)

__all__ = ["Results", "run_extended_analyses", "contributions_step", "ablation_step", "ground_truth_step",
           "performance_step", "compare_step", "EXTENDED_STEPS"]


@dataclass
class Results:
    """What the extended analyses add to the run; later steps read the earlier steps' tables."""
    analyses: dict = field(default_factory=dict)   # run.json "analyses"
    files: dict = field(default_factory=dict)      # run.json "files" entries
    plots: list = field(default_factory=list)      # figure paths
    summary: list = field(default_factory=list)    # summary.txt lines
    contributions: object = None                   # gate_contributions.csv DataFrame (--contributions)
    contribution_summary: object = None            # per query x layer x gate
    ablation: object = None                        # ablation.csv DataFrame (--ablate)
    reference: str = None                          # the audio-off intervention joined with performance


def _draw(run, res, fn, *args, **kwargs):
    """A step's figures ``fn(*args, **kwargs)``: with a figure job (``run.plot_job``, the main job's), drawn
    beside the other figures, their paths returned by the job after those of the gate figures (the order of
    ``res.plots`` if drawn here); without one, drawn here into ``res.plots``."""
    if run.plot_job is not None:
        run.plot_job.submit(fn, *args, **kwargs)
    else:
        res.plots += as_paths(fn(*args, **kwargs))


def contributions_step(run, res):
    """``--contributions``: read the streamed ``gate_contributions.csv``, its figures and summary line."""
    if not run.cfg.contributions:
        return
    res.contributions = load_contributions(run.out)
    res.contribution_summary = contribution_summary(res.contributions)
    res.files["contributions"] = CONTRIBUTIONS_FILE
    if run.plots:
        from .plots_causal import plot_contributions
        used = res.contributions[["layer", "gate", "gate_value", "contribution"]]  # what the figures read
        _draw(run, res, plot_contributions, used, run.out, gate_ranges=run.sink.stats.gate_ranges)
    t = contrib_layer_table(res.contributions)
    res.summary.append("effective contribution (median over clips): " + ", ".join(
        f"{gate_name(r.layer, r.gate)} {r.median:.3g}" for r in t.itertuples()))


def ablation_step(run, res):
    """``--ablate``: one inference pass per intervention, compared with the main pass."""
    interventions, cfg, acc = run.interventions, run.cfg, run.sink.stats
    if not interventions:
        return
    brief = run.brief
    means = dataset_mean_gates(acc) if any(iv.value == "mean" for iv in interventions) else None
    base_metrics = None
    if run.query_metrics is not None:
        base_metrics = {row["qid"]: row for row in run.query_metrics.rows(run.lines, run.dataset.records)}
    res.ablation, ablation_ov, info = AB.run_ablation(
        run.model, run.dataset, run.batches, run.device, interventions, run.lines, output_dir=run.out,
        gate_means=means, seed=cfg.ablate_seed or 0, progress=run.progress, num_workers=cfg.num_workers or 0,
        base_brief=brief, base_metrics=base_metrics)
    res.reference = reference_intervention(interventions).name
    res.analyses["ablation"] = {"interventions": [iv.name for iv in interventions], "reference": res.reference,
                                "seed": cfg.ablate_seed or 0, "runs": info}
    res.files.update(ablation=ABLATION_FILE, ablation_overall=ABLATION_OVERALL_FILE,
                     ablation_predictions=ABLATION_DIR + "/")
    if run.plots:
        from .plots_causal import plot_ablation
        _draw(run, res, plot_ablation, res.ablation, ablation_ov, run.out, kinds=acc.kinds)
    for iv in interventions:
        b = info[iv.name]["metrics_brief"]
        if b and brief and "MR-full-mAP" in b:
            res.summary.append(f"ablation {iv.name}: MR-full-mAP {brief['MR-full-mAP']} -> {b['MR-full-mAP']} "
                               f"({b['MR-full-mAP'] - brief['MR-full-mAP']:+.2f}), HL-min-VeryGood-mAP "
                               f"{b.get('HL-min-VeryGood-mAP')} ({info[iv.name]['seconds']} s)")
        else:
            sel = res.ablation[res.ablation["intervention"] == iv.name]
            res.summary.append(f"ablation {iv.name}: top-1 window changed for "
                               f"{int((sel['top1_window_iou_vs_base'] < 1).sum())}/{len(sel)} queries")


def ground_truth_step(run, res):
    """Gates (and contributions) inside vs outside the relevant windows: ``gate_ground_truth*.csv``."""
    gt = run.sink.ground_truth
    gt.add_contributions(res.contributions)
    gt_pq, gt_ov, gt_files = gt.write(run.out)
    if not gt_files:
        res.summary.append("ground truth and performance link: skipped (the data has no labels)")
        return
    res.files.update(ground_truth=GROUND_TRUTH_FILE, ground_truth_overall=GROUND_TRUTH_OVERALL_FILE)
    if run.plots:
        from .plots_ground_truth import plot_ground_truth
        across, ranges = gt.across_queries(), run.sink.stats.gate_ranges
        for part in ("distributions", "inside_outside", "across_queries"):  # one task each (examples: plot_all's)
            _draw(run, res, plot_ground_truth, gt_pq, gt_ov, run.out, across=across, n_examples=0, gate_ranges=ranges,
                  records=run.dataset.records if part == "across_queries" else None, figures=(part,))
    pooled = gt_ov[(gt_ov["scope"] == "pooled") & (gt_ov["statistic"] == "auroc_inside")
                   & (gt_ov["measure"] == "gate")]
    if len(pooled):
        res.summary.append("gate AUROC inside vs outside relevant windows (pooled clips): " + ", ".join(
            f"{r.name} {r.value:.3f}" for r in pooled.itertuples()))
    elif gt.gating_type not in PER_CLIP_GATING_TYPES:
        res.summary.append(f"ground truth: {GT.GLOBAL_NOTE}")


def _failure_frames(run, res, perf):
    """``--failure_cases N``: the pairs and their comparison ({file name: DataFrame}), figure and summary."""
    n = run.cfg.failure_cases
    per_query = perf.drop_duplicates("qid")
    pairs = PF.failure_cases(per_query, n)
    res.analyses["failure_cases"] = {"requested": n, "pairs": len(pairs), "success_top1_iou": PF.SUCCESS_IOU}
    res.summary.append(f"failure cases: {len(pairs)} of {n} worst queries matched to successes "
                       f"(successful queries, top-1 IoU >= {PF.SUCCESS_IOU}: "
                       f"{int((per_query['top1_iou'] >= PF.SUCCESS_IOU).sum())})")
    if run.plots and len(pairs):
        from .plots_performance import plot_failure_cases
        _draw(run, res, plot_failure_cases, pairs, perf, run.out, gate_ranges=run.sink.stats.gate_ranges)
    return {FAILURE_PAIRS_FILE: pairs, FAILURE_COMPARISON_FILE: PF.failure_comparison(pairs, perf)}


def performance_step(run, res):
    """Labelled data: per-query metrics joined with the gates and their correlations, failure cases and the
    subset split (``gate_performance*.csv``, ``gate_failure_*.csv``, ``gate_subset_comparison.csv``);
    unlabelled data: only the subset split."""
    cfg, records, acc = run.cfg, run.dataset.records, run.sink.stats
    info = run.subset_info
    split = bool(info and info["mode"] == "split")
    if any(r.get("relevant_windows") for r in records):
        qs = acc.query_stats()
        perf = PF.performance_table(run.lines, records, qs, res.contribution_summary, metrics=run.query_metrics)
        corr = PF.correlation_table(perf, res.ablation)
        frames = {PERFORMANCE_FILE: perf, PERFORMANCE_CORRELATIONS_FILE: corr}
        joined = PF.ablation_join(perf, res.ablation)
        if len(joined):
            frames[PERFORMANCE_ABLATION_FILE] = joined
        if cfg.failure_cases:
            frames.update(_failure_frames(run, res, perf))
        if split:
            feats = PF.query_gate_features(qs, res.contribution_summary)
            comp = PF.subset_comparison(PF.read_subset(cfg.subset), feats, perf, res.ablation, run.lines, records)
            frames[SUBSET_COMPARISON_FILE] = comp
            if run.plots:
                from .plots_performance import plot_subset_comparison
                _draw(run, res, plot_subset_comparison, comp, run.out, os.path.basename(cfg.subset),
                      gate_ranges=acc.gate_ranges)
        res.files.update({k.rsplit(".", 1)[0]: k for k in PF.write_performance(run.out, frames)})
        if run.plots and len(perf):
            from .plots_performance import plot_performance
            effect = joined[joined["intervention"] == res.reference] if res.reference else None
            for part in ("scatter", "correlations"):
                _draw(run, res, plot_performance, perf, corr, run.out, gate_ranges=acc.gate_ranges, ablation=effect,
                      figures=(part,))
    elif split:
        feats = PF.query_gate_features(acc.query_stats(), res.contribution_summary)
        comp = PF.subset_comparison(PF.read_subset(cfg.subset), feats, None, res.ablation)
        PF.write_performance(run.out, {SUBSET_COMPARISON_FILE: comp})
        res.files[SUBSET_COMPARISON_FILE.rsplit(".", 1)[0]] = SUBSET_COMPARISON_FILE
    if info:
        res.analyses["subset"] = info
        res.summary.append(f"subset {info['mode']}: {info['n_in_data']} listed queries in the data "
                           f"({info['n_missing_from_data']} listed but absent)")


def compare_step(run, res):
    """``--compare_runs``: this run against earlier output folders (``gate_compare_*.csv``)."""
    cfg = run.cfg
    if not cfg.compare_runs:
        return
    from .compare import compare_runs, write_compare
    current = {**run.manifest, "metrics_brief": run.brief}
    runs, layers_df, queries = compare_runs(list(cfg.compare_runs) + [run.out], overrides={run.out: current})
    res.files.update({k.rsplit(".", 1)[0]: k for k in write_compare(run.out, runs, layers_df, queries)})
    if run.plots:
        from .plots_compare import plot_compare
        _draw(run, res, plot_compare, runs, layers_df, queries, run.out)
    res.summary.append(f"compared with {len(cfg.compare_runs)} earlier run(s): {queries['qid'].nunique()} queries "
                       f"in all runs")


#: The extended analyses in the order they run (later ones use earlier ones' tables).
EXTENDED_STEPS = (contributions_step, ablation_step, ground_truth_step, performance_step, compare_step)
#: What the progress bar shows while each step runs.
STEP_LABELS = {contributions_step: "contributions", ablation_step: "interventions", ground_truth_step: "ground truth",
               performance_step: "performance link", compare_step: "comparison of runs"}


def run_extended_analyses(run):
    """Run ``EXTENDED_STEPS`` on the state of a run whose main pass is done; returns the ``Results``."""
    res = Results()
    for step in EXTENDED_STEPS:
        with run.phase(STEP_LABELS[step]):
            step(run, res)
    return res
