"""Every file and folder name an analysis writes into its output folder (and the training monitor into
its folder), in one place; the modules that write or read a file import its name from here.

Layout of a ``run_gate_analysis.py`` output folder::

    run.json, summary.txt, report.html          provenance and status, short summary, one-page report
    predictions.jsonl, predictions_metrics.json  submission lines (+ official metrics when labelled)
    gates/                                       raw gates (gate_analysis.store)
    gate_stats_*.csv, gate_histograms.csv, gate_rankings.csv     statistics (gate_analysis.stats)
    gate_contributions.csv                       --contributions
    ablation.csv, ablation_overall.csv, ablation/*.jsonl         --ablate
    gate_ground_truth*.csv, gate_performance*.csv, gate_failure_*.csv, gate_subset_comparison.csv
    gate_compare_{runs,layers,queries}.csv       --compare_runs
    plots/*.png                                  figures
"""
__all__ = ["RUN_FILE", "SUMMARY_FILE", "REPORT_FILE", "PREDICTIONS_FILE", "PARTIAL_PREDICTIONS_FILE",
           "METRICS_FILE", "GATES_DIR", "GATES_META_FILE", "GATES_INDEX_FILE", "PLOTS_DIR", "ABLATION_DIR", "ABLATION_FILE", "ABLATION_OVERALL_FILE",
           "CONTRIBUTIONS_FILE", "CONTRIBUTIONS_PARTIAL", "STATS_CSV_FILES", "GROUND_TRUTH_FILE",
           "GROUND_TRUTH_OVERALL_FILE", "PERFORMANCE_FILE", "PERFORMANCE_CORRELATIONS_FILE",
           "PERFORMANCE_ABLATION_FILE", "FAILURE_PAIRS_FILE",
           "FAILURE_COMPARISON_FILE", "SUBSET_COMPARISON_FILE", "COMPARE_RUNS_FILE", "COMPARE_LAYERS_FILE",
           "COMPARE_QUERIES_FILE", "ABLATION_PLOTS", "GROUND_TRUTH_PLOTS", "PERFORMANCE_PLOTS", "COMPARE_PLOTS",
           "EVOLUTION_FILE", "EVOLUTION_PLOTS", "RUN_OUTPUT_FILES", "RUN_OUTPUT_DIRS", "is_run_output"]

# -- provenance, predictions, raw gates, figures ----------------------------------------------------
RUN_FILE = "run.json"
SUMMARY_FILE = "summary.txt"
REPORT_FILE = "report.html"
PREDICTIONS_FILE = "predictions.jsonl"
PARTIAL_PREDICTIONS_FILE = "predictions.partial.jsonl"  # predictions of the batches done so far
METRICS_FILE = "predictions_metrics.json"
GATES_DIR = "gates"
GATES_META_FILE = "meta.json"    # in gates/: the store's description (gate_analysis.store)
GATES_INDEX_FILE = "index.csv"   # in gates/: one row per query
PLOTS_DIR = "plots"

# -- statistics (gate_analysis.stats): short key -> file name ------------------------------------------
STATS_CSV_FILES = {
    "per_query": "gate_stats_per_query.csv",
    "per_video": "gate_stats_per_video.csv",
    "per_layer": "gate_stats_per_layer.csv",
    "histograms": "gate_histograms.csv",
    "per_clip_position": "gate_stats_per_clip_position.csv",
    "per_dim": "gate_stats_per_dim.csv",
    "rankings": "gate_rankings.csv",
}

# -- beyond gate values ------------------------------------------------------------------------------
ABLATION_DIR = "ablation"  # ablated predictions, one JSONL per intervention
ABLATION_FILE = "ablation.csv"
ABLATION_OVERALL_FILE = "ablation_overall.csv"
CONTRIBUTIONS_FILE = "gate_contributions.csv"
CONTRIBUTIONS_PARTIAL = "gate_contributions.partial.csv"  # rows streamed during the main pass
GROUND_TRUTH_FILE = "gate_ground_truth.csv"
GROUND_TRUTH_OVERALL_FILE = "gate_ground_truth_overall.csv"
PERFORMANCE_FILE = "gate_performance.csv"
PERFORMANCE_CORRELATIONS_FILE = "gate_performance_correlations.csv"
PERFORMANCE_ABLATION_FILE = "gate_performance_ablation.csv"
FAILURE_PAIRS_FILE = "gate_failure_pairs.csv"
FAILURE_COMPARISON_FILE = "gate_failure_comparison.csv"
SUBSET_COMPARISON_FILE = "gate_subset_comparison.csv"
COMPARE_RUNS_FILE = "gate_compare_runs.csv"
COMPARE_LAYERS_FILE = "gate_compare_layers.csv"
COMPARE_QUERIES_FILE = "gate_compare_queries.csv"

# -- figures of the analyses (in plots/) ----------------------------------------------------------------
ABLATION_PLOTS = {
    "overall": "ablation_overall.png",
    "per_query": "ablation_per_query.png",
    "heatmap": "ablation_heatmap.png",
    "contributions": "contributions.png",
    "contribution_layers": "contribution_layers.png",
}
GROUND_TRUTH_PLOTS = {
    "distributions": "ground_truth_auroc_spearman.png",
    "inside_outside": "ground_truth_inside_outside.png",
    "across_queries": "ground_truth_across_queries.png",
    "examples": "ground_truth_examples.png",
}
PERFORMANCE_PLOTS = {
    "scatter": "performance_scatter.png",
    "correlations": "performance_correlations.png",
    "failure": "failure_cases.png",
    "subset": "subset_split.png",
}
COMPARE_PLOTS = {"layers": "compare_layer_evolution.png", "queries": "compare_query_differences.png"}

# -- the training monitor's folder (gate_analysis.monitor) ----------------------------------------------
EVOLUTION_FILE = "gate_evolution.csv"
EVOLUTION_PLOTS = {"layer": "evolution_layers.png", "query": "evolution_queries.png"}

# -- what a fresh run into an --overwrite folder removes first (besides every gate_*.csv) ---------------
RUN_OUTPUT_FILES = (RUN_FILE, SUMMARY_FILE, REPORT_FILE, PREDICTIONS_FILE, METRICS_FILE, PARTIAL_PREDICTIONS_FILE,
                    ABLATION_FILE, ABLATION_OVERALL_FILE)
RUN_OUTPUT_DIRS = (PLOTS_DIR, ABLATION_DIR)


def is_run_output(name):
    """True for a file name a run writes (``RUN_OUTPUT_FILES`` or any ``gate_*.csv``)."""
    return name in RUN_OUTPUT_FILES or (name.startswith("gate_") and name.endswith(".csv"))
