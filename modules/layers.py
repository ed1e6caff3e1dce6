"""Transformer layer parts: norms, the position-wise feed-forward block, and one residual block."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from modules.attention import LayerKV, MultiHeadAttention
from modules.config import BackboneConfig

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


def make_norm(config: BackboneConfig) -> nn.Module:
    """LayerNorm (BERT) or scale-only RMSNorm (T5)."""
    if config.norm_type == "rmsnorm":
        return nn.RMSNorm(config.d_model, eps=config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)


class FeedForward(nn.Module):
    """Position-wise MLP: d_model -> d_ff -> d_model, applied to every position with shared weights.

    Gated variants (T5 v1.1, LLaMA) compute act(x W_gate) * (x W_up) from one fused projection.
    """

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        self.gated = config.gated_ff
        width = 2 * config.d_ff if self.gated else config.d_ff
        self.up = nn.Linear(config.d_model, width, bias=config.bias)
        self.down = nn.Linear(config.d_ff, config.d_model, bias=config.bias)
        self.act = ACTIVATIONS[config.activation]
        self.dropout = nn.Dropout(config.dropout if config.ff_dropout is None else config.ff_dropout)

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, D) -> (B, T, D)"""
        h = self.up(x)  # (B, T, d_ff) or (B, T, 2 * d_ff)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        return self.down(self.dropout(h))


class TransformerBlock(nn.Module):
    """Self-attention, optional cross-attention, feed-forward; each a residual sub-layer.

    post-norm (BERT): x = norm(x + sublayer(x)); pre-norm (T5): x = x + sublayer(norm(x)).
    Cross-attention runs only when a memory is given, so a decoder built for an encoder can also
    serve as a plain decoder-only LM (a prefix LM on the same weights).
    """

    def __init__(self, config: BackboneConfig, cross: bool) -> None:
        super().__init__()
        self.pre_norm = config.norm == "pre"

        def attention(is_cross: bool) -> MultiHeadAttention:
            return MultiHeadAttention(
                config.d_model,
                config.n_heads,
                config.attention_head_dim,
                bias=config.bias,
                dropout=config.attention_dropout,
                scale=config.scale_attention,
                cross=is_cross,
            )

        self.self_attn = attention(False)
        self.self_attn_norm = make_norm(config)
        self.cross_attn = attention(True) if cross else None
        self.cross_attn_norm = make_norm(config) if cross else None
        self.ff = FeedForward(config)
        self.ff_norm = make_norm(config)
        self.dropout = nn.Dropout(config.dropout)

    def _residual(self, x: Tensor, norm: nn.Module, sublayer) -> Tensor:
        if self.pre_norm:
            return x + self.dropout(sublayer(norm(x)))
        return norm(x + self.dropout(sublayer(x)))

    def forward(
        self,
        x: Tensor,
        self_bias: Tensor | None = None,
        is_causal: bool = False,
        memory: Tensor | None = None,
        memory_bias: Tensor | None = None,
        cache: LayerKV | None = None,
    ) -> Tensor:
        """x: (B, T, D); memory: (B, S, D) encoder output for cross-attention -> (B, T, D)"""
        x = self._residual(
            x,
            self.self_attn_norm,
            lambda h: self.self_attn(h, bias=self_bias, is_causal=is_causal, cache=cache),
        )
        if self.cross_attn is not None and memory is not None:
            x = self._residual(
                x,
                self.cross_attn_norm,
                lambda h: self.cross_attn(h, memory=memory, bias=memory_bias, cache=cache),
            )
        return self._residual(x, self.ff_norm, self.ff)
