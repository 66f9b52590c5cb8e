"""AVIGATE-style gated audio-visual fusion (the research code's ``AVIGATEFusionCustom``), every variant.

Each block fuses projected audio A [B, L, D] into video V [B, L, D] (D = hidden_dim). ``variant``:

- ``"v1"`` (branch ``avigate_custom`` and its gate-analysis descendants): tanh gates in [-1, 1]::

    g_mha, g_ffn = gating_function(V, A)
    a     = out_proj(a_proj(norm1(A)))                  "identity attention": clip t of audio feeds clip t
    z     = g_mha * a + V
    z_bar = g_ffn * ffn1(norm2(z)) + z

- ``"diagstrip"`` (branch ``diagstrip-ssm``): as v1, except that ``global`` gating computes its MHA
  gate with a sigmoid (0, 1), and gating type ``global_diagstrip_ssm`` takes its gates from
  ``qd_detr.ssm_gate.DiagonalStripSSMGate`` (sigmoid MHA, tanh FFN, both [B, 1, 1]).
- ``"v2"`` (branch ``feat/gate_analysis_junhan_v2-0812``, "gate refinement")::

    g_mha = sigmoid((mlp_mha(joint) + mha_bias) / mha_temp) * mha_scale      in (0, mha_scale)
    g_ffn = tanh(mlp_ffn(joint)) * ffn_alpha                                 in [-|alpha|, |alpha|]
    z     = V + g_mha * delta_norm_mha(a)
    d     = delta_norm_ffn(ffn1(norm2(z)))
    z_bar = z + g_ffn * d                               without FiLM
    z_bar = z + d * (1 + g_ffn) + g_beta                with FiLM (ffn_film), g_beta = tanh(mlp_ffn_beta(joint)) * ffn_beta

  ``mha_bias``, ``mha_scale``, ``ffn_alpha``, ``ffn_beta`` are 0-d parameters of each layer;
  ``mha_temp`` is a plain float that exists only in the saved options (``mha_gate_temp``). With FiLM
  ``g_ffn = 0`` means "FFN branch at weight 1", not "off". ``g_beta`` is computed by the block (as in
  the original), through ``GatingFunction.film_shift``.

Then, in every variant::

    r     = self_attention(norm3(z_bar)) + z_bar        padded clips masked (video_mask == 0)
    out   = ffn2(norm4(r)) + r

``joint`` is ``cat(V, A)`` per clip (clipwise, elementwise) or ``cat(mean_L V, mean_L A)`` (global).
Gate shapes: global and global_diagstrip_ssm [B, 1, 1], clipwise [B, L, 1], elementwise [B, L, D].
Every layer receives the previous layer's output and the same A. There is no dropout in the block.

The global pooling of the original code averages over all L positions, padding included, so a
sample's gate depends on how much padding its batch adds. With ``batch_invariant=True`` (the default;
see ``QDDETR.set_batching``) the pooling covers the valid clips only, which equals running the sample
alone; with ``False`` the original padded mean is reproduced. The same holds for the FiLM shift of
global v2 gating and for the SSM gate's encoder (see ``qd_detr.ssm_gate``).

Gate tracking (``enable_gate_tracking`` and friends) comes from ``GateTrackingMixin``: it adds no
parameters, and gates are read by forward hooks on each ``gating_function`` (``qd_detr.gates``).
"""
import torch
from torch import nn

from .gates import GateRange, GateTrackingMixin
from .ssm_gate import DiagonalStripSSMGate

__all__ = ["GatingFunction", "GatedFusionBlockCustom", "AVIGATEFusionCustom", "masked_mean", "FUSION_VARIANTS"]

FUSION_VARIANTS = ("v1", "diagstrip", "v2")


def masked_mean(x, mask):
    """Mean of x [B, L, D] over L; with mask [B, L] (1 = valid) over valid positions only."""
    if mask is None:
        return x.mean(dim=1)
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)


