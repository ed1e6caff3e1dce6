"""Dropout that draws its random mask cheaply on the CPU.

`F.dropout` on the CPU draws one Bernoulli sample per element, and in a small transformer that
draw alone is a fifth of a training step (`benchmarks/train_throughput.py --profile`). Here a CPU
mask comes from 64-bit random words cut into four 16-bit halves, each kept when it clears a
threshold: a quarter of the draws and a compare, 2-3x faster than the Bernoulli kernel. The drop
probability is thereby rounded to a multiple of 1/65536 (0.1 becomes 0.100006). On other devices
the fused `F.dropout` kernel is already fast and is used as is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HALF_WORDS = 65536  # values of one 16-bit half


def keep_mask(shape: torch.Size, dropped: int, device: torch.device) -> Tensor:
    """(shape) uint8, each element 0 with probability dropped / 65536 and else 1, independently.
    dropped: 1 .. 65535. Bytes, not bools: CPU kernels write and multiply by them several times
    faster."""
    n = shape.numel()
    words = torch.randint(
        torch.iinfo(torch.int64).min,
        torch.iinfo(torch.int64).max,
        ((n + 3) // 4,),
        dtype=torch.int64,
        device=device,
    )  # (ceil(n / 4),) uniform 64-bit words
    halves = words.view(torch.int16)[:n].view(shape)  # uniform over [-32768, 32767]
    return torch.ge(
        halves,
        dropped + torch.iinfo(torch.int16).min,
        out=torch.empty(shape, dtype=torch.uint8, device=device),
    )


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Zero each element with probability p and scale the rest by 1 / (1 - p), in training only.
    On the CPU p is first rounded to a multiple of 1/65536, and the scale follows the rounded p."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, training=True)
    dropped = round(p * HALF_WORDS)  # of every 65536 elements, on average
    if dropped == 0:
        return x
    if dropped == HALF_WORDS:
        return x * 0.0
    keep = keep_mask(x.shape, dropped, x.device)
    return MaskAndScale.apply(x, keep, HALF_WORDS / (HALF_WORDS - dropped))


def relu_dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """dropout(relu(x)). On the CPU in training, ReLU's mask joins dropout's in one multiply: no
    ReLU pass forward or backward, and only the one-byte mask kept, where a feed-forward block
    (T5's) would otherwise keep the (B, T, d_ff) ReLU output too."""
    dropped = round(p * HALF_WORDS)
    if not training or x.device.type != "cpu" or dropped in (0, HALF_WORDS):
        return dropout(F.relu(x), p, training)
    keep = keep_mask(x.shape, dropped, x.device)
    keep.mul_(torch.gt(x, 0).view(torch.uint8))
    return MaskAndScale.apply(x, keep, HALF_WORDS / (HALF_WORDS - dropped))


def scaled_by_mask(x: Tensor, keep: Tensor, scale: float) -> Tensor:
    """x * keep * scale in one multiply. The byte mask is first widened to x's dtype (a temporary
    of x's size): the CPU multiply of floats by bytes converts them anyway, element by element, and
    a second pass for the scale made the pair twice as slow."""
    return torch.addcmul(x.new_zeros(()), x, keep.to(x.dtype), value=scale)


class MaskAndScale(torch.autograd.Function):
    """x * keep * scale, keeping only the one-byte mask for backward."""

    @staticmethod
    def forward(ctx, x: Tensor, keep: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return scaled_by_mask(x, keep, scale)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        (keep,) = ctx.saved_tensors
        return scaled_by_mask(grad, keep, ctx.scale), None, None


class Dropout(nn.Module):
    """`nn.Dropout` with the cheap CPU mask above."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
