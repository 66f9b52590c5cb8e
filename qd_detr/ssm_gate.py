"""The diagonal-strip self-similarity gate of the research code's ``diagstrip-ssm`` branch.

For one modality x [B, T, D] with mask m [B, T] (1 = valid):

    x~ = x * m;  x^ = x~ / (||x~||_2 + 1e-6)            padded rows become 0
    S  = x^ x^T - d * I;  S = (S + 1) / 2;  S *= m m^T     cosine self-similarity [B, T, T]
    strip[:, w + k, t] = S[t, t + k] (k >= 0), S[t + |k|, t] (k < 0), left-aligned, 0 outside
    h  = encoder(strip)                                   [B, C, T]: 1x1 conv, then per dilation
                                                           (3-tap dilated conv, 1x1 conv), ReLU after each
    z  = sum_t h[:, :, t] m_t / (sum_t m_t + 1e-6)        masked average pool [B, C]

Audio and (``use_video_branch``) video share one encoder; ``f = LayerNorm(cat(z_a, z_v))`` and

    gate_mha = sigmoid(mlp_mha(f))  in (0, 1),   gate_ffn = tanh(mlp_ffn(f))  in (-1, 1),   both [B, 1, 1].

The gates depend on video and audio only. In the original code the padded steps of a batch are
``ReLU(bias)`` after the first convolution, and the zero-padded dilated convolutions carry them into
the last ``sum(dilations)`` valid steps, so a short video's gate depends on its batch mates. With
``batch_invariant=True`` (``QDDETR.set_batching("query")``) the encoder output is zeroed on padded steps
after every ReLU, which equals running the sample alone; ``False`` reproduces the original.
"""
import torch
from torch import nn

__all__ = ["DiagonalStripSSMGate", "DiagonalStripEncoder", "self_similarity", "diagonal_strip"]


def self_similarity(x, mask=None, diag_subtract=0.1):
    """Cosine self-similarity of x [B, T, D] mapped to [0, 1], diagonal lowered by ``diag_subtract``,
    padded rows and columns zero: [B, T, T]."""
    if mask is not None:
        x = x * mask.unsqueeze(-1).to(x.dtype)
    x = x / (x.norm(p=2, dim=-1, keepdim=True) + 1e-6)
    sim = torch.einsum("btd,bsd->bts", x, x)
    if diag_subtract:
        sim = sim - diag_subtract * torch.eye(sim.shape[1], device=sim.device, dtype=sim.dtype).unsqueeze(0)
    sim = (sim + 1.0) * 0.5
    if mask is not None:
        m = mask.to(sim.dtype)
        sim = sim * m.unsqueeze(2) * m.unsqueeze(1)
    return sim


def diagonal_strip(sim, band_width):
    """The 2w+1 diagonals of ``sim`` [B, T, T] around the main one, left-aligned: [B, 2w+1, T]."""
    batch, length, _ = sim.shape
    out = sim.new_zeros((batch, 2 * band_width + 1, length))
    for channel, k in enumerate(range(-band_width, band_width + 1)):
        n = length - abs(k)
        if n <= 0:
            continue
        if k >= 0:
            out[:, channel, :n] = sim[:, :n, k:].diagonal(dim1=1, dim2=2)
        else:
            out[:, channel, :n] = sim[:, -k:, :n].diagonal(dim1=1, dim2=2)
    return out


class DiagonalStripEncoder(nn.Module):
    """1x1 conv, then for each dilation d: Conv1d(k=3, dilation=d), ReLU, Dropout, Conv1d(k=1), ReLU.

    forward(strip [B, 2w+1, T], mask [B, T] or None) -> pooled [B, C]. ``net`` indices equal the
    original's (``net.0``, then ``net.{2+5i}`` and ``net.{5+5i}`` for dilation i).
    """

    def __init__(self, in_bands, channels=64, dilations=(1, 2, 4), dropout=0.1):
        super().__init__()
        layers = [nn.Conv1d(in_bands, channels, kernel_size=1), nn.ReLU()]
        for d in dilations:
            layers += [nn.Conv1d(channels, channels, kernel_size=3, padding=d, dilation=d), nn.ReLU(),
                       nn.Dropout(dropout), nn.Conv1d(channels, channels, kernel_size=1), nn.ReLU()]
        self.net = nn.Sequential(*layers)
        self.batch_invariant = True

    def forward(self, strip, mask=None):
        if mask is None or not self.batch_invariant:
            h = self.net(strip)
        else:
            keep = mask.to(strip.dtype).unsqueeze(1)  # [B, 1, T]
            h = strip
            for layer in self.net:
                h = layer(h)
                if isinstance(layer, nn.ReLU):
                    h = h * keep  # padded steps = the zero padding a sample alone sees
        if mask is None:
            return h.mean(dim=-1)
        m = mask.to(h.dtype).unsqueeze(1)
        return (h * m).sum(dim=-1) / (m.sum(dim=-1) + 1e-6)


class DiagonalStripSSMGate(nn.Module):
    """forward(V [B, T, D], A [B, T, D], video_mask, audio_mask) -> (gate_mha, gate_ffn), each [B, 1, 1]."""

    def __init__(self, band_width=8, enc_channels=64, dilations=(1, 2, 4), diag_subtract=0.1,
                 use_video_branch=True):
        super().__init__()
        self.band_width = int(band_width)
        self.diag_subtract = float(diag_subtract)
        self.dilations = tuple(int(d) for d in dilations)
        self.use_video_branch = bool(use_video_branch)
        self.encoder = DiagonalStripEncoder(2 * self.band_width + 1, enc_channels, self.dilations)
        width = enc_channels * (2 if self.use_video_branch else 1)
        self.norm = nn.LayerNorm(width)
        self.mlp_mha = nn.Sequential(nn.Linear(width, enc_channels), nn.ReLU(), nn.Linear(enc_channels, 1))
        self.mlp_ffn = nn.Sequential(nn.Linear(width, enc_channels), nn.ReLU(), nn.Linear(enc_channels, 1))
        nn.init.constant_(self.mlp_mha[-1].bias, -1.0)  # the original's initial value (a trained bias wins)

    def summary(self, x, mask):
        """Pooled strip encoding of one modality [B, C]."""
        strip = diagonal_strip(self_similarity(x, mask, self.diag_subtract), self.band_width)
        return self.encoder(strip, mask)

    def forward(self, video_feat, audio_feat, video_mask=None, audio_mask=None):
        feat = self.summary(audio_feat, audio_mask)
        if self.use_video_branch:
            feat = torch.cat([feat, self.summary(video_feat, video_mask)], dim=-1)
        feat = self.norm(feat)
        gate_mha = torch.sigmoid(self.mlp_mha(feat))
        gate_ffn = torch.tanh(self.mlp_ffn(feat))
        return gate_mha.unsqueeze(-1), gate_ffn.unsqueeze(-1)