def _gate_mlp(hidden_dim, out_dim):
    return nn.Sequential(nn.Linear(hidden_dim * 2, hidden_dim // 2), nn.ReLU(), nn.Linear(hidden_dim // 2, out_dim))


class GatingFunction(nn.Module):
    """Gates from video and audio: forward(V, A, video_mask=None, audio_mask=None) -> (gate_mha, gate_ffn).

    The masks (float [B, L], 1 = valid) only affect global pooling when ``batch_invariant`` is set,
    and the SSM gate (which always uses them, as the original does). v2 options: ``mha_temp`` (a
    float, not a parameter), ``ffn_film``; the ``*_init`` values are overwritten by a loaded state dict.
    """

    def __init__(self, hidden_dim, gating_type="global", variant="v1", mha_temp=1.5, mha_bias_init=1.0,
                 mha_scale_init=1.0, ffn_alpha_init=0.3, ffn_film=False, ffn_beta_init=0.3, ssm=None):
        super().__init__()
        if variant not in FUSION_VARIANTS:
            raise ValueError(f"unknown fusion variant {variant!r}")
        allowed = ("global", "clipwise", "elementwise") + (("global_diagstrip_ssm",) if variant == "diagstrip" else ())
        if gating_type not in allowed:
            raise ValueError(f"gating_type {gating_type!r} does not exist in the {variant} fusion "
                             f"(allowed: {', '.join(allowed)})")
        self.gating_type = gating_type
        self.variant = variant
        self.ffn_film = bool(ffn_film) and variant == "v2"
        self.batch_invariant = True
        if variant == "v2":
            self.mha_temp = float(mha_temp)
            self.mha_bias = nn.Parameter(torch.tensor(mha_bias_init, dtype=torch.float32))
            self.mha_scale = nn.Parameter(torch.tensor(mha_scale_init, dtype=torch.float32))
            self.ffn_alpha = nn.Parameter(torch.tensor(ffn_alpha_init, dtype=torch.float32))
            if self.ffn_film:
                self.ffn_beta = nn.Parameter(torch.tensor(ffn_beta_init, dtype=torch.float32))
        if gating_type == "global_diagstrip_ssm":
            self.ssm_gate = DiagonalStripSSMGate(**(ssm or {}))
            return
        out_dim = hidden_dim if gating_type == "elementwise" else 1
        self.mlp_mha = _gate_mlp(hidden_dim, out_dim)
        self.mlp_ffn = _gate_mlp(hidden_dim, out_dim)
        if self.ffn_film:
            self.mlp_ffn_beta = _gate_mlp(hidden_dim, out_dim)

    @property
    def gate_kinds(self):
        """The gates this function's block applies: ("mha", "ffn") or, with FiLM, ("mha", "ffn", "beta")."""
        return ("mha", "ffn", "beta") if self.ffn_film else ("mha", "ffn")

    def joint(self, video_feat, audio_feat, video_mask=None):
        """The gating input: [B, 2D] pooled (global) or [B, L, 2D] per clip."""
        if self.gating_type == "global":
            mask = video_mask if self.batch_invariant else None
            return torch.cat([masked_mean(video_feat, mask), masked_mean(audio_feat, mask)], dim=1)
        return torch.cat([video_feat, audio_feat], dim=2)

    def _shape(self, gate):
        return gate.unsqueeze(-1) if self.gating_type == "global" else gate  # global [B, 1] -> [B, 1, 1]

    def forward(self, video_feat, audio_feat, video_mask=None, audio_mask=None):
        if self.gating_type == "global_diagstrip_ssm":
            return self.ssm_gate(video_feat, audio_feat, video_mask=video_mask, audio_mask=audio_mask)
        joint = self.joint(video_feat, audio_feat, video_mask)
        if self.variant == "v2":
            gate_mha = torch.sigmoid((self.mlp_mha(joint) + self.mha_bias) / self.mha_temp) * self.mha_scale
            gate_ffn = torch.tanh(self.mlp_ffn(joint)) * self.ffn_alpha
        else:
            raw_mha = self.mlp_mha(joint)
            sigmoid = self.variant == "diagstrip" and self.gating_type == "global"
            gate_mha = torch.sigmoid(raw_mha) if sigmoid else torch.tanh(raw_mha)
            gate_ffn = torch.tanh(self.mlp_ffn(joint))
        return self._shape(gate_mha), self._shape(gate_ffn)

    def beta_from_raw(self, raw):
        """The FiLM shift from the output of ``mlp_ffn_beta``: tanh(raw) * ffn_beta."""
        return torch.tanh(raw) * self.ffn_beta

    def film_shift(self, video_feat, audio_feat, video_mask=None):
        """g_beta (FiLM only), shaped like the gates; computed by the block, as in the original."""
        return self._shape(self.beta_from_raw(self.mlp_ffn_beta(self.joint(video_feat, audio_feat, video_mask))))

    def gate_ranges(self):
        """{kind: GateRange}: the values each gate can take with this layer's (trained) parameters."""
        if self.variant == "v2":
            scale = float(self.mha_scale.detach())
            alpha = abs(float(self.ffn_alpha.detach()))
            temp = self.mha_temp
            ranges = {
                "mha": GateRange("sigmoid", min(0.0, scale), max(0.0, scale), off=0.0,
                                 formula=f"sigmoid((mlp + bias) / {temp:g}) * scale, scale {scale:.4g}"),
                "ffn": GateRange("scaled_tanh", -alpha, alpha, off=-1.0 if self.ffn_film else 0.0,
                                 formula=f"tanh(mlp) * alpha, alpha {float(self.ffn_alpha.detach()):.4g}",
                                 film=self.ffn_film),
            }
            if self.ffn_film:
                beta = abs(float(self.ffn_beta.detach()))
                ranges["beta"] = GateRange("scaled_tanh", -beta, beta, off=0.0, shift=True,
                                           formula=f"tanh(mlp_beta) * beta, beta {float(self.ffn_beta.detach()):.4g}")
            return ranges
        sigmoid = self.variant == "diagstrip" and self.gating_type in ("global", "global_diagstrip_ssm")
        mha = GateRange("sigmoid", 0.0, 1.0, off=0.0, formula="sigmoid(mlp)") if sigmoid else \
            GateRange("tanh", -1.0, 1.0, off=0.0, formula="tanh(mlp)")
        return {"mha": mha, "ffn": GateRange("tanh", -1.0, 1.0, off=0.0, formula="tanh(mlp)")}


class GatedFusionBlockCustom(nn.Module):
    """One fusion block (see the module docstring for the math)."""

    def __init__(self, hidden_dim, n_heads, gating_type="global", variant="v1", **gate_options):
        super().__init__()
        self.gating_function = GatingFunction(hidden_dim, gating_type, variant=variant, **gate_options)
        self.variant = variant
        self.a_proj = nn.Linear(hidden_dim, hidden_dim)
        self.out_proj = nn.Linear(hidden_dim, hidden_dim)
        self.ffn1 = nn.Sequential(nn.Linear(hidden_dim, hidden_dim * 4), nn.ReLU(), nn.Linear(hidden_dim * 4, hidden_dim))
        if variant == "v2":
            self.delta_norm_mha = nn.LayerNorm(hidden_dim)
            self.delta_norm_ffn = nn.LayerNorm(hidden_dim)
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
        gf = self.gating_function
        gate_mha, gate_ffn = gf(video_feat, audio_feat, video_mask=video_mask, audio_mask=audio_mask)
        if self.variant == "v2":
            z = video_feat + gate_mha * self.delta_norm_mha(self.audio_branch(audio_feat))
            delta = self.delta_norm_ffn(self.ffn1(self.norm2(z)))
            if gf.ffn_film:
                z_bar = z + delta * (1 + gate_ffn) + gf.film_shift(video_feat, audio_feat, video_mask)
            else:
                z_bar = z + gate_ffn * delta
        else:
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
    audio_mask [B, L] (used by the SSM gate only, as in the original)) -> fused video [B, L, D].
    ``vid_dim``/``aud_dim`` are accepted for signature compatibility and unused. ``gate_options``
    go to every ``GatingFunction`` (v2: mha_temp, *_init, ffn_film; diagstrip SSM: ``ssm`` dict).
    """

    layout = "custom"

    def __init__(self, vid_dim, aud_dim, hidden_dim, n_heads=8, num_layers=1, gating_type="global",
                 variant="v1", **gate_options):
        super().__init__()
        self.gating_type = gating_type
        self.variant = variant
        self.hidden_dim = hidden_dim
        self.fusion_layers = nn.ModuleList(
            GatedFusionBlockCustom(hidden_dim, n_heads, gating_type=gating_type, variant=variant, **gate_options)
            for _ in range(num_layers))

    def forward(self, video_feat, audio_feat, video_mask=None, audio_mask=None):
        fused = video_feat
        for layer in self.fusion_layers:
            fused = layer(fused, audio_feat, video_mask, audio_mask)
        return fused
