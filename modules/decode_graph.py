"""A decoding step recorded once as a CUDA graph and replayed for every later step.

A decoding step of a small model is a few hundred small kernels. Launched one by one from Python,
the GPU waits on the host most of the step (3 ms a step for the 4 + 4-layer T5 of
benchmarks/generate.py on an H100, for well under 1 ms of GPU work). A CUDA graph records the
kernels of one step with their arguments; replaying it is one launch.

A replay repeats the recorded kernels on the same addresses, so what changes between steps must be
data in place, never new shapes, new tensors or host decisions. `KVCache.fix_shapes` makes the
cache so: a step writes the column a device tensor names (and advances it), and attends over the
whole capacity with the columns not yet written masked. What the step is fed, the tokens and their
positions, is copied into the recorded input tensors before each replay, and what the step's
Python would have done on the host (each layer's count of filled columns) is done here after it.

Beam search's reorder swaps each layer's cache buffers with a spare pair, so its steps alternate
between two sets of addresses: one recording per set, found by the addresses, sharing one memory
pool (they never run at once). The first step runs eagerly on a side stream, as CUDA's capture
rules ask, so that libraries set up their handles and workspaces outside any recording.

Each recording synchronises the device once and is made for one `generate` call's shapes (a
greedy or sampled generation records once, beam search twice), which the benchmark's timings
include: short generations gain little, long ones replay many steps per recording.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from modules.attention import KVCache

Step = Callable[[Tensor, Tensor], Tensor]
"""(N, 1) token ids, (N, 1) their positions -> (N, V) next-token logits, one token into the cache."""


class GraphedStep:
    """`step` (on a cache with fixed shapes), replayed from a CUDA graph after its first, eager, call.

    Recording starts afresh for each generation (its shapes are those of its batch and cache), so a
    recording is made once or twice per `generate` call and replayed for every later step.
    """

    def __init__(self, step: Step, cache: KVCache) -> None:
        if cache.column is None:
            raise ValueError(
                "a CUDA-graph decoding step needs a KVCache with fixed shapes (KVCache.fix_shapes)"
            )
        self.step, self.cache = step, cache
        self.device = cache.column.device
        self.tokens: Tensor | None = None  # (N, 1) the recorded inputs, refilled before every replay
        self.positions: Tensor | None = None  # (N, 1)
        self.recordings: dict[tuple[int, ...], tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self.pool: tuple[int, int] | None = None  # memory pool shared by the recordings

    def __call__(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """tokens, positions: (N, 1) -> logits (N, V), valid until the next call."""
        if self.cache.length >= self.cache.capacity:  # a replay runs no Python that would check it
            raise ValueError(f"KVCache capacity {self.cache.capacity} exceeded; make a larger cache")
        with torch.cuda.device(self.device):  # streams and recordings on the cache's GPU, not the current one
            if self.tokens is None or self.positions is None:
                self.tokens, self.positions = tokens.clone(), positions.clone()
                return self._eager_on_side_stream()
            self.tokens.copy_(tokens)
            self.positions.copy_(positions)
            addresses = self._addresses()
            if addresses not in self.recordings:
                return self._record(addresses)
            graph, logits = self.recordings[addresses]
            graph.replay()
        for layer in self.cache.layers:  # what the step's Python did on the host when it was recorded
            layer.length += 1
        return logits

    def _addresses(self) -> tuple[int, ...]:
        """Where the step's cache tensors lie now: beam search's reorders move them between two sets."""
        mask = self.cache.key_mask
        return (
            *(layer.keys.data_ptr() for layer in self.cache.layers if layer.keys is not None),
            *(layer.values.data_ptr() for layer in self.cache.layers if layer.values is not None),
            mask.data_ptr() if mask is not None else 0,
        )

    def _eager_on_side_stream(self) -> Tensor:
        """The first step, run as usual but on a side stream, which warms up what recording needs."""
        main, side = torch.cuda.current_stream(), torch.cuda.Stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            logits = self.step(self.tokens, self.positions)
        main.wait_stream(side)
        logits.record_stream(main)  # made on the side stream, used and freed on the main one
        return logits

    def _record(self, addresses: tuple[int, ...]) -> Tensor:
        """Record this step and replay it once: recording only records, so the step has not run yet.
        The recording pass's Python has already advanced the cache's host counts, as the step does.
        thread_local: CUDA calls other threads make meanwhile (a data loader pinning memory, NCCL's
        watchdog) neither break the recording nor are refused."""
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        with torch.cuda.graph(graph, pool=self.pool, stream=stream, capture_error_mode="thread_local"):
            logits = self.step(self.tokens, self.positions)
        self.pool = graph.pool()
        self.recordings[addresses] = (graph, logits)
        graph.replay()
        return logits
