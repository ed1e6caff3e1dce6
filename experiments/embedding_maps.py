"""Sentence embeddings of many texts, projected to 2-D, grouped and compared: shared by
`polyhead inspect embeddings` and the validation pictures.

Texts are embedded by the checkpoint's own SentenceEmbedding task (its [CLS] text [SEP] inputs,
max_length, pooling and head), so a map shows the vectors that task is trained and scored on.
PCA needs nothing beyond numpy; t-SNE and UMAP are used when scikit-learn / umap-learn are installed.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from datamodules.tokenizer import Tokenizer
from modules.backbone import Backbone
from modules.errors import UserError
from tasks.groups import EvalRows, TextTable
from tasks.triplet import SentenceEmbedding

METHODS = ("pca", "tsne", "umap")
BATCH = 64  # texts per forward pass


def embed(
    task: SentenceEmbedding, backbone: Backbone, head: nn.Module, tokenizer: Tokenizer, texts: TextTable
) -> Tensor:
    """Every text of the table -> (N, E) unit vectors on the CPU, in table order. Call under no_grad
    with the model in eval mode."""
    rows = EvalRows(texts, np.arange(len(texts))[:, None], np.zeros(len(texts)))  # one field per row
    device = next(backbone.parameters()).device
    vectors = []
    for start in range(0, len(rows), BATCH):
        items = [rows[i] for i in range(start, min(start + BATCH, len(rows)))]
        batch = task.collate(items, [0] * len(items), tokenizer)
        batch = {key: value.to(device) for key, value in batch.items()}
        vectors.append(task.forward(backbone, head, batch)["embeddings"].float().cpu())  # (b, E)
    return torch.cat(vectors)


def project(vectors: np.ndarray, method: str) -> tuple[np.ndarray, tuple[str, str]]:
    """(N, E) -> (N, 2) points and the names of their two axes; method: one of METHODS."""
    if len(vectors) < 3:
        raise UserError(f"an embedding map needs at least 3 distinct texts, got {len(vectors)}")
    if method == "pca":
        centred = vectors - vectors.mean(axis=0)
        _, singular, directions = np.linalg.svd(centred, full_matrices=False)
        share = singular**2 / max(float((singular**2).sum()), 1e-12)
        points = centred @ directions[:2].T  # (N, 2)
        return points, (f"PC1 ({share[0]:.0%} of variance)", f"PC2 ({share[1]:.0%} of variance)")
    if method == "tsne":
        try:
            from sklearn.manifold import TSNE
        except ImportError:
            raise UserError(
                "--method tsne needs scikit-learn (pip install scikit-learn); --method pca needs nothing"
            ) from None
        perplexity = min(30.0, (len(vectors) - 1) / 3)
        points = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=0).fit_transform(
            vectors
        )
        return points, ("t-SNE 1", "t-SNE 2")
    try:  # umap
        import umap
    except ImportError:
        raise UserError(
            "--method umap needs umap-learn (pip install umap-learn); --method pca needs nothing"
        ) from None
    reducer = umap.UMAP(n_components=2, n_neighbors=min(15, len(vectors) - 1), random_state=0)
    return reducer.fit_transform(vectors), ("UMAP 1", "UMAP 2")


def clusters(vectors: np.ndarray, k: int, iterations: int = 25) -> np.ndarray:
    """k-means (k-means++ start, seeded) -> (N,) cluster per vector, for colouring texts that
    carry no label."""
    rng = np.random.default_rng(0)
    k = min(k, len(vectors))
    centres = [vectors[rng.integers(len(vectors))]]
    for _ in range(1, k):  # each next centre drawn with probability ~ squared distance to the nearest
        distance = ((vectors[:, None] - np.array(centres)[None]) ** 2).sum(-1).min(1)  # (N,)
        total = distance.sum()
        centres.append(
            vectors[rng.choice(len(vectors), p=distance / total) if total > 0 else rng.integers(len(vectors))]
        )
    centres = np.array(centres)  # (k, E)
    for _ in range(iterations):
        assignment = ((vectors[:, None] - centres[None]) ** 2).sum(-1).argmin(1)  # (N,)
        for c in range(k):
            if (assignment == c).any():
                centres[c] = vectors[assignment == c].mean(0)
    return assignment


def nearest(vectors: np.ndarray, queries: list[int], k: int) -> list[list[tuple[int, float]]]:
    """For each query row, the k other rows of highest cosine similarity (vectors are unit length),
    as (row, similarity), best first."""
    k = min(k, len(vectors) - 1)
    similarity = vectors[queries] @ vectors.T  # (Q, N)
    similarity[np.arange(len(queries)), queries] = -np.inf  # not itself
    order = np.argsort(-similarity, axis=1)[:, :k]
    return [[(int(j), float(similarity[i, j])) for j in row] for i, row in enumerate(order)]
