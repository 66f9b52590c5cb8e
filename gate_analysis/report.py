"""``report.html``: one self-contained page summarising an output folder.

``write_report(folder)`` reads whatever the folder holds (``run.json``, metrics, the gate CSVs, the
ablation / ground-truth / performance / comparison CSVs and ``plots/*.png``) and writes a single
HTML file: inline CSS, every figure embedded as a base64 ``data:image/png`` URI, the explorer's data
and script inline (``gate_analysis.report_explore``: a sortable, filterable table of queries and videos,
one video's timeline on a click) and no external resource, so it can be mailed or archived alone.
Sections without their inputs are left out.
"""
import base64
import datetime
import html
import json
import os

import pandas as pd

from qd_detr.io import write_text

from .manifest import query_dependence_text
from .outputs import (
    ABLATION_OVERALL_FILE,
    ABLATION_PLOTS,
    COMPARE_LAYERS_FILE,
    COMPARE_PLOTS,
    COMPARE_RUNS_FILE,
    CONTRIBUTIONS_FILE,
    FAILURE_COMPARISON_FILE,
    FAILURE_PAIRS_FILE,
    GATES_DIR,
    GATES_META_FILE,
    GROUND_TRUTH_OVERALL_FILE,
    GROUND_TRUTH_PLOTS,
    METRICS_FILE,
    PERFORMANCE_CORRELATIONS_FILE,
    PERFORMANCE_PLOTS,
    PLOTS_DIR,
    REPORT_FILE,
    RUN_FILE,
    STATS_CSV_FILES,
    SUBSET_COMPARISON_FILE,
)

__all__ = ["write_report", "build_report", "REPORT_FILE"]

