"""Reformer's LSH self-attention: each query attends only to the keys that hash into its bucket.

Full attention compares every query with every key, T² scores per head, which is what runs out of
memory on long inputs. Softmax weights are dominated by the few keys closest to the query, so the
Reformer (Kitaev et al., 2020) finds candidates by locality-sensitive hashing and scores only those:

- queries and keys share one projection (shared-QK), so a query and its nearest keys are the same
  kind of vector and hash alike; keys are unit-normalised;
- angular LSH: a random rotation R (Dh, n_buckets / 2) per hash round, bucket = argmax([xR, -xR])
  (for many buckets, two such hashes whose buckets combine: `bucket_factors`);
- positions are sorted by (round, bucket, position) and cut into chunks of `bucket_size`; each chunk
  attends to itself and to the chunk before it, so a bucket that straddles a chunk boundary is still
  seen whole; keys of another bucket, another round, another packed document, padding and (in a
  decoder) the future are masked;
- a position never attends to itself unless nothing else is open to it: with shared-QK, q·k is
  largest for the query's own key, which would otherwise swamp every other weight (a hash round in
  which a query found no other key then counts only if every round came back empty);
- `n_hashes` rounds are combined by weighting each round's output with its share of the softmax
  normaliser (its log-sum-exp), which is what one softmax over the union of their keys would give,
  up to keys found by more than one round.

Cost per head: n_hashes · T · 2·bucket_size scores instead of T². A sequence that fits in one bucket
gets exactly full shared-QK attention. Decoding with a KV cache attends to every cached key with the
same shared-QK scores: one new query against T keys is already linear, and the cache cannot be
re-bucketed each step.

Training draws fresh rotations from torch's random generator (seeded runs repeat; a reversible
backward replays the generator, so it hashes exactly as the forward did). In evaluation the rotations
come from a fixed seed, so validation and prediction give the same answer every time.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from modules.attention import LayerKV, attention_bias
from modules.dropout import dropout

EVAL_ROTATION_SEED = 0
FACTORISE_ABOVE = 128
"""More buckets than this are hashed as two factors (`bucket_factors`)."""
HASH_SLICE = 2**25
"""At most this many rotated coordinates (B x H x rounds x positions x directions) exist at once."""
SLICE_SCORES = 2**25
"""At most this many attention scores (B x H x chunks x C x K) are computed at once. Longer inputs
are attended a slice of chunks at a time, each slice recomputed in the backward pass instead of
kept (torch.utils.checkpoint), so a layer's attention memory stops growing with the input at one
slice's scores (about 1 GiB of them and their masks in fp32), the rest being linear in length."""


def bucket_factors(n_chunks: int) -> tuple[int, ...]:
    """How many buckets an input of `n_chunks` chunks hashes into, as the factors of that number.

    About one bucket per chunk, as the Reformer does, and even (a rotation gives half as many
    directions and their opposites); one bucket when there is one chunk. Hashing scores every vector
    against half of its factor's directions, so a single factor would cost O(T^2) over T positions
    (16,384 buckets at a million tokens); above FACTORISE_ABOVE buckets the count is split into two
    even factors near its square root (the Reformer's factorised hashing), whose product covers it.
    """
    if n_chunks == 1:
        return (1,)
    n_buckets = n_chunks + n_chunks % 2
    if n_buckets <= FACTORISE_ABOVE:
        return (n_buckets,)
    first = 2 * math.ceil(math.sqrt(n_buckets) / 2)
    return first, 2 * math.ceil(n_buckets / first / 2)


