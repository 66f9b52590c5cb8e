"""Model outputs -> official QVHighlights submission lines, with the original post-processing.

Per query: foreground probability ``softmax(pred_logits)[:, 0]``; windows
``span_cxw_to_xx(pred_spans) * duration`` (JSONL duration); rows ``[st, ed, score]`` stably sorted by
score (descending), every value rounded to 4 decimals; then windows clamped to [0, 150] and rounded
to multiples of the 2 s clip length (round half to even), in float32 as the original tensors are;
scores re-rounded to 4 decimals, no re-sort. Saliency: ``saliency_scores.half()`` trimmed to the
valid clips.
"""
import torch

from .io import write_json, write_jsonl
from .span_utils import span_cxw_to_xx

__all__ = ["submission_lines", "finalize_windows", "ambiguous_rows", "PROB_NOISE", "SPAN_NOISE",
           # re-exported from qd_detr.io (their home): the original module's writers
           "write_jsonl", "write_json"]


def finalize_windows(rows, clip_length=2, min_ts=0, max_ts=150):
    """The original PostProcessorDETR with ("clip_ts", "round_multiple") on [[st, ed, score], ...]."""
    t = torch.tensor(rows)  # float32, as in the original
    windows = torch.clamp(t[:, :2], min=min_ts, max=max_ts)
    windows = torch.round(windows / clip_length) * clip_length
    out = torch.cat([windows, t[:, 2:3]], dim=1).tolist()
    return [row[:2] + [float(f"{row[2]:.4f}")] for row in out]


def submission_lines(metas, outputs, video_mask):
    """One submission dict per query of a batch.

    metas: JSONL records (qid, query, vid, duration); outputs: the model's ``pred_logits`` [B, nq, 2],
    ``pred_spans`` [B, nq, 2] and ``saliency_scores`` [B, L]; video_mask [B, L] float, 1 = valid.
    """
    prob = torch.softmax(outputs["pred_logits"], -1)[..., 0].cpu()
    spans = outputs["pred_spans"].cpu()
    saliency = outputs["saliency_scores"].half().cpu()
    lengths = video_mask.sum(1).cpu().tolist()
    lines = []
    for j, meta in enumerate(metas):
        xx = span_cxw_to_xx(spans[j]) * meta["duration"]
        rows = sorted(torch.cat([xx, prob[j][:, None]], dim=1).tolist(), key=lambda r: r[2], reverse=True)
        rows = [[float(f"{v:.4f}") for v in row] for row in rows]
        lines.append(dict(qid=meta["qid"], query=meta["query"], vid=meta["vid"],
                          pred_relevant_windows=finalize_windows(rows),
                          pred_saliency_scores=saliency[j, :int(lengths[j])].tolist()))
    return lines


def _near_boundary(values, eps, step):
    """True where rounding ``values`` to a multiple of ``step`` could change under noise ``eps``."""
    return torch.round((values - eps) / step) != torch.round((values + eps) / step)


# Bounds on how much a batched forward differs from the same query run alone (kernels round
# differently for different batch shapes). Measured per layout by benchmarks/measure_batching_noise.py
# (batch 32 vs 1, CPU; 512 queries of each benchmark layout at default size, random weights, and the 16
# queries of each fixture): foreground probability up to 3.0e-7 (global_diagstrip_ssm; the others
# 0.9-2.4e-7), normalised span coordinates up to 3.6e-7. The probability bound keeps a 1.7x margin (so it
# cannot be tightened to re-run fewer queries), the span bound 5.6x.
PROB_NOISE = 5e-7
SPAN_NOISE = 2e-6


def ambiguous_rows(metas, outputs, prob_eps=PROB_NOISE, span_eps=SPAN_NOISE):
    """Batch rows whose submission line is not decided within batching noise.

    Noise changes a line only when two scores are nearly tied (the rank order of windows flips), a
    score lies next to a 4-decimal rounding boundary, or a window end lies next to a 2 s rounding
    boundary. Such rows are recomputed alone by the caller. Saliency is not checked: noise there
    moves a float16 value by at most one float16 step (about 1e-7 absolute near zero).
    """
    prob = torch.softmax(outputs["pred_logits"].float(), -1)[..., 0].cpu()
    spans = outputs["pred_spans"].float().cpu()
    rows = []
    for j, meta in enumerate(metas):
        p = prob[j].sort(descending=True).values
        ends = span_cxw_to_xx(spans[j]) * meta["duration"]
        if bool(((p[:-1] - p[1:]) < prob_eps).any() or _near_boundary(prob[j], prob_eps, 1e-4).any()
                or _near_boundary(ends, span_eps * meta["duration"], 2.0).any()):
            rows.append(j)
    return rows
