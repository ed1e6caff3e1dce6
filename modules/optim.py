"""AdamW with decoupled weight decay on matrices only, and a warmup-then-decay learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from modules.errors import UserError


@dataclass
class OptimizerConfig:
    lr: float = 5e-4
    """Peak learning rate, reached at the end of warmup."""
    weight_decay: float = 0.01
    """AdamW decay on weight matrices and embeddings; never on biases or norm scales."""
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup: float = 0.1
    """Warmup length: a fraction of all training steps if < 1, else a number of steps."""
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    """Decay after warmup, down to min_lr_ratio * lr at the last step."""
    min_lr_ratio: float = 0.0
    layer_decay: float = 1.0
    """Layer-wise learning-rate decay: a parameter at depth d (modules/freezing.py: embeddings 0, the
    task heads at the top) learns at lr * layer_decay ** (top - d), so fine-tuning moves the layers
    nearest the input least. 1 gives every layer the same rate."""


class WarmupDecay:
    """Multiplier of the peak learning rate at a step. A plain object (not a lambda) so LambdaLR
    saves its settings in checkpoints."""

    def __init__(self, total_steps: int, warmup_steps: int, schedule: str, min_ratio: float) -> None:
        self.total_steps, self.warmup_steps = max(1, total_steps), warmup_steps
        self.schedule, self.min_ratio = schedule, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        decay = 1.0 - progress if self.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_ratio + (1.0 - self.min_ratio) * decay


def build_optimizer(
    model: nn.Module, config: OptimizerConfig, total_steps: int, depth: Callable[[str], int]
) -> dict:
    """-> Lightning's optimizer dict: AdamW + per-step LambdaLR. depth: parameter name -> its depth
    in the network (only read when layer_decay != 1)."""
    if config.lr <= 0 or config.weight_decay < 0:
        raise UserError(
            f"model.optimizer: need lr > 0 and weight_decay >= 0, got lr={config.lr}, weight_decay={config.weight_decay}"
        )
    if not 0 < config.layer_decay <= 1:
        raise UserError(f"model.optimizer.layer_decay must be in (0, 1], got {config.layer_decay}")
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    depths = {name: depth(name) for name, _ in named} if config.layer_decay != 1 else {}
    top = max(depths.values(), default=0)
    grouped: dict[tuple[bool, int], list[nn.Parameter]] = {}
    for name, p in named:  # biases and norm scales never decay
        grouped.setdefault((p.ndim >= 2, depths.get(name, top)), []).append(p)
    groups = [
        {
            "params": params,
            "weight_decay": config.weight_decay if decays else 0.0,
            "lr": config.lr * config.layer_decay ** (top - level),
        }
        for (decays, level), params in sorted(grouped.items())
    ]
    # on a GPU the fused kernel updates every tensor in one launch instead of several per tensor
    # (Lightning builds the optimizer after moving the model, so the parameters are already there)
    fused = all(p.is_cuda for _, p in named)
    optimizer = torch.optim.AdamW(
        groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps, fused=fused
    )
    warmup = int(config.warmup * total_steps) if config.warmup < 1 else int(config.warmup)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupDecay(total_steps, warmup, config.schedule, config.min_lr_ratio)
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
