"""Transfer learning from a trained backbone: which parameters train, and how fast each layer learns.

The user's notes name two methods: feature extraction (the pretrained model frozen, only new heads
train) and fine-tuning (all or part of it trains). Both, and the usual refinements, come down to
the depth of each parameter in the network:

    embeddings 0 | encoder layer i: 1 + i | decoder layer j: E + 1 + j | heads: E + D + 1 (the top)

(a stack's relative position bias sits with its first layer, its final norm and the pooler with its
last). `FreezeConfig` freezes everything at or below a depth and can lower that depth as epochs
pass (gradual unfreezing, ULMFiT); `OptimizerConfig.layer_decay` scales each depth's learning rate
by decay ** (top - depth) (layer-wise learning-rate decay, as in ELECTRA / BEiT fine-tuning).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from torch import nn

from modules.config import BackboneConfig
from modules.errors import UserError

LAYER = re.compile(r"^backbone\.(encoder|decoder)\.layers\.(\d+)\.")


def parameter_depth(name: str, config: BackboneConfig) -> int:
    """Depth of a MultiTaskModel parameter (see the module docstring); heads are the top."""
    encoder, decoder = config.encoder_layers, config.decoder_layers
    first = {"encoder": 1, "decoder": encoder + 1}  # depth of each stack's first layer
    last = {"encoder": encoder, "decoder": encoder + decoder}
    if name.startswith("backbone.embeddings."):
        return 0
    if match := LAYER.match(name):
        return first[match.group(1)] + int(match.group(2))
    for stack in ("encoder", "decoder"):
        if name.startswith(f"backbone.{stack}.relative_bias."):
            return first[stack]
        if name.startswith(f"backbone.{stack}."):  # final norm
            return last[stack]
    if name.startswith("backbone."):  # pooler: on top of the last stack
        return encoder + decoder
    return encoder + decoder + 1


@dataclass
class FreezeConfig:
    policy: Literal["none", "feature_extraction", "bottom"] = "none"
    """none: everything trains. feature_extraction: the whole backbone is frozen and only the task
    heads train. bottom: the embeddings and the lowest `layers` layers (encoder first) are frozen."""
    layers: int = 0
    """bottom: how many layers above the embeddings stay frozen."""
    unfreeze_every: int = 0
    """Gradual unfreezing: every this many epochs the highest frozen layer starts to train, until
    nothing is frozen; 0 keeps the frozen part frozen for the whole run."""

    def __post_init__(self) -> None:
        if self.policy not in ("none", "feature_extraction", "bottom"):
            raise UserError(
                f"model.freeze.policy must be 'none', 'feature_extraction' or 'bottom', got {self.policy!r}"
            )
        if self.layers < 0 or self.unfreeze_every < 0:
            raise UserError("model.freeze.layers and model.freeze.unfreeze_every must be >= 0")
        if self.policy == "bottom" and self.layers == 0:
            raise UserError("model.freeze.policy 'bottom' needs layers >= 1: how many layers to freeze")
        if self.policy != "bottom" and self.layers:
            raise UserError(f"model.freeze.layers applies to policy 'bottom', not {self.policy!r}")

    def highest_frozen(self, config: BackboneConfig, epoch: int) -> int:
        """The depth at and below which parameters are frozen in this epoch; -1 when none are."""
        if self.policy == "none":
            return -1
        top = config.encoder_layers + config.decoder_layers
        frozen = top if self.policy == "feature_extraction" else min(self.layers, top)
        if self.unfreeze_every:
            frozen -= epoch // self.unfreeze_every
        return max(frozen, -1)


def frozen_names(model: nn.Module, freeze: FreezeConfig, config: BackboneConfig, epoch: int) -> set[str]:
    """Names of the parameters that must not change in this epoch."""
    limit = freeze.highest_frozen(config, epoch)
    return {name for name, _ in model.named_parameters() if parameter_depth(name, config) <= limit}


def freeze_report(model: nn.Module, frozen: set[str]) -> str:
    """A short table of frozen and trainable parameter counts, per part of the model."""
    counts: dict[str, list[int]] = {}
    for name, param in model.named_parameters():
        part = ".".join(name.split(".")[:2])
        counts.setdefault(part, [0, 0])[name not in frozen] += param.numel()
    lines = [f"{'part':<24}{'frozen':>12}{'trainable':>12}"]
    lines += [f"{part:<24}{f:>12,}{t:>12,}" for part, (f, t) in counts.items()]
    total_frozen = sum(f for f, _ in counts.values())
    total_trainable = sum(t for _, t in counts.values())
    lines.append(f"{'total':<24}{total_frozen:>12,}{total_trainable:>12,}")
    return "\n".join(lines)
