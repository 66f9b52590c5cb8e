"""QD-DETR with optional audio: no audio, audio concatenated to video, or AVIGATE gated fusion.

``build_model(opt)`` rebuilds the architecture an option set describes (see ``qd_detr.config``);
state-dict names and shapes equal those of the original research code.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from .avigate import AVIGATEFusion
from .avigate_custom import AVIGATEFusionCustom
from .config import check_options, fusion_layout, fusion_variant, gate_options
from .errors import ConfigError, NoFusionError
from .position_encoding import build_position_encoding
from .transformer import MLP, build_transformer, inverse_sigmoid

__all__ = ["QDDETR", "LinearLayer", "NoFusionError", "build_model", "BATCHING_MODES"]

BATCHING_MODES = ("query", "original")


class LinearLayer(nn.Module):
    """LayerNorm -> Dropout -> Linear -> optional ReLU, on [B, L, D_in] -> [B, L, D_out]."""

    def __init__(self, in_hsz, out_hsz, layer_norm=True, dropout=0.1, relu=True):
        super().__init__()
        self.relu = relu
        self.layer_norm = layer_norm
        if layer_norm:
            self.LayerNorm = nn.LayerNorm(in_hsz)
        self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_hsz, out_hsz))

    def forward(self, x):
        if self.layer_norm:
            x = self.LayerNorm(x)
        x = self.net(x)
        return F.relu(x, inplace=True) if self.relu else x


def _input_proj(in_dim, hidden_dim, n_input_proj, dropout):
    relu = [True, True, True]
    relu[n_input_proj - 1] = False
    dims = [in_dim, hidden_dim, hidden_dim]
    return nn.Sequential(*[LinearLayer(dims[i], hidden_dim, layer_norm=True, dropout=dropout, relu=relu[i])
                           for i in range(n_input_proj)])


class QDDETR(nn.Module):
    """Query-dependent DETR for moment retrieval and highlight detection.

    forward(src_txt [B, Lt, Dt], src_txt_mask [B, Lt], src_vid [B, Lv, Dv], src_vid_mask [B, Lv],
    src_aud [B, Lv, Da] = None, src_aud_mask = None), masks float with 1 = valid, returns
    ``pred_logits`` [B, nq, 2] (class 0 = foreground), ``pred_spans`` [B, nq, 2] (center, width) in
    [0, 1], ``saliency_scores`` [B, Lv], ``saliency_scores_neg`` [B, Lv] (text rolled by one in the
    batch; only with ``compute_neg``), ``video_mask`` and ``aux_outputs`` (one dict per earlier decoder
    layer, when ``aux_loss``).

    ``fusion`` is the AVIGATE fusion module or None; ``avigate_fusion`` is an alias that adds no
    state-dict keys and raises ``NoFusionError`` when there is none.
    """

    def __init__(self, transformer, position_embed, txt_position_embed, txt_dim, vid_dim, num_queries,
                 input_dropout, aux_loss=False, contrastive_align_loss=False, contrastive_hdim=64, max_v_l=75,
                 span_loss_type="l1", use_txt_pos=False, n_input_proj=2, aud_dim=0, layout="video_only",
                 gating_type="global", fusion_layers=4, fusion_n_heads=8, fusion_variant="v1", gate_options=None):
        super().__init__()
        self.num_queries = num_queries
        self.transformer = transformer
        self.position_embed = position_embed
        self.txt_position_embed = txt_position_embed
        hidden_dim = transformer.d_model
        self.hidden_dim = hidden_dim
        self.span_loss_type = span_loss_type
        self.max_v_l = max_v_l
        self.span_embed = MLP(hidden_dim, hidden_dim, 2 if span_loss_type == "l1" else max_v_l * 2, 3)
        self.class_embed = nn.Linear(hidden_dim, 2)
        self.use_txt_pos = use_txt_pos
        self.n_input_proj = n_input_proj
        self.query_embed = nn.Embedding(num_queries, 2)
        self.input_txt_proj = _input_proj(txt_dim, hidden_dim, n_input_proj, input_dropout)
        self.layout = layout
        self.fusion = None
        if layout == "custom":
            self.fusion = AVIGATEFusionCustom(vid_dim, aud_dim, hidden_dim, n_heads=fusion_n_heads,
                                              num_layers=fusion_layers, gating_type=gating_type,
                                              variant=fusion_variant, **(gate_options or {}))
            self.input_vid_proj = _input_proj(vid_dim, hidden_dim, n_input_proj, input_dropout)
            self.input_aud_proj = _input_proj(aud_dim, hidden_dim, n_input_proj, input_dropout)
        elif layout == "avigate":
            self.fusion = AVIGATEFusion(vid_dim, aud_dim, hidden_dim, n_heads=8, num_layers=1)
            self.input_vid_proj = nn.Identity()
        elif layout == "concat":
            self.input_vid_proj = _input_proj(vid_dim + aud_dim, hidden_dim, n_input_proj, input_dropout)
        elif layout == "video_only":
            self.input_vid_proj = _input_proj(vid_dim, hidden_dim, n_input_proj, input_dropout)
        else:
            raise ValueError(f"unknown layout {layout!r}")
        self.contrastive_align_loss = contrastive_align_loss
        if contrastive_align_loss:
            self.contrastive_align_projection_query = nn.Linear(hidden_dim, contrastive_hdim)
            self.contrastive_align_projection_txt = nn.Linear(hidden_dim, contrastive_hdim)
            self.contrastive_align_projection_vid = nn.Linear(hidden_dim, contrastive_hdim)
        self.saliency_proj1 = nn.Linear(hidden_dim, hidden_dim)
        self.saliency_proj2 = nn.Linear(hidden_dim, hidden_dim)
        self.aux_loss = aux_loss
        self.global_rep_token = nn.Parameter(torch.randn(hidden_dim))
        self.global_rep_pos = nn.Parameter(torch.randn(hidden_dim))
        self.batching = "query"

    @property
    def avigate_fusion(self):
        if self.fusion is None:
            raise NoFusionError(f"this model has no audio-visual fusion module (layout: {self.layout}), "
                                "so it has no gates to track")
        return self.fusion

    @property
    def uses_audio(self):
        return self.layout != "video_only"

    def set_batching(self, mode):
        """``"query"``: each sample's outputs equal running it alone (padding-aware masks and pooling);
        ``"original"``: the original code's batch-dependent behaviour, quirks included."""
        if mode not in BATCHING_MODES:
            raise ValueError(f"batching must be one of {BATCHING_MODES}, not {mode!r}")
        for module in self.modules():
            if hasattr(module, "batch_invariant"):
                module.batch_invariant = mode == "query"
        self.batching = mode
        return self

    def encode_video(self, src_vid, src_vid_mask, src_aud=None, src_aud_mask=None):
        """Projected (and, with a fusion module, audio-fused) video features [B, Lv, D]."""
        if self.layout in ("custom", "avigate") and src_aud is None:
            raise ValueError(f"audio features are required by the {self.layout} fusion layout")
        if self.layout == "custom":
            return self.fusion(self.input_vid_proj(src_vid), self.input_aud_proj(src_aud),
                               video_mask=src_vid_mask, audio_mask=src_aud_mask)
        if self.layout == "avigate":
            return self.fusion(src_vid, src_aud, video_mask=src_vid_mask, audio_mask=src_aud_mask)
        if self.layout == "concat":
            if src_aud is None:
                raise ValueError("audio features are required by the audio-concatenation layout")
            return self.input_vid_proj(torch.cat([src_vid, src_aud], dim=2))
        return self.input_vid_proj(src_vid)

    def _run_transformer(self, src_vid, src_vid_mask, src_txt, src_txt_mask, pos):
        bsz = src_vid.shape[0]
        src = torch.cat([self.global_rep_token.reshape(1, 1, -1).repeat(bsz, 1, 1), src_vid, src_txt], dim=1)
        valid = torch.cat([torch.ones(bsz, 1, dtype=torch.bool, device=src.device),
                           src_vid_mask.bool(), src_txt_mask.bool()], dim=1)
        pos = torch.cat([self.global_rep_pos.reshape(1, 1, -1).repeat(bsz, 1, 1), pos], dim=1)
        return self.transformer(src, ~valid, self.query_embed.weight, pos, video_length=src_vid.shape[1])

    def _saliency(self, vid_mem, memory_global):
        return torch.sum(self.saliency_proj1(vid_mem) * self.saliency_proj2(memory_global).unsqueeze(1),
                         dim=-1) / math.sqrt(self.hidden_dim)

    def forward(self, src_txt, src_txt_mask, src_vid, src_vid_mask, src_aud=None, src_aud_mask=None,
                compute_neg=True):
        src_vid = self.encode_video(src_vid, src_vid_mask, src_aud, src_aud_mask)
        src_txt = self.input_txt_proj(src_txt)
        if src_txt.shape[1] == 0:
            raise ValueError("empty text query: every query needs at least one token")
        pos_vid = self.position_embed(src_vid, src_vid_mask)
        pos_txt = self.txt_position_embed(src_txt) if self.use_txt_pos else torch.zeros_like(src_txt)
        pos = torch.cat([pos_vid, pos_txt], dim=1)

        hs, reference, memory, memory_global = self._run_transformer(src_vid, src_vid_mask, src_txt,
                                                                     src_txt_mask, pos)
        outputs_class = self.class_embed(hs)  # [layers, B, nq, 2]
        outputs_coord = self.span_embed(hs) + inverse_sigmoid(reference)
        if self.span_loss_type == "l1":
            outputs_coord = outputs_coord.sigmoid()
        out = {"pred_logits": outputs_class[-1], "pred_spans": outputs_coord[-1]}
        vid_mem = memory[:, :src_vid.shape[1]]
        if self.contrastive_align_loss:
            proj_queries = F.normalize(self.contrastive_align_projection_query(hs), p=2, dim=-1)
            out["proj_queries"] = proj_queries[-1]
            out["proj_txt_mem"] = F.normalize(self.contrastive_align_projection_txt(memory[:, src_vid.shape[1]:]),
                                              p=2, dim=-1)
            out["proj_vid_mem"] = F.normalize(self.contrastive_align_projection_vid(vid_mem), p=2, dim=-1)
        out["saliency_scores"] = self._saliency(vid_mem, memory_global)
        if compute_neg:
            # negative pairs: each video with the next sample's text (the fusion does not run again)
            txt_neg = torch.cat([src_txt[1:], src_txt[:1]], dim=0)
            txt_mask_neg = torch.cat([src_txt_mask[1:], src_txt_mask[:1]], dim=0)
            _, _, memory_neg, memory_global_neg = self._run_transformer(src_vid, src_vid_mask, txt_neg,
                                                                        txt_mask_neg, pos.clone())
            out["saliency_scores_neg"] = self._saliency(memory_neg[:, :src_vid.shape[1]], memory_global_neg)
        out["video_mask"] = src_vid_mask
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_spans": b}
                                  for a, b in zip(outputs_class[:-1], outputs_coord[:-1])]
            if self.contrastive_align_loss:
                for idx, d in enumerate(proj_queries[:-1]):
                    out["aux_outputs"][idx].update(proj_queries=d, proj_txt_mem=out["proj_txt_mem"])
        return out


