"""Transformer layer parts: norms, the position-wise feed-forward block, and one residual block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modules.attention import LayerKV, MultiHeadAttention
from modules.config import BackboneConfig
from modules.dropout import Dropout, relu_dropout
from modules.lsh_attention import LSHSelfAttention
from modules.rotary import Rotation

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


def make_norm(config: BackboneConfig, width: int | None = None) -> nn.Module:
    """LayerNorm (BERT) or scale-only RMSNorm (T5), over `width` features (d_model unless given:
    the query/key norms of `qk_norm` are head_dim wide)."""
    width = width or config.d_model
    if config.norm_type == "rmsnorm":
        return nn.RMSNorm(width, eps=config.norm_eps)
    return nn.LayerNorm(width, eps=config.norm_eps, bias=config.bias)


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
        self.dropout = Dropout(config.dropout if config.ff_dropout is None else config.ff_dropout)

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, D) -> (B, T, D)"""
        h = self.up(x)  # (B, T, d_ff) or (B, T, 2 * d_ff)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            return self.down(self.dropout(self.act(gate) * up))
        if self.act is F.relu:  # ReLU and dropout as one masked multiply
            return self.down(relu_dropout(h, self.dropout.p, self.training))
        return self.down(self.dropout(self.act(h)))


def in_chunks(function, x: Tensor, chunks: int) -> Tensor:
    """function applied to `chunks` slices of x (B, T, D) along the sequence, one after another.

    Only for position-wise functions, whose result does not depend on the slicing.
    """
    if chunks == 1:
        return function(x)
    return torch.cat([function(part) for part in x.chunk(chunks, dim=1)], dim=1)


class TransformerBlock(nn.Module):
    """Self-attention, optional cross-attention, feed-forward; each a residual sub-layer.

    post-norm (BERT): x = norm(x + sublayer(x)); pre-norm (T5): x = x + sublayer(norm(x)).
    Cross-attention runs only when a memory is given, so a decoder built for an encoder can also
    serve as a plain decoder-only LM (a prefix LM on the same weights). Self-attention is `full`
    or `lsh` (modules/lsh_attention.py); the pre-norm branches `attention_branch` and
    `feed_forward_branch` are also what a reversible stack (modules/reversible.py) runs.
    """

    def __init__(
        self, config: BackboneConfig, cross: bool, causal: bool = False, attention: str = "full"
    ) -> None:
        super().__init__()
        self.pre_norm = config.norm == "pre"
        self.ff_chunks = config.ff_chunks

        def full_attention(is_cross: bool) -> MultiHeadAttention:
            return MultiHeadAttention(
                config.d_model,
                config.n_heads,
                config.attention_head_dim,
                bias=config.bias,
                dropout=config.attention_dropout,
                scale=config.scale_attention,
                cross=is_cross,
                kv_heads=config.n_kv_heads,
                qkv_bias=config.attention_qkv_bias,
                qk_norm=(lambda width: make_norm(config, width)) if config.qk_norm else None,
            )

        self.lsh = attention == "lsh"
        if self.lsh:
            self.self_attn = LSHSelfAttention(
                config.d_model,
                config.n_heads,
                config.attention_head_dim,
                bias=config.bias,
                qkv_bias=config.attention_qkv_bias,
                dropout=config.attention_dropout,
                scale=config.scale_attention,
                causal=causal,
                n_hashes=config.lsh_n_hashes,
                bucket_size=config.lsh_bucket_size,
            )
        else:
            self.self_attn = full_attention(False)
        self.self_attn_norm = make_norm(config)
        self.cross_attn = full_attention(True) if cross else None
        self.cross_attn_norm = make_norm(config) if cross else None
        self.ff = FeedForward(config)
        self.ff_norm = make_norm(config)
        self.dropout = Dropout(config.dropout)

    def _residual(self, x: Tensor, norm: nn.Module, sublayer) -> Tensor:
        if self.pre_norm:
            return x + self.dropout(sublayer(norm(x)))
        return norm(x + self.dropout(sublayer(x)))

    def _self_attention(
        self,
        h: Tensor,
        bias: Tensor | None,
        is_causal: bool,
        key_mask: Tensor | None,
        documents: Tensor | None,
        cache: LayerKV | None,
        rotation: Rotation | None,
    ) -> Tensor:
        """Full attention reads the additive bias (and the rotary angles, if any); LSH attention the
        key mask and documents, as it never builds a (T, S) matrix."""
        if self.lsh:
            return self.self_attn(h, key_mask=key_mask, documents=documents, cache=cache)
        return self.self_attn(h, bias=bias, is_causal=is_causal, cache=cache, rotation=rotation)

    def attention_branch(
        self,
        x: Tensor,
        self_bias: Tensor | None = None,
        is_causal: bool = False,
        key_mask: Tensor | None = None,
        documents: Tensor | None = None,
        rotation: Rotation | None = None,
        cache: LayerKV | None = None,
    ) -> Tensor:
        """Pre-norm self-attention without its residual: dropout(attention(norm(x))). (B, T, D) -> (B, T, D)"""
        return self.dropout(
            self._self_attention(
                self.self_attn_norm(x), self_bias, is_causal, key_mask, documents, cache, rotation
            )
        )

    def feed_forward_slice(self, x: Tensor) -> Tensor:
        """Pre-norm feed-forward without its residual, dropout(ff(norm(x))), on any slice of the
        sequence: it is position-wise. (B, T', D) -> (B, T', D)"""
        return self.dropout(self.ff(self.ff_norm(x)))

    def feed_forward_branch(self, x: Tensor) -> Tensor:
        """`feed_forward_slice` over the whole sequence, `ff_chunks` slices at a time. (B, T, D) -> (B, T, D)"""
        return in_chunks(self.feed_forward_slice, x, self.ff_chunks)

    def forward(
        self,
        x: Tensor,
        self_bias: Tensor | None = None,
        is_causal: bool = False,
        memory: Tensor | None = None,
        memory_bias: Tensor | None = None,
        cache: LayerKV | None = None,
        key_mask: Tensor | None = None,
        documents: Tensor | None = None,
        rotation: Rotation | None = None,
    ) -> Tensor:
        """x: (B, T, D); memory: (B, S, D) encoder output for cross-attention -> (B, T, D)

        key_mask: (B, S) True at real keys and documents: (B, T) packed document ids, for LSH
        attention (full attention has them in self_bias). rotation: rotary angles of x's positions.
        """
        x = self._residual(
            x,
            self.self_attn_norm,
            lambda h: self._self_attention(h, self_bias, is_causal, key_mask, documents, cache, rotation),
        )
        if self.cross_attn is not None and memory is not None:
            x = self._residual(
                x,
                self.cross_attn_norm,
                lambda h: self.cross_attn(h, memory=memory, bias=memory_bias, cache=cache),
            )
        if self.pre_norm:
            return x + self.feed_forward_branch(x)
        return in_chunks(lambda part: self._residual(part, self.ff_norm, self.ff), x, self.ff_chunks)
