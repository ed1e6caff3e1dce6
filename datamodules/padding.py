"""Which attention masks of a batch hide nothing, decided on the host.

Attention without a mask takes the fastest kernel (flash attention on a GPU); a mask that hides no
token should not cost that. Testing a GPU tensor for it would stop the step until the GPU caught
up, so collate tests the masks while they are still on the host and the batch carries the answer.
"""

from __future__ import annotations

from torch import Tensor


def mark_unpadded(batch: dict) -> dict:
    """The batch with "unpadded": the names of its attention masks that hide nothing (every row
    full). Collate decides it on the host, where the test is free; `padding_mask` then hands the
    backbone no mask for them, so attention takes its unmasked kernel without the GPU stopping the
    step to find out."""
    batch["unpadded"] = tuple(
        k
        for k, v in batch.items()
        if k.endswith("attention_mask") and isinstance(v, Tensor) and bool(v.all())
    )
    return batch


def padding_mask(batch: dict, key: str = "attention_mask") -> Tensor | None:
    """batch[key] (R, T) for the backbone, or None where collate found it hides nothing
    (`mark_unpadded`)."""
    return None if key in batch.get("unpadded", ()) else batch[key]
