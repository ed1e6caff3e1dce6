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
  (the bottom layers of `model.freeze`) 2. "Before" follows the forward pass, with an
  encoder-decoder's encoder taken as before all of its decoder: the decoder's self-attention does
  not read the encoder, so there it can count a pass that does not run;
- attention adds the scores q·k and the weighted sum of values, 2 · 2 · (H·Dh) · context forward
  per layer, and twice that backward when its queries, keys or values need gradients (12 in all);
  an LSH layer's context is the keys a query can score (n_hashes · 2 · bucket_size) when the input
  is longer.

Embedding lookups are not matmuls and are left out; so is a tied output projection onto the
vocabulary, as in the non-embedding counts of Kaplan et al. and PaLM. The count is therefore a
floor (but for that encoder-decoder case): a model whose head projects every position onto a large
vocabulary does more work than it is credited with, never less.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from lightning.fabric.utilities.throughput import get_available_flops
from torch import nn


@dataclass(frozen=True)
class NetworkCost:
    """FLOPs per token of one task's forward + backward pass: `matmul` for its weight matrices, and
    per attended key `attention` (its full-attention layers, summed) and `lsh_attention` (its LSH
    layers, which score at most `lsh_context` keys per query, however long the input)."""

    matmul: int
    attention: int
    lsh_attention: int = 0
    lsh_context: int = 0

    def training_flops(self, tokens: int, context: int) -> int:
        """FLOPs of forward + backward over `tokens` tokens that each attend to `context` positions."""
        return tokens * (
            self.matmul + self.attention * context + self.lsh_attention * min(context, self.lsh_context)
        )


def forward_order(stack: nn.Module) -> list[nn.Module]:
    """A modules.backbone.Stack's parts that hold weights, in the order its forward pass runs them:
    each block's sub-layers with their norms before them (pre-norm) or after (post-norm)."""
    parts: list[nn.Module] = [m for m in (stack.relative_bias, stack.rotary) if m is not None]
    for block in stack.layers:
        for norm, sublayer in (
            (block.self_attn_norm, block.self_attn),
            (block.cross_attn_norm, block.cross_attn),
            (block.ff_norm, block.ff),
        ):
            parts += [norm, sublayer] if block.pre_norm else [sublayer, norm]
    return [part for part in [*parts, stack.final_norm] if part is not None]


def network_cost(backbone: nn.Module, head: nn.Module, stacks: str) -> NetworkCost:
    """The cost of a task that uses `stacks` ("encoder", "decoder" or "encoder-decoder") of
    `backbone` (a modules.backbone.Backbone) and its own `head`, with what trains now."""
    config = backbone.config
    width = config.n_heads * config.attention_head_dim
    used = [getattr(backbone, name) for name in stacks.split("-")]
    attention_layers = {id(layer.self_attn): layer.lsh for stack in used for layer in stack.layers}
    # has anything before this point trained? then gradients flow back through what follows
    upstream = any(p.requires_grad for p in backbone.embeddings.parameters())
    matmul = attention = lsh_attention = 0
    seen: set[int] = set()  # a weight shared by two modules (tied) multiplies once
    for part in [*(part for stack in used for part in forward_order(stack)), head]:
        for module in part.modules():
            if id(module) in attention_layers:  # its scores need a backward pass if q, k or v do
                needs_backward = upstream or any(
                    p.requires_grad for name, p in module.named_parameters() if not name.startswith("out.")
                )
                cost = width * (12 if needs_backward else 4)
                if attention_layers[id(module)]:
                    lsh_attention += cost
                else:
                    attention += cost
            for weight in module.parameters(recurse=False):  # in order: a LoRA layer's W, A, then B
                if isinstance(module, nn.Linear) and weight.dim() == 2 and id(weight) not in seen:
                    seen.add(id(weight))
                    matmul += weight.numel() * (2 + 2 * upstream + 2 * weight.requires_grad)
                upstream = upstream or weight.requires_grad
    return NetworkCost(
        matmul=matmul,
        attention=attention,
        lsh_attention=lsh_attention,
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
