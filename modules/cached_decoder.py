"""The decoder stack on a KV cache, stepped one token per row at a time: what every decoding strategy of
modules/generation.py drives, eagerly or, on a GPU with `cuda_graph`, replayed from a recorded CUDA graph
(modules/decode_graph.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.distributed.fsdp import FSDPModule

from modules.attention import KVCache
from modules.backbone import Backbone
from modules.decode_graph import GraphedStep, Step

Project = Callable[[Tensor], Tensor]
"""The output projection, hidden (N, D) -> logits (N, V): tasks own their LM heads."""


@dataclass
class DecoderLogits:
    """The decoder stack on a KV cache and the output projection: new tokens in, next-token logits out.

    Apart from `CachedDecoder` (and holding nothing of it), so that a recorded step referring to it
    makes no reference cycle: the cache and any recording go as soon as `generate` returns.
    """

    backbone: Backbone
    project: Project
    cache: KVCache
    memory: Tensor | None  # (B, S, D): one row per source
    memory_mask: Tensor | None  # (B, S)

    def __call__(self, input_ids: Tensor, positions: Tensor, mask: Tensor | None = None) -> Tensor:
        """input_ids, positions, mask: (N, T) new tokens -> next-token logits (N, V) after the last column."""
        hidden = self.backbone.decode(
            input_ids, mask, self.memory, self.memory_mask, cache=self.cache, positions=positions
        )  # (N, T, D)
        return self.project(hidden[:, -1])


class CachedDecoder:
    """The decoder stack on a KV cache, fed the newest token of every row each step: what all strategies drive.

    It tracks each row's next position, so left-padded prompts keep counting from their first real token.
    The encoder memory holds one row per source, shared by its beams, so only the cache moves on reorder.
    With `cuda_graph`, the cache's shapes are fixed from the first step on (`KVCache.fix_shapes`): every
    step is then the same kernels on the same tensors, replayed as one recorded CUDA graph on a GPU. On
    the CPU, where there is no graph, fixed shapes would only attend over unwritten columns for nothing,
    but they run all the same, so that CPU tests check what a GPU replays. A backbone sharded by FSDP
    gathers its weights inside each block's forward, which a recording cannot replay: it steps eagerly.
    """

    def __init__(
        self,
        backbone: Backbone,
        project: Project,
        cache: KVCache,
        memory: Tensor | None = None,
        memory_mask: Tensor | None = None,
        cuda_graph: bool = False,
    ) -> None:
        self.logits = DecoderLogits(backbone, project, cache, memory, memory_mask)
        self.cache, self.cuda_graph = cache, cuda_graph
        self.next_position = torch.empty(0, dtype=torch.long)  # (N,) once the start token or prompt is fed
        self.one_token: Step | None = None  # set on the first step

    def feed(self, input_ids: Tensor, mask: Tensor | None, positions: Tensor) -> Tensor:
        """The start token or the prompt: input_ids, mask, positions (N, T) -> logits (N, V) after them."""
        self.next_position = positions[:, -1] + 1
        return self.logits(input_ids, positions, mask)

    def step(self, tokens: Tensor) -> Tensor:
        """tokens: (N,) the newest token of each row -> logits (N, V) for the one after it (with a CUDA
        graph, valid until the next step)."""
        if self.one_token is None:
            self.one_token = self.logits
            if self.cuda_graph:
                self.cache.fix_shapes(tokens.size(0), tokens.device)
                sharded = any(isinstance(m, FSDPModule) for m in self.logits.backbone.modules())
                if tokens.is_cuda and not sharded:
                    self.one_token = GraphedStep(self.logits, self.cache)
        logits = self.one_token(tokens[:, None], self.next_position[:, None])
        self.next_position = self.next_position + 1
        return logits

    def reorder(self, rows: Tensor) -> None:
        """Row i continues old row rows[i] (beam search), rows: (N,)."""
        self.cache.reorder(rows)
        self.next_position = self.next_position[rows]
