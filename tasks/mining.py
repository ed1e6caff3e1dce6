"""Offline hard-negative mining for `SentenceEmbedding`: between epochs, the training pool is embedded
with the current weights and every grouped text gets its nearest texts of other groups as negatives.

Apart from the task because it runs outside the training step, over the whole pool at once: each
process embeds a share and every process ends with the same negatives, written into the pool's
shared-memory table so that dataloader workers see them. (The miners that pick triplets inside a
batch are part of the loss: modules/losses.py.)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from datamodules.tokenizer import Tokenizer
from modules.distributed import gather_rows, world_size
from tasks.groups import GroupChunks, TextTable

EMBED_BATCH = 256  # texts per forward pass when embedding a whole pool

Pad = Callable[[list[np.ndarray], Tokenizer], tuple[Tensor, Tensor]]
"""The task's texts -> (input_ids, attention_mask), so mining reads texts exactly as training does."""


def mine_negatives(model, name: str, pool: GroupChunks, pad: Pad, count: int, skip: int) -> None:
    """Embed the training pool with the current weights and attach to every grouped text its
    nearest texts of other groups, ranks skip + 1 ... skip + count."""
    embeddings = embed_texts(model, name, pool.texts, pad)  # (n_texts, E), the same on every process
    queries = np.flatnonzero(pool.group >= 0)
    group = torch.as_tensor(pool.group, device=embeddings.device)
    wanted = skip + count
    for start in range(0, len(queries), EMBED_BATCH):
        rows = torch.as_tensor(queries[start : start + EMBED_BATCH], device=embeddings.device)
        scores = embeddings[rows] @ embeddings.T  # (q, n_texts)
        same_group = group[rows, None] == group[None, :]  # includes the text itself
        scores = scores.masked_fill(same_group, float("-inf"))
        top = scores.topk(min(wanted, scores.shape[1]), dim=1)
        nearest = torch.where(torch.isfinite(top.values), top.indices, -1)[:, skip:]
        pool.mined[rows.cpu()] = -1
        pool.mined[rows.cpu(), : nearest.shape[1]] = nearest.cpu()


@torch.no_grad()
def embed_texts(model, name: str, texts: TextTable, pad: Pad) -> Tensor:
    """Embed every text with the current weights, each process a share, gathered in order."""
    was_training = model.training
    model.eval()
    ranks, rank = world_size(), model.global_rank
    mine = list(range(rank, len(texts), ranks))
    parts = []
    for start in range(0, len(mine), EMBED_BATCH):
        input_ids, attention_mask = pad(
            [texts[i] for i in mine[start : start + EMBED_BATCH]], model.tokenizer
        )
        hidden = model.backbone.encode(input_ids.to(model.device), attention_mask.to(model.device))
        parts.append(model.heads[name](hidden, attention_mask.to(model.device)))
    local = torch.cat(parts) if parts else torch.zeros(0, model.heads[name].dim, device=model.device)
    gathered, _ = gather_rows(local)
    index, _ = gather_rows(torch.as_tensor(mine, dtype=torch.long, device=model.device))
    embeddings = torch.empty_like(gathered)
    embeddings[index] = gathered
    model.train(was_training)
    return embeddings
