"""Rotary position embedding (RoPE, Su et al. 2021; LLaMA's positions).

Each head's query and key vectors are turned, pair of dimensions by pair, through an angle that grows
with the position: pair i at position p by p * base ** (-2i / Dh). A rotation keeps lengths and
composes by adding angles, so the dot product of a query at p with a key at p' depends on p - p'
alone: attention sees relative offsets with nothing added to the embeddings and no table of
positions, so no length limit. Pairs are (i, i + Dh/2), the "rotate half" layout HF's LLaMA
checkpoints are stored for.

Keys are rotated once, at their own position, before they enter a decoding cache, so a cached key
never needs turning again.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

Rotation = tuple[Tensor, Tensor]
"""(cos, ±sin), each (B or 1, 1, T, Dh): the angles of T positions, broadcast over heads; the sines
of the first half of the dimensions negated (see `rotate`)."""


class RotaryEmbedding(nn.Module):
    """Positions -> the rotation their queries and keys are turned by."""

    def __init__(self, head_dim: int, base: float) -> None:
        super().__init__()
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim  # (Dh/2,)
        self.register_buffer("inv_freq", 1.0 / base**exponents, persistent=False)  # radians per position

    def forward(self, positions: Tensor) -> Rotation:
        """positions: (T,) or (B, T) integer -> (cos, ±sin), each (1 or B, 1, T, Dh), float32."""
        angles = positions[..., None].float() * self.inv_freq  # (T, Dh/2) or (B, T, Dh/2)
        if angles.dim() == 2:
            angles = angles[None]
        cos, sin = angles.cos(), angles.sin()  # (1 or B, T, Dh/2)
        return torch.cat([cos, cos], dim=-1)[:, None], torch.cat([-sin, sin], dim=-1)[:, None]


def rotate(x: Tensor, rotation: Rotation) -> Tensor:
    """x: (B, H, T, Dh) queries or keys -> the same turned by `rotation` (see the module docstring).

    Pair (a, b) = (x_i, x_{i + Dh/2}) becomes (a cos - b sin, b cos + a sin): x times cos, plus x with
    its halves swapped (a roll by Dh/2) times the sines, negated on the first half."""
    cos, signed_sin = rotation
    return x * cos.to(x.dtype) + x.roll(x.size(-1) // 2, dims=-1) * signed_sin.to(x.dtype)