def hash_buckets(
    vectors: Tensor, factors: tuple[int, ...], n_hashes: int, generator: torch.Generator | None
) -> Tensor:
    """Angular LSH. vectors: (B, H, T, Dh) -> (B, H, n_hashes, T) bucket ids in [0, prod(factors)).

    Each factor f (even, or a lone 1) draws a random rotation per round onto f / 2 directions; a
    vector's bucket for it is the nearest of those directions and their opposites,
    argmax([xR, -xR]), and the factors' buckets combine as the digits of one number. Positions are
    hashed a slice at a time (HASH_SLICE), so the rotated vectors never all exist at once.
    """
    b, h, t, dh = vectors.shape
    buckets = vectors.new_zeros(b, h, n_hashes, t, dtype=torch.long)
    if factors == (1,):
        return buckets
    rotations = [  # (Dh, n_hashes, f / 2) per factor, one per round, shared by heads and rows
        torch.randn(dh, n_hashes, f // 2, device=vectors.device, dtype=vectors.dtype, generator=generator)
        for f in factors
    ]
    for factor, rotation in zip(factors, rotations, strict=True):
        step = max(1, HASH_SLICE // (b * h * n_hashes * (factor // 2)))  # positions per slice
        for first in range(0, t, step):
            rotated = torch.einsum("bhtd,dnr->bhntr", vectors[:, :, first : first + step], rotation)
            largest, smallest = rotated.max(dim=-1), rotated.min(dim=-1)  # (B, H, n_hashes, slice)
            nearest = torch.where(  # argmax([xR, -xR]) without building it
                largest.values >= -smallest.values, largest.indices, smallest.indices + factor // 2
            )
            buckets[..., first : first + step] = buckets[..., first : first + step] * factor + nearest
    return buckets


def look_one_back(chunks: Tensor) -> Tensor:
    """(B, H, N, C, ...) -> (B, H, N, 2C, ...): each chunk followed by the chunk before it (the first
    wraps to the last, whose keys a bucket or causal mask then rules out)."""
    return torch.cat([chunks, chunks.roll(1, dims=2)], dim=3)


class LSHSelfAttention(nn.Module):
    """Shared-QK self-attention over LSH buckets (see the module docstring).

    The parameters are one fused (d_model -> 2 * H * Dh) projection to shared query-keys and
    values (biased as `qkv_bias` says, None: as `bias`), and the output projection: a layer switches
    between `full` and `lsh` attention only with its configuration, never its size.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        head_dim: int,
        bias: bool,
        dropout: float,
        scale: bool,
        causal: bool,
        n_hashes: int,
        bucket_size: int,
        qkv_bias: bool | None = None,
    ) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.causal = n_heads, head_dim, causal
        self.n_hashes, self.bucket_size = n_hashes, bucket_size
        inner = n_heads * head_dim
        in_bias = bias if qkv_bias is None else qkv_bias
        self.qkv = nn.Linear(d_model, 2 * inner, bias=in_bias)  # shared query-keys, then values
        self.out = nn.Linear(inner, d_model, bias=bias)
        self.dropout = dropout
        self.scale = head_dim**-0.5 if scale else 1.0

    def _heads(self, x: Tensor) -> Tensor:
        """(B, T, H*Dh) -> (B, H, T, Dh)"""
        b, t, _ = x.shape
        return x.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)

    def _merge(self, y: Tensor) -> Tensor:
        """(B, H, T, Dh) -> (B, T, D) through the output projection."""
        b, _, t, _ = y.shape
        return self.out(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))

    def forward(
        self,
        x: Tensor,
        key_mask: Tensor | None = None,
        documents: Tensor | None = None,
        cache: LayerKV | None = None,
    ) -> Tensor:
        """x: (B, T, D); key_mask: (B, T) True at real tokens (B, past + T with a cache); documents:
        (B, T) packed document ids -> (B, T, D)."""
        qk, v = (self._heads(t) for t in self.qkv(x).chunk(2, dim=-1))  # (B, H, T, Dh) each
        if cache is not None:
            return self._merge(self._attend_cached(qk, v, key_mask, cache))
        return self._merge(self._attend_buckets(qk, v, key_mask, documents))

    def _attend_cached(self, qk: Tensor, v: Tensor, key_mask: Tensor | None, cache: LayerKV) -> Tensor:
        """Decoding: the new queries (B, H, T, Dh) against every cached key, self excluded unless alone."""
        past = cache.length
        keys, values = cache.append(F.normalize(qk, dim=-1), v)  # (B, H, past + T, Dh)
        t, s = qk.size(2), keys.size(2)
        bias = attention_bias(t, s, key_mask, causal=self.causal, dtype=qk.dtype, device=qk.device)
        scores = torch.einsum("bhtd,bhsd->bhts", qk, keys) * self.scale  # (B, H, T, S)
        if bias is not None:
            scores = scores + bias
        first = past if cache.column is None else cache.column  # a fixed-shape step's column: (1,) long
        columns = torch.arange(t, device=qk.device) + first  # (T,) the queries' own columns
        itself = columns[:, None] == torch.arange(s, device=qk.device)
        alone = torch.finfo(scores.dtype).min / 2
        scores = scores.masked_fill(itself, alone).clamp_min(torch.finfo(scores.dtype).min)
        return torch.einsum("bhts,bhsd->bhtd", scores.softmax(dim=-1), values)

    def _attend_buckets(
        self, qk: Tensor, v: Tensor, key_mask: Tensor | None, documents: Tensor | None
    ) -> Tensor:
        """(B, H, T, Dh) shared query-keys and values -> (B, H, T, Dh) attention output."""
        b, h, t, dh = qk.shape
        c, rounds = self.bucket_size, self.n_hashes
        padded = -(-t // c) * c  # T rounded up to whole chunks; the extra keys are masked
        if padded != t:
            qk, v = (F.pad(z, (0, 0, 0, padded - t)) for z in (qk, v))
        real = torch.ones(b, padded, dtype=torch.bool, device=qk.device)  # (B, Tp)
        real[:, t:] = False
        if key_mask is not None:
            real[:, :t] = key_mask.bool()
        doc = F.pad(documents, (0, padded - t)) if documents is not None else None  # (B, Tp)

        n_chunks = padded // c
        factors = bucket_factors(n_chunks)
        n_buckets = math.prod(factors)
        generator = None
        if not self.training:
            generator = torch.Generator(device=qk.device).manual_seed(EVAL_ROTATION_SEED)
        with torch.no_grad():
            buckets = hash_buckets(qk.detach(), factors, rounds, generator)  # (B, H, rounds, Tp)
            offsets = torch.arange(rounds, device=qk.device)[:, None] * n_buckets  # (rounds, 1)
            bucket_ids = (buckets + offsets).flatten(2)  # (B, H, L), L = rounds * Tp, unique per round
            positions = torch.arange(padded, device=qk.device).repeat(rounds)  # (L,)
            order = (bucket_ids * padded + positions).argsort(dim=-1)  # (B, H, L) sorted (round, bucket, pos)
            sorted_pos = order % padded  # (B, H, L)
            sorted_bucket = bucket_ids.gather(-1, order)  # (B, H, L)

        n = rounds * n_chunks  # chunks of c sorted positions, over all rounds
        q_pos, q_bucket = sorted_pos.view(b, h, n, c), sorted_bucket.view(b, h, n, c)  # (B, H, N, C)
        k_pos, k_bucket = q_pos, q_bucket
        if n_chunks > 1:  # with one chunk per round, the chunk before holds another round's keys only
            k_pos, k_bucket = look_one_back(q_pos), look_one_back(q_bucket)  # (B, H, N, 2C)
        per_chunk = b * h * c * k_pos.size(-1)  # scores of one chunk
        step = max(1, SLICE_SCORES // per_chunk)  # chunks per slice
        attend = self._attend_chunks
        if n > step and torch.is_grad_enabled():  # each slice's scores recomputed in the backward pass
            attend = partial(checkpoint, self._attend_chunks, use_reentrant=False)
        out = qk.new_zeros(b, h, rounds * padded, dh)  # (B, H, L, Dh) in (round, position) order
        normaliser = qk.new_zeros(b, h, rounds * padded)  # (B, H, L)
        for first in range(0, n, step):
            sliced = (z[:, :, first : first + step] for z in (q_pos, q_bucket, k_pos, k_bucket))
            arguments = (qk, v, real, doc, *sliced)
            piece, piece_normaliser = attend(*arguments)  # (B, H, M, C, Dh), (B, H, M, C)
            rows = order[:, :, first * c : (first + step) * c]  # (B, H, M * C): each sorted row's place
            out.scatter_(2, rows[..., None].expand(-1, -1, -1, dh), piece.flatten(2, 3))
            normaliser.scatter_(2, rows, piece_normaliser.flatten(2))

        share = normaliser.view(b, h, rounds, padded, 1).softmax(dim=2)  # each round's part of the union
        return (out.view(b, h, rounds, padded, dh) * share).sum(dim=2)[:, :, :t]  # (B, H, T, Dh)

    def _attend_chunks(
        self,
        qk: Tensor,
        v: Tensor,
        real: Tensor,
        doc: Tensor | None,
        q_pos: Tensor,
        q_bucket: Tensor,
        k_pos: Tensor,
        k_bucket: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """Chunks of sorted positions, each query scoring the keys of its chunk (and the chunk before).

        qk, v: (B, H, Tp, Dh); real, doc: (B, Tp); q_pos, q_bucket: (B, H, M, C) the chunks' positions
        and bucket ids; k_pos, k_bucket: (B, H, M, K) those of the keys each chunk scores
        -> (B, H, M, C, Dh) outputs and (B, H, M, C) their log-sum-exp normalisers.
        """
        b, dh = qk.size(0), qk.size(-1)

        def at(values: Tensor, positions: Tensor) -> Tensor:
            """(B, H, Tp, Dh) at (B, H, M, X) positions -> (B, H, M, X, Dh)"""
            index = positions.flatten(2)[..., None].expand(-1, -1, -1, dh)
            return values.gather(2, index).view(*positions.shape, dh)

        queries = at(qk, q_pos)  # (B, H, M, C, Dh)
        keys = F.normalize(at(qk, k_pos), dim=-1)  # before the scale, which goes on the queries
        values = at(v, k_pos)  # (B, H, M, K, Dh)
        scores = torch.einsum("bhmcd,bhmkd->bhmck", queries * self.scale, keys)  # (B, H, M, C, K)
        blocked = q_bucket[..., :, None] != k_bucket[..., None, :]  # (B, H, M, C, K)
        batch_rows = torch.arange(b, device=qk.device)[:, None, None, None]
        blocked |= ~real[batch_rows, k_pos][..., None, :]
        if doc is not None:
            blocked |= doc[batch_rows, q_pos][..., :, None] != doc[batch_rows, k_pos][..., None, :]
        if self.causal:
            blocked |= k_pos[..., None, :] > q_pos[..., :, None]
        floor = torch.finfo(scores.dtype).min
        itself = q_pos[..., :, None] == k_pos[..., None, :]
        scores = scores.masked_fill(itself, floor / 2).masked_fill(blocked, floor)
        normaliser = scores.logsumexp(dim=-1, keepdim=True)  # (B, H, M, C, 1)
        weights = dropout((scores - normaliser).exp(), self.dropout, self.training)
        return torch.einsum("bhmck,bhmkd->bhmcd", weights, values), normaliser.squeeze(-1)
