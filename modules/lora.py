"""Low-rank adaptation (LoRA; Hu et al., 2021): fine-tune a large backbone by training small updates.

Every chosen projection W (d_out x d_in) stays frozen and gains a trainable update of rank r,
W + (alpha / r) * B A with A (r x d_in) and B (d_out x r). B starts at zero, so the adapted model
starts as exactly the loaded one. Only A and B train in the backbone (MultiTaskModel adds the
pooler and the heads' new weights): the optimizer keeps state for a few percent of the weights or
less, the backward pass computes no gradient for any frozen weight, and a fine-tuned task costs
r * (d_in + d_out) numbers per adapted projection.

polyhead fuses projections (q | k | v in one matrix, k | v for cross-attention, gate | up in a gated
feed-forward), so an update covers slices of a fused output: one (A_i, B_i) pair per target slice,
as separate q, k and v projections would each have their own. The targets:

    query, key, value   attention's input projections (LSH's shared query-key counts as query and key)
    output              attention's output projection
    feed_forward        the feed-forward projections (a gated one's gate and up as two)

The default, query and value, is the LoRA paper's. `merge_lora` folds the updates into the weights,
which is what an exported model and a checkpoint loaded without adapters (`init_from`) contain.
A run's checkpoints leave out the frozen weights it took from its base checkpoint and name that
file instead (MultiTaskModel, modules/checkpoint.py `restore_frozen_weights`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modules.attention import MultiHeadAttention
from modules.backbone import Backbone
from modules.config import BackboneConfig
from modules.dropout import Dropout
from modules.errors import UserError
from modules.layers import FeedForward
from modules.lsh_attention import LSHSelfAttention

TARGETS = ("query", "key", "value", "output", "feed_forward")


@dataclass
class LoraConfig:
    rank: int = 0
    """r, the rank of each update; 0 trains the whole backbone (no LoRA)."""
    alpha: float = 16.0
    """Updates are scaled by alpha / rank, so changing the rank needs no new learning rate."""
    dropout: float = 0.0
    """Dropout on the input of each update (the frozen path sees the input unchanged)."""
    targets: list[str] = field(default_factory=lambda: ["query", "value"])
    """Which projections get updates, of: query, key, value, output, feed_forward."""

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise UserError(f"model.lora.rank must be >= 0 (0: no LoRA), got {self.rank}")
        if self.alpha <= 0:
            raise UserError(f"model.lora.alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model.lora.dropout must be in [0, 1), got {self.dropout}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise UserError(
                f"model.lora.targets {list(self.targets)!r}: name one or more of {', '.join(TARGETS)}"
            )

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    def to_dict(self) -> dict:
        return {
            "rank": self.rank,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "targets": list(self.targets),
        }


class LoRALinear(nn.Linear):
    """An nn.Linear whose output slices [start, start + width) each add (alpha / r) * B_i A_i x.

    It keeps the frozen layer's own `weight` and `bias` under their names, so a state dict without
    adapters loads into it and one with them differs only by `lora_A` and `lora_B`:
    lora_A (P * r, d_in) stacks the P slices' A_i, lora_B (sum of widths, r) their B_i.
    """

    def __init__(
        self, base: nn.Linear, slices: list[tuple[int, int]], rank: int, alpha: float, dropout: float
    ) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.slices, self.rank, self.scale = slices, rank, alpha / rank
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(len(slices) * rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(sum(w for _, w in slices), rank, **factory))
        for a in self.lora_A.view(len(slices), rank, self.in_features):  # as nn.Linear's own init
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_dropout = Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """(..., d_in) -> (..., d_out)"""
        y = F.linear(x, self.weight, self.bias)  # (..., d_out)
        z = F.linear(self.lora_dropout(x), self.lora_A)  # (..., P * r)
        widths = [w for _, w in self.slices]
        for (start, width), z_i, b_i in zip(
            self.slices, z.split(self.rank, dim=-1), self.lora_B.split(widths), strict=True
        ):
            y.narrow(-1, start, width).add_(F.linear(z_i, b_i), alpha=self.scale)  # (..., width)
        return y

    def delta(self) -> Tensor:
        """(d_out, d_in) the update the adapters add to the weight."""
        update = torch.zeros_like(self.weight)
        a = self.lora_A.view(len(self.slices), self.rank, self.in_features)
        widths = [w for _, w in self.slices]
        for (start, width), a_i, b_i in zip(self.slices, a, self.lora_B.split(widths), strict=True):
            update[start : start + width] = self.scale * (b_i @ a_i)
        return update


def _targeted_slices(module: nn.Module, targets: list[str]) -> dict[str, list[tuple[int, int]]]:
    """attribute name of an nn.Linear in `module` -> the output slices (start, width) to adapt."""

    def pick(parts: list[tuple[tuple[str, ...], int]]) -> list[tuple[int, int]]:
        chosen, start = [], 0
        for names, width in parts:
            if any(name in targets for name in names):
                chosen.append((start, width))
            start += width
        return chosen

    if isinstance(module, MultiHeadAttention):
        q_width, kv_width, _ = module.split
        if module.cross:
            found = {
                "q": pick([(("query",), q_width)]),
                "kv": pick([(("key",), kv_width), (("value",), kv_width)]),
            }
        else:
            found = {"qkv": pick([(("query",), q_width), (("key",), kv_width), (("value",), kv_width)])}
        found["out"] = pick([(("output",), module.out.out_features)])
    elif isinstance(module, LSHSelfAttention):
        inner = module.n_heads * module.head_dim
        found = {
            "qkv": pick([(("query", "key"), inner), (("value",), inner)]),
            "out": pick([(("output",), module.out.out_features)]),
        }
    elif isinstance(module, FeedForward):
        d_ff = module.down.in_features
        found = {  # a gated layer's gate | up are two projections, as LLaMA's gate_proj and up_proj
            "up": pick([(("feed_forward",), d_ff)] * (2 if module.gated else 1)),
            "down": pick([(("feed_forward",), module.down.out_features)]),
        }
    else:
        return {}
    return {name: slices for name, slices in found.items() if slices}


def add_lora(backbone: nn.Module, config: LoraConfig) -> int:
    """Freeze every parameter of `backbone` and put adapters on the targeted projections.
    -> the number of adapter parameters (the backbone's trainable ones from now on)."""
    backbone.requires_grad_(False)
    adapters = 0
    for module in list(backbone.modules()):
        for name, slices in _targeted_slices(module, config.targets).items():
            adapted = LoRALinear(getattr(module, name), slices, config.rank, config.alpha, config.dropout)
            setattr(module, name, adapted)
            adapters += adapted.lora_A.numel() + adapted.lora_B.numel()
    return adapters


@torch.no_grad()
def merge_lora(root: nn.Module) -> None:
    """Fold every adapter under `root` into its weight and put the plain nn.Linear back: the
    network computes the same function, now without adapters."""
    for module in list(root.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                child.weight.add_(child.delta())
                plain = nn.Linear(child.in_features, child.out_features, bias=False, device="meta")
                plain.weight, plain.bias = child.weight, child.bias
                setattr(module, name, plain)


def without_adapters(checkpoint: dict) -> dict[str, Tensor]:
    """The state dict of a polyhead checkpoint with any adapters folded into their weights: what a
    model without LoRA loads (`init_from`, export to HF) to compute what the adapted one did."""
    state, saved = checkpoint["state_dict"], checkpoint["polyhead"]
    lora = LoraConfig(**saved.get("lora", {}))
    if not lora.enabled:
        return state
    backbone = Backbone(BackboneConfig.from_dict(saved["backbone"]))
    add_lora(backbone, lora)
    prefix = "backbone."
    backbone.load_state_dict({k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)})
    merge_lora(backbone)
    merged = {prefix + k: v for k, v in backbone.state_dict().items()}
    return {k: v for k, v in state.items() if not k.startswith(prefix)} | merged
