"""Attention weights of one input, recorded from a backbone and drawn as a grid of heatmaps.

Shared by `polyhead inspect attention` and the validation pictures: `AttentionRecorder` asks every
`MultiHeadAttention` of the backbone for the softmax weights it uses (see `on_weights`), keeping
the first call of each; `label_maps` crops them to the real tokens and names their rows and
columns; `draw_maps` lays them out as layers x heads.

Three kinds of map: "encoder" and "decoder" self-attention (queries and keys from the same tokens)
and "cross" attention (decoder queries over encoder keys).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import Tensor

from experiments.plots import Heatmap, heatmap_grid
from modules.attention import MultiHeadAttention
from modules.backbone import Backbone
from modules.errors import UserError

KINDS = ("encoder", "decoder", "cross")
LAYER_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass
class AttentionMap:
    """The weights of one layer's attention for one input: row i is where query token i looked."""

    kind: str  # "encoder", "decoder" or "cross"
    layer: int
    weights: np.ndarray  # (H, T, S): heads x queries x keys, each row summing to 1
    queries: list[str]  # T token pieces
    keys: list[str]  # S token pieces
    heads: list[int]  # H: which head each of weights' rows is


class AttentionRecorder:
    """`with AttentionRecorder(backbone) as recorder:` everything run inside records its attention.

    Only the first call of each attention module is kept, for row `row` of its batch: a task's
    forward may run the decoder again afterwards (generation, one token at a time), and those
    steps are not the pass to draw. Compiled blocks (model.speed.compile) are set aside while
    recording, as recording takes the eager path.
    -> recorder.weights: (kind, layer) -> (H, T, S) float tensor on the CPU.
    """

    def __init__(self, backbone: Backbone, row: int = 0) -> None:
        self.row = row
        self.weights: dict[tuple[str, int], Tensor] = {}
        self.stacks = {name: getattr(backbone, name) for name in ("encoder", "decoder")}
        self.compiled: dict[str, list | None] = {}

    def __enter__(self) -> AttentionRecorder:
        for name, stack in self.stacks.items():
            if stack is None:
                continue
            self.compiled[name], stack.compiled_layers = stack.compiled_layers, None
            for module_name, module in stack.named_modules():
                if isinstance(module, MultiHeadAttention):
                    layer = int(LAYER_NAME.search(module_name).group(1))
                    module.on_weights = self._keeper(("cross" if module.cross else name, layer))
        return self

    def _keeper(self, key: tuple[str, int]):
        def keep(weights: Tensor) -> None:  # weights: (B, H, T, S)
            if key not in self.weights:
                self.weights[key] = weights[self.row].float().cpu()

        return keep

    def __exit__(self, *exc) -> None:
        for name, stack in self.stacks.items():
            if stack is None:
                continue
            stack.compiled_layers = self.compiled[name]
            for module in stack.modules():
                if isinstance(module, MultiHeadAttention):
                    module.on_weights = None


def label_maps(
    weights: dict[tuple[str, int], Tensor], encoder_tokens: list[str], decoder_tokens: list[str]
) -> list[AttentionMap]:
    """Recorded weights -> maps cropped to the given tokens (the real ones; padding falls away),
    in the order encoder, decoder, cross and by layer."""
    maps = []
    for (kind, layer), values in sorted(
        weights.items(), key=lambda item: (KINDS.index(item[0][0]), item[0][1])
    ):
        queries = encoder_tokens if kind == "encoder" else decoder_tokens
        keys = decoder_tokens if kind == "decoder" else encoder_tokens
        cropped = values[:, : len(queries), : len(keys)].numpy()  # (H, T, S)
        maps.append(AttentionMap(kind, layer, cropped, list(queries), list(keys), list(range(len(values)))))
    return maps


def select_maps(maps: list[AttentionMap], layer: int | None, head: int | None) -> list[AttentionMap]:
    """The maps of one layer (negative: counted back from the last layer of each kind that recorded
    weights) and/or one head, checked against what was recorded."""
    if head is not None:
        heads = len(maps[0].heads)
        if not -heads <= head < heads:
            raise UserError(f"--head {head}: this model has heads 0..{heads - 1}")
        head %= heads
        maps = [AttentionMap(m.kind, m.layer, m.weights[[head]], m.queries, m.keys, [head]) for m in maps]
    if layer is None:
        return maps
    chosen = []
    for kind in dict.fromkeys(m.kind for m in maps):
        mine = [m for m in maps if m.kind == kind]
        wanted = mine[-1].layer + 1 + layer if layer < 0 else layer
        chosen.extend(m for m in mine if m.layer == wanted)
    if not chosen:
        kinds = dict.fromkeys(m.kind for m in maps)
        recorded = "; ".join(f"{kind} {[m.layer for m in maps if m.kind == kind]}" for kind in kinds)
        raise UserError(
            f"--layer {layer}: no attention weights recorded for that layer (recorded: {recorded}; "
            "layers without full attention, such as LSH layers, have no weights to draw)"
        )
    return chosen


def draw_maps(path: str | Path, maps: list[AttentionMap], title: str) -> Path:
    """One row of panels per (kind, layer), one column per head."""
    panels = [
        [Heatmap(f"{m.kind} L{m.layer} H{h}", m.weights[i], m.queries, m.keys) for i, h in enumerate(m.heads)]
        for m in maps
    ]
    return heatmap_grid(path, panels, title)
