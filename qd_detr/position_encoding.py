"""Positional encodings: sine encoding of clip positions and the (saved, rarely used) text encoding."""
import math

import torch
from torch import nn

__all__ = ["PositionEmbeddingSine", "TrainablePositionalEncoding", "build_position_encoding"]


class PositionEmbeddingSine(nn.Module):
    """Sine/cosine encoding of normalised 1-D positions.

    forward(x [B, L, *], mask [B, L] float, 1 = valid) -> [B, L, num_pos_feats].
    Positions are ``cumsum(mask) / (count + 1e-6) * 2pi``, so padded clips repeat the last valid
    position; no parameters.
    """

    def __init__(self, num_pos_feats=256, temperature=10000, normalize=True, scale=None):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, x, mask):
        pos = mask.cumsum(1, dtype=torch.float32)  # [B, L]
        if self.normalize:
            pos = pos / (pos[:, -1:] + 1e-6) * self.scale
        i = torch.arange(self.num_pos_feats, dtype=torch.float32, device=x.device)
        freq = self.temperature ** (2 * (i // 2) / self.num_pos_feats)
        angles = pos[:, :, None] / freq  # [B, L, F]
        # interleave sin (even dims) and cos (odd dims)
        return torch.stack((angles[:, :, 0::2].sin(), angles[:, :, 1::2].cos()), dim=3).flatten(2)


class TrainablePositionalEncoding(nn.Module):
    """Learned text position embedding: LayerNorm(x + E[pos]) then dropout. x: [B, L, D]."""

    def __init__(self, max_position_embeddings, hidden_size, dropout=0.1):
        super().__init__()
        self.position_embeddings = nn.Embedding(max_position_embeddings, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, input_feat):
        bsz, length = input_feat.shape[:2]
        ids = torch.arange(length, dtype=torch.long, device=input_feat.device).unsqueeze(0).expand(bsz, -1)
        return self.dropout(self.LayerNorm(input_feat + self.position_embeddings(ids)))


def build_position_encoding(opt):
    """(video sine encoding, text trainable encoding) as the original builds them."""
    return (PositionEmbeddingSine(opt.hidden_dim, normalize=True),
            TrainablePositionalEncoding(opt.max_q_l, opt.hidden_dim, dropout=opt.input_dropout))
