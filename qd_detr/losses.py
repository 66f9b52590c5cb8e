"""QD-DETR training losses (``SetCriterion``), term for term as the original defines them.

With ``B`` queries in a batch, ``nq`` decoder queries, ``L`` padded clips and ``M`` matched pairs
(from ``HungarianMatcher`` on the last decoder layer):

- ``loss_span``: L1 between matched predicted and target (center, width) spans, averaged over the
  ``M x 2`` coordinates.
- ``loss_giou``: ``1 - GIoU`` of the matched pairs, averaged over ``M``.
- ``loss_label``: per-query cross-entropy of foreground (matched, class 0) vs background (class 1)
  with class weights ``[1, eos_coef]``, averaged over all ``B x nq`` queries (``reduction="none"``
  then ``mean``, as the original: the weights are not normalised away).
- ``loss_saliency`` = ``margin`` + ``rank_contrastive`` + ``neg_pair`` (top layer only):
  * margin: ``mean(max(0, margin + s[neg] - s[pos])) * 2`` over the sampled (hard, easy) pairs;
  * rank contrastive: for each level ``r = 1..11`` with any clip labelled ``>= r``, a supervised
    contrastive term (temperature 0.5) over the clips of the video and of the query-negative pass
    (``saliency_scores_neg``, all labelled 0), whose positives are the clips with summed label ``>= r``;
    the sum is divided by 12 (sic, as the original);
  * neg pair: ``sum_t -log(1 - sigmoid(s_neg[t]))`` over valid clips, averaged over the batch: the
    video paired with another sample's text should look irrelevant everywhere (computed as the equal
    ``softplus(s_neg)``, which stays finite where the original's float32 ``sigmoid`` rounds to 1).
- ``loss_contrastive_align`` (only with ``contrastive_align_loss``): query-token NCE.
- auxiliary decoder layers ``k = 0 .. dec_layers-2``: span/giou/label (and contrastive) terms with
  suffix ``_k``, each with its own matching.

The total is ``sum(loss[k] * weight_dict[k])``; entries without a weight (``class_error`` and the
three saliency parts) are for logging only.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .matcher import FOREGROUND_LABEL, build_matcher
from .span_utils import generalized_temporal_iou, span_cxw_to_xx

__all__ = ["SetCriterion", "build_criterion", "build_weight_dict", "weighted_total", "saliency_loss_terms"]

BACKGROUND_LABEL = 1
RANK_TAU = 0.5
RANK_LEVELS = range(1, 12)
RANK_DIVISOR = 12
MASKED_SCORE = -1e3


def _src_permutation(indices):
    """(batch_idx, query_idx) of all matched predictions, each [M]."""
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    src_idx = torch.cat([src for src, _ in indices])
    return batch_idx, src_idx


def saliency_loss_terms(saliency_scores, saliency_scores_neg, video_mask, pos_labels, neg_labels, all_labels,
                        margin):
    """The three parts of QD-DETR's saliency loss, each a 0-d tensor.

    Args:
        saliency_scores: [B, L] scores of each clip for its own query.
        saliency_scores_neg: [B, L] scores with the text of another batch element (query negative).
        video_mask: [B, L] float, 1 = valid clip.
        pos_labels, neg_labels: [B, P] int64 clip indices of the sampled positive / negative clips.
        all_labels: [B, L'] summed annotator scores per clip (0..12); cut or zero-padded to L.
        margin: hinge margin of the pairwise term.
    Returns:
        dict with ``margin``, ``rank_contrastive``, ``neg_pair``.
    """
    mask = video_mask.to(saliency_scores.dtype)
    length = saliency_scores.shape[1]
    labels = all_labels.to(saliency_scores.dtype)
    if labels.shape[1] >= length:
        labels = labels[:, :length]  # the original grows the label array by one in a corner case
    else:
        labels = F.pad(labels, (0, length - labels.shape[1]))

    # query-negative pairs: every valid clip of the mismatched pair should score low.
    # -log(1 - sigmoid(s)) computed as softplus(s): equal, but finite where sigmoid rounds to 1
    neg_pair = torch.where(mask > 0, F.softplus(saliency_scores_neg), 0.0).sum(dim=1).mean()

    # rank contrastive over [own clips, query-negative clips]
    scores = torch.cat([saliency_scores, saliency_scores_neg], dim=1)          # [B, 2L]
    rank_labels = torch.cat([labels, torch.zeros_like(labels)], dim=1)         # [B, 2L]
    mask2 = mask.repeat(1, 2)                                                  # [B, 2L]
    scores = mask2 * scores + (1.0 - mask2) * MASKED_SCORE
    rank = scores.new_zeros(())
    for level in RANK_LEVELS:
        pos = (rank_labels >= level).to(scores.dtype)                          # [B, 2L]
        if pos.sum() == 0:
            continue
        has_pos = (pos.sum(dim=1) > 0).to(scores.dtype)                        # [B]
        logits = scores / RANK_TAU
        logits = logits - logits.max(dim=1, keepdim=True)[0]
        log_prob = logits - torch.log(torch.exp(logits).sum(dim=1, keepdim=True) + 1e-6)
        mean_log_prob_pos = (pos * log_prob * mask2).sum(dim=1) / (pos.sum(dim=1) + 1e-6)
        rank = rank + (-mean_log_prob_pos * has_pos).mean()
    rank = rank / RANK_DIVISOR

    # hinge on sampled (positive, negative) clip pairs
    rows = torch.arange(len(saliency_scores), device=saliency_scores.device)
    n_pairs = pos_labels.shape[1]
    pos_scores = torch.stack([saliency_scores[rows, pos_labels[:, c]] for c in range(n_pairs)], dim=1)
    neg_scores = torch.stack([saliency_scores[rows, neg_labels[:, c]] for c in range(n_pairs)], dim=1)
    hinge = torch.clamp(margin + neg_scores - pos_scores, min=0).sum() / (len(pos_scores) * n_pairs) * 2
    return {"margin": hinge, "rank_contrastive": rank, "neg_pair": neg_pair}


class SetCriterion(nn.Module):
    """Matching + losses; ``forward(outputs, targets)`` returns a dict of 0-d loss tensors.

    Args:
        matcher: a ``HungarianMatcher``.
        weight_dict: {loss name: weight} (see ``build_weight_dict``).
        eos_coef: classification weight of the background ("no object") class.
        losses: subset of ("spans", "labels", "saliency", "contrastive_align").
        saliency_margin: margin of the pairwise saliency hinge.
        temperature: temperature of the contrastive-align NCE.
    ``outputs`` are the model's (``pred_logits``, ``pred_spans``, ``saliency_scores``,
    ``saliency_scores_neg``, ``video_mask``, ``aux_outputs``); ``targets`` are ``inputs["targets"]``
    of ``qd_detr.dataset.collate`` on the same device.
    """

    def __init__(self, matcher, weight_dict, eos_coef=0.1, losses=("spans", "labels", "saliency"),
                 saliency_margin=0.2, temperature=0.07):
        super().__init__()
        unknown = set(losses) - {"spans", "labels", "saliency", "contrastive_align"}
        if unknown:
            raise ValueError(f"unknown loss(es) {sorted(unknown)}")
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.losses = tuple(losses)
        self.eos_coef = float(eos_coef)
        self.saliency_margin = float(saliency_margin)
        self.temperature = float(temperature)
        empty_weight = torch.ones(2)
        empty_weight[BACKGROUND_LABEL] = self.eos_coef
        self.register_buffer("empty_weight", empty_weight)

    # -- terms -----------------------------------------------------------------------------------
    def loss_spans(self, outputs, targets, indices):
        idx = _src_permutation(indices)
        src = outputs["pred_spans"][idx]                                                       # [M, 2]
        tgt = torch.cat([t["spans"][j] for t, (_, j) in zip(targets["span_labels"], indices)]).to(src)  # [M, 2]
        if len(src) == 0:
            zero = outputs["pred_spans"].sum() * 0
            return {"loss_span": zero, "loss_giou": zero}
        l1 = F.l1_loss(src, tgt, reduction="none")
        giou = 1 - torch.diag(generalized_temporal_iou(span_cxw_to_xx(src), span_cxw_to_xx(tgt)))
        return {"loss_span": l1.mean(), "loss_giou": giou.mean()}

    def loss_labels(self, outputs, targets, indices):
        logits = outputs["pred_logits"]                                                        # [B, nq, 2]
        idx = _src_permutation(indices)
        target_classes = torch.full(logits.shape[:2], BACKGROUND_LABEL, dtype=torch.int64, device=logits.device)
        target_classes[idx] = FOREGROUND_LABEL
        ce = F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight.to(logits), reduction="none")
        matched = logits[idx]
        if len(matched):
            accuracy = (matched.argmax(-1) == FOREGROUND_LABEL).float().mean() * 100
            class_error = 100 - accuracy
        else:
            class_error = logits.new_zeros(())
        return {"loss_label": ce.mean(), "class_error": class_error.detach()}

    def loss_saliency(self, outputs, targets, indices=None):
        if "saliency_pos_labels" not in targets:
            return {}
        if "saliency_scores_neg" not in outputs:
            raise ValueError("the saliency loss needs saliency_scores_neg: run the model with compute_neg=True")
        parts = saliency_loss_terms(outputs["saliency_scores"], outputs["saliency_scores_neg"], outputs["video_mask"],
                                    targets["saliency_pos_labels"], targets["saliency_neg_labels"],
                                    targets["saliency_all_labels"], self.saliency_margin)
        out = {"loss_saliency": parts["margin"] + parts["rank_contrastive"] + parts["neg_pair"]}
        out.update({f"saliency_{k}": v.detach() for k, v in parts.items()})
        return out

    def loss_contrastive_align(self, outputs, targets, indices):
        txt = outputs["proj_txt_mem"]                                                          # [B, Lt, d]
        queries = outputs["proj_queries"]                                                      # [B, nq, d]
        logits = torch.einsum("bmd,bnd->bmn", queries, txt).sum(2) / self.temperature          # [B, nq]
        positive = torch.zeros_like(logits, dtype=torch.bool)
        positive[_src_permutation(indices)] = True
        pos_term = logits.masked_fill(~positive, 0).sum(1)
        nce = -pos_term / positive.sum(1) + logits.logsumexp(1)
        return {"loss_contrastive_align": nce.mean()}

    # -- driver ----------------------------------------------------------------------------------
    def _layer_losses(self, outputs, targets, top):
        indices = self.matcher(outputs, targets)
        out = {}
        for name in self.losses:
            if name == "saliency":
                if top:
                    out.update(self.loss_saliency(outputs, targets, indices))
            else:
                out.update(getattr(self, f"loss_{name}")(outputs, targets, indices))
        return out

    def forward(self, outputs, targets):
        losses = self._layer_losses({k: v for k, v in outputs.items() if k != "aux_outputs"}, targets, top=True)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            losses.update({f"{k}_{i}": v for k, v in self._layer_losses(aux, targets, top=False).items()})
        return losses

    def total(self, loss_dict):
        """Weighted sum of the weighted terms of ``loss_dict`` (a 0-d tensor)."""
        return weighted_total(loss_dict, self.weight_dict)


def weighted_total(loss_dict, weight_dict):
    """``sum(loss_dict[k] * weight_dict[k])`` over the keys that have a weight."""
    terms = [loss_dict[k] * weight_dict[k] for k in loss_dict if k in weight_dict]
    if not terms:
        raise ValueError("no weighted loss term in the loss dict")
    return sum(terms)


def build_weight_dict(opt):
    """Loss weights as the original ``build_model``: top-layer terms plus ``_k`` aux copies (no saliency)."""
    weights = {"loss_span": opt.span_loss_coef, "loss_giou": opt.giou_loss_coef,
               "loss_label": opt.label_loss_coef, "loss_saliency": opt.lw_saliency}
    if opt.contrastive_align_loss:
        weights["loss_contrastive_align"] = opt.contrastive_align_loss_coef
    if opt.aux_loss:
        for i in range(opt.dec_layers - 1):
            weights.update({f"{k}_{i}": v for k, v in list(weights.items())
                            if k != "loss_saliency" and not k[-1].isdigit()})
    return weights


def build_criterion(opt):
    """``SetCriterion`` of an option set (moment retrieval on QVHighlights-style data)."""
    if getattr(opt, "dset_name", "hl") != "hl":
        raise ConfigError(f"dset_name={opt.dset_name!r}: only 'hl' (QVHighlights-style moment retrieval) "
                          "training is supported")
    if opt.span_loss_type != "l1":
        raise ConfigError(f"span_loss_type={opt.span_loss_type!r}: training supports 'l1' only "
                          "(the dataset builds (center, width) span labels)")
    losses = ["spans", "labels", "saliency"] + (["contrastive_align"] if opt.contrastive_align_loss else [])
    return SetCriterion(build_matcher(opt), build_weight_dict(opt), eos_coef=opt.eos_coef, losses=losses,
                        saliency_margin=opt.saliency_margin, temperature=opt.temperature)
