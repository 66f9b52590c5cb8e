"""Temporal span helpers: (center, width) <-> (start, end), IoU and generalized IoU."""
import torch

__all__ = ["span_cxw_to_xx", "span_xx_to_cxw", "temporal_iou", "generalized_temporal_iou"]


def span_cxw_to_xx(spans):
    """[..., 2] (center, width) -> [..., 2] (start, end)."""
    return torch.stack([spans[..., 0] - 0.5 * spans[..., 1], spans[..., 0] + 0.5 * spans[..., 1]], dim=-1)


def span_xx_to_cxw(spans):
    """[..., 2] (start, end) -> [..., 2] (center, width)."""
    return torch.stack([spans.sum(-1) * 0.5, spans[..., 1] - spans[..., 0]], dim=-1)


def temporal_iou(spans1, spans2):
    """Pairwise IoU and union of (start, end) spans: [N, 2] x [M, 2] -> ([N, M], [N, M])."""
    areas1 = spans1[:, 1] - spans1[:, 0]
    areas2 = spans2[:, 1] - spans2[:, 0]
    left = torch.max(spans1[:, None, 0], spans2[None, :, 0])
    right = torch.min(spans1[:, None, 1], spans2[None, :, 1])
    inter = (right - left).clamp(min=0)
    union = areas1[:, None] + areas2[None, :] - inter
    return inter / union, union


def generalized_temporal_iou(spans1, spans2):
    """Pairwise generalized IoU of (start, end) spans (end >= start): [N, 2] x [M, 2] -> [N, M]."""
    spans1, spans2 = spans1.float(), spans2.float()
    iou, union = temporal_iou(spans1, spans2)
    left = torch.min(spans1[:, None, 0], spans2[None, :, 0])
    right = torch.max(spans1[:, None, 1], spans2[None, :, 1])
    enclosing = (right - left).clamp(min=0)
    return iou - (enclosing - union) / enclosing
