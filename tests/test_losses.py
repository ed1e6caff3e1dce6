"""Triplet miners and losses agree with brute force over every triplet of small batches.

The references below are deliberately plain: Python loops over all (a, p, n) on B = 12, float64,
written from the papers' rules rather than from the vectorised code.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from modules.errors import UserError
from modules.losses import (
    MINERS,
    get_miner,
    in_batch_negatives_loss,
    pairwise_distances,
    random_negatives,
    triplet_margin_loss,
)

# label 4 is a singleton: that anchor has no positive and must never appear as an anchor
LABELS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 4])
MARGINS = {"euclidean": 0.5, "cosine": 0.1}  # wide enough that every semi-hard branch is hit
SEEDS = range(4)


def batch(seed: int, dim: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(LABELS), generator=generator)
    return torch.randn(len(LABELS), dim, generator=generator, dtype=torch.float64), LABELS[order]


def ref_distances(x: torch.Tensor, metric: str) -> list[list[float]]:
    rows = x.tolist()
    out = []
    for u in rows:
        row = []
        for v in rows:
            if metric == "euclidean":
                row.append(math.sqrt(sum((a - b) ** 2 for a, b in zip(u, v, strict=True))))
            else:
                dot = sum(a * b for a, b in zip(u, v, strict=True))
                row.append(1 - dot / (math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v))))
        out.append(row)
    return out


def ref_pairs(labels: list[int]) -> list[tuple[int, int]]:
    """(a, p) pairs whose anchor also has a negative: the only pairs that can form a triplet."""
    b = len(labels)
    has_negative = [any(labels[n] != labels[a] for n in range(b)) for a in range(b)]
    return [
        (a, p) for a in range(b) for p in range(b) if a != p and labels[a] == labels[p] and has_negative[a]
    ]


def ref_batch_hard(d, labels, margin) -> set[tuple[int, int, int]]:
    out = set()
    for a in range(len(labels)):
        positives = [p for p in range(len(labels)) if p != a and labels[p] == labels[a]]
        negatives = [n for n in range(len(labels)) if labels[n] != labels[a]]
        if positives and negatives:
            out.add((a, max(positives, key=lambda p: d[a][p]), min(negatives, key=lambda n: d[a][n])))
    return out


def ref_semi_hard(d, labels, margin, branches=None) -> set[tuple[int, int, int]]:
    """FaceNet's window, then the closest farther negative, then the farthest negative."""
    out = set()
    for a, p in ref_pairs(labels):
        negatives = [n for n in range(len(labels)) if labels[n] != labels[a]]
        window = [n for n in negatives if d[a][p] < d[a][n] < d[a][p] + margin]
        farther = [n for n in negatives if d[a][n] > d[a][p]]
        if window:
            branch, n = "semi-hard", min(window, key=lambda n: d[a][n])
        elif farther:
            branch, n = "easy", min(farther, key=lambda n: d[a][n])
        else:
            branch, n = "all hard", max(negatives, key=lambda n: d[a][n])
        out.add((a, p, n))
        if branches is not None:
            branches.add(branch)
    return out


def ref_batch_all(d, labels, margin) -> set[tuple[int, int, int]]:
    return {
        (a, p, n)
        for a, p in ref_pairs(labels)
        for n in range(len(labels))
        if labels[n] != labels[a] and d[a][p] - d[a][n] + margin > 0
    }


REFERENCES = {"batch_hard": ref_batch_hard, "semi_hard": ref_semi_hard, "batch_all": ref_batch_all}


def ref_loss(d, triplets, margin, soft_margin) -> float:
    terms = []
    for a, p, n in triplets:
        gap = d[a][p] - d[a][n]
        terms.append(math.log1p(math.exp(gap)) if soft_margin else max(0.0, gap + margin))
    return sum(terms) / len(terms)


