"""The shared `Backbone`: embeddings, an encoder stack and/or a decoder stack, an optional pooler.

Every task runs on this one module. Encoder-only (BERT), decoder-only (GPT) and encoder-decoder
(T5) are the same code with different layer counts: decoder layers are causal, and cross-attend to
the encoder output when there is an encoder.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from modules.attention import RelativePositionBias, attention_bias
from modules.config import BackboneConfig
from modules.layers import TransformerBlock, make_norm


def sinusoidal_table(max_len: int, d_model: int) -> Tensor:
    """(max_len, d_model) fixed positions from "Attention Is All You Need": sin on even, cos on odd dims."""
    position = torch.arange(max_len, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    table = torch.zeros(max_len, d_model)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency[: d_model // 2])
    return table


class Embeddings(nn.Module):
    """Token + absolute position + segment embeddings, summed (then normed, as in BERT, if configured)."""

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        self.tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.positions = (
            nn.Embedding(config.max_len, config.d_model) if config.position == "learned" else None
        )
        if config.position == "sinusoidal":
            self.register_buffer(
                "sinusoid", sinusoidal_table(config.max_len, config.d_model), persistent=False
            )
        self.segments = (
            nn.Embedding(config.type_vocab_size, config.d_model) if config.type_vocab_size else None
        )
        self.norm = make_norm(config) if config.embedding_norm else None
        self.dropout = nn.Dropout(config.dropout)
        self.position_kind, self.max_len = config.position, config.max_len

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None = None, offset: int = 0) -> Tensor:
        """input_ids: (B, T) -> (B, T, D); offset shifts positions (decoding with a cache)."""
        t = input_ids.size(1)
        if offset + t > self.max_len and self.position_kind != "relative":
            raise ValueError(
                f"sequence of {offset + t} tokens exceeds model.backbone.max_len={self.max_len}; "
                "truncate the input or raise max_len"
            )
        x = self.tokens(input_ids)
        if self.positions is not None:
            x = x + self.positions.weight[offset : offset + t]
        elif self.position_kind == "sinusoidal":
            x = x + self.sinusoid[offset : offset + t]
        if self.segments is not None:
            x = x + (self.segments(token_type_ids) if token_type_ids is not None else self.segments.weight[0])
        if self.norm is not None:
            x = self.norm(x)
        return self.dropout(x)


class Stack(nn.Module):
    """A stack of blocks with its own relative position bias (T5 keeps one per stack) and final norm."""

    def __init__(self, config: BackboneConfig, n_layers: int, causal: bool, cross: bool) -> None:
        super().__init__()
        self.causal = causal
        self.layers = nn.ModuleList(TransformerBlock(config, cross=cross) for _ in range(n_layers))
        self.relative_bias = (
            RelativePositionBias(
                config.n_heads,
                config.relative_buckets,
                config.relative_max_distance,
                bidirectional=not causal,
            )
            if config.position == "relative"
            else None
        )
        # pre-norm leaves the residual stream un-normalised: one norm at the top of the stack fixes that
        self.final_norm = make_norm(config) if config.norm == "pre" else None
        self.dropout = nn.Dropout(config.dropout) if config.norm == "pre" else None

    def forward(
        self,
        x: Tensor,
        padding_mask: Tensor | None = None,
        memory: Tensor | None = None,
        memory_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """x: (B, T, D); padding_mask: (B, T) True at real tokens; memory: (B, S, D) -> (B, T, D)"""
        t = x.size(1)
        position_bias = self.relative_bias(t, t, x.device) if self.relative_bias is not None else None
        self_bias = attention_bias(t, t, padding_mask, self.causal, position_bias, x.dtype)
        # with no mask at all SDPA's own causal path avoids materialising the (T, T) bias
        is_causal = self.causal and self_bias is None
        memory_bias = None
        if memory is not None:
            memory_bias = attention_bias(t, memory.size(1), memory_padding_mask, dtype=x.dtype)
        for layer in self.layers:
            x = layer(x, self_bias, is_causal, memory, memory_bias)
        if self.final_norm is not None:
            x = self.dropout(self.final_norm(x))
        return x


def init_weights(root: nn.Module, std: float) -> None:
    """BERT's initialisation: N(0, std) for linear and embedding weights, zero biases, unit norms."""
    for module in root.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)


def _real_tokens(attention_mask: Tensor | None) -> Tensor | None:
    """Drop an all-ones mask so attention can take its unmasked fast path."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return attention_mask.bool()


class Backbone(nn.Module):
    """Embeddings + encoder and/or decoder stacks (+ pooler), shared by every task head."""

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("BackboneConfig.vocab_size must be known before the backbone is built")
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = (
            Stack(config, config.encoder_layers, causal=False, cross=False) if config.encoder_layers else None
        )
        self.decoder = (
            Stack(config, config.decoder_layers, causal=True, cross=config.encoder_layers > 0)
            if config.decoder_layers
            else None
        )
        self.pooler = nn.Linear(config.d_model, config.d_model) if config.pooler else None
        init_weights(self, config.init_std)

    @property
    def token_embedding(self) -> Tensor:
        """(V, D) input embedding matrix; tied output heads project onto it."""
        return self.embeddings.tokens.weight

    def encode(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
    ) -> Tensor:
        """Bidirectional encoding. input_ids, attention_mask, token_type_ids: (B, T) -> (B, T, D)"""
        if self.encoder is None:
            raise ValueError("this backbone has no encoder (model.backbone.encoder_layers is 0)")
        x = self.embeddings(input_ids, token_type_ids)
        return self.encoder(x, _real_tokens(attention_mask))

    def decode(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        memory: Tensor | None = None,
        memory_mask: Tensor | None = None,
    ) -> Tensor:
        """Causal decoding, cross-attending to `memory` (B, S, D) when given. input_ids: (B, T) -> (B, T, D)"""
        if self.decoder is None:
            raise ValueError("this backbone has no decoder (model.backbone.decoder_layers is 0)")
        x = self.embeddings(input_ids)
        return self.decoder(x, _real_tokens(attention_mask), memory, _real_tokens(memory_mask))

    def pool(self, hidden: Tensor) -> Tensor:
        """BERT's pooler: tanh(W h_0 + b) on the first ([CLS]) position. (B, T, D) -> (B, D)"""
        if self.pooler is None:
            raise ValueError("this backbone has no pooler (model.backbone.pooler is false)")
        return torch.tanh(self.pooler(hidden[:, 0]))
