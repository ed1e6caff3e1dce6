"""Switches that change how fast the backbone trains and how much memory it takes, never what it
computes: `model.speed` in a config.

Both act per transformer block, on every stack:
- compile: each block is compiled by `torch.compile` (regional compilation). Blocks of one stack
  share their code, so the compiler works on one small graph instead of the whole model, compiles
  in seconds rather than minutes, and the task code around the backbone (masking, mining, data-
  dependent gathers) stays eager, where it would break a whole-model graph. Decoding with a
  KV cache stays eager too: its growing cache would recompile every step.
- activation_checkpointing: a block keeps only its input for the backward pass and recomputes the
  rest there (`torch.utils.checkpoint`, non-reentrant; dropout masks are replayed exactly), trading
  one more forward pass for the activation memory of all but one block at a time.

`peak_tflops` changes nothing about training: it is what MFU is measured against.
Mixed precision is the trainer's (`trainer.precision: bf16-mixed`), not a switch here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from modules.errors import UserError


@dataclass
class SpeedConfig:
    compile: bool = False
    """Compile each transformer block with torch.compile (needs a C++ compiler on CPU, Triton on GPU)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass instead of keeping them."""
    peak_tflops: float | None = None
    """One device's peak TFLOP/s at the run's precision, the denominator of the MFU logged while
    training (device/mfu). None: the datasheet figure of a known GPU; on a CPU, no MFU."""


def apply_speed(backbone: nn.Module, config: SpeedConfig) -> None:
    """Turn on `config`'s switches in every stack of `backbone` (a modules.backbone.Backbone)."""
    if backbone.config.reversible and (config.compile or config.activation_checkpointing):
        raise UserError(
            "model.speed.compile and model.speed.activation_checkpointing do not apply to reversible layers "
            "(model.backbone.reversible: true), which already recompute activations in their backward pass; "
            "turn them off"
        )
    for stack in (backbone.encoder, backbone.decoder):
        if stack is None:
            continue
        stack.checkpoint_activations = config.activation_checkpointing
        if config.compile:
            stack.compiled_layers = [torch.compile(layer) for layer in stack.layers]
