"""The two halves of MFU (model FLOPs utilisation): the FLOPs a training step of the network
needs, and the most a device can do per second.

MFU is the network's FLOPs per second of training over the device's peak (PaLM, appendix B;
nanoGPT prints it while it trains). The FLOPs are counted from the network's shape, not from the
kernels an implementation happens to run, so two implementations of one network get the same count
and their MFUs compare as their throughputs do. Per token:

- each weight matrix multiplies the token once forward (2 FLOPs per weight, a multiply and an add)
  and up to twice backward: for the gradient of its input, needed when anything before it trains,
  and for its own gradient, needed when it trains. 6 FLOPs per weight in full training; a frozen
  weight behind LoRA adapters or a trained layer costs 4, and one with nothing trained before it
  (the bottom layers of `model.freeze`) 2. "Before" follows the forward pass: a decoder's
  cross-attention is where the encoder comes before it. Each stack's weights multiply that stack's
  tokens (an encoder-decoder's source and target counted apart), but a cross-attention's key and
  value projections, which multiply the encoder's;
- attention adds the scores q·k and the weighted sum of values, 2 · 2 · (H·Dh) · context forward
  per layer, and twice that backward when its queries, keys or values need gradients (12 in all),
  over the stack's own positions and, in cross-attention, the encoder's; an LSH layer's context is
  the keys a query can score (n_hashes · 2 · bucket_size) when the input is longer.

Embedding lookups are not matmuls and are left out; so is a tied output projection onto the
vocabulary, as in the non-embedding counts of Kaplan et al. and PaLM. The count is therefore a
floor: a model whose head projects every position onto a large vocabulary does more work than it
is credited with, never less.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from lightning.fabric.utilities.throughput import get_available_flops
from torch import nn


@dataclass(frozen=True)
class StackCost:
    """FLOPs per token of one stack's forward + backward pass: `matmul` for its weight matrices (and
    the head's, for the task's last stack); per attended key `attention` (its full-attention layers,
    summed) and `lsh_attention` (its LSH layers, which score at most `lsh_context` keys per query,
    however long the input). A decoder reading an encoder adds `cross_attention` per encoder
    position, and its cross-attention's key / value projections, `memory_matmul`, multiply each
    encoder token instead of its own."""

    matmul: int
    attention: int
    lsh_attention: int = 0
    lsh_context: int = 0
    cross_attention: int = 0
    memory_matmul: int = 0

    def flops(self, tokens: int, context: int, memory_tokens: int = 0, memory_context: int = 0) -> int:
        return memory_tokens * self.memory_matmul + tokens * (
            self.matmul
            + self.attention * context
            + self.lsh_attention * min(context, self.lsh_context)
            + self.cross_attention * memory_context
        )


@dataclass(frozen=True)
class NetworkCost:
    """What a task's training step costs, stack by stack: `first` (the encoder, or the only stack)
    and, for an encoder-decoder, `decoder`."""

    first: StackCost
    decoder: StackCost | None = None

    def training_flops(
        self, tokens: int, context: int, decoder_tokens: int = 0, decoder_context: int = 0
    ) -> int:
        """FLOPs of forward + backward over `tokens` tokens of the first stack, each attending to
        `context` positions, and `decoder_tokens` decoder tokens attending to `decoder_context`
        positions and (cross-attention) to the `context` encoder positions."""
        flops = self.first.flops(tokens, context)
        if self.decoder is not None:
            flops += self.decoder.flops(decoder_tokens, decoder_context, tokens, context)
        return flops


def forward_order(stack: nn.Module, with_memory: bool) -> list[nn.Module]:
    """A modules.backbone.Stack's parts that hold weights, in the order its forward pass runs them:
    each block's sub-layers with their norms before them (pre-norm) or after (post-norm); the
    cross-attention only `with_memory` (a decoder-only task on an encoder-decoder skips it)."""
    parts: list[nn.Module] = [m for m in (stack.relative_bias, stack.rotary) if m is not None]
    for block in stack.layers:
        sublayers = [(block.self_attn_norm, block.self_attn), (block.ff_norm, block.ff)]
        if with_memory:
            sublayers.insert(1, (block.cross_attn_norm, block.cross_attn))
        for norm, sublayer in sublayers:
            parts += [norm, sublayer] if block.pre_norm else [sublayer, norm]
    return [part for part in [*parts, stack.final_norm] if part is not None]


def network_cost(backbone: nn.Module, head: nn.Module, stacks: str) -> NetworkCost:
    """The cost of a task that uses `stacks` ("encoder", "decoder" or "encoder-decoder") of
    `backbone` (a modules.backbone.Backbone) and its own `head`, with what trains now."""
    config = backbone.config
    width = config.n_heads * config.attention_head_dim
    names = stacks.split("-")
    embeddings_train = any(p.requires_grad for p in backbone.embeddings.parameters())
    memory_upstream = False  # did anything in the encoder train? (its output is the memory)
    seen: set[int] = set()  # a weight shared by two modules (tied) multiplies once
    costs = []
    for name in names:
        stack = getattr(backbone, name)
        with_memory = name == "decoder" and "encoder" in names
        kinds = {id(layer.self_attn): "lsh" if layer.lsh else "full" for layer in stack.layers}
        memory_side: set[int] = set()  # the cross-attention key / value projections: they read the memory
        if with_memory:
            kinds |= {id(layer.cross_attn): "cross" for layer in stack.layers}
            memory_side = {id(layer.cross_attn.kv) for layer in stack.layers}
        # has anything before this point trained? then gradients flow back through what follows
        upstream = embeddings_train
        terms = {"matmul": 0, "memory_matmul": 0, "full": 0, "lsh": 0, "cross": 0}
        for part in forward_order(stack, with_memory) + ([head] if name == names[-1] else []):
            for module in part.modules():
                reads_memory = id(module) in memory_side
                before = memory_upstream if reads_memory else upstream
                if id(module) in kinds:  # its scores need a backward pass if q, k or v do
                    needs_backward = (
                        upstream
                        or (kinds[id(module)] == "cross" and memory_upstream)
                        or any(
                            p.requires_grad
                            for key, p in module.named_parameters()
                            if not key.startswith("out.")
                        )
                    )
                    terms[kinds[id(module)]] += width * (12 if needs_backward else 4)
                for weight in module.parameters(recurse=False):  # in order: a LoRA layer's W, A, then B
                    if isinstance(module, nn.Linear) and weight.dim() == 2 and id(weight) not in seen:
                        seen.add(id(weight))
                        side = "memory_matmul" if reads_memory else "matmul"
                        terms[side] += weight.numel() * (2 + 2 * before + 2 * weight.requires_grad)
                    before = before or weight.requires_grad
                # what follows the cross-attention's keys and values depends on the memory too
                upstream = upstream or before
        if name == "encoder":
            memory_upstream = upstream
        costs.append(
            StackCost(
                matmul=terms["matmul"],
                attention=terms["full"],
                lsh_attention=terms["lsh"],
                lsh_context=config.lsh_n_hashes * 2 * config.lsh_bucket_size,
                cross_attention=terms["cross"],
                memory_matmul=terms["memory_matmul"],
            )
        )
    return NetworkCost(*costs)


def peak_flops(
    device: torch.device, dtype: torch.dtype | str, peak_tflops: float | None = None
) -> float | None:
    """FLOP/s one device can do at most: `peak_tflops` when given, else the datasheet figure of a
    known GPU and precision (Lightning's table); None when neither is known (a CPU, say)."""
    if peak_tflops is not None:
        return peak_tflops * 1e12
    return get_available_flops(device, dtype)
