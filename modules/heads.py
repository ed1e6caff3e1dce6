"""Task heads that sit on the backbone's hidden states. Tied heads project onto the token embeddings."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modules.config import BackboneConfig
from modules.dropout import Dropout
from modules.layers import ACTIVATIONS, make_norm
from modules.lm_loss import linear_cross_entropy


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
        return F.linear(hidden * self.scale, self._weight(token_embedding))

    def loss(
        self, hidden: Tensor, token_embedding: Tensor, targets: Tensor, label_smoothing: float
    ) -> Tensor:
        """hidden: (N, D) at the target positions; targets: (N,) -> the mean cross-entropy of the
        logits `forward` would give, computed without holding them (modules/lm_loss.py)."""
        return linear_cross_entropy(
            hidden, self._weight(token_embedding), targets, self.scale, label_smoothing
        )

    def _weight(self, token_embedding: Tensor) -> Tensor:
        """The (V, D) projection: the token embedding when tied, the head's own matrix otherwise."""
        return token_embedding if self.decoder is None else self.decoder.weight


class PooledClassifierHead(nn.Module):
    """A linear classifier on the pooled sentence vector (BERT's NSP head is this with 2 classes)."""

    def __init__(self, config: BackboneConfig, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = Dropout(dropout)
        self.classifier = nn.Linear(config.d_model, num_classes)

    def forward(self, pooled: Tensor) -> Tensor:
        """pooled: (B, D) -> logits (B, num_classes)"""
        return self.classifier(self.dropout(pooled))


class SegmentMatchHead(nn.Module):
    """Next-sentence logits from how well each segment's tokens find a match in the other segment.

    Why: a true continuation shares words (names, terms) with A that a span of another document
    does not; word overlap alone separates WikiText-2's NSP pairs far above chance. BERT's pooled
    [CLS] must first learn, through attention, to compare A with B, which takes far longer than a
    small budget (polyhead and HF BERT both stay at chance after 600 steps of 32 pairs, where this
    head reaches 80%; README, "Compared with HuggingFace BERT"). This head
    compares them directly, as late-interaction retrievers (ColBERT) do: every token of B takes its
    best cosine similarity to a token of A (after a learned projection) and vice versa; a learned
    per-token weight (zero at the start, so first a plain mean) decides how much a token's match
    counts, so frequent words can learn to count less than rare ones. The two pooled scores are
    standardised over the batch (BatchNorm, running statistics at evaluation) and a linear layer,
    zero at the start, turns them into the two NSP logits.
    """

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        self.project = nn.Linear(config.d_model, config.d_model)
        self.token_weight = nn.Linear(config.d_model, 1)
        self.norm = nn.BatchNorm1d(2, affine=False)
        self.classifier = nn.Linear(2, 2)
        for layer in (self.token_weight, self.classifier):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(
        self, hidden: Tensor, attention_mask: Tensor, segment_ids: Tensor, pair_ids: Tensor, n_pairs: int
    ) -> Tensor:
        """hidden: (R, T, D); attention_mask, segment_ids (0 for A, 1 for B): (R, T); pair_ids: (R, T)
        the index in [0, n_pairs) of the pair each token belongs to -> logits (n_pairs, 2) in pair order."""
        states = F.normalize(self.project(hidden).float(), dim=-1)  # (R, T, D)
        similarity = states @ states.transpose(1, 2)  # (R, T, T) cosines, in [-1, 1]
        same_pair = pair_ids[:, :, None] == pair_ids[:, None, :]  # (R, T, T)
        real, in_b = attention_mask.bool(), segment_ids.bool()
        weight_logits = self.token_weight(hidden).float().squeeze(-1)  # (R, T)
        scores = []
        for query, key in ((real & in_b, real & ~in_b), (real & ~in_b, real & in_b)):
            allowed = same_pair & key[:, None, :]  # (R, T, T) keys of the other segment of the same pair
            # (R, T) each token's best match; -2, below any cosine, where it has no key at all
            best = similarity.masked_fill(~allowed, -2.0).amax(dim=-1)
            scores.append(self.pool_by_pair(best, weight_logits, query & (best > -1.5), pair_ids, n_pairs))
        features = torch.stack(scores, dim=-1)  # (P, 2) B's match in A, A's match in B
        if self.training and n_pairs < 2:  # batch statistics need two pairs: use the running ones
            features = F.batch_norm(features, self.norm.running_mean, self.norm.running_var)
        else:
            features = self.norm(features)
        return self.classifier(features)

    @staticmethod
    def pool_by_pair(
        values: Tensor, weight_logits: Tensor, valid: Tensor, pair_ids: Tensor, n_pairs: int
    ) -> Tensor:
        """values, weight_logits, valid, pair_ids: (R, T) -> per pair, the softmax(weight_logits)-
        weighted mean of the valid tokens' values (P,); 0 for a pair without valid tokens."""
        pairs, valid = pair_ids.flatten().clamp_min(0), valid.flatten()
        logits = torch.where(valid, weight_logits.flatten(), -1e4)  # (R*T,) finite, so no nan gradients
        peak = logits.new_full((n_pairs,), -1e4).scatter_reduce(0, pairs, logits, "amax")  # (P,)
        weights = (logits - peak[pairs]).exp() * valid  # (R*T,)
        total = logits.new_zeros(n_pairs).index_add(0, pairs, weights)  # (P,)
        weighted = logits.new_zeros(n_pairs).index_add(
            0, pairs, weights * torch.where(valid, values.flatten(), 0)
        )
        return weighted / total.clamp_min(1e-9)


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
