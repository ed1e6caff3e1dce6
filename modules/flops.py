"""The two halves of MFU (model FLOPs utilisation): the FLOPs a training step of the network
needs, and the most a device can do per second.

MFU is the network's FLOPs per second of training over the device's peak (PaLM, appendix B;
nanoGPT prints it while it trains). The FLOPs are counted from the network's shape, not from the
kernels an implementation happens to run, so two implementations of one network get the same count
and their MFUs compare as their throughputs do. Per token:

- each weight matrix multiplies the token once forward (2 FLOPs per weight, a multiply and an add)
  and twice backward (the gradients of the input and of the weight): 6 FLOPs per weight;
- attention adds the scores q·k and the weighted sum of values, 2 · 2 · (H·Dh) · context forward
  per layer, so 12 · (H·Dh) · context per layer with the backward pass; an LSH layer's context is
  the keys a query can score (n_hashes · 2 · bucket_size) when the input is longer.

Embedding lookups are not matmuls and are left out; so is a tied output projection onto the
vocabulary, as in the non-embedding counts of Kaplan et al. and PaLM. The count is therefore a
floor: a model whose head projects every position onto a large vocabulary does more work than it is
credited with, never less.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from lightning.fabric.utilities.throughput import get_available_flops
from torch import nn


def matmul_weights(*modules: nn.Module | None) -> int:
    """Entries of the nn.Linear weight matrices under `modules` (None skipped, a shared one once)."""
    seen: dict[int, int] = {}
    for module in modules:
        for layer in module.modules() if module is not None else ():
            if isinstance(layer, nn.Linear):
                seen[id(layer.weight)] = layer.weight.numel()
    return sum(seen.values())


@dataclass(frozen=True)
class NetworkCost:
    """What one task's forward pass runs through: its matmul weights (the stacks it uses and its
    head), its attention layers and their width H·Dh. LSH layers score at most `lsh_context` keys
    per query (n_hashes rounds of two buckets), however long the input."""

    weights: int
    layers: int
    attention_width: int
    lsh_layers: int = 0
    lsh_context: int = 0

    def training_flops(self, tokens: int, context: int) -> int:
        """FLOPs of forward + backward over `tokens` tokens that each attend to `context` positions."""
        attended = (self.layers - self.lsh_layers) * context + self.lsh_layers * min(
            context, self.lsh_context
        )
        return tokens * (6 * self.weights + 12 * self.attention_width * attended)


def network_cost(backbone: nn.Module, head: nn.Module, stacks: str) -> NetworkCost:
    """The cost of a task that uses `stacks` ("encoder", "decoder" or "encoder-decoder") of
    `backbone` (a modules.backbone.Backbone) and its own `head`."""
    used = [getattr(backbone, name) for name in stacks.split("-")]
    config = backbone.config
    return NetworkCost(
        weights=matmul_weights(*used, head),
        layers=sum(len(stack.layers) for stack in used),
        attention_width=config.n_heads * config.attention_head_dim,
        lsh_layers=sum(layer.lsh for stack in used for layer in stack.layers),
        lsh_context=config.lsh_n_hashes * 2 * config.lsh_bucket_size,
    )


def peak_flops(
    device: torch.device, dtype: torch.dtype | str, peak_tflops: float | None = None
) -> float | None:
    """FLOP/s one device can do at most: `peak_tflops` when given, else the datasheet figure of a
    known GPU and precision (Lightning's table); None when neither is known (a CPU, say)."""
    if peak_tflops is not None:
        return peak_tflops * 1e12
    return get_available_flops(device, dtype)
