"""The segment-match NSP head: its scores against a brute-force computation, packed rows, and that
it learns from word overlap."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from modules.config import BackboneConfig
from modules.errors import UserError
from modules.heads import SegmentMatchHead
from tasks.mlm_nsp import MaskedLMNextSentence

D = 32


def _head() -> SegmentMatchHead:
    return SegmentMatchHead(BackboneConfig(vocab_size=100, d_model=D, n_heads=4, d_ff=64, encoder_layers=1))


def _random_pairs(rows: int, length: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """-> attention_mask, segment_ids, pair_ids (rows, length): each row holds two pairs of random
    lengths followed by padding (pair ids -1 there), as packed MLM + NSP rows do."""
    attention_mask = torch.zeros(rows, length, dtype=torch.long)
    segment_ids = torch.zeros(rows, length, dtype=torch.long)
    pair_ids = torch.full((rows, length), -1, dtype=torch.long)
    for row in range(rows):
        start = 0
        for k in range(2):
            a, b = (int(n) for n in torch.randint(2, length // 5, (2,), generator=generator))
            attention_mask[row, start : start + a + b] = 1
            segment_ids[row, start + a : start + a + b] = 1
            pair_ids[row, start : start + a + b] = 2 * row + k
            start += a + b
    return attention_mask, segment_ids, pair_ids


def test_pool_by_pair_is_each_pairs_softmax_weighted_mean():
    generator = torch.Generator().manual_seed(0)
    attention_mask, _, pair_ids = _random_pairs(3, 40, generator)
    values, logits = torch.randn(3, 40, generator=generator), 3 * torch.randn(3, 40, generator=generator)
    valid = attention_mask.bool() & (torch.rand(3, 40, generator=generator) < 0.7)
    got = SegmentMatchHead.pool_by_pair(values, logits, valid, pair_ids, 6)
    for pair in range(6):
        chosen = valid & (pair_ids == pair)
        expected = (logits[chosen].softmax(0) * values[chosen]).sum()
        torch.testing.assert_close(got[pair], expected)


def test_scores_are_each_tokens_best_cosine_in_the_other_segment_averaged():
    """With the token weights at their start (zero: a plain mean) and the classifier set to the
    identity, the logits are the two scores: the mean over B's tokens of the best cosine to a token
    of A in the same pair (after the projection), and the same from A to B."""
    torch.manual_seed(0)
    head = _head().eval()
    with torch.no_grad():
        head.classifier.weight.copy_(torch.eye(2))
    attention_mask, segment_ids, pair_ids = _random_pairs(2, 50, torch.Generator().manual_seed(1))
    hidden = torch.randn(2, 50, D)
    with torch.no_grad():
        logits = head(hidden, attention_mask, segment_ids, pair_ids, 4) * (1 + head.norm.eps) ** 0.5
        states = F.normalize(head.project(hidden), dim=-1)
    for pair in range(4):
        row = pair // 2
        in_pair = (pair_ids[row] == pair) & attention_mask[row].bool()
        a = states[row][in_pair & (segment_ids[row] == 0)]
        b = states[row][in_pair & (segment_ids[row] == 1)]
        b_in_a = (b @ a.T).amax(dim=1).mean()
        a_in_b = (a @ b.T).amax(dim=1).mean()
        torch.testing.assert_close(logits[pair], torch.stack([b_in_a, a_in_b]), atol=1e-5, rtol=1e-5)


def test_a_training_batch_of_one_pair_uses_the_running_statistics():
    head = _head().train()
    attention_mask = torch.ones(1, 10, dtype=torch.long)
    segment_ids = torch.tensor([[0] * 5 + [1] * 5])
    logits = head(torch.randn(1, 10, D), attention_mask, segment_ids, torch.zeros(1, 10, dtype=torch.long), 1)
    assert logits.shape == (1, 2) and torch.isfinite(logits).all()


def test_learns_next_from_random_segments_by_their_shared_words():
    """Pairs from one of 40 'documents' (each ten words of its own, mixed with common words): a true
    next segment draws from A's document, a random one from another. Trained on the fixed token
    vectors alone, the head must separate held-out pairs of unseen documents."""
    generator = torch.Generator().manual_seed(0)
    embedding = torch.randn(450, D, generator=generator)
    common = torch.arange(50)  # words every document uses

    def pairs(n: int, documents: range) -> tuple[torch.Tensor, ...]:
        hidden, labels = [], []
        for _ in range(n):
            doc, other = (documents[int(i)] for i in torch.randperm(len(documents), generator=generator)[:2])
            is_next = bool(torch.rand(1, generator=generator) < 0.5)
            words = [torch.arange(50 + 10 * d, 60 + 10 * d) for d in (doc, doc if is_next else other)]
            segments = [
                torch.where(
                    torch.rand(15, generator=generator) < 0.5,
                    w[torch.randint(10, (15,), generator=generator)],
                    common[torch.randint(50, (15,), generator=generator)],
                )
                for w in words
            ]
            hidden.append(embedding[torch.cat(segments)])
            labels.append(0 if is_next else 1)
        segment_ids = torch.tensor([[0] * 15 + [1] * 15]).expand(n, 30)
        return torch.stack(hidden), segment_ids, torch.tensor(labels)

    head = _head()
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-2)
    train_hidden, segment_ids, train_labels = pairs(512, range(0, 30))
    mask, pair_ids = torch.ones(512, 30, dtype=torch.long), torch.arange(512)[:, None].expand(512, 30)
    for step in range(60):
        batch = slice(64 * (step % 8), 64 * (step % 8 + 1))
        logits = head(
            train_hidden[batch], mask[batch], segment_ids[batch], pair_ids[batch] - 64 * (step % 8), 64
        )
        loss = F.cross_entropy(logits, train_labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    head.eval()
    test_hidden, test_segments, test_labels = pairs(256, range(30, 40))
    with torch.no_grad():
        logits = head(test_hidden, mask[:256], test_segments, pair_ids[:256], 256)
    accuracy = (logits.argmax(-1) == test_labels).float().mean()
    assert accuracy > 0.75, f"held-out NSP accuracy {accuracy:.2f} from shared words"


def test_an_unknown_nsp_head_is_refused_with_the_choices():
    with pytest.raises(UserError, match="nsp_head must be one of pooled, match, got 'cls'"):
        MaskedLMNextSentence(nsp_head="cls")
