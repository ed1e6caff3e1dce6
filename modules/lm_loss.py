"""`linear_cross_entropy`: the cross-entropy of a vocabulary projection, without its logits.

A language model's loss projects every target position onto the vocabulary and takes the
cross-entropy of those logits. Done plainly, the (N, V) logits are written, read by log-softmax,
kept for backward with their log-probabilities, and a (N, V) gradient is written back: at 4,096
targets and 8,000 words that is 131 MB per copy, and with LLaMA's 128k words 2 GB, more than the
rest of a small model's activations. Here the projection is taken a chunk of rows at a time, and
each chunk's gradient with respect to its logits, softmax minus the (smoothed) target, is formed in
place and multiplied straight into the hidden states' and the weight's gradients, so no (N, V)
tensor ever exists and each chunk stays in cache: the same three matrix products as the plain
computation, a third less time for the head and loss on a CPU (benchmarks/train_throughput.py),
and the gradients are ready when backward asks for them (it only scales them by the incoming
gradient). Without gradients (evaluation) only the loss is computed, chunk by chunk.
"""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK_ROWS = 1024
"""Rows projected at a time: (1024, V) float32 logits, 32 MB at V = 8,000; measured fastest of
128-4096 on a 2-core CPU at V = 8,000."""


def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, targets: Tensor, scale: float = 1.0, label_smoothing: float = 0.0
) -> Tensor:
    """Mean cross-entropy of the logits (scale * hidden) @ weight.T against `targets`, as
    F.cross_entropy(F.linear(scale * hidden, weight), targets, label_smoothing=...) computes it.
    hidden: (N, D); weight: (V, D); targets: (N,) ids -> () loss, float32 (float64 for float64
    inputs). Under autocast the products take its dtype and the softmax float32, as autocast would
    run the plain version."""
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, scale, label_smoothing)
    return _chunked(hidden, weight, targets, scale, label_smoothing, False, False)[0]


def _chunked(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    scale: float,
    smoothing: float,
    wants_hidden: bool,
    wants_weight: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """-> the mean loss (), and the gradients of the mean loss with respect to hidden (N, D) and
    weight (V, D; float32, or float64 for float64 inputs) where wanted (None where not)."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    softmax_dtype = torch.promote_types(dtype, torch.float32)  # float32, or float64 for float64 inputs
    with torch.autocast(device, enabled=False):
        w = weight.to(dtype)  # (V, D)
        n, vocab = hidden.size(0), weight.size(0)
        total = torch.zeros((), device=hidden.device, dtype=softmax_dtype)
        grad_hidden = torch.empty_like(hidden) if wants_hidden else None  # (N, D)
        grad_weight = (
            torch.zeros(weight.shape, device=weight.device, dtype=softmax_dtype) if wants_weight else None
        )
        for start in range(0, n, CHUNK_ROWS):
            h = hidden[start : start + CHUNK_ROWS].to(dtype) * scale  # (C, D)
            target = targets[start : start + CHUNK_ROWS]  # (C,)
            logits = (h @ w.t()).to(softmax_dtype)  # (C, V)
            norm = torch.logsumexp(logits, dim=-1)  # (C,)
            picked = logits.gather(1, target[:, None]).squeeze(1)  # (C,)
            loss = (1 - smoothing) * (norm - picked)
            if smoothing:
                loss = loss + smoothing * (norm - logits.mean(dim=-1))
            total += loss.sum()
            if not (wants_hidden or wants_weight):
                continue
            grad = logits.sub_(norm[:, None]).exp_()  # (C, V) softmax, in the logits' place
            grad.scatter_add_(1, target[:, None], grad.new_full((len(target), 1), smoothing - 1))
            if smoothing:
                grad -= smoothing / vocab
            grad = (grad / n).to(dtype)  # d(mean loss) / d(logits)
            if grad_hidden is not None:
                grad_hidden[start : start + CHUNK_ROWS] = (grad @ w) * scale
            if grad_weight is not None:
                grad_weight += grad.t() @ h
    return total / n, grad_hidden, grad_weight


class _LinearCrossEntropy(torch.autograd.Function):
    """The gradients are computed with the loss, in forward; backward scales them."""

    @staticmethod
    def forward(
        ctx, hidden: Tensor, weight: Tensor, targets: Tensor, scale: float, smoothing: float
    ) -> Tensor:
        loss, grad_hidden, grad_weight = _chunked(
            hidden, weight, targets, scale, smoothing, ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        )
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            None if grad_hidden is None else grad_hidden * grad_loss,
            None if grad_weight is None else (grad_weight * grad_loss).to(ctx.weight_dtype),
            None,
            None,
            None,
        )
