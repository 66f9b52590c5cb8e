"""QD-DETR transformer: text-to-video (T2V) encoder, encoder, and DAB-style anchor decoder.

Sequences are sequence-first inside the transformer: [L, B, D]. Padding masks are boolean with
True = pad (the model converts its float 1 = valid masks before calling in).

Parameter names and shapes equal those of the original research code, so its checkpoints load with
``strict=True``. Differences from the original forward, both opt-in through ``batch_invariant``:
- ``batch_invariant=True`` lays out the T2V attention mask per (sample, head) as
  ``nn.MultiheadAttention`` expects (``repeat_interleave``); the original ``repeat`` gives head h of
  sample b the mask of sample (b * nhead + h) % B, so batched outputs depend on the batch.
- the decoder's initial target is created on the device of its inputs (the original hard-codes CUDA).
"""
import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MLP", "Transformer", "build_transformer", "inverse_sigmoid", "gen_sineembed_for_position"]


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them (none after the last)."""

    def __init__(self, input_dim, hidden_dim, output_dim, num_layers):
        super().__init__()
        self.num_layers = num_layers
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        outs = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip(dims, outs))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < self.num_layers - 1:
                x = F.relu(x)
        return x


def inverse_sigmoid(x, eps=1e-3):
    """log(x / (1 - x)) with both terms clamped at ``eps``."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def gen_sineembed_for_position(pos_tensor):
    """Sine embedding of (center, width) anchors: [nq, B, 2] -> [nq, B, 256] (128 dims each)."""
    scale = 2 * math.pi
    i = torch.arange(128, dtype=torch.float32, device=pos_tensor.device)
    freq = 10000 ** (2 * (i // 2) / 128)

    def embed(coord):
        angles = (coord * scale)[:, :, None] / freq
        return torch.stack((angles[:, :, 0::2].sin(), angles[:, :, 1::2].cos()), dim=3).flatten(2)

    return torch.cat((embed(pos_tensor[:, :, 0]), embed(pos_tensor[:, :, 1])), dim=2)


class MultiheadAttention(nn.Module):
    """Attention without input projections (the decoder projects q/k/v itself); only ``out_proj``.

    query [Lq, B, E], key [Lk, B, E], value [Lk, B, vdim] -> ([Lq, B, vdim], head-averaged weights).
    ``key_padding_mask`` [B, Lk] bool, True = ignore.
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, vdim=None):
        super().__init__()
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.vdim = vdim if vdim is not None else embed_dim
        self.out_proj = nn.Linear(self.vdim, self.vdim)
        nn.init.constant_(self.out_proj.bias, 0.0)

    def forward(self, query, key, value, key_padding_mask=None, attn_mask=None):
        tgt_len, bsz, embed_dim = query.shape
        heads = self.num_heads
        head_dim = embed_dim // heads
        v_head_dim = self.vdim // heads
        q = query * float(head_dim) ** -0.5
        q = q.contiguous().view(tgt_len, bsz * heads, head_dim).transpose(0, 1)
        k = key.contiguous().view(-1, bsz * heads, head_dim).transpose(0, 1)
        v = value.contiguous().view(-1, bsz * heads, v_head_dim).transpose(0, 1)
        src_len = k.size(1)
        weights = torch.bmm(q, k.transpose(1, 2))  # [B*h, Lq, Lk]
        if attn_mask is not None:
            weights.masked_fill_(attn_mask, float("-inf"))
        if key_padding_mask is not None:
            weights = weights.view(bsz, heads, tgt_len, src_len)
            weights = weights.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
            weights = weights.view(bsz * heads, tgt_len, src_len)
        weights = torch.softmax(weights - weights.max(dim=-1, keepdim=True)[0], dim=-1)
        weights = F.dropout(weights, p=self.dropout, training=self.training)
        out = torch.bmm(weights, v)  # [B*h, Lq, v_head_dim]
        out = out.transpose(0, 1).contiguous().view(tgt_len, bsz, self.vdim)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        return out, weights.view(bsz, heads, tgt_len, src_len).sum(dim=1) / heads


class T2VEncoderLayer(nn.Module):
    """Text-to-video layer: video clips (queries) attend to text tokens only; the global token and
    the text pass through unchanged. src [1 + Lv + Lt, B, D] ordered (global, video, text)."""

    def __init__(self, d_model, nhead, dim_feedforward, dropout):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = nn.PReLU()
        self.nhead = nhead
        self.batch_invariant = True

    def forward(self, src, src_key_padding_mask, pos, video_length):
        lv = video_length
        with_pos = src + pos
        q, k, v = with_pos[1:lv + 1], with_pos[lv + 1:], src[lv + 1:]
        q_pad = src_key_padding_mask[:, 1:lv + 1].unsqueeze(2).float()  # [B, Lv, 1]
        k_pad = src_key_padding_mask[:, lv + 1:].unsqueeze(1).float()  # [B, 1, Lt]
        pair_mask = torch.matmul(q_pad, k_pad).bool()  # [B, Lv, Lt]: padded clip x padded token
        if self.batch_invariant:
            attn_mask = pair_mask.repeat_interleave(self.nhead, dim=0)  # index b * nhead + h
        else:
            attn_mask = pair_mask.repeat(self.nhead, 1, 1)  # original layout (index h * B + b)
        out = self.self_attn(q, k, value=v, attn_mask=attn_mask,
                             key_padding_mask=src_key_padding_mask[:, lv + 1:])[0]
        out = src[1:lv + 1] + self.dropout1(out)
        ffn = self.linear2(self.dropout(self.activation(self.linear1(self.norm1(out)))))
        out = self.norm2(out + self.dropout2(ffn))
        return torch.cat([src[:1], out, src[lv + 1:]], dim=0)


class EncoderLayer(nn.Module):
    """Post-norm self-attention encoder layer with a PReLU feed-forward block."""

    def __init__(self, d_model, nhead, dim_feedforward, dropout):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = nn.PReLU()

    def forward(self, src, src_key_padding_mask, pos):
        q = k = src + pos
        out = self.self_attn(q, k, value=src, key_padding_mask=src_key_padding_mask)[0]
        src = self.norm1(src + self.dropout1(out))
        ffn = self.linear2(self.dropout(self.activation(self.linear1(src))))
        return self.norm2(src + self.dropout2(ffn))


class Encoder(nn.Module):
    def __init__(self, layer, num_layers):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.num_layers = num_layers

    def forward(self, src, src_key_padding_mask, pos, **kwargs):
        for layer in self.layers:
            src = layer(src, src_key_padding_mask=src_key_padding_mask, pos=pos, **kwargs)
        return src


class DecoderLayer(nn.Module):
    """Conditional/DAB-DETR decoder layer: content and positional parts of queries and keys are
    projected separately; in cross-attention they are concatenated per head."""

    def __init__(self, d_model, nhead, dim_feedforward, dropout):
        super().__init__()
        self.sa_qcontent_proj = nn.Linear(d_model, d_model)
        self.sa_qpos_proj = nn.Linear(d_model, d_model)
        self.sa_kcontent_proj = nn.Linear(d_model, d_model)
        self.sa_kpos_proj = nn.Linear(d_model, d_model)
        self.sa_v_proj = nn.Linear(d_model, d_model)
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, vdim=d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)

        self.ca_qcontent_proj = nn.Linear(d_model, d_model)
        self.ca_qpos_proj = nn.Linear(d_model, d_model)  # used by the first layer only
        self.ca_kcontent_proj = nn.Linear(d_model, d_model)
        self.ca_kpos_proj = nn.Linear(d_model, d_model)
        self.ca_v_proj = nn.Linear(d_model, d_model)
        self.ca_qpos_sine_proj = nn.Linear(d_model, d_model)
        self.cross_attn = MultiheadAttention(d_model * 2, nhead, dropout=dropout, vdim=d_model)

        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.activation = nn.PReLU()
        self.nhead = nhead

    def forward(self, tgt, memory, memory_key_padding_mask, pos, query_pos, query_sine_embed, is_first):
        # self-attention among the decoder queries
        q = self.sa_qcontent_proj(tgt) + self.sa_qpos_proj(query_pos)
        k = self.sa_kcontent_proj(tgt) + self.sa_kpos_proj(query_pos)
        out = self.self_attn(q, k, value=self.sa_v_proj(tgt))[0]
        tgt = self.norm1(tgt + self.dropout1(out))

        # cross-attention to the video memory
        q_content = self.ca_qcontent_proj(tgt)
        k_content = self.ca_kcontent_proj(memory)
        v = self.ca_v_proj(memory)
        nq, bs, d = q_content.shape
        lk = k_content.shape[0]
        k_pos = self.ca_kpos_proj(pos)
        if is_first:
            q = q_content + self.ca_qpos_proj(query_pos)
            k = k_content + k_pos
        else:
            q, k = q_content, k_content
        hd = d // self.nhead
        q = q.view(nq, bs, self.nhead, hd)
        sine = self.ca_qpos_sine_proj(query_sine_embed).view(nq, bs, self.nhead, hd)
        q = torch.cat([q, sine], dim=3).view(nq, bs, d * 2)
        k = torch.cat([k.view(lk, bs, self.nhead, hd), k_pos.view(lk, bs, self.nhead, hd)], dim=3)
        k = k.view(lk, bs, d * 2)
        out = self.cross_attn(query=q, key=k, value=v, key_padding_mask=memory_key_padding_mask)[0]
        tgt = self.norm2(tgt + self.dropout2(out))
        ffn = self.linear2(self.dropout(self.activation(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout3(ffn))


class Decoder(nn.Module):
    """Anchor decoder: each layer refines (center, width) anchors; returns all layers' outputs."""

    def __init__(self, layer, num_layers, d_model=256, query_dim=2):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.num_layers = num_layers
        self.norm = nn.LayerNorm(d_model)
        self.query_dim = query_dim
        self.query_scale = MLP(d_model, d_model, d_model, 2)
        self.ref_point_head = MLP(d_model, d_model, d_model, 2)
        self.bbox_embed = MLP(d_model, d_model, 2, 3)
        nn.init.constant_(self.bbox_embed.layers[-1].weight, 0)
        nn.init.constant_(self.bbox_embed.layers[-1].bias, 0)
        self.ref_anchor_head = MLP(d_model, d_model, 1, 2)
        for layer_id in range(1, num_layers):  # keep_query_pos=False: only layer 0 has ca_qpos_proj
            self.layers[layer_id].ca_qpos_proj = None

    def forward(self, tgt, memory, memory_key_padding_mask, pos, refpoints_unsigmoid):
        """tgt [nq, B, D], memory [Lv, B, D] -> (hs [layers, B, nq, D], refs [layers, B, nq, 2])."""
        output = tgt
        intermediate = []
        reference_points = refpoints_unsigmoid.sigmoid()
        ref_points = [reference_points]
        for layer_id, layer in enumerate(self.layers):
            obj_center = reference_points[..., :self.query_dim]
            query_sine_embed = gen_sineembed_for_position(obj_center)
            query_pos = self.ref_point_head(query_sine_embed)
            scale = 1 if layer_id == 0 else self.query_scale(output)
            query_sine_embed = query_sine_embed * scale
            # modulate the positional attention by the predicted/anchor width ratio
            reft_cond = self.ref_anchor_head(output).sigmoid()  # [nq, B, 1]
            query_sine_embed *= (reft_cond[..., 0] / obj_center[..., 1]).unsqueeze(-1)
            output = layer(output, memory, memory_key_padding_mask=memory_key_padding_mask, pos=pos,
                           query_pos=query_pos, query_sine_embed=query_sine_embed, is_first=layer_id == 0)
            tmp = self.bbox_embed(output)
            tmp[..., :self.query_dim] += inverse_sigmoid(reference_points)
            new_reference_points = tmp[..., :self.query_dim].sigmoid()
            if layer_id != self.num_layers - 1:
                ref_points.append(new_reference_points)
            reference_points = new_reference_points.detach()
            intermediate.append(self.norm(output))
        return torch.stack(intermediate).transpose(1, 2), torch.stack(ref_points).transpose(1, 2)


class Transformer(nn.Module):
    """T2V encoder -> encoder over (global token, video) -> anchor decoder."""

    def __init__(self, d_model=256, nhead=8, num_queries=10, num_encoder_layers=2, num_decoder_layers=2,
                 dim_feedforward=1024, dropout=0.1):
        super().__init__()
        self.t2v_encoder = Encoder(T2VEncoderLayer(d_model, nhead, dim_feedforward, dropout), num_encoder_layers)
        self.encoder = Encoder(EncoderLayer(d_model, nhead, dim_feedforward, dropout), num_encoder_layers)
        self.decoder = Decoder(DecoderLayer(d_model, nhead, dim_feedforward, dropout), num_decoder_layers,
                               d_model=d_model)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        self.d_model = d_model
        self.nhead = nhead
        self.batch_invariant = True
        self.dec_layers = num_decoder_layers
        self.num_queries = num_queries

    def forward(self, src, mask, query_embed, pos_embed, video_length):
        """src [B, 1+Lv+Lt, D] (global, video, text); mask [B, 1+Lv+Lt] True = pad;
        query_embed [nq, 2]; pos_embed like src.
        Returns hs [layers, B, nq, D], references [layers, B, nq, 2], memory_local [B, Lv, D],
        memory_global [B, D]."""
        bs, _, d = src.shape
        src = src.permute(1, 0, 2)  # [L, B, D]
        pos_embed = pos_embed.permute(1, 0, 2)
        if self.batch_invariant:
            # A permuted batch is non-contiguous, and Linear kernels round differently on
            # non-contiguous rows than on the contiguous rows of a batch of one.
            src, pos_embed = src.contiguous(), pos_embed.contiguous()
        refpoint_embed = query_embed.unsqueeze(1).repeat(1, bs, 1)  # [nq, B, 2]
        src = self.t2v_encoder(src, src_key_padding_mask=mask, pos=pos_embed, video_length=video_length)
        keep = video_length + 1  # global token + video; text leaves the model here
        src, mask, pos_embed = src[:keep], mask[:, :keep], pos_embed[:keep]
        memory = self.encoder(src, src_key_padding_mask=mask, pos=pos_embed)
        memory_global, memory_local = memory[0], memory[1:]
        tgt = torch.zeros(refpoint_embed.shape[0], bs, d, dtype=src.dtype, device=src.device)
        hs, references = self.decoder(tgt, memory_local, memory_key_padding_mask=mask[:, 1:],
                                      pos=pos_embed[1:], refpoints_unsigmoid=refpoint_embed)
        return hs, references, memory_local.transpose(0, 1), memory_global


def build_transformer(opt):
    return Transformer(d_model=opt.hidden_dim, nhead=opt.nheads, num_queries=opt.num_queries,
                       num_encoder_layers=opt.enc_layers, num_decoder_layers=opt.dec_layers,
                       dim_feedforward=opt.dim_feedforward, dropout=opt.dropout)
