"""Reversible residual layers (RevNet; Gomez et al. 2017, used by the Reformer).

A plain stack keeps every layer's activations for the backward pass, so training memory grows
with depth. A reversible layer splits the residual stream into two halves and updates them in turn,

    y1 = x1 + F(x2)        F = attention_branch (pre-norm self-attention)
    y2 = x2 + G(y1)        G = feed_forward_branch (pre-norm feed-forward)

which can be run backwards exactly: x2 = y2 - G(y1), x1 = y1 - F(x2). So the forward pass keeps
only the last layer's output; the backward pass walks down the layers, rebuilding each layer's
input from its output and recomputing F and G with gradients on, one layer at a time. Dropout and
LSH hashing are random: each branch's generator state is recorded in the forward pass and replayed
in the backward pass, so the recomputation draws the same masks and buckets. G is position-wise, so
with `ff_chunks` it is recomputed and back-propagated one slice of the sequence at a time.

The stack's input x enters as x1 = x2 = x, and its output is the mean (y1 + y2) / 2.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor, nn


class GeneratorState:
    """The random generator state one branch started from, to draw the same numbers again."""

    def __init__(self, device: torch.device) -> None:
        self.cpu = torch.get_rng_state()
        self.device = device if device.type == "cuda" else None
        self.cuda = torch.cuda.get_rng_state(device) if self.device is not None else None

    @contextmanager
    def replayed(self):
        """Run the enclosed code from the recorded state, then give the generators back theirs."""
        devices = [self.device] if self.device is not None else []
        with torch.random.fork_rng(devices=devices, device_type="cuda"):
            torch.set_rng_state(self.cpu)
            if self.device is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


class ReversibleStack(torch.autograd.Function):
    """The reversible layers of one stack as one autograd node that stores only its output.

    The trainable parameters of its blocks are inputs of the node, and the backward pass returns
    their gradients, so the node sits in the autograd graph like any layer: DDP finds every
    parameter it trains, and frozen embeddings below it do not keep its backward from running.
    """

    @staticmethod
    def forward(ctx, x: Tensor, blocks: nn.ModuleList, branch_args: tuple, *parameters: Tensor) -> Tensor:
        """x: (B, T, D) -> (B, T, D). branch_args: what each block's attention_branch takes after x.
        parameters: the blocks' trainable parameters, block by block (see `trainable`)."""
        ctx.blocks, ctx.branch_args, ctx.states = blocks, branch_args, []
        device_type = x.device.type
        ctx.autocast = (
            device_type,
            torch.is_autocast_enabled(device_type),
            torch.get_autocast_dtype(device_type),
        )
        y1, y2 = run_layers(blocks, x, branch_args, ctx.states)
        ctx.save_for_backward(y1, y2)
        return (y1 + y2) / 2

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple:
        y1, y2 = ctx.saved_tensors  # (B, T, D) each, the last layer's halves
        dy1 = dy2 = grad_out / 2
        parameter_grads: list[Tensor | None] = []  # block by block, last block first
        device_type, autocast_on, autocast_dtype = ctx.autocast
        with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_on):
            for block, (attention_state, feed_forward_state) in zip(
                reversed(ctx.blocks), reversed(ctx.states), strict=True
            ):
                parameters = trainable(block)
                g, dg_input, g_grads = _recompute_feed_forward(block, parameters, y1, dy2, feed_forward_state)
                x2 = y2 - g
                dy1 = dy1 + dg_input
                del g
                with torch.enable_grad():
                    x2_ = x2.detach().requires_grad_()
                    with attention_state.replayed():
                        f = block.attention_branch(x2_, *ctx.branch_args)
                    dx2, *f_grads = torch.autograd.grad(f, [x2_, *parameters], dy1, allow_unused=True)
                y1, y2 = y1 - f.detach(), x2
                dy2 = dy2 + dx2
                del f, x2_
                parameter_grads[:0] = [_add(a, b) for a, b in zip(f_grads, g_grads, strict=True)]
        return dy1 + dy2, None, None, *parameter_grads


def trainable(module: nn.Module) -> list[Tensor]:
    """The parameters of `module` that train, in a fixed order."""
    return [p for p in module.parameters() if p.requires_grad]


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """The sum of two gradients of one parameter, either of which may be missing (None)."""
    if a is None or b is None:
        return a if b is None else b
    return a + b


def _recompute_feed_forward(
    block: nn.Module, parameters: list[Tensor], y1: Tensor, dy2: Tensor, state: GeneratorState
) -> tuple[Tensor, Tensor, list[Tensor | None]]:
    """G(y1), the gradient reaching y1 through G, and the gradients of `parameters` (the block's),
    back-propagating dy2 slice by slice in the order the forward pass computed G (block.ff_chunks),
    so only one slice's hidden units live at a time. y1, dy2: (B, T, D)."""
    outputs, input_grads = [], []
    parameter_grads: list[Tensor | None] = [None] * len(parameters)
    with state.replayed():
        for part, grad in zip(
            y1.chunk(block.ff_chunks, dim=1), dy2.chunk(block.ff_chunks, dim=1), strict=True
        ):
            with torch.enable_grad():
                part = part.detach().requires_grad_()
                out = block.feed_forward_slice(part)
                part_grad, *grads = torch.autograd.grad(out, [part, *parameters], grad, allow_unused=True)
            outputs.append(out.detach())
            input_grads.append(part_grad)
            parameter_grads = [_add(a, b) for a, b in zip(parameter_grads, grads, strict=True)]
    return torch.cat(outputs, dim=1), torch.cat(input_grads, dim=1), parameter_grads


def run_layers(
    blocks: nn.ModuleList,
    x: Tensor,
    branch_args: tuple,
    states: list | None = None,
    caches: list | None = None,
) -> tuple[Tensor, Tensor]:
    """The reversible updates of every block from x1 = x2 = x (B, T, D) -> the last (y1, y2).
    states: when a list, each block's (attention, feed-forward) generator states are appended.
    caches: one LayerKV per block when decoding with a KVCache."""
    x1, x2 = x, x
    for i, block in enumerate(blocks):
        attention_state = GeneratorState(x.device) if states is not None else None
        x1 = x1 + block.attention_branch(x2, *branch_args, cache=caches[i] if caches else None)
        feed_forward_state = GeneratorState(x.device) if states is not None else None
        x2 = x2 + block.feed_forward_branch(x1)
        if states is not None:
            states.append((attention_state, feed_forward_state))
    return x1, x2


def run_reversible(
    blocks: nn.ModuleList, x: Tensor, branch_args: tuple, caches: list | None = None
) -> Tensor:
    """The stack's layers over x (B, T, D) -> (B, T, D), storing no activations when a gradient is
    wanted. branch_args: (self_bias, is_causal, key_mask, documents, rotation) for every attention_branch."""
    if not torch.is_grad_enabled() or caches:
        y1, y2 = run_layers(blocks, x, branch_args, caches=caches)
        return (y1 + y2) / 2
    parameters = [p for block in blocks for p in trainable(block)]
    return ReversibleStack.apply(x, blocks, branch_args, *parameters)
