"""What a batch's attention masks say, read on the host when the batch is collated.

Attention without a mask takes the fastest kernel (flash attention on a GPU), so a mask that hides
no token should not be passed; and throughput and MFU count a step's real tokens. Reading either
off a GPU tensor would stop the step until the GPU caught up, so collate reads the masks while
they are still on the host and the batch carries the answers.
"""

from __future__ import annotations

from torch import Tensor


def mark_masks(batch: dict) -> dict:
    """The batch with "unpadded", the names of its attention masks that hide nothing (every row
    full), and "real_tokens", each mask's count of real tokens. `padding_mask` then hands the
    backbone no mask for the first, and `real_tokens` reads the second."""
    masks = {k: v for k, v in batch.items() if k.endswith("attention_mask") and isinstance(v, Tensor)}
    batch["unpadded"] = tuple(k for k, v in masks.items() if bool(v.all()))
    batch["real_tokens"] = {k: int(v.sum()) for k, v in masks.items()}
    return batch


def padding_mask(batch: dict, key: str = "attention_mask") -> Tensor | None:
    """batch[key] (R, T) for the backbone, or None where collate found it hides nothing
    (`mark_masks`)."""
    return None if key in batch.get("unpadded", ()) else batch[key]


def real_tokens(batch: dict, key: str) -> int:
    """How many real tokens batch[key] marks: as collate counted them (`mark_masks`), or counted
    now for a batch built otherwise."""
    counted = batch.get("real_tokens", {})
    return counted[key] if key in counted else int(batch[key].sum())
