"""The older AVIGATE fusion layout (the research code's ``avigate`` branch, ``--use_avigate``).

Unlike ``AVIGATEFusionCustom`` it projects raw features itself (``video_proj``, ``audio_proj`` plus
Dropout(0.5); the model's ``input_vid_proj`` is then an identity), has a real cross-attention
(``nn.MultiheadAttention``, video queries over audio keys) and only global gates [B, 1]:

    g_mha, g_ffn = tanh(mlp(cat(mean_L V, mean_L A)))       [B, 1] each
    z     = g_mha * cross_attention(norm1 V, norm1 A, norm1 A) + V
    z_bar = g_ffn * ffn1(norm2 z) + z
    r     = self_attention(norm3 z_bar) + z_bar
    out   = ffn2(norm4 r) + r

Mask convention it was trained with: the original passes the float masks (1 = valid, 0 = pad) as
``key_padding_mask``; PyTorch adds a float mask to the attention logits, so valid keys get +1 and
padded keys are *not* masked. ``batch_invariant=False`` reproduces that; ``True`` (the default)
masks padded keys and pools over valid clips, which equals running each sample alone (where the
uniform +1 cancels in the softmax).
"""
import torch
from torch import nn

from .avigate_custom import masked_mean
from .gates import GateTrackingMixin

__all__ = ["LegacyGatingFunction", "GatedFusionBlock", "AVIGATEFusion"]


def _gate_mlp(hidden_dim):
    return nn.Sequential(nn.Linear(hidden_dim * 2, hidden_dim // 2), nn.ReLU(), nn.Linear(hidden_dim // 2, 1))


def _ffn(hidden_dim):
    return nn.Sequential(nn.Linear(hidden_dim, hidden_dim * 4), nn.ReLU(), nn.Linear(hidden_dim * 4, hidden_dim))


class LegacyGatingFunction(nn.Module):
    """Global gates: forward(V, A, video_mask=None) -> (gate_mha [B, 1], gate_ffn [B, 1])."""

    gating_type = "global"

    def __init__(self, hidden_dim):
        super().__init__()
        self.mlp_mha = _gate_mlp(hidden_dim)
        self.mlp_ffn = _gate_mlp(hidden_dim)
        self.batch_invariant = True

    def forward(self, video_feat, audio_feat, video_mask=None):
        mask = video_mask if self.batch_invariant else None
        joint = torch.cat([masked_mean(video_feat, mask), masked_mean(audio_feat, mask)], dim=1)
        return torch.tanh(self.mlp_mha(joint)), torch.tanh(self.mlp_ffn(joint))


class GatedFusionBlock(nn.Module):
    def __init__(self, hidden_dim, n_heads):
        super().__init__()
        self.gating_function = LegacyGatingFunction(hidden_dim)
        self.cross_attention = nn.MultiheadAttention(hidden_dim, n_heads, batch_first=True)
        self.ffn1 = _ffn(hidden_dim)
        self.self_attention = nn.MultiheadAttention(hidden_dim, n_heads, batch_first=True)
        self.ffn2 = _ffn(hidden_dim)
        self.norm1 = nn.LayerNorm(hidden_dim)
        self.norm2 = nn.LayerNorm(hidden_dim)
        self.norm3 = nn.LayerNorm(hidden_dim)
        self.norm4 = nn.LayerNorm(hidden_dim)
        self.batch_invariant = True

    def _key_mask(self, mask):
        if mask is None:
            return None
        return mask.eq(0) if self.batch_invariant else mask  # original: the float mask, additive

    def audio_branch(self, video_feat, audio_feat, audio_mask=None):
        """Cross-attention output (before the gate), [B, L, D]."""
        return self.cross_attention(self.norm1(video_feat), self.norm1(audio_feat), self.norm1(audio_feat),
                                    key_padding_mask=self._key_mask(audio_mask))[0]

    def forward(self, video_feat, audio_feat, video_mask=None, audio_mask=None):
        gate_mha, gate_ffn = self.gating_function(video_feat, audio_feat, video_mask=video_mask)
        z = gate_mha.unsqueeze(-1) * self.audio_branch(video_feat, audio_feat, audio_mask) + video_feat
        z_bar = gate_ffn.unsqueeze(-1) * self.ffn1(self.norm2(z)) + z
        refined = self.self_attention(self.norm3(z_bar), self.norm3(z_bar), self.norm3(z_bar),
                                      key_padding_mask=self._key_mask(video_mask))[0]
        refined = refined + z_bar
        return self.ffn2(self.norm4(refined)) + refined


class AVIGATEFusion(GateTrackingMixin, nn.Module):
    """forward(raw video [B, L, Dv], raw audio [B, L, Da], video_mask, audio_mask) -> [B, L, D]."""

    layout = "avigate"
    gating_type = "global"

    def __init__(self, vid_dim, aud_dim, hidden_dim, n_heads=8, num_layers=1):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.video_proj = nn.Linear(vid_dim, hidden_dim)
        self.audio_proj = nn.Linear(aud_dim, hidden_dim)
        self.dropout = nn.Dropout(0.5)
        self.fusion_layers = nn.ModuleList(GatedFusionBlock(hidden_dim, n_heads) for _ in range(num_layers))

    def forward(self, video_feat, audio_feat, video_mask=None, audio_mask=None):
        video_feat = self.dropout(self.video_proj(video_feat))
        audio_feat = self.dropout(self.audio_proj(audio_feat))
        fused = video_feat
        for layer in self.fusion_layers:
            fused = layer(fused, audio_feat, video_mask, audio_mask)
        return fused
