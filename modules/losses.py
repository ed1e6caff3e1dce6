"""Losses for sentence embeddings: triplet loss with batch mining, and in-batch negatives.

Everything works on one batch of embeddings (B, D) and integer labels (B,): examples with equal
labels are positives of each other, all others are negatives. A triplet (a, p, n) is valid when
a != p, label[a] == label[p] and label[a] != label[n]. A miner picks which valid triplets to train
on; every miner has the signature

    miner(distances (B, B), labels (B,), margin) -> Triplets(anchor (T,), positive (T,), negative (T,))

so `triplet_margin_loss` can take any of them by name (`MINERS`, `get_miner`) or a callable of one's
own. Miners see detached distances: the choice of triplets is not differentiated, only the distances
of the chosen ones are. Mining is vectorised over anchor-positive pairs: P pairs cost (P, B) memory,
about B * (K - 1) * B for a P x K batch, never (B, B, B).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from modules.errors import UserError

# Distances below sqrt(EPS) are clamped: sqrt has an infinite slope at 0, and identical embeddings
# (duplicates in a batch, or a collapsed model) must still give finite gradients.
EPS = 1e-12


class Triplets(NamedTuple):
    """Index tensors into the batch, each (T,): triplet t is (anchor[t], positive[t], negative[t])."""

    anchor: Tensor
    positive: Tensor
    negative: Tensor


Miner = Callable[[Tensor, Tensor, float], Triplets]


def _euclidean(x: Tensor) -> Tensor:
    """(B, D) -> (B, B) L2 distances via |x|^2 + |y|^2 - 2 x.y: one matmul, no (B, B, D) difference tensor."""
    squared_norms = x.pow(2).sum(dim=1)  # (B,)
    squared = squared_norms[:, None] + squared_norms[None, :] - 2 * x @ x.T  # (B, B), may round below 0
    return squared.clamp_min(EPS).sqrt()


def _cosine(x: Tensor) -> Tensor:
    """(B, D) -> (B, B) cosine distances 1 - cos(x_i, x_j), in [0, 2]."""
    unit = F.normalize(x, dim=1)
    return 1 - unit @ unit.T


_DISTANCES = {"euclidean": _euclidean, "cosine": _cosine}


def pairwise_distances(embeddings: Tensor, metric: str = "euclidean") -> Tensor:
    """All pairwise distances of a batch: (B, D) -> (B, B).

    metric "euclidean" is the L2 distance, clamped at sqrt(1e-12) so that identical embeddings have
    finite (zero) gradients; "cosine" is 1 - cosine similarity. Computed in at least float32 with
    autocast off: the Gram-matrix form cancels badly in bf16/fp16 for nearby points, and nearby
    points are exactly the ones mining looks at. Any batch works (no label structure needed).

    Example:
        >>> emb = torch.randn(8, 32)
        >>> d = pairwise_distances(emb, "cosine")  # (8, 8), zero diagonal
    """
    if metric not in _DISTANCES:
        raise UserError(f"unknown distance metric {metric!r}; choose one of: {', '.join(sorted(_DISTANCES))}")
    x = embeddings.to(torch.promote_types(embeddings.dtype, torch.float32))
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _DISTANCES[metric](x)


def _label_masks(labels: Tensor) -> tuple[Tensor, Tensor]:
    """labels (B,) -> positive (B, B): same label, not self; negative (B, B): different label."""
    same = labels[:, None] == labels[None, :]
    self_pair = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return same & ~self_pair, ~same


def _anchor_positive_pairs(labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Every (anchor, positive) pair whose anchor has at least one negative.

    -> anchor (P,), positive (P,), and the anchors' negative masks (P, B). Pairs whose anchor has no
    negative can form no triplet, so they are dropped here once for all miners.
    """
    positive, negative = _label_masks(labels)
    positive = positive & negative.any(dim=1, keepdim=True)
    anchor, pos = positive.nonzero(as_tuple=True)
    return anchor, pos, negative[anchor]


