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

What it holds from forward to backward instead of the logits is the weight's gradient (V, D, in
float32): less than the logits' several (N, V) copies unless a batch has fewer targets than about
half the model width. Under float16 the plain computation runs (see `linear_cross_entropy`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

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
    if _product_dtype(hidden) == torch.float16:
        # float16 would flush the small (softmax - target) / N to zero; the plain computation's
        # gradient is taken in backward, under GradScaler's loss scale, which protects it
        logits = F.linear(hidden * scale, weight).float()  # (N, V)
        return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, scale, label_smoothing)
    return _chunked(hidden, weight, targets, scale, label_smoothing, False, False)[0]


def _product_dtype(hidden: Tensor) -> torch.dtype:
    """The dtype the matrix products take: autocast's where it is on, else the hidden states'."""
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype


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
    device, dtype = hidden.device.type, _product_dtype(hidden)
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
            picked = logits.gather(1, target[:, None]).squeeze(1)  # (C,)
            mean = logits.mean(dim=-1) if smoothing else None  # (C,)
            top = logits.amax(dim=-1, keepdim=True)  # (C, 1)
            # exp(logits - top), in the logits' place: the softmax times its row sum
            unnormalised = logits.sub_(top).exp_()  # (C, V)
            sums = unnormalised.sum(dim=-1, keepdim=True)  # (C, 1)
            norm = (top + sums.log()).squeeze(1)  # (C,) logsumexp
            loss = (1 - smoothing) * (norm - picked)
            if smoothing:
                loss = loss + smoothing * (norm - mean)
            total += loss.sum()
            if not (wants_hidden or wants_weight):
                continue
            # d(loss of a row) / d(logits) = softmax - (1 - s) one-hot - s / V, here times the row's
            # sum, which the products divide out per row (with the mean's 1 / N) on (C, D) instead
            grad = unnormalised.scatter_add_(1, target[:, None], (smoothing - 1) * sums)
            if smoothing:
                grad -= sums * (smoothing / vocab)
            grad = grad.to(dtype)
            row_factor = 1 / (sums * n)  # (C, 1)
            if grad_hidden is not None:
                grad_hidden[start : start + CHUNK_ROWS] = (grad @ w) * (row_factor * scale)
            if grad_weight is not None:
                grad_weight += grad.t() @ (h * row_factor.to(dtype))
    return total / n, grad_hidden, grad_weight


class _LinearCrossEntropy(torch.autograd.Function):
    """The gradients are computed with the loss, in forward; backward scales them (in place: the
    weight's gradient is as large as the weight) and hands them over."""

    @staticmethod
    def forward(
        ctx, hidden: Tensor, weight: Tensor, targets: Tensor, scale: float, smoothing: float
    ) -> Tensor:
        loss, ctx.grad_hidden, ctx.grad_weight = _chunked(
            hidden, weight, targets, scale, smoothing, ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        )
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor):
        grad_hidden, grad_weight = ctx.grad_hidden, ctx.grad_weight
        ctx.grad_hidden = ctx.grad_weight = None  # freed with their last use
        if grad_hidden is not None:
            grad_hidden.mul_(grad_loss)
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None
