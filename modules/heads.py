"""Task heads that sit on the backbone's hidden states. Tied heads project onto the token embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modules.config import BackboneConfig
from modules.layers import ACTIVATIONS, make_norm


class MaskedLMHead(nn.Module):
    """BERT's MLM head: dense + activation + norm, then a projection onto the vocabulary.

    The projection reuses the backbone's token embedding matrix when tied (only a bias is owned
    here). Callers pass only the masked positions, so the (N, V) logits cost N, not B * T, rows.
    """

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        self.transform = nn.Linear(config.d_model, config.d_model)
        self.act = ACTIVATIONS[config.activation]
        self.norm = make_norm(config)
        self.decoder = (
            None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        )
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden: Tensor, token_embedding: Tensor) -> Tensor:
        """hidden: (N, D) states at masked positions; token_embedding: (V, D) -> logits (N, V)"""
        h = self.norm(self.act(self.transform(hidden)))
        weight = token_embedding if self.decoder is None else self.decoder.weight
        return F.linear(h, weight, self.bias)


class PooledClassifierHead(nn.Module):
    """A linear classifier on the pooled sentence vector (BERT's NSP head is this with 2 classes)."""

    def __init__(self, config: BackboneConfig, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.d_model, num_classes)

    def forward(self, pooled: Tensor) -> Tensor:
        """pooled: (B, D) -> logits (B, num_classes)"""
        return self.classifier(self.dropout(pooled))