MAX_ROWS = 60
TOP_CORRELATIONS = 10  # correlations shown; the explorer has the per-query values

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1180px;color:#222;
background:#fff;line-height:1.4}
h1{font-size:24px;margin-bottom:4px}h2{font-size:19px;border-bottom:2px solid #ddd;padding-bottom:3px;margin-top:30px}
h3{font-size:15px;margin-bottom:4px}
table{border-collapse:collapse;font-size:12px;margin:6px 0 10px 0}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}th{background:#f0f0f0}
td:first-child,th:first-child{text-align:left}
.kv td{text-align:left}.kv td:first-child{font-weight:600;background:#fafafa;white-space:nowrap}
.muted{color:#666;font-size:12px}.status-complete{color:#1a7f37;font-weight:600}
.status-other{color:#b35900;font-weight:600}
figure{margin:12px 0 22px 0}figure img{max-width:100%;border:1px solid #ddd}
figcaption{font-size:12px;color:#444}
nav a{margin-right:12px;font-size:13px}
details{margin:6px 0}.scroll{overflow-x:auto;max-width:100%}summary{cursor:pointer;font-size:13px}
"""

# plot files shown under each section (in this order); the rest go to "Gate plots"
_SECTION_PLOTS = {
    "contributions": (ABLATION_PLOTS["contribution_layers"], ABLATION_PLOTS["contributions"]),
    "ablation": (ABLATION_PLOTS["overall"], ABLATION_PLOTS["per_query"], ABLATION_PLOTS["heatmap"]),
    "ground_truth": (GROUND_TRUTH_PLOTS["distributions"], GROUND_TRUTH_PLOTS["inside_outside"],
                     GROUND_TRUTH_PLOTS["examples"], GROUND_TRUTH_PLOTS["across_queries"]),
    "performance": (PERFORMANCE_PLOTS["scatter"], PERFORMANCE_PLOTS["correlations"]),
    "failure": (PERFORMANCE_PLOTS["failure"],),
    "subset": (PERFORMANCE_PLOTS["subset"],),
    "compare": (COMPARE_PLOTS["layers"], COMPARE_PLOTS["queries"]),
}


def _read_csv(folder, name):
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return None
    try:
        return pd.read_csv(path, keep_default_na=False, na_values=[""])
    except (pd.errors.EmptyDataError, pd.errors.ParserError):
        return None


def _read_json(folder, name):
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as fh:
            return json.load(fh)
    except ValueError:
        return None


def _esc(v):
    return html.escape(str(v))


def _fmt(v):
    if isinstance(v, float):
        if v != v:
            return ""
        if v == int(v) and abs(v) < 1e9:
            return f"{v:.0f}" if abs(v) >= 100 else f"{v:.4g}"
        return f"{v:.4g}"
    return str(v)


def _table(df, max_rows=MAX_ROWS, columns=None):
    if df is None or len(df) == 0:
        return "<p class='muted'>(no rows)</p>"
    if columns:
        df = df[[c for c in columns if c in df.columns]]
    note = ""
    if len(df) > max_rows:
        note = f"<p class='muted'>first {max_rows} of {len(df)} rows; see the CSV for all.</p>"
        df = df.head(max_rows)
    head = "".join(f"<th>{_esc(c)}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(f"<td>{_esc(_fmt(v))}</td>" for v in row) + "</tr>"
                   for row in df.itertuples(index=False))
    return f"<div class='scroll'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>{note}"


def _kv(pairs):
    rows = "".join(f"<tr><td>{_esc(k)}</td><td>{_esc(_fmt(v))}</td></tr>" for k, v in pairs if v not in (None, ""))
    return f"<table class='kv'>{rows}</table>"


def _img(path, caption):
    with open(path, "rb") as fh:
        data = base64.b64encode(fh.read()).decode("ascii")
    return (f"<figure><img alt='{_esc(caption)}' src='data:image/png;base64,{data}'>"
            f"<figcaption>{_esc(caption)}</figcaption></figure>")


def _plots(folder):
    d = os.path.join(folder, PLOTS_DIR)
    if not os.path.isdir(d):
        return []
    return sorted(n for n in os.listdir(d) if n.endswith(".png") and not n.startswith("."))


def _take_plots(names, wanted, used):
    """The files of ``wanted`` present in ``names`` and not shown yet (in ``wanted`` order); marks them used."""
    out = [n for n in dict.fromkeys(wanted) if n in names and n not in used]
    used.update(out)
    return out


def _ranges_html(run, folder, layer_table):
    """What the gates' values mean for this layout: one line per gate kind and range (run.json's
    ``gate_ranges``, else the gate store's; tanh [-1, 1] when neither records any)."""
    from .ranges import describe_ranges, ranges_from_meta, resolve_ranges
    declared = ranges_from_meta(run) or ranges_from_meta(_read_json(os.path.join(folder, GATES_DIR), GATES_META_FILE))
    keys = list(dict.fromkeys(zip(layer_table["layer"].astype(int), layer_table["gate"].astype(str))))
    ranges = resolve_ranges(declared, sorted({l for l, _ in keys}), list(dict.fromkeys(k for _, k in keys)))
    lines = describe_ranges({k: ranges[k] for k in keys})
    note = "" if declared else " (no ranges recorded: read as v1 tanh gates)"
    if (run.get("source") or {}).get("gate_ranges_declared") is False:
        note = " (not declared in a gate log: read as tanh [-1, 1])"
    items = "".join(f"<li>{_esc(line)}</li>" for line in lines)
    return f"<p><b>Reading the gates{_esc(note)}:</b></p><ul class='muted'>{items}</ul>"


def build_report(folder, run=None, lanes=None):
    """The report of ``folder`` as an HTML string; ``run``: the manifest to show instead of run.json; ``lanes``:
    the run's ``report_explore.LaneAccumulator`` (the explorer's gate lanes without reading the store back)."""
    folder = os.path.abspath(folder)
    run = run if run is not None else (_read_json(folder, RUN_FILE) or {})
    sections = []  # (anchor, title, html)
    plots = _plots(folder)
    used = set()

    def figs(names):
        return "".join(_img(os.path.join(folder, PLOTS_DIR, n), n) for n in names)

    # provenance
    ck, data, model = run.get("checkpoint") or {}, run.get("data") or {}, run.get("model") or {}
    env, batching = run.get("environment") or {}, run.get("batching") or {}
    status = run.get("status", "unknown")
    prov = _kv([("status", status), ("kind", run.get("kind", "gate analysis")), ("started", run.get("started")),
                ("finished", run.get("finished")), ("seconds", run.get("seconds")),
                ("checkpoint", ck.get("path")), ("checkpoint sha256", ck.get("sha256")),
                ("checkpoint epoch", (ck.get("load_report") or {}).get("epoch")),
                ("fusion layout", model.get("layout")), ("gating type", model.get("gating_type")),
                ("fusion layers", model.get("fusion_layers")), ("hidden dim", model.get("hidden_dim")),
                ("data", data.get("path")), ("data sha256", data.get("sha256")),
                ("queries analysed", (run.get("counts") or {}).get("queries", data.get("n_queries"))),
                ("feature folders", json.dumps(data.get("feature_dirs")) if data.get("feature_dirs") else None),
                ("batching", f"{batching.get('policy')} ({batching.get('n_batches')} batches of up to "
                             f"{batching.get('batch_size')})" if batching.get("n_batches") else batching.get("policy")),
                ("environment", ", ".join(f"{k} {v}" for k, v in env.items()) if env else None)])
    if run.get("runs"):
        prov += _table(pd.DataFrame(run["runs"]))
    source = run.get("source") or {}
    if source:  # gate_analysis.gate_log_run: gates read from a gate log, no model
        prov += _kv([("gate log", source.get("path")), ("gate log sha256", source.get("sha256")),
                     ("model ran", "no" if source.get("model_ran") is False else None),
                     ("predictions", (source.get("predictions") or {}).get("path"))])
        notes = "".join(f"<li>{_esc(n)}</li>" for n in source.get("not_recorded") or [])
        if notes:
            prov += f"<p><b>Not in the gate log</b> (never filled in):</p><ul class='muted'>{notes}</ul>"
    if run.get("arguments"):
        args = "".join(f"<tr><td>{_esc(k)}</td><td>{_esc(v)}</td></tr>" for k, v in run["arguments"].items()
                       if v not in (None, False, [], ""))
        prov += f"<details><summary>arguments</summary><table class='kv'>{args}</table></details>"
    sections.append(("provenance", "Model and data provenance", prov))

    brief = run.get("metrics_brief") or (_read_json(folder, METRICS_FILE) or {}).get("brief")
    if brief:
        sections.append(("metrics", "Metrics (official QVHighlights evaluation)",
                         _table(pd.DataFrame([{"metric": k, "value": v} for k, v in brief.items()]))))

    if run.get("reproduction"):  # gate_analysis.reproduction: the verdict against the original run's predictions
        from .reproduction_report import reproduction_html
        sections.append(("reproduction", "Reproduction of the original predictions",
                         reproduction_html(run["reproduction"])))

    layer = _read_csv(folder, STATS_CSV_FILES["per_layer"])
    if layer is not None and len(layer):
        q = layer[layer["weighting"] == "video"] if "weighting" in layer else layer
        dependence = ""
        if run.get("query_dependence"):
            text = query_dependence_text(run["query_dependence"], run.get("batching", {}).get("policy"))
            dependence = f"<p><b>Query dependence:</b> {html.escape(text)}.</p>"
        body = (dependence + "<p class='muted'>Statistics of the per-video mean gate (each video counts once). Fractions: "
                "positive / negative / near zero relative to 10% of each gate's declared range, saturated within 5% "
                "of a bound (empty where the gate cannot take such values, e.g. negative sigmoid gates).</p>"
                + _ranges_html(run, folder, q) +
                _table(q, columns=["name", "n_videos", "mean", "std", "min", "max", "frac_positive", "frac_negative",
                                   "frac_near_zero", "frac_saturated"]))
        rk = _read_csv(folder, STATS_CSV_FILES["rankings"])
        if rk is not None and len(rk):
            sel = rk[(rk["layer"].astype(str) == "all") & (rk["rank"] <= 5)]
            body += ("<h3>Top and bottom 5 videos by |mean gate| averaged over layers</h3>" + _table(
                sel, columns=["gate", "rank_type", "rank", "vid", "n_queries", "qid", "value"]))
        sections.append(("gates", "Gate statistics per layer", body))

    from .report_explore import explore_html
    explorer = explore_html(folder, run, lanes=lanes)
    if explorer:
        sections.append(("explore", "Explore videos and queries", explorer))

    contrib_path = os.path.join(folder, CONTRIBUTIONS_FILE)
    if os.path.isfile(contrib_path):
        from .contributions import contrib_layer_table, load_contributions
        c = load_contributions(contrib_path)
        body = ("<p class='muted'>Effective contribution = ||gate × branch output|| / ||residual stream|| per clip "
                "(0: the branch adds nothing, whatever the gate).</p>")
        if len(c):
            t = contrib_layer_table(c)
            t.insert(0, "name", [f"layers.{l}.gate_{k}" for l, k in zip(t["layer"], t["gate"])])
            body += _table(t.drop(columns=["layer", "gate"]))
        body += figs(_take_plots(plots, _SECTION_PLOTS["contributions"], used))
        sections.append(("contributions", "Effective contributions", body))

    ov = _read_csv(folder, ABLATION_OVERALL_FILE)
    if ov is not None:
        body = ("<p class='muted'>Each intervention re-runs inference; delta = ablated − baseline. For audio-off "
                "interventions (zero@all:both, audio_zero, audio_swap) a negative delta means audio helped.</p>")
        keys = ["MR-full-mAP", "MR-full-R1@0.5", "MR-full-R1@0.7", "HL-min-VeryGood-mAP", "HL-min-VeryGood-Hit1",
                "frac_top1_window_changed", "mean_saliency_abs_change"]
        if len(ov):
            piv = ov[ov["metric"].isin(keys)].pivot_table(index="intervention", columns="metric", values="delta",
                                                           sort=False)
            piv = piv[[k for k in keys if k in piv.columns]].reset_index()
            body += "<h3>Change in the run's metrics (delta)</h3>" + _table(piv)
            pq = ov[ov["metric"].isin(["mean_top1_iou", "mean_mr_ap", "mean_hl_ap_verygood"])]
            if len(pq):
                rows = []
                for name, sel in pq.groupby("intervention", sort=False):
                    m = sel.set_index("metric")
                    row = {"intervention": name}
                    for key, label in (("mean_top1_iou", "top-1 IoU"), ("mean_mr_ap", "MR AP"),
                                       ("mean_hl_ap_verygood", "HL AP")):
                        if key in m.index:
                            row[f"Δ mean {label}"] = m.loc[key, "delta"]
                            row[f"{label}: better / worse / same"] = (f"{m.loc[key, 'n_improved']:.0f} / "
                                                                      f"{m.loc[key, 'n_worsened']:.0f} / "
                                                                      f"{m.loc[key, 'n_unchanged']:.0f}")
                    rows.append(row)
                body += "<h3>Per-query effects (queries better / worse / unchanged)</h3>" + _table(pd.DataFrame(rows))
        body += figs(_take_plots(plots, _SECTION_PLOTS["ablation"], used))
        sections.append(("ablation", "Interventions (ablation)", body))

    gto = _read_csv(folder, GROUND_TRUTH_OVERALL_FILE)
    if gto is not None:
        body = ("<p class='muted'>Inside vs outside the annotated relevant windows (AUROC 0.5 = no separation) and "
                "Spearman correlation with the mean annotator saliency.</p>")
        notes = sorted(set(gto["note"].dropna().astype(str)) - {""}) if "note" in gto else []
        for n in notes:
            body += f"<p><b>Note:</b> {_esc(n)}</p>"
        main = gto[gto["statistic"] != "not_applicable"]
        if len(main):
            keys = {("pooled", "diff_inside_minus_outside"): "diff inside−outside (pooled)",
                    ("pooled", "auroc_inside"): "AUROC (pooled)", ("per_query", "auroc_inside"): "AUROC (per-query mean)",
                    ("pooled", "spearman_saliency"): "rho saliency (pooled)",
                    ("per_query", "spearman_saliency"): "rho saliency (per-query mean)",
                    ("across_queries", "spearman_fraction_relevant"): "rho vs fraction relevant (across queries)"}
            main = main[[(a, b) in keys for a, b in zip(main["scope"], main["statistic"])]]
            main = main.assign(col=[keys[(a, b)] for a, b in zip(main["scope"], main["statistic"])])
            piv = main.pivot_table(index=["measure", "name"], columns="col", values="value", sort=False)
            piv = piv[[c for c in keys.values() if c in piv.columns]].reset_index()
            body += _table(piv) + "<p class='muted'>p-values and counts: gate_ground_truth_overall.csv.</p>"
        body += figs(_take_plots(plots, _SECTION_PLOTS["ground_truth"], used))
        sections.append(("ground_truth", "Gates vs ground truth", body))

    corr = _read_csv(folder, PERFORMANCE_CORRELATIONS_FILE)
    if corr is not None:
        body = "<p class='muted'>Spearman correlation across queries (layer 'all' = the query's mean over layers).</p>"
        if len(corr):
            sel = corr[corr["layer"].astype(str) == "all"].copy()
            sel = sel.reindex(sel["rho"].abs().sort_values(ascending=False).index)
            body += ("<h3>Strongest correlations (all layers, by |rho|)</h3>"
                     + _table(sel, max_rows=TOP_CORRELATIONS, columns=["name", "x", "y", "intervention", "n", "rho",
                                                                       "p_value"])
                     + "<p class='muted'>Every correlation, per layer too: gate_performance_correlations.csv. Each "
                     "query's metrics beside its video's gates: <a href='#explore'>Explore videos and queries</a>."
                     "</p>")
        body += figs(_take_plots(plots, _SECTION_PLOTS["performance"], used))
        sections.append(("performance", "Gates vs performance", body))

    pairs = _read_csv(folder, FAILURE_PAIRS_FILE)
    if pairs is not None:
        comp = _read_csv(folder, FAILURE_COMPARISON_FILE)
        body = ("<p class='muted'>Worst queries by top-1 IoU, each matched (nearest neighbour without replacement on "
                "standardised duration and window length) to a query with top-1 IoU ≥ 0.5.</p>" + _table(pairs) +
                "<h3>Gates: failures vs matched successes</h3>" + _table(comp))
        body += figs(_take_plots(plots, _SECTION_PLOTS["failure"], used))
        sections.append(("failure", "Failure cases", body))

    sub = _read_csv(folder, SUBSET_COMPARISON_FILE)
    if sub is not None:
        info = (run.get("analyses") or {}).get("subset") or {}
        body = _kv([("subset file", info.get("path")), ("queries in subset", info.get("n_in_data"))]) + _table(sub)
        body += figs(_take_plots(plots, _SECTION_PLOTS["subset"], used))
        sections.append(("subset", "Subset split", body))

    cruns = _read_csv(folder, COMPARE_RUNS_FILE)
    if cruns is not None:
        clayers = _read_csv(folder, COMPARE_LAYERS_FILE)
        body = _table(cruns.drop(columns=[c for c in ("path", "checkpoint_sha256") if c in cruns])) + \
            "<h3>Per-layer gates per run</h3>" + _table(clayers)
        body += figs(_take_plots(plots, _SECTION_PLOTS["compare"], used))
        sections.append(("compare", "Comparison across runs", body))

    rest = [n for n in plots if n not in used]
    if rest:
        sections.append(("plots", "Gate plots", figs(rest)))

    files = sorted(n for n in os.listdir(folder) if not n.startswith("."))
    sections.append(("files", "Files in this folder", "<p class='muted'>" + ", ".join(map(_esc, files)) + "</p>"))

    title = "Gate analysis report" if run.get("kind") != "compare" else "Gate comparison report"
    status_cls = "status-complete" if status == "complete" else "status-other"
    nav = "".join(f"<a href='#{a}'>{_esc(t)}</a>" for a, t, _ in sections)
    body = "".join(f"<h2 id='{a}'>{_esc(t)}</h2>{h}" for a, t, h in sections)
    generated = datetime.datetime.now().isoformat(timespec="seconds")
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{_esc(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{_esc(title)}</h1>"
            f"<p class='muted'>{_esc(folder)} · run status <span class='{status_cls}'>{_esc(status)}</span> · "
            f"generated {generated}</p><nav>{nav}</nav>{body}</body></html>\n")


def write_report(folder, run=None, lanes=None):
    """Write ``{folder}/report.html`` atomically; returns its path (``run``, ``lanes`` as in ``build_report``)."""
    path = os.path.join(os.path.abspath(folder), REPORT_FILE)
    write_text(path, build_report(folder, run, lanes=lanes))
    return path
