"""Text and HTML of a reproduction verdict (``gate_analysis.reproduction``): one message, then the facts.

Both forms are built from the verdict dict alone, so the compatibility report, summary.txt and
report.html say the same.
"""
import html
import os

__all__ = ["WORST_SHOWN", "verdict_message", "format_reproduction", "reproduction_html"]

WORST_SHOWN = 5   # queries (and metrics) shown per verdict


_CODE_NOTE = ("the checkpoint was probably trained with code this toolkit does not know (a layout that only "
              "changes code, e.g. branch feat/t2v-ffn, cannot be recognised from the file), or the file belongs "
              "to another checkpoint or epoch")


def _worst_text(q):
    return (f"qid {q['qid']}: {q['problem'] or q['status'].replace('_', ' ')} (windows unmatched "
            f"{q['unmatched_windows']}, max end diff {q['max_end_diff_s']:.4g} s, max score diff "
            f"{q['max_score_diff']:.4g}, max saliency diff {q['max_saliency_diff']:.4g})")


def verdict_message(res):
    """The verdict's one line: REPRODUCES or DIFFERS, with counts and the metrics comparison."""
    p, m = res["predictions"], res.get("metrics")
    name = os.path.basename(res["predictions_path"])
    met = ""
    if m:
        ref = "the metrics file" if m["compared_with"] == "metrics file" else "metrics recomputed from the file"
        met = (f"; metrics {len(m['metrics']) - len(m['beyond'])}/{len(m['metrics'])} within bounds "
               f"(max |delta| {m['max_abs_delta']:.2f} vs {ref})")
    if res["status"] == "reproduces":
        level = res["noise_level"]
        return (f"REPRODUCES: the re-run with original batching matches {name}: {p['n_queries']}/{p['n_queries']} "
                f"queries ({p['identical']} identical, {p['within_noise']} within {level} noise){met}")
    return (f"DIFFERS: the re-run with original batching does not match {name}: {p['differs']}/{p['n_queries']} "
            f"queries beyond the noise bounds{met}; {_CODE_NOTE}")


def _details(res):
    """The facts of a verdict dict below its message, one string each (text and HTML share them)."""
    out = [f"note: {res['note']}"] if res.get("note") else []
    if res["status"] in ("not_found", "not_checked"):
        return out
    p, b, n_b = res["predictions"], res["bounds"], res["batching"]["n_batches"]
    out.append(f"file {res['predictions_path']} ({res['source']}); {res['n_queries']} queries in {n_b} "
               f"batch{'es' if n_b != 1 else ''} of up to {res['batching']['batch_size']} in file order; "
               f"data {res['data_path']}")
    out.append(f"bounds {b['name']} ({b['description']}): prob {b['prob']:g}, span {b['span']:g} x duration, "
               f"saliency {b['saliency']:g} x max(1, |s|), each plus one rounding step")
    out.append(f"max diffs: window end {p['max_end_diff_s']:.4g} s, score {p['max_score_diff']:.4g}, saliency "
               f"{p['max_saliency_diff']:.4g} ({p['max_saliency_steps']:.3g} float16 steps); snap flips "
               f"{p['snap_flips']}, windows at another rank {p['reordered_windows']}")
    out += [f"worst {_worst_text(q)}" for q in p["worst"]]
    m = res.get("metrics")
    if m:
        beyond = sorted((r for r in m["metrics"] if r["metric"] in m["beyond"]),
                        key=lambda r: -abs(r["delta"]) if r["delta"] is not None else -float("inf"))
        moved = sorted((r for r in m["metrics"] if r["delta"]), key=lambda r: -abs(r["delta"]))
        shown = (beyond or moved)[:WORST_SHOWN]
        head = (f"metrics beyond bounds ({len(beyond)}/{len(m['metrics'])})" if beyond else
                f"metrics within bounds ({len(m['metrics'])}, {len(moved)} moved)")
        items = [f"{r['metric']} {r['original']} -> {r['rerun']}" + (
            f" (delta {r['delta']:+g}, allowed {r['allowed']:g})" if r["delta"] is not None else "") for r in shown]
        more = len(beyond or moved) - len(shown)
        out.append(head + (": " + "; ".join(items) if items else "") + (f"; {more} more" if more > 0 else ""))
        if m.get("file_matches_its_predictions") is False:
            out.append(f"note: {res['metrics_path']} does not match the metrics of its own predictions on this "
                       "data file (other labels?); compared with metrics recomputed from the file")
    return out


def format_reproduction(res):
    """Text lines of a verdict dict for the compatibility report (the same facts as its JSON)."""
    return [f"  reproduction {text}" for text in [res["message"], *_details(res)]]


def reproduction_html(res):
    """An HTML fragment (escaped) of a verdict dict, for report.html."""
    cls = {"reproduces": "status-complete", "differs": "status-other"}.get(res["status"], "muted")
    items = "".join(f"<li>{html.escape(text)}</li>" for text in _details(res))
    return f"<p class='{cls}'>{html.escape(res['message'])}</p>" + (f"<ul class='muted'>{items}</ul>" if items else "")
