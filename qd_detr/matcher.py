"""Hungarian matching of predicted spans to ground-truth windows (QD-DETR / DETR set prediction).

Per batch element ``i`` with ``N_i`` ground-truth spans, the cost of assigning query ``q`` to span ``j``
is (all spans in normalised (center, width) form)::

    C[q, j] = cost_span * |s_q - t_j|_1  -  cost_giou * GIoU(s_q, t_j)  -  cost_class * p_q(foreground)

where ``p_q`` is ``softmax(pred_logits[q])`` and class 0 is the foreground. The constant 1 of the
"1 - p" classification cost is dropped: it does not change the assignment. The one-to-one assignment
of minimal total cost is found with ``scipy.optimize.linear_sum_assignment``; the
``nq - N_i`` unmatched queries are treated as background by the loss.
"""
import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from .errors import ConfigError
from .span_utils import generalized_temporal_iou, span_cxw_to_xx

__all__ = ["HungarianMatcher", "build_matcher", "FOREGROUND_LABEL"]

FOREGROUND_LABEL = 0


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to ground-truth spans (no parameters).

    Args:
        cost_class, cost_span, cost_giou: weights of the three cost terms (not all zero).
        span_loss_type: only ``"l1"`` (spans regressed as (center, width) in [0, 1]).
    """

    def __init__(self, cost_class=1.0, cost_span=1.0, cost_giou=1.0, span_loss_type="l1"):
        super().__init__()
        if span_loss_type != "l1":
            raise ConfigError(f"span_loss_type={span_loss_type!r}: matching is implemented for 'l1' spans only")
        if cost_class == 0 and cost_span == 0 and cost_giou == 0:
            raise ConfigError("the matching costs (set_cost_class, set_cost_span, set_cost_giou) cannot all be 0")
        self.cost_class = float(cost_class)
        self.cost_span = float(cost_span)
        self.cost_giou = float(cost_giou)

    @torch.no_grad()
    def cost_matrices(self, outputs, targets):
        """Per-element cost matrices.

        Args:
            outputs: ``pred_logits`` [B, nq, 2] and ``pred_spans`` [B, nq, 2] (center, width).
            targets: ``{"span_labels": [{"spans": [N_i, 2]}, ...]}`` (B entries), as ``collate`` builds.
        Returns:
            list of B float CPU tensors [nq, N_i].
        """
        span_labels = targets["span_labels"]
        bs, nq = outputs["pred_spans"].shape[:2]
        if len(span_labels) != bs:
            raise ValueError(f"{len(span_labels)} targets for a batch of {bs} predictions")
        sizes = [len(t["spans"]) for t in span_labels]
        if sum(sizes) == 0:
            return [outputs["pred_spans"].new_zeros((nq, 0)).cpu() for _ in range(bs)]
        prob = outputs["pred_logits"].flatten(0, 1).float().softmax(-1)      # [B*nq, 2]
        out_spans = outputs["pred_spans"].flatten(0, 1).float()             # [B*nq, 2]
        tgt_spans = torch.cat([t["spans"] for t in span_labels]).to(out_spans)  # [sum N_i, 2]
        cost_class = -prob[:, FOREGROUND_LABEL].unsqueeze(1).expand(-1, len(tgt_spans))
        cost_span = torch.cdist(out_spans, tgt_spans, p=1)
        cost_giou = -generalized_temporal_iou(span_cxw_to_xx(out_spans), span_cxw_to_xx(tgt_spans))
        cost = self.cost_span * cost_span + self.cost_giou * cost_giou + self.cost_class * cost_class
        cost = cost.view(bs, nq, -1).cpu()                                   # [B, nq, sum N_i]
        return [c[i] for i, c in enumerate(cost.split(sizes, -1))]

    @torch.no_grad()
    def forward(self, outputs, targets):
        """List of B pairs ``(query_idx, target_idx)``, int64 tensors of length ``min(nq, N_i)``;
        ``query_idx`` is increasing."""
        indices = []
        for i, cost in enumerate(self.cost_matrices(outputs, targets)):
            c = cost.numpy()
            if not np.isfinite(c).all():
                raise ValueError(f"batch element {i}: the matching cost has NaN/Inf entries "
                                 "(degenerate predicted or target spans)")
            rows, cols = linear_sum_assignment(c)
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices


def build_matcher(opt):
    """The matcher of an option set (``set_cost_class``, ``set_cost_span``, ``set_cost_giou``)."""
    return HungarianMatcher(cost_class=opt.set_cost_class, cost_span=opt.set_cost_span,
                            cost_giou=opt.set_cost_giou, span_loss_type=opt.span_loss_type)
