"""Task heads that sit on the backbone's hidden states. Tied heads project onto the token embeddings."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modules.config import BackboneConfig
from modules.dropout import Dropout
from modules.layers import ACTIVATIONS, make_norm


def tied_output_scale(config: BackboneConfig) -> float:
    """What hidden states are multiplied by before a projection onto the tied token embeddings:
    d_model ** -0.5 when `scale_tied_output` is set (T5), else 1."""
    return config.d_model**-0.5 if config.tie_embeddings and config.scale_tied_output else 1.0


class MaskedLMHead(nn.Module):
    """BERT's MLM head: dense + activation + norm, then a projection onto the vocabulary.

    The projection reuses the backbone's token embedding matrix when tied (only a bias is owned
    here), scaled by d_model ** -0.5 first when `scale_tied_output` is set, as T5's tied output is.
    Callers pass only the masked positions, so the (N, V) logits cost N, not B * T, rows.
    """

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        self.scale = tied_output_scale(config)
        self.transform = nn.Linear(config.d_model, config.d_model)
        self.act = ACTIVATIONS[config.activation]
        self.norm = make_norm(config)
        self.decoder = (
            None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        )
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden: Tensor, token_embedding: Tensor) -> Tensor:
        """hidden: (N, D) states at masked positions; token_embedding: (V, D) -> logits (N, V)"""
        h = self.norm(self.act(self.transform(hidden))) * self.scale
        weight = token_embedding if self.decoder is None else self.decoder.weight
        return F.linear(h, weight, self.bias)


class LanguageModelHead(nn.Module):
    """Next-token logits for generation: hidden states projected onto the vocabulary.

    Tied (the default), the projection is the token embedding matrix, scaled by d_model ** -0.5
    when `scale_tied_output` is set (T5 ties this way); untied, the head owns its (V, D) matrix
    (where an imported untied T5 `lm_head` lands). No bias, as in T5 and GPT-2.
    """

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        self.scale = tied_output_scale(config)
        self.decoder = (
            None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        )

    def forward(self, hidden: Tensor, token_embedding: Tensor) -> Tensor:
        """hidden: (N, D); token_embedding: (V, D) -> logits (N, V)"""
        weight = token_embedding if self.decoder is None else self.decoder.weight
        return F.linear(hidden * self.scale, weight)


class PooledClassifierHead(nn.Module):
    """A linear classifier on the pooled sentence vector (BERT's NSP head is this with 2 classes)."""

    def __init__(self, config: BackboneConfig, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = Dropout(dropout)
        self.classifier = nn.Linear(config.d_model, num_classes)

    def forward(self, pooled: Tensor) -> Tensor:
        """pooled: (B, D) -> logits (B, num_classes)"""
        return self.classifier(self.dropout(pooled))


class EmbeddingHead(nn.Module):
    """Sentence embedding: pool the token states, optionally project, then L2-normalise.

    Pooling "mean" averages the real (non-padding) tokens, "cls" takes the first position, "max"
    takes each feature's maximum over real tokens. Unit-length outputs make cosine similarity a dot
    product and bound Euclidean distances to [0, 2], so one margin works across models.
    """

    def __init__(self, config: BackboneConfig, pooling: str = "mean", projection: int | None = None) -> None:
        super().__init__()
        self.pooling = pooling
        self.dim = projection or config.d_model
        self.projection = nn.Linear(config.d_model, projection) if projection else None

    def forward(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        """hidden: (B, T, D), attention_mask: (B, T) -> unit embeddings (B, projection or D)"""
        real = attention_mask.bool()[..., None]  # (B, T, 1)
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        elif self.pooling == "max":
            pooled = hidden.masked_fill(~real, float("-inf")).amax(dim=1)
        else:
            pooled = (hidden * real).sum(dim=1) / real.sum(dim=1).clamp_min(1)
        if self.projection is not None:
            pooled = self.projection(pooled)
        return F.normalize(pooled, dim=-1)


class PointerGeneratorHead(nn.Module):
    """Next-token log-probabilities that mix generating from the vocabulary with copying a source token.

    See et al. (2017): an attention over the encoder states gives a copy distribution (each source
    position's weight lands on its token id), a switch p_gen = sigmoid(w [h; context] + b) weighs it
    against the LM head's softmax: p(w) = p_gen p_vocab(w) + (1 - p_gen) sum_{i: x_i = w} a_i. A
    summarizer then needs no training to reproduce a source word, only to learn where to look, which
    is most of what it must learn at small budgets. The output is normalised log-probabilities, so
    cross-entropy, argmax and sampling take it as they take logits.
    """

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        self.vocabulary = LanguageModelHead(config)
        self.query = nn.Linear(config.d_model, config.d_model, bias=False)
        self.key = nn.Linear(config.d_model, config.d_model, bias=False)
        self.switch = nn.Linear(2 * config.d_model, 1)

    def forward(
        self,
        hidden: Tensor,
        token_embedding: Tensor,
        memory: Tensor,
        memory_mask: Tensor,
        source_ids: Tensor,
    ) -> Tensor:
        """hidden: (B, T, D) decoder states; token_embedding: (V, D); memory: (B, S, D) encoder states;
        memory_mask: (B, S) 1 at real source tokens; source_ids: (B, S) -> log-probs (B, T, V)"""
        scores = self.query(hidden) @ self.key(memory).transpose(1, 2) * hidden.size(-1) ** -0.5  # (B, T, S)
        scores = scores.float().masked_fill(~memory_mask.bool()[:, None, :], -math.inf)
        attention = scores.softmax(dim=-1)  # (B, T, S)
        context = attention.to(memory.dtype) @ memory  # (B, T, D)
        generate = self.switch(torch.cat([hidden, context], dim=-1)).float()  # (B, T, 1) logit of p_gen
        vocab = self.vocabulary(hidden, token_embedding).float().log_softmax(dim=-1)  # (B, T, V)
        index = source_ids[:, None, :].expand_as(attention)  # (B, T, S)
        copy = torch.zeros_like(vocab).scatter_add_(-1, index, attention)  # (B, T, V) copy distribution
        # log(p_gen p_vocab + (1 - p_gen) p_copy); the clamp keeps log(0) (words absent from the source)
        # finite with a zero gradient, where log would give inf * 0 = nan
        return torch.logaddexp(
            F.logsigmoid(generate) + vocab, F.logsigmoid(-generate) + copy.clamp_min(1e-30).log()
        )


class SpanHead(nn.Module):
    """Extractive QA (BERT on SQuAD): one linear layer scores every token as the answer's start
    and as its end; the answer is the best-scoring span (the task searches it)."""

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        self.scorer = nn.Linear(config.d_model, 2)

    def forward(self, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """hidden: (B, T, D) -> start logits (B, T), end logits (B, T)"""
        start, end = self.scorer(hidden).unbind(dim=-1)
        return start, end