def batch_hard(distances: Tensor, labels: Tensor, margin: float) -> Triplets:
    """Batch-hard mining (Hermans et al. 2017, "In Defense of the Triplet Loss for Person Re-Identification").

    One triplet per anchor: its farthest positive and its closest negative. Anchors without a
    positive or without a negative are skipped. Needs P x K batches (P labels, K >= 2 examples
    each), or most anchors have no positive. `margin` is unused (every miner takes it).

    Example:
        >>> d = pairwise_distances(emb)  # emb (B, D) from a P x K batch
        >>> anchor, positive, negative = batch_hard(d, labels, margin=0.2)  # each (T,), T <= B
    """
    positive, negative = _label_masks(labels)
    hardest_positive = distances.masked_fill(~positive, float("-inf")).argmax(dim=1)  # (B,)
    hardest_negative = distances.masked_fill(~negative, float("inf")).argmin(dim=1)  # (B,)
    anchor = (positive.any(dim=1) & negative.any(dim=1)).nonzero(as_tuple=True)[0]
    return Triplets(anchor, hardest_positive[anchor], hardest_negative[anchor])


def semi_hard(distances: Tensor, labels: Tensor, margin: float) -> Triplets:
    """Semi-hard mining (Schroff et al. 2015, "FaceNet: A Unified Embedding for Face Recognition").

    One triplet per anchor-positive pair. The negative is:
      1. the closest semi-hard negative, d(a,p) < d(a,n) < d(a,p) + margin (FaceNet's rule);
      2. if there is none, the closest negative farther than d(a,p) + margin (an easy negative: the
         hinge is 0, but it keeps the pair in the average and a soft margin still pulls it);
      3. if no negative is farther than the positive at all, the farthest negative: the least hard
         of the hard ones, as TF-addons' triplet_semihard_loss does. FaceNet warns that the hardest
         negatives collapse training early on, so we avoid them even here.
    Rules 1 and 2 together are "the closest negative farther than the positive", which is how it
    is computed; `margin` therefore never changes which negative is picked. Needs P x K batches.

    Example:
        >>> d = pairwise_distances(emb)  # emb (B, D) from a P x K batch
        >>> anchor, positive, negative = semi_hard(d, labels, margin=0.2)  # T = number of pairs
    """
    anchor, positive, is_negative = _anchor_positive_pairs(labels)
    d_ap = distances[anchor, positive][:, None]  # (P, 1)
    d_an = distances[anchor]  # (P, B)
    farther = is_negative & (d_an > d_ap)  # (P, B)
    closest_farther = d_an.masked_fill(~farther, float("inf")).argmin(dim=1)  # (P,)
    farthest = d_an.masked_fill(~is_negative, float("-inf")).argmax(dim=1)  # (P,)
    return Triplets(anchor, positive, torch.where(farther.any(dim=1), closest_farther, farthest))


def batch_all(distances: Tensor, labels: Tensor, margin: float) -> Triplets:
    """Batch-all mining (Hermans et al. 2017): every valid triplet with a positive hinge loss.

    Keeps (a, p, n) when d(a,p) - d(a,n) + margin > 0, so averaging the loss over the mined
    triplets is the paper's "BA≠0" average over non-zero terms (easy triplets would only dilute
    it). Needs P x K batches. T can reach B * (K - 1) * (B - K).

    Example:
        >>> d = pairwise_distances(emb)  # emb (B, D) from a P x K batch
        >>> anchor, positive, negative = batch_all(d, labels, margin=0.2)
    """
    anchor, positive, is_negative = _anchor_positive_pairs(labels)
    hinge = distances[anchor, positive][:, None] - distances[anchor] + margin  # (P, B)
    pair, negative = (is_negative & (hinge > 0)).nonzero(as_tuple=True)
    return Triplets(anchor[pair], positive[pair], negative)


def random_negatives(
    distances: Tensor, labels: Tensor, margin: float, generator: torch.Generator | None = None
) -> Triplets:
    """Random mining, the baseline the others are measured against (as in Hermans et al. 2017).

    One triplet per anchor-positive pair, with a negative drawn uniformly from the anchor's
    negatives. Pass a `torch.Generator` on the distances' device for reproducible draws (bind it
    with functools.partial to use this as a miner). `margin` is unused. Needs P x K batches.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> triplets = random_negatives(pairwise_distances(emb), labels, 0.2, generator=g)
    """
    anchor, positive, is_negative = _anchor_positive_pairs(labels)
    negative = torch.multinomial(is_negative.float(), 1, generator=generator).squeeze(1)  # (P,)
    return Triplets(anchor, positive, negative)


MINERS: dict[str, Miner] = {
    "batch_hard": batch_hard,
    "semi_hard": semi_hard,
    "batch_all": batch_all,
    "random": random_negatives,
}


def get_miner(name: str) -> Miner:
    """The miner registered as `name` in MINERS; a config naming another gets a UserError listing them.

    Example:
        >>> miner = get_miner("semi_hard")
        >>> triplets = miner(pairwise_distances(emb), labels, 0.2)
    """
    if name not in MINERS:
        raise UserError(f"unknown triplet miner {name!r}; choose one of: {', '.join(MINERS)}")
    return MINERS[name]


