"""Cross-process helpers for losses that compare examples across the whole global batch."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_rows(tensor: Tensor) -> tuple[Tensor, int]:
    """Concatenate every process's rows in rank order; the local rows keep their gradient.

    tensor: (N_r, ...) on process r, N_r may differ -> ((sum N_r, ...), offset of the local rows).
    Rows from other processes are constants here: each process back-propagates only into its own
    slice, so gradients are neither lost nor counted twice. Losses computed on the gathered batch
    are the same on every process; see `scale_gathered_loss` for the matching gradient scale.
    """
    if world_size() == 1:
        return tensor, 0
    sizes = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([len(tensor)], device=tensor.device))
    counts = [int(s) for s in sizes]
    padded = tensor.new_zeros((max(counts), *tensor.shape[1:]))
    padded[: len(tensor)] = tensor.detach()
    gathered = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(gathered, padded)
    rank = dist.get_rank()
    gathered[rank] = tensor  # the local slice, with its gradient
    return torch.cat([g[:n] for g, n in zip(gathered, counts, strict=True)]), sum(counts[:rank])


def scale_gathered_loss(loss: Tensor) -> Tensor:
    """A loss computed on gathered rows, with W times its gradient and the same value.

    DDP averages gradients over W processes, but each process's gradient here only covers its own
    slice of the global batch, so the average is 1/W of the single-process gradient of the same
    loss. Scaling the gradient by W restores it exactly; the logged value stays the loss itself.
    """
    w = world_size()
    return loss if w == 1 else loss * w - loss.detach() * (w - 1)
