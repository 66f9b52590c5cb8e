"""AVIGATE-style gated audio-visual fusion (the research code's ``AVIGATEFusionCustom``).

Each block fuses projected audio A [B, L, D] into video V [B, L, D] (D = hidden_dim):

    g_mha, g_ffn = gating_function(V, A)                tanh gates in [-1, 1]
    a     = out_proj(a_proj(norm1(A)))                  "identity attention": clip t of audio feeds clip t
    z     = g_mha * a + V
    z_bar = g_ffn * ffn1(norm2(z)) + z
    r     = self_attention(norm3(z_bar)) + z_bar        padded clips masked (video_mask == 0)
    out   = ffn2(norm4(r)) + r

Gate shapes by gating type: global [B, 1, 1] (one per sample), clipwise [B, L, 1], elementwise
[B, L, D]. Every layer receives the previous layer's output and the same A. There is no dropout.

The global gate of the original code mean-pools V and A over all L positions, padding included, so a
sample's gate depends on how much padding its batch adds. With ``batch_invariant=True`` (the default;
see ``QDDETR.set_batching``) the pooling covers the valid clips only, which equals running the sample
alone; with ``False`` the original padded mean is reproduced.

Gate tracking (``enable_gate_tracking`` and friends) comes from ``GateTrackingMixin``: it adds no
parameters, and gates are read by forward hooks on each ``gating_function`` (``qd_detr.gates``).
"""
import torch
from torch import nn

from .gates import GateTrackingMixin

__all__ = ["GatingFunction", "GatedFusionBlockCustom", "AVIGATEFusionCustom", "masked_mean"]


def masked_mean(x, mask):
    """Mean of x [B, L, D] over L; with mask [B, L] (1 = valid) over valid positions only."""
    if mask is None:
        return x.mean(dim=1)
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)


def _gate_mlp(hidden_dim, out_dim):
    return nn.Sequential(nn.Linear(hidden_dim * 2, hidden_dim // 2), nn.ReLU(), nn.Linear(hidden_dim // 2, out_dim))


class GatingFunction(nn.Module):
    """Gates from video and audio: forward(V, A, video_mask=None) -> (gate_mha, gate_ffn).

    ``video_mask`` (float [B, L], 1 = valid) only affects global pooling, and only when
    ``batch_invariant`` is set.
    """

    def __init__(self, hidden_dim, gating_type="global"):
        super().__init__()
        if gating_type not in ("global", "clipwise", "elementwise"):
            raise ValueError(f"unknown gating_type {gating_type!r}")
        self.gating_type = gating_type
        out_dim = hidden_dim if gating_type == "elementwise" else 1
        self.mlp_mha = _gate_mlp(hidden_dim, out_dim)
        self.mlp_ffn = _gate_mlp(hidden_dim, out_dim)
        self.batch_invariant = True

    def forward(self, video_feat, audio_feat, video_mask=None):
        if self.gating_type == "global":
            mask = video_mask if self.batch_invariant else None
            joint = torch.cat([masked_mean(video_feat, mask), masked_mean(audio_feat, mask)], dim=1)  # [B, 2D]
            return torch.tanh(self.mlp_mha(joint)).unsqueeze(-1), torch.tanh(self.mlp_ffn(joint)).unsqueeze(-1)
        joint = torch.cat([video_feat, audio_feat], dim=2)  # [B, L, 2D]
        return torch.tanh(self.mlp_mha(joint)), torch.tanh(self.mlp_ffn(joint))


class GatedFusionBlockCustom(nn.Module):
    """One fusion block (see the module docstring for the math)."""

    def __init__(self, hidden_dim, n_heads, gating_type="global"):
        super().__init__()
        self.gating_function = GatingFunction(hidden_dim, gating_type)
        self.a_proj = nn.Linear(hidden_dim, hidden_dim)
        self.out_proj = nn.Linear(hidden_dim, hidden_dim)
        self.ffn1 = nn.Sequential(nn.Linear(hidden_dim, hidden_dim * 4), nn.ReLU(), nn.Linear(hidden_dim * 4, hidden_dim))
        self.self_attention = nn.MultiheadAttention(hidden_dim, n_heads, batch_first=True)
        self.ffn2 = nn.Sequential(nn.Linear(hidden_dim, hidden_dim * 4), nn.ReLU(), nn.Linear(hidden_dim * 4, hidden_dim))
        self.norm1 = nn.LayerNorm(hidden_dim)
        self.norm2 = nn.LayerNorm(hidden_dim)
        self.norm3 = nn.LayerNorm(hidden_dim)
        self.norm4 = nn.LayerNorm(hidden_dim)
        self.n_heads = n_heads

    def audio_branch(self, audio_feat):
        """The cross-attention branch: identity attention over the projected audio, [B, L, D].

        Splitting ``a_proj`` into heads and concatenating them again is the same linear map, so this
        equals the original per-head computation.
        """
        return self.out_proj(self.a_proj(self.norm1(audio_feat)))

    def forward(self, video_feat, audio_feat, video_mask=None, audio_mask=None):
        gate_mha, gate_ffn = self.gating_function(video_feat, audio_feat, video_mask=video_mask)
        z = gate_mha * self.audio_branch(audio_feat) + video_feat
        z_bar = gate_ffn * self.ffn1(self.norm2(z)) + z
        pad = video_mask.eq(0) if video_mask is not None else None
        # norm3 is applied three times, as in the original: three distinct tensors keep
        # nn.MultiheadAttention on the same (unpacked) projection path, bit for bit.
        refined, _ = self.self_attention(self.norm3(z_bar), self.norm3(z_bar), self.norm3(z_bar),
                                         key_padding_mask=pad)
        refined = refined + z_bar
        return self.ffn2(self.norm4(refined)) + refined


class AVIGATEFusionCustom(GateTrackingMixin, nn.Module):
    """A stack of ``num_layers`` gated fusion blocks over already projected video and audio.

    forward(video_feat [B, L, D], audio_feat [B, L, D], video_mask [B, L] float 1 = valid,
    audio_mask ignored, as in the original) -> fused video [B, L, D].
    ``vid_dim``/``aud_dim`` are accepted for signature compatibility and unused.
    """

    layout = "custom"

    def __init__(self, vid_dim, aud_dim, hidden_dim, n_heads=8, num_layers=1, gating_type="global"):
        super().__init__()
        self.gating_type = gating_type
        self.hidden_dim = hidden_dim
        self.fusion_layers = nn.ModuleList(
            GatedFusionBlockCustom(hidden_dim, n_heads, gating_type=gating_type) for _ in range(num_layers))

    def forward(self, video_feat, audio_feat, video_mask=None, audio_mask=None):
        fused = video_feat
        for layer in self.fusion_layers:
            fused = layer(fused, audio_feat, video_mask, audio_mask)
        return fused