def as_set(triplets) -> set[tuple[int, int, int]]:
    return set(zip(*(t.tolist() for t in triplets), strict=True))


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_distances_match_brute_force(metric):
    x, _ = batch(0)
    expected = torch.tensor(ref_distances(x, metric), dtype=torch.float64)
    torch.testing.assert_close(pairwise_distances(x, metric), expected, rtol=0, atol=1e-6)


def test_distances_stay_float32_under_bf16_autocast():
    x = torch.randn(16, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d = pairwise_distances(x)
    assert d.dtype == torch.float32
    torch.testing.assert_close(d, pairwise_distances(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_miners_return_the_brute_force_triplets(name, metric):
    margin = MARGINS[metric]
    for seed in SEEDS:
        x, labels = batch(seed)
        triplets = get_miner(name)(pairwise_distances(x, metric), labels, margin)
        assert len(triplets.anchor) == len(as_set(triplets)), "a triplet was returned twice"
        assert as_set(triplets) == REFERENCES[name](ref_distances(x, metric), labels.tolist(), margin)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_semi_hard_reference_covers_every_branch(metric):
    """Otherwise the fallback comparisons above would prove nothing."""
    branches = set()
    for seed in SEEDS:
        x, labels = batch(seed)
        ref_semi_hard(ref_distances(x, metric), labels.tolist(), MARGINS[metric], branches)
    assert branches == {"semi-hard", "easy", "all hard"}


@pytest.mark.parametrize("soft_margin", [False, True])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_loss_matches_brute_force(name, metric, soft_margin):
    margin = MARGINS[metric]
    for seed in SEEDS:
        x, labels = batch(seed)
        d = ref_distances(x, metric)
        expected = REFERENCES[name](d, labels.tolist(), margin)
        loss, stats = triplet_margin_loss(x, labels, name, margin, metric, soft_margin)
        assert loss.item() == pytest.approx(ref_loss(d, expected, margin, soft_margin), abs=1e-9)
        assert stats["triplets"].item() == len(expected)
        active = sum(d[a][p] - d[a][n] + margin > 0 for a, p, n in expected) / len(expected)
        assert stats["active_fraction"].item() == pytest.approx(active)
        if name == "batch_all":
            assert stats["active_fraction"].item() == 1.0


@pytest.mark.parametrize("soft_margin", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(MINERS))
def test_identical_embeddings_give_finite_gradients(name, dtype, soft_margin):
    x, labels = batch(1)
    x = x.to(dtype)
    labels = torch.tensor([0, 0, 1, 2, 1, 1, 2, 2, 3, 3, 0, 3])
    x[1] = x[0]  # a positive at distance 0
    x[2] = x[0]  # and a negative at distance 0: batch-hard's hardest negative
    x.requires_grad_(True)
    miner = get_miner(name)
    if name == "random":
        miner = functools.partial(random_negatives, generator=torch.Generator().manual_seed(0))
    loss, _ = triplet_margin_loss(x, labels, miner, 0.5, "euclidean", soft_margin)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    assert pairwise_distances(x.detach())[0, 1].item() < 1e-3


@pytest.mark.parametrize("labels", [torch.zeros(12, dtype=torch.long), torch.arange(12)])
@pytest.mark.parametrize("name", sorted(MINERS))
def test_batch_without_triplets_gives_zero_loss_on_the_graph(name, labels):
    """One label (no negatives) or no repeated label (no positives): nothing to mine."""
    x = torch.randn(12, 4, requires_grad=True)
    loss, stats = triplet_margin_loss(x, labels, name)
    assert loss.item() == 0 and loss.requires_grad
    loss.backward()
    assert (x.grad == 0).all()
    assert stats["triplets"].item() == 0 and stats["active_fraction"].item() == 0


def test_unknown_names_raise_user_error_listing_choices():
    with pytest.raises(UserError) as error:
        get_miner("nope")
    assert all(name in str(error.value) for name in MINERS)
    with pytest.raises(UserError, match="euclidean"):
        pairwise_distances(torch.randn(3, 2), "manhattan")


def test_random_miner_is_reproducible_and_draws_only_negatives():
    x, labels = batch(2)
    d = pairwise_distances(x)

    def draw(seed):
        return random_negatives(d, labels, 0.2, generator=torch.Generator().manual_seed(seed))

    first = draw(0)
    assert all(torch.equal(u, v) for u, v in zip(first, draw(0), strict=True))
    assert not torch.equal(first.negative, draw(1).negative)
    assert set(zip(first.anchor.tolist(), first.positive.tolist(), strict=True)) == set(
        ref_pairs(labels.tolist())
    )
    seen = set()
    for seed in range(50):
        anchor, _, negative = draw(seed)
        assert (labels[negative] != labels[anchor]).all()
        seen |= {n for a, n in zip(anchor.tolist(), negative.tolist(), strict=True) if a == 0}
    assert seen == {n for n in range(len(labels)) if labels[n] != labels[0]}, "not every negative is drawn"


def test_loss_takes_a_callable_miner():
    x, labels = batch(3)
    miner = functools.partial(random_negatives, generator=torch.Generator().manual_seed(0))
    loss, stats = triplet_margin_loss(x, labels, miner, margin=0.5)
    triplets = random_negatives(pairwise_distances(x), labels, 0.5, torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx(ref_loss(ref_distances(x, "euclidean"), as_set(triplets), 0.5, False))
    assert stats["triplets"].item() == len(triplets.anchor)


def ref_in_batch_negatives(anchors, positives, scale, labels=None) -> float:
    total = 0.0
    for i in range(len(anchors)):
        logits = {}
        for j in range(len(positives)):
            if labels is not None and j != i and labels[j] == labels[i]:
                continue
            cos = torch.dot(anchors[i], positives[j]) / (anchors[i].norm() * positives[j].norm())
            logits[j] = scale * cos.item()
        total += math.log(sum(math.exp(v) for v in logits.values())) - logits[i]
    return total / len(anchors)


@pytest.mark.parametrize("with_labels", [False, True])
def test_in_batch_negatives_matches_brute_force_cross_entropy(with_labels):
    x, labels = batch(4, dim=8)
    y = x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    labels = labels if with_labels else None
    x.requires_grad_(True)
    loss = in_batch_negatives_loss(x, y, scale=5.0, labels=labels)
    assert loss.item() == pytest.approx(ref_in_batch_negatives(x.detach(), y, 5.0, labels), abs=1e-9)
    loss.backward()
    assert torch.isfinite(x.grad).all()


def test_label_masking_removes_duplicates_from_the_negatives():
    x, labels = batch(5, dim=8)
    assert in_batch_negatives_loss(x, x, labels=labels) < in_batch_negatives_loss(x, x)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_sgd_on_free_embeddings_lowers_the_batch_hard_loss(metric):
    torch.manual_seed(0)
    labels = torch.arange(4).repeat_interleave(3)
    x = torch.nn.Parameter(torch.randn(12, 8))
    optimizer = torch.optim.SGD([x], lr=0.3)
    losses = []
    for _ in range(30):
        loss, _ = triplet_margin_loss(x, labels, "batch_hard", MARGINS[metric], metric)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_mining_a_512_batch_is_vectorised_and_valid():
    """P x K = 128 x 4: Python loops over B^2 pairs would be far too slow for this suite."""
    labels = torch.arange(128).repeat_interleave(4)
    d = pairwise_distances(torch.randn(512, 64))
    counts = {}
    for name, miner in MINERS.items():
        anchor, positive, negative = miner(d, labels, 0.2)
        assert (anchor != positive).all() and (labels[anchor] == labels[positive]).all()
        assert (labels[anchor] != labels[negative]).all()
        counts[name] = len(anchor)
    assert counts["batch_hard"] == 512
    assert counts["semi_hard"] == counts["random"] == 512 * 3
    assert counts["batch_all"] <= 512 * 3 * 508
