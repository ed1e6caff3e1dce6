"""The shared `Backbone`: embeddings, an encoder stack and/or a decoder stack, an optional pooler.

Every task runs on this one module. Encoder-only (BERT), decoder-only (GPT) and encoder-decoder
(T5) are the same code with different layer counts: decoder layers are causal, and cross-attend to
the encoder output when there is an encoder.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from modules.attention import KVCache, MultiHeadAttention, RelativePositionBias, attention_bias
from modules.config import BackboneConfig
from modules.dropout import Dropout
from modules.layers import TransformerBlock, make_norm
from modules.reversible import run_reversible
from modules.rotary import RotaryEmbedding


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
        self.dropout = Dropout(config.dropout)
        self.absolute_positions, self.max_len = config.absolute_positions, config.max_len

    def forward(
        self, input_ids: Tensor, token_type_ids: Tensor | None = None, positions: Tensor | None = None
    ) -> Tensor:
        """input_ids: (B, T) -> (B, T, D).

        positions: (T,) or (B, T) position ids, 0..T-1 when None. Decoding with a cache passes where
        the new tokens sit; a left-padded row passes its own ids, so it is embedded as if unpadded.
        """
        x = self.tokens(input_ids)
        if self.absolute_positions:  # relative and rotary positions act in attention instead
            x = x + self._position_vectors(input_ids.size(1), positions)
        if self.segments is not None:
            x = x + (self.segments(token_type_ids) if token_type_ids is not None else self.segments.weight[0])
        if self.norm is not None:
            x = self.norm(x)
        return self.dropout(x)

    def _position_vectors(self, length: int, positions: Tensor | None) -> Tensor:
        """(T, D) or (B, T, D) rows of the learned or sinusoidal table, positions checked against max_len.

        Positions in host memory are checked here. On a GPU, reading their max would make the host wait
        for the GPU at every call (packed documents' positions are computed there each step) and cannot
        be done at all while a CUDA graph is recorded, so the GPU checks them itself: out of range, the
        process stops with the same message at the GPU's next synchronisation.
        """
        beyond = f"is beyond model.backbone.max_len={self.max_len}; truncate the input or raise max_len"
        if positions is not None and positions.is_cuda:
            torch._assert_async(positions.max() < self.max_len, f"a position {beyond}")
        else:
            last = length - 1 if positions is None else int(positions.max())
            if last >= self.max_len:
                raise ValueError(f"position {last} {beyond}")
        table = self.positions.weight if self.positions is not None else self.sinusoid  # (max_len, D)
        return table[:length] if positions is None else table[positions]


class Stack(nn.Module):
    """A stack of blocks with its own relative position bias (T5 keeps one per stack) or rotary
    angles, and final norm.

    modules/speed.py may set `checkpoint_activations` and `compiled_layers` (the blocks, compiled);
    both only change how the same blocks run.
    """

    checkpoint_activations = False
    compiled_layers: list | None = None

    def __init__(self, config: BackboneConfig, n_layers: int, causal: bool, cross: bool) -> None:
        super().__init__()
        self.causal, self.reversible = causal, config.reversible
        self.layers = nn.ModuleList(
            TransformerBlock(config, cross=cross, causal=causal, attention=kind)
            for kind in config.layer_attention(n_layers)
        )
        self.full_attention = any(not layer.lsh for layer in self.layers)
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
        self.rotary = (
            RotaryEmbedding(config.attention_head_dim, config.rotary_base)
            if config.position == "rotary"
            else None
        )
        # pre-norm leaves the residual stream un-normalised: one norm at the top of the stack fixes that
        self.final_norm = make_norm(config) if config.norm == "pre" else None
        self.dropout = Dropout(config.dropout) if config.norm == "pre" else None

    def forward(
        self,
        x: Tensor,
        padding_mask: Tensor | None = None,
        memory: Tensor | None = None,
        memory_padding_mask: Tensor | None = None,
        cache: KVCache | None = None,
        documents: Tensor | None = None,
        positions: Tensor | None = None,
    ) -> Tensor:
        """x: (B, T, D); padding_mask: (B, T) True at real tokens; memory: (B, S, D) -> (B, T, D)

        With a cache, x holds only the new positions, which follow the cached ones. documents: (B, T)
        packed document ids (see `Backbone.encode`); self-attention stays inside each document.
        positions: (T,) or (B, T) position ids for rotary angles, by default past + 0..T-1.
        """
        b, t, _ = x.shape
        key_mask = padding_mask
        if cache is not None:
            key_mask = cache.extend_key_mask(padding_mask, t, b, x.device)  # (B, past + T or capacity)
        past = cache.length if cache is not None else 0
        self_bias, is_causal = None, False
        if self.full_attention:  # LSH layers build no (T, S) bias: they read key_mask and documents
            key_len = cache.capacity if cache is not None and cache.column is not None else past + t
            first_query = cache.column if cache is not None else None
            self_bias, is_causal = self._self_attention_bias(t, key_len, key_mask, x, documents, first_query)
        memory_bias = None
        if memory is not None:
            memory_bias = attention_bias(t, memory.size(1), memory_padding_mask, dtype=x.dtype)
        rotation = None
        if self.rotary is not None:
            rotation = self.rotary(
                positions if positions is not None else torch.arange(past, past + t, device=x.device)
            )
        if self.reversible:
            caches = cache.layers if cache is not None else None
            x = run_reversible(self.layers, x, (self_bias, is_causal, key_mask, documents, rotation), caches)
        else:
            x = self._residual_layers(
                x, (self_bias, is_causal, memory, memory_bias), key_mask, documents, cache, rotation
            )
        if self.final_norm is not None:
            x = self.dropout(self.final_norm(x))
        if cache is not None:
            cache.written()
        return x

    def _residual_layers(
        self,
        x: Tensor,
        masks: tuple,
        key_mask: Tensor | None,
        documents: Tensor | None,
        cache: KVCache | None,
        rotation: tuple[Tensor, Tensor] | None,
    ) -> Tensor:
        """The plain (non-reversible) layers over x (B, T, D). masks: (self_bias, is_causal, memory,
        memory_bias) as every block takes them."""
        for i, layer in enumerate(self.layers):
            if cache is not None:  # decoding: eager, as the cache grows each step
                x = layer(x, *masks, cache.layers[i], key_mask, documents, rotation)
                continue
            block = self.compiled_layers[i] if self.compiled_layers else layer
            if self.checkpoint_activations and torch.is_grad_enabled():
                x = checkpoint(block, x, *masks, None, key_mask, documents, rotation, use_reentrant=False)
            else:
                x = block(x, *masks, None, key_mask, documents, rotation)
        return x

    def _self_attention_bias(
        self,
        query_len: int,
        key_len: int,
        key_mask: Tensor | None,
        x: Tensor,
        documents: Tensor | None,
        first_query: Tensor | None = None,
    ) -> tuple[Tensor | None, bool]:
        """-> (additive bias or None, whether SDPA should apply its own causal mask).

        Queries are the last query_len of key_len positions, or start at column first_query ((1,) long:
        a fixed-shape decoding step, see `KVCache.fix_shapes`). A single query (one decoding step) is the
        latest position, so it may see every key written and needs no causal mask. With no padding, no
        relative bias and no cached keys, SDPA's built-in causal path avoids materialising a (T, T) bias.
        """
        position_bias = None
        if self.relative_bias is not None:
            position_bias = self.relative_bias(query_len, key_len, x.device, first_query)  # (1, H, T, S)
        causal = self.causal and query_len > 1
        if (
            causal
            and key_mask is None
            and position_bias is None
            and documents is None
            and query_len == key_len
        ):
            return None, True
        bias = attention_bias(
            query_len, key_len, key_mask, causal, position_bias, x.dtype, documents, x.device
        )
        return bias, False


def init_weights(root: nn.Module, config: BackboneConfig) -> None:
    """Initialise every linear, embedding and attention projection under `root` (see `BackboneConfig.init`).

    Biases start at zero and norms at unit scale either way. T5's scheme keeps activations at unit
    scale through tied, unscaled layers; with N(0, 0.02) there, a T5-layout model starts with
    near-uniform attention and logits ~1e-3 and learns its first hundreds of steps very slowly.
    """
    t5 = config.init == "t5"
    for module in root.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=module.in_features**-0.5 if t5 else config.init_std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=1.0 if t5 else config.init_std)
    if not t5:
        return
    for module in root.modules():  # T5's exceptions to the rules above
        if isinstance(module, RelativePositionBias):
            nn.init.normal_(module.bias.weight, std=config.d_model**-0.5)
        elif isinstance(module, MultiHeadAttention) and not config.scale_attention:
            # fold 1/sqrt(head_dim) into the queries: into their norm's scale where one would undo it
            queries = module.q_norm.weight if config.qk_norm else module.query_weight
            with torch.no_grad():
                queries.mul_(config.attention_head_dim**-0.5)


def document_positions(documents: Tensor) -> Tensor:
    """(B, T) packed document ids -> (B, T) position ids counting from 0 at each document's start.

    A document starts wherever the id changes along the row; its first column is carried forward by
    a running maximum, and a position is its column minus that start.
    """
    columns = torch.arange(documents.size(1), device=documents.device).expand_as(documents)  # (B, T)
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    return columns - torch.where(starts, columns, 0).cummax(dim=1).values


def _real_tokens(attention_mask: Tensor | None) -> Tensor | None:
    """(B, T) 1 at real tokens -> the boolean mask attention takes, or None where it hides nothing, so
    attention takes its unmasked fast path. Only a mask in host memory is tested: on a GPU the test
    would stop the step until the GPU caught up, so a GPU mask is kept (training batches say which
    masks hide nothing before they leave the host: datamodules/padding.py)."""
    if attention_mask is None or (attention_mask.device.type == "cpu" and bool(attention_mask.all())):
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
        init_weights(self, config)

    @property
    def token_embedding(self) -> Tensor:
        """(V, D) input embedding matrix; tied output heads project onto it."""
        return self.embeddings.tokens.weight

    def encode(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        document_ids: Tensor | None = None,
    ) -> Tensor:
        """Bidirectional encoding. input_ids, attention_mask, token_type_ids: (B, T) -> (B, T, D)

        document_ids: (B, T) for rows that pack several documents, numbering them along the row
        (0, 0, 0, 1, 1, 2, ...): attention stays inside each document and positions restart at each
        document's start, so every document is encoded as it would be alone in its own row.
        """
        if self.encoder is None:
            raise ValueError("this backbone has no encoder (model.backbone.encoder_layers is 0)")
        positions = document_positions(document_ids) if document_ids is not None else None
        x = self.embeddings(input_ids, token_type_ids, positions)
        return self.encoder(x, _real_tokens(attention_mask), documents=document_ids, positions=positions)

    def decode(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        memory: Tensor | None = None,
        memory_mask: Tensor | None = None,
        cache: KVCache | None = None,
        positions: Tensor | None = None,
        document_ids: Tensor | None = None,
    ) -> Tensor:
        """Causal decoding, cross-attending to `memory` (B, S, D) when given. input_ids: (B, T) -> (B, T, D)

        Without memory, cross-attention layers are skipped: an encoder-decoder backbone's decoder then
        runs as a decoder-only LM. With a `cache` (see `KVCache`), input_ids and attention_mask cover
        only the new tokens, which follow the cached ones. positions: (T,) or (B, T) absolute position
        ids of input_ids, by default cache.length + 0..T-1; left-padded rows pass their own so their
        real tokens get the positions they would have unpadded. The relative bias needs no ids: it
        depends on distances between columns, which left padding leaves unchanged between real tokens.
        document_ids: (B, T) packed documents, decoder-only training (see `encode`).
        """
        if self.decoder is None:
            raise ValueError("this backbone has no decoder (model.backbone.decoder_layers is 0)")
        if positions is None and cache is not None and cache.column is not None:  # read on the device
            positions = cache.column + torch.arange(input_ids.size(1), device=input_ids.device)
        elif positions is None and cache is not None and cache.length:
            positions = torch.arange(cache.length, cache.length + input_ids.size(1), device=input_ids.device)
        if document_ids is not None:
            positions = document_positions(document_ids)
        x = self.embeddings(input_ids, positions=positions)
        return self.decoder(
            x,
            _real_tokens(attention_mask),
            memory,
            _real_tokens(memory_mask),
            cache,
            documents=document_ids,
            positions=positions,
        )

    def decoder_cache(self, capacity: int) -> KVCache:
        """An empty `KVCache` for this decoder, holding up to `capacity` positions (prompt + new tokens)."""
        if self.decoder is None:
            raise ValueError("this backbone has no decoder (model.backbone.decoder_layers is 0)")
        return KVCache(len(self.decoder.layers), capacity)

    def pool(self, hidden: Tensor) -> Tensor:
        """BERT's pooler: tanh(W h_0 + b) on the first ([CLS]) position. (B, T, D) -> (B, D)"""
        if self.pooler is None:
            raise ValueError("this backbone has no pooler (model.backbone.pooler is false)")
        return torch.tanh(self.pooler(hidden[:, 0]))
