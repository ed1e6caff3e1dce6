"""Multi-head attention on `F.scaled_dot_product_attention`, and the masks it is given.

Three kinds of attention share one module: bidirectional self-attention (encoder), causal
self-attention (decoder) and encoder-decoder cross-attention. Masks are additive biases on the
attention logits: 0 where a query may look, a very negative number where it may not, so after the
softmax those weights are exactly 0. The causal mask is the upper triangle (j > i) blocked, the
diagonal and below open.

Decoding one token at a time reuses what earlier steps computed through a `KVCache`: each decoder
layer keeps its self-attention keys/values (appended to, step by step) and the keys/values of the
encoder memory (projected once, on the first step). See `KVCache` for the contract.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modules.dropout import dropout
from modules.rotary import Rotation, rotate


def causal_mask_bias(query_len: int, key_len: int, device: torch.device | None = None) -> Tensor:
    """(query_len, key_len) additive bias: 0 on and below the diagonal, -inf above it.

    When keys outnumber queries (decoding with cached keys) the queries are the last
    `query_len` positions, so query i sits at absolute position key_len - query_len + i.
    """
    offset = key_len - query_len
    future = torch.ones(query_len, key_len, dtype=torch.bool, device=device).triu(diagonal=1 + offset)
    return torch.zeros(query_len, key_len, device=device).masked_fill(future, float("-inf"))


def attention_bias(
    query_len: int,
    key_len: int,
    key_padding_mask: Tensor | None = None,
    causal: bool = False,
    position_bias: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    documents: Tensor | None = None,
    device: torch.device | None = None,
) -> Tensor | None:
    """Combine causal mask, key padding, packed documents and position bias into one additive bias,
    or None if all are absent.

    key_padding_mask: (B, S) with True (or 1) at real tokens. position_bias: (1, H, T, S).
    documents: (B, T) packed document ids of self-attention's positions (T == S): a query sees only
    keys of its own document. device: where the causal mask is made (that of the attention's inputs).
    Returns (B or 1, H or 1, T, S). Blocked entries get the dtype's most negative finite value rather
    than -inf, so a row with nothing to attend to (an all-padding sequence) yields finite values
    instead of NaNs that would leak through the value sum into real positions.
    """
    if key_padding_mask is None and not causal and position_bias is None and documents is None:
        return None
    blocked = None
    if causal:
        device = position_bias.device if position_bias is not None else None
        if key_padding_mask is not None:
            device = key_padding_mask.device
        blocked = causal_mask_bias(query_len, key_len, device).isinf()[None, None]  # (1, 1, T, S)
    if key_padding_mask is not None:
        pad = ~key_padding_mask.bool()[:, None, None, :]  # (B, 1, 1, S)
        blocked = pad if blocked is None else blocked | pad
    if documents is not None:
        elsewhere = documents[:, None, :, None] != documents[:, None, None, :]  # (B, 1, T, S)
        blocked = elsewhere if blocked is None else blocked | elsewhere
    bias = position_bias.to(dtype) if position_bias is not None else None
    if blocked is not None:
        mask_bias = torch.zeros(blocked.shape, dtype=dtype, device=blocked.device)
        mask_bias = mask_bias.masked_fill(blocked, torch.finfo(dtype).min)
        bias = mask_bias if bias is None else (bias + mask_bias).clamp_min(torch.finfo(dtype).min)
    return bias


class LayerKV:
    """One decoder layer's share of a `KVCache`.

    Self-attention keys/values are written into buffers allocated once for `capacity` columns, so a
    decoding step copies only its own new column instead of the whole history. Cross-attention
    keys/values (the encoder memory projected by this layer) are stored on first use and reused.
    Beam search's reordering writes into a second pair of buffers and swaps, so once both exist (with
    as many rows as there are beams) no step allocates.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.length = 0  # columns of keys/values filled so far
        self.keys: Tensor | None = None  # (B, Hkv, capacity, Dh), allocated on the first append
        self.values: Tensor | None = None  # (B, Hkv, capacity, Dh)
        self.spare: tuple[Tensor, Tensor] | None = None  # reorder's destination, allocated on first use
        self.memory_kv: tuple[Tensor, Tensor] | None = None  # (B, Hkv, S, Dh) keys and values
        self.column: Tensor | None = None  # (1,) long, shared by all layers once the cache's shapes are fixed

    def append(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Store this step's keys/values (B, H, T, Dh); return every one so far, (B, H, length, Dh) each,
        or, once the shapes are fixed (see `KVCache.fix_shapes`), all `capacity` columns."""
        end = self.length + keys.size(2)
        if end > self.capacity:
            raise ValueError(
                f"KVCache capacity {self.capacity} exceeded: {end} positions; make a larger cache"
            )
        if self.keys is None or self.values is None:  # zeros: attention reads the unwritten columns
            b, h, _, dh = keys.shape  # of a fixed-shape cache (weighted 0, and 0 * NaN would be NaN)
            self.keys = keys.new_zeros(b, h, self.capacity, dh)
            self.values = values.new_zeros(b, h, self.capacity, dh)
        self.length = end
        if self.column is not None:  # the column comes from the device: one kernel whatever the step
            self.keys.index_copy_(2, self.column, keys)
            self.values.index_copy_(2, self.column, values)
            return self.keys, self.values
        self.keys[:, :, end - keys.size(2) : end] = keys
        self.values[:, :, end - keys.size(2) : end] = values
        return self.keys[:, :, :end], self.values[:, :, :end]

    def reorder(self, index: Tensor) -> None:
        """Row i becomes old row index[i] (self-attention only; see `KVCache.reorder`)."""
        if self.keys is None or self.values is None:
            return
        if self.spare is None or self.spare[0].size(0) != index.numel():  # first use, or a new row count
            rows = (index.numel(), *self.keys.shape[1:])
            self.spare = (self.keys.new_zeros(rows), self.values.new_zeros(rows))
        keys, values = self.spare
        filled = slice(0, self.length)  # the columns after it hold nothing yet: not worth copying
        torch.index_select(self.keys[:, :, filled], 0, index, out=keys[:, :, filled])
        torch.index_select(self.values[:, :, filled], 0, index, out=values[:, :, filled])
        self.spare = (self.keys, self.values)
        self.keys, self.values = keys, values


class KVCache:
    """What the decoder stack keeps between decoding steps, for inference (use under `torch.no_grad`).

    Make one per generation with `Backbone.decoder_cache(capacity)`, where capacity is the most
    positions it will hold (prompt + new tokens), and pass it to every `Backbone.decode` call:

        cache = backbone.decoder_cache(prompt_len + max_new_tokens)
        hidden = backbone.decode(prompt, prompt_mask, cache=cache, positions=positions)  # prefill
        cache.fix_shapes(batch, device)  # optional: every later call feeds one token per row
        hidden = backbone.decode(next_ids[:, None], cache=cache, positions=next_positions)  # one step

    With a cache, `decode` sees only the new tokens; their keys/values are appended, and attention
    runs over everything cached. The attention mask given with new tokens covers only them; the
    cache accumulates it in `key_mask`, so padding inside a prompt stays hidden on later steps.
    `reorder` moves rows (beam search keeps the cache of the beams it continues).

    After `fix_shapes`, each step writes its column where a device tensor says and attends over the
    whole capacity, the columns not yet written masked out: every step then launches the same
    kernels on tensors of the same shapes and addresses, which is what lets a GPU replay a step as
    one recorded CUDA graph (modules/decode_graph.py), and what makes its host work nothing but
    the launches.
    """

    def __init__(self, n_layers: int, capacity: int) -> None:
        self.layers = [LayerKV(capacity) for _ in range(n_layers)]
        self.capacity = capacity
        self.key_mask: Tensor | None = None  # (B, capacity) True at real keys; None while all are real
        self.spare_mask: Tensor | None = None  # reorder's destination for key_mask (as LayerKV's spare)
        self.column: Tensor | None = None  # (1,) long: the column the next step writes, once shapes are fixed

    @property
    def length(self) -> int:
        """Positions already cached: the column where the next tokens go."""
        return self.layers[0].length

    def fix_shapes(self, batch: int, device: torch.device) -> None:
        """From now on every `decode` call feeds one token to each of `batch` rows and attends over all
        `capacity` columns, those not yet written hidden by `key_mask`."""
        mask = torch.zeros(batch, self.capacity, dtype=torch.bool, device=device)
        mask[:, : self.length] = True if self.key_mask is None else self.key_mask[:, : self.length]
        self.key_mask = mask
        self.column = torch.full((1,), self.length, dtype=torch.long, device=device)
        for layer in self.layers:
            layer.column = self.column

    def extend_key_mask(
        self, new_mask: Tensor | None, new_len: int, batch: int, device: torch.device
    ) -> Tensor | None:
        """Record which of `new_len` new keys are real; -> (B, length + new_len) mask or None if all are
        (fixed shapes: the (B, capacity) mask of the columns written once this step's is)."""
        if self.column is not None and self.key_mask is not None:
            if new_len != 1 or new_mask is not None:
                raise ValueError("a KVCache with fixed shapes takes one real token per row per decode call")
            return self.key_mask.index_fill_(1, self.column, True)
        if new_mask is None and self.key_mask is None:
            return None
        start, end = self.length, self.length + new_len
        if self.key_mask is None:
            self.key_mask = torch.ones(batch, self.capacity, dtype=torch.bool, device=device)
        self.key_mask[:, start:end] = True if new_mask is None else new_mask.bool()
        return self.key_mask[:, :end]

    def written(self) -> None:
        """A decode call is done: with fixed shapes, the next one writes the next column."""
        if self.column is not None:
            self.column.add_(1)

    def reorder(self, index: Tensor) -> None:
        """Row i of the batch becomes old row index[i] (index: (N,) long). N may differ from the old
        row count: generation repeats each prompt's cache once per beam or sample this way.

        Cross-attention keys/values are left alone: beam search only moves a row among the beams of
        the same source, which share one encoder memory, so reordering them would copy for nothing.
        """
        for layer in self.layers:
            layer.reorder(index)
        if self.key_mask is None:
            return
        if self.spare_mask is None or self.spare_mask.size(0) != index.numel():
            self.spare_mask = self.key_mask.new_empty(index.numel(), self.capacity)
        torch.index_select(self.key_mask, 0, index, out=self.spare_mask)
        self.key_mask, self.spare_mask = self.spare_mask, self.key_mask


class MultiHeadAttention(nn.Module):
    """Self- or cross-attention with fused projections.

    Self-attention projects q, k and v with one (d_model -> (H + 2 * Hkv) * Dh) matmul; cross-attention
    projects q from the decoder and k, v together from the encoder memory. Hkv = kv_heads is H unless
    grouped-query attention shares each key/value head among H / Hkv query heads. `qkv_bias` (None: as
    `bias`) biases those projections apart from the output's, as Qwen2 has them. Given `qk_norm`,
    a factory of norms of a given width, each head's q and k are normalised over Dh (Qwen3), before
    self-attention turns them by their positions when given a rotary `rotation` (modules/rotary.py).

    Attention runs in SDPA's fused kernels, which never hand out the softmax weights. To look at
    them (`polyhead inspect attention`, the validation pictures), set `on_weights` to a callable:
    forward then computes the same attention step by step and passes it the (B, H, T, S) weights
    it used. Left None (the default), forward takes the fused path, except for training with
    attention dropout on the CPU: there SDPA falls back to the same step-by-step arithmetic anyway,
    and written out here it draws its dropout mask the cheap way (modules/dropout.py).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        head_dim: int,
        bias: bool,
        dropout: float,
        scale: bool,
        cross: bool = False,
        kv_heads: int | None = None,
        qkv_bias: bool | None = None,
        qk_norm: Callable[[int], nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.cross = n_heads, head_dim, cross
        self.kv_heads = kv_heads or n_heads
        inner, kv_inner = n_heads * head_dim, self.kv_heads * head_dim
        self.split = (inner, kv_inner, kv_inner)  # q | k | v widths of the fused projection
        in_bias = bias if qkv_bias is None else qkv_bias
        if cross:
            self.q = nn.Linear(d_model, inner, bias=in_bias)
            self.kv = nn.Linear(d_model, 2 * kv_inner, bias=in_bias)
        else:
            self.qkv = nn.Linear(d_model, inner + 2 * kv_inner, bias=in_bias)
        # over the last dim (Dh) of (B, H, T, Dh) queries and (B, Hkv, S, Dh) keys; Identity: no norm
        self.q_norm = qk_norm(head_dim) if qk_norm is not None else nn.Identity()
        self.k_norm = qk_norm(head_dim) if qk_norm is not None else nn.Identity()
        self.out = nn.Linear(inner, d_model, bias=bias)
        self.dropout = dropout
        self.scale = None if scale else 1.0  # None lets SDPA use 1/sqrt(head_dim)
        self.on_weights: Callable[[Tensor], None] | None = None  # see the class docstring

    @property
    def query_weight(self) -> Tensor:
        """(H*Dh, D) the rows of the projection that make queries (a view into the fused matrix)."""
        return self.q.weight if self.cross else self.qkv.weight[: self.n_heads * self.head_dim]

    def _heads(self, x: Tensor) -> Tensor:
        """(B, T, heads*Dh) -> (B, heads, T, Dh)"""
        b, t, width = x.shape
        return x.view(b, t, width // self.head_dim, self.head_dim).transpose(1, 2)

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None = None,
        bias: Tensor | None = None,
        is_causal: bool = False,
        cache: LayerKV | None = None,
        rotation: Rotation | None = None,
    ) -> Tensor:
        """x: (B, T, D); memory: (B, S, D) for cross-attention; bias: broadcastable to (B, H, T, S).

        memory (and its padding bias) may also hold one row per group of c consecutive rows of x, the c
        beams or samples of a source while decoding (see `_fold_copies`).

        is_causal asks SDPA for its built-in causal mask; it is only used when no bias is given.
        With a cache, self-attention attends over the cached keys plus this call's, and
        cross-attention projects `memory` only the first time. rotation: the rotary angles of x's
        positions (self-attention only); keys enter the cache already turned.
        """
        n, t, _ = x.shape
        if self.cross:
            k, v = self._memory_keys_values(memory, cache)  # (B, Hkv, S, Dh) each
            q = self.q_norm(self._heads(self.q(x)))  # (N, H, T, Dh)
            q = _fold_copies(q, k.size(0))  # (B, H, c * T, Dh)
        else:
            q, k, v = (self._heads(part) for part in self.qkv(x).split(self.split, dim=-1))
            q, k = self.q_norm(q), self.k_norm(k)
            if rotation is not None:
                # q and k become new tensors: v of its own lets the fused projection's output go
                q, k, v = rotate(q, rotation), rotate(k, rotation), v.contiguous()
            if cache is not None:
                k, v = cache.append(k, v)  # (B, Hkv, past + T, Dh)
        cpu_dropout = self.training and self.dropout > 0 and q.device.type == "cpu"
        if self.on_weights is None and not cpu_dropout:
            y = F.scaled_dot_product_attention(  # (B, H, T, Dh)
                q,
                k,
                v,
                attn_mask=bias,
                dropout_p=self.dropout if self.training else 0.0,
                is_causal=is_causal and bias is None,
                scale=self.scale,
                enable_gqa=self.kv_heads != self.n_heads,
            )
        else:
            y = self._attend_step_by_step(q, k, v, bias, is_causal and bias is None)
        # (B, H, c, T, Dh): c = 1 unless the copies of a source were folded into its queries
        y = y.view(-1, self.n_heads, n // y.size(0), t, self.head_dim)
        return self.out(y.permute(0, 2, 3, 1, 4).reshape(n, t, self.n_heads * self.head_dim))

    def _attend_step_by_step(
        self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, is_causal: bool
    ) -> Tensor:
        """SDPA's arithmetic written out, handing the softmax weights to `on_weights` (if set) before dropout.
        q: (B, H, T, Dh); k, v: (B, Hkv, S, Dh) -> (B, H, T, Dh). is_causal blocks key j > query i, as
        SDPA's own causal mask does."""
        if self.kv_heads != self.n_heads:  # each key/value head serves a group of consecutive query heads
            groups = self.n_heads // self.kv_heads
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, H, S, Dh)
        scale = self.scale if self.scale is not None else self.head_dim**-0.5
        if scale != 1.0:  # T5 leaves its logits unscaled: no pass over them for nothing
            q = q * scale  # (B, H, T, Dh): cheaper than scaling the (T, S) logits
        logits = q @ k.transpose(-2, -1)  # (B, H, T, S)
        if bias is not None:
            logits = logits + bias  # not in place: under autocast the bias may be the wider dtype
        if is_causal:
            future = torch.ones(q.size(2), k.size(2), dtype=torch.bool, device=q.device).triu(1)
            logits = logits.masked_fill(future, float("-inf"))
        weights = logits.float().softmax(dim=-1).to(v.dtype)  # (B, H, T, S), rows sum to 1
        if self.on_weights is not None:
            self.on_weights(weights.detach())
        return dropout(weights, self.dropout, self.training) @ v

    def _memory_keys_values(self, memory: Tensor | None, cache: LayerKV | None) -> tuple[Tensor, Tensor]:
        """Cross-attention keys and values (B, Hkv, S, Dh), projected once per cache."""
        if cache is not None and cache.memory_kv is not None:
            return cache.memory_kv
        if memory is None:
            raise ValueError("cross-attention needs the encoder memory")
        k, v = (self._heads(t) for t in self.kv(memory).chunk(2, dim=-1))
        k = self.k_norm(k)
        if cache is not None:
            cache.memory_kv = (k.contiguous(), v.contiguous())
            return cache.memory_kv
        return k, v


def _fold_copies(q: Tensor, memory_rows: int) -> Tensor:
    """Fold the copies of a source into the query axis. q: (N, H, T, Dh) -> (B, H, c * T, Dh), B = memory_rows.

    While decoding, the c beams or samples of a source are c consecutive query rows that share one
    memory row, so the memory is kept (and its keys/values projected) once per source, not once per
    copy, and each source's keys/values are read once per step for all its copies. Queries attend
    independently, so stacking a source's copies along the query axis computes the same attention,
    given a memory bias that is the same for every query: the padding mask, (B, 1, 1, S).
    """
    n, h, t, dh = q.shape
    if n == memory_rows:
        return q
    if n % memory_rows:
        raise ValueError(
            f"cross-attention over {memory_rows} memory rows needs a multiple of {memory_rows} query rows, got {n}"
        )
    copies = n // memory_rows
    return q.view(memory_rows, copies, h, t, dh).transpose(1, 2).reshape(memory_rows, h, copies * t, dh)


class RelativePositionBias(nn.Module):
    """T5's learned bias per (head, distance bucket), added to the attention logits.

    Small distances get a bucket each; larger ones share logarithmically wider buckets up to
    `max_distance`. Bidirectional (encoder) attention splits the buckets between the two directions.
    """

    def __init__(self, n_heads: int, num_buckets: int, max_distance: int, bidirectional: bool) -> None:
        super().__init__()
        self.num_buckets, self.max_distance, self.bidirectional = num_buckets, max_distance, bidirectional
        self.bias = nn.Embedding(num_buckets, n_heads)

    def bucket(self, relative: Tensor) -> Tensor:
        """relative = key position - query position -> bucket index, same shape."""
        buckets = self.num_buckets
        result = torch.zeros_like(relative)
        if self.bidirectional:
            buckets //= 2
            result = result + (relative > 0).long() * buckets
            distance = relative.abs()
        else:
            distance = (-relative).clamp_min(0)
        exact = buckets // 2
        log_ratio = torch.log(distance.float().clamp_min(1) / exact) / math.log(self.max_distance / exact)
        far = (exact + (log_ratio * (buckets - exact)).long()).clamp_max(buckets - 1)
        return result + torch.where(distance < exact, distance, far)

    def forward(
        self, query_len: int, key_len: int, device: torch.device, first_query: Tensor | None = None
    ) -> Tensor:
        """-> (1, H, query_len, key_len); queries are the last query_len of key_len positions, or, given
        first_query ((1,) long, a fixed-shape decoding step's column), start there."""
        start = key_len - query_len if first_query is None else first_query
        q_pos = (torch.arange(query_len, device=device) + start)[:, None]
        k_pos = torch.arange(key_len, device=device)[None, :]
        values = self.bias(self.bucket(k_pos - q_pos))  # (T, S, H)
        return values.permute(2, 0, 1).unsqueeze(0)