def build_model(opt):
    """QDDETR for an option set (an ``argparse.Namespace`` with final feature dims)."""
    check_options(opt)
    if getattr(opt, "pre_norm", False):
        raise ConfigError("pre_norm=True is not supported: the original pre-norm text-to-video layer "
                          "hard-codes 75 clips and cannot run either")
    layout = fusion_layout(opt)
    position_embed, txt_position_embed = build_position_encoding(opt)
    model = QDDETR(
        build_transformer(opt), position_embed, txt_position_embed,
        txt_dim=opt.t_feat_dim, vid_dim=opt.v_feat_dim,
        aud_dim=opt.a_feat_dim if layout != "video_only" else 0,
        num_queries=opt.num_queries, input_dropout=opt.input_dropout, aux_loss=opt.aux_loss,
        contrastive_align_loss=opt.contrastive_align_loss, contrastive_hdim=opt.contrastive_hdim,
        span_loss_type=opt.span_loss_type, use_txt_pos=opt.use_txt_pos, n_input_proj=opt.n_input_proj,
        layout=layout, gating_type=getattr(opt, "gating_type", "global"),
        fusion_layers=getattr(opt, "fusion_layers", 4), fusion_n_heads=getattr(opt, "fusion_n_heads", 8),
        fusion_variant=fusion_variant(opt) if layout == "custom" else "v1",
        gate_options=gate_options(opt)[0] if layout == "custom" else None)
    return model