def triplet_margin_loss(
    embeddings: Tensor,
    labels: Tensor,
    miner: str | Miner,
    margin: float = 0.2,
    metric: str = "euclidean",
    soft_margin: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Triplet loss on mined triplets (Schroff et al. 2015; soft margin from Hermans et al. 2017).

    Per triplet: max(0, d(a,p) - d(a,n) + margin), or with `soft_margin` log(1 + exp(d(a,p) - d(a,n)))
    which has no margin and keeps pulling already-separated triplets; `margin` then only bounds
    batch_all's selection and the active_fraction statistic. The loss is the mean over the mined triplets (for batch_all those are
    exactly the triplets with a positive hinge, the paper's average). A batch with no valid triplet
    (a single label, or no label seen twice) gives a zero loss still attached to the graph, so
    every process in DDP runs the same backward. Needs P x K batches: P labels, K >= 2 examples each.

    -> (loss (), stats): stats["triplets"] is T and stats["active_fraction"] the share of mined
    triplets with d(a,p) - d(a,n) + margin > 0; both detached float tensors, ready to log.

    Example:
        >>> emb = head(backbone(batch))  # (B, D), labels (B,) from a P x K sampler
        >>> loss, stats = triplet_margin_loss(emb, labels, "batch_hard", margin=0.3)
        >>> loss.backward()
    """
    if embeddings.dim() != 2 or labels.shape != embeddings.shape[:1]:
        raise ValueError(f"want embeddings (B, D) and labels (B,), got {embeddings.shape} and {labels.shape}")
    mine = get_miner(miner) if isinstance(miner, str) else miner
    distances = pairwise_distances(embeddings, metric)  # (B, B)
    anchor, positive, negative = mine(distances.detach(), labels, margin)
    if len(anchor) == 0:
        zero = torch.zeros((), device=embeddings.device)
        return embeddings.sum() * 0, {"triplets": zero, "active_fraction": zero}
    gap = distances[anchor, positive] - distances[anchor, negative]  # (T,) d(a,p) - d(a,n)
    hinge = gap + margin
    loss = F.softplus(gap) if soft_margin else hinge.clamp_min(0)
    stats = {
        "triplets": torch.tensor(float(len(anchor)), device=embeddings.device),
        "active_fraction": (hinge > 0).float().mean().detach(),
    }
    return loss.mean(), stats


def in_batch_negatives_loss(
    anchors: Tensor,
    positives: Tensor,
    scale: float = 20.0,
    labels: Tensor | None = None,
    negatives: Tensor | None = None,
    negative_labels: Tensor | None = None,
) -> Tensor:
    """Multiple-negatives ranking loss (Henderson et al. 2017, "Efficient Natural Language Response
    Suggestion for Smart Reply"), the loss sentence-transformers calls MNRL.

    Anchor i is scored against every positive in the batch, and every extra `negative` (N, D) if
    given (mined hard negatives), by scale * cos; cross-entropy picks out its own positive i, so
    the other candidates are free negatives. The batch gets better with size. If two pairs are
    about the same thing (duplicate questions), give `labels` (B,) (and `negative_labels` (N,)):
    candidates other than its own positive that share anchor i's label are then left out of its
    softmax instead of being pushed away.

    Example:
        >>> a, p = encode(questions), encode(answers)  # (B, D) each, row i a matching pair
        >>> loss = in_batch_negatives_loss(a, p, scale=20.0)
    """
    if anchors.shape != positives.shape or anchors.dim() != 2:
        raise ValueError(f"want anchors and positives both (B, D), got {anchors.shape} and {positives.shape}")
    candidates = positives if negatives is None else torch.cat([positives, negatives])  # (B + N, D)
    logits = scale * F.normalize(anchors, dim=1) @ F.normalize(candidates, dim=1).T  # (B, B + N)
    if labels is not None:
        duplicate, _ = _label_masks(labels)  # (B, B); the diagonal (own positive) is never masked
        if negatives is not None:
            if negative_labels is None:
                raise ValueError("give negative_labels with labels when negatives are given")
            duplicate = torch.cat([duplicate, labels[:, None] == negative_labels[None, :]], dim=1)
        logits = logits.masked_fill(duplicate, float("-inf"))
    target = torch.arange(len(anchors), device=anchors.device)
    return F.cross_entropy(logits, target)
