"""Sentence embeddings on the shared encoder: siamese / triplet training with hard-negative mining.

Every text goes through the same encoder and `EmbeddingHead` (one set of weights for all towers)
and comes out as a unit vector. Training data become *groups* of texts that mean the same thing:

  input "pairs"     fields sentence1, sentence2 (+ score): pairs scoring >= threshold are positives
                    (every pair, when threshold is None); the connected components of the graph of
                    positive pairs are the groups (STS-B: score >= 4 of 5).
  input "labelled"  fields text, label: texts with the same label form a group; `unit` can split
                    each row into sentences or lines that all carry its label.
  input "triplets"  fields anchor, positive, negative: anchor-positive components are groups and
                    each negative is kept as a hard negative of its anchor.

tasks/sentence_data.py turns the columns into these groups, evaluation rows and padded batches.

Training batches are P x K: the mixture sampler draws P "chunks" per batch (data.batch_size = P),
each K members of one group, so every anchor has a positive in the batch; a chunk also brings one
of its members' hard negatives (given in the data, or mined between epochs) when it has any.
A pass over the chunks covers every grouped text. The loss is a triplet margin loss with a miner
(batch_hard, semi_hard, batch_all, random), or in-batch negatives (MNRL) over the same batches.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.regression import SpearmanCorrCoef

from datamodules.padding import padding_mask
from datamodules.tokenizer import Tokenizer
from modules.backbone import Backbone
from modules.config import BackboneConfig
from modules.distributed import gather_rows, scale_gathered_loss, world_size
from modules.errors import UserError
from modules.heads import EmbeddingHead
from modules.losses import MINERS, in_batch_negatives_loss, triplet_margin_loss
from tasks.base import Task, check_fits_positions
from tasks.groups import GroupChunks
from tasks.metrics import EmbeddingRetrieval
from tasks.mining import mine_negatives
from tasks.sentence_data import (
    INPUT_FIELDS,
    check_scores,
    collate_chunks,
    collate_rows,
    eval_rows,
    group_chunks,
    pad_texts,
    predict_rows,
    tokenize_columns,
)

LOSSES = (*MINERS, "in_batch_negatives")
BAG_WIDTH = 4096  # columns of the bag-of-pieces baseline embedding


def pair_rows(labels: Tensor) -> tuple[Tensor, Tensor]:
    """(R,) labels -> (anchor rows, positive rows): consecutive rows of each label paired up,
    (1st, 2nd), (3rd, 4th), ..., in label order. Rows left unpaired become extra negatives."""
    order = torch.argsort(labels, stable=True)
    ordered = labels[order]
    index = torch.arange(len(labels), device=labels.device)
    new_run = torch.ones_like(ordered, dtype=torch.bool)
    new_run[1:] = ordered[1:] != ordered[:-1]
    run_start = torch.cummax(torch.where(new_run, index, 0), dim=0).values
    has_next = torch.zeros_like(new_run)
    has_next[:-1] = ~new_run[1:]
    first_of_pair = ((index - run_start) % 2 == 0) & has_next
    return order[first_of_pair], order[index[first_of_pair] + 1]


def bag_of_pieces(input_ids: Tensor, tokenizer: Tokenizer) -> Tensor:
    """(R, T) ids -> (R, min(V, BAG_WIDTH)) counts of non-special pieces, the model-free embedding the
    baselines score (pieces beyond BAG_WIDTH share columns by id modulo, to bound the memory)."""
    width = min(tokenizer.vocab_size, BAG_WIDTH)
    counts = torch.zeros(len(input_ids), width, device=input_ids.device)
    real = (~tokenizer.is_special(input_ids)).to(counts.dtype)
    counts.scatter_add_(1, input_ids % width, real)
    return counts


class SentenceEmbedding(Task):
    """Siamese / triplet sentence embeddings (see the module docstring for inputs and batches)."""

    stacks = "encoder"
    special_tokens = ("pad", "cls", "sep")

    def __init__(
        self,
        input: Literal["pairs", "labelled", "triplets"] = "pairs",
        threshold: float | None = 4.0,
        score_range: tuple[float, float] | None = None,
        unit: Literal["row", "sentence", "line"] = "row",
        samples_per_group: int = 2,
        pooling: Literal["mean", "cls", "max"] = "mean",
        projection: int | None = None,
        loss: str = "batch_hard",
        margin: float = 0.2,
        distance: Literal["cosine", "euclidean"] = "cosine",
        soft_margin: bool = False,
        scale: float = 20.0,
        gather_across_ranks: bool = False,
        mined_negatives: int = 0,
        mining_skip: int = 0,
        mine_every_n_epochs: int = 1,
        max_length: int = 128,
        loss_weight: float = 1.0,
    ) -> None:
        """
        input: how the data describe similarity: "pairs", "labelled" or "triplets" (module docstring).
        threshold: pairs input: the score from which a pair counts as positive; None: every pair does.
        score_range: pairs input: the valid (low, high) scores; a score outside stops the run.
        unit: labelled input: embed each row whole, or each of its sentences or lines (same label).
        samples_per_group: K of the P x K batches (groups smaller than K repeat members).
        pooling: how token states become one vector: mean over real tokens, [CLS], or max.
        projection: width of a linear projection after pooling; None: no projection.
        loss: "batch_hard", "semi_hard", "batch_all", "random" (triplet margin loss with that miner)
            or "in_batch_negatives" (MNRL: each anchor against every other candidate in the batch).
        margin: triplet margin, in units of `distance`.
        distance: "cosine" (1 - cos) or "euclidean" between the unit embeddings.
        soft_margin: log(1 + exp(d_ap - d_an)) instead of the hinge.
        scale: in_batch_negatives: cosine similarities are multiplied by this before the softmax.
        gather_across_ranks: under DDP, mine and rank over the global batch of every process, each
            process back-propagating through its own slice (equal to one process on that batch).
        mined_negatives: offline mining: every mine_every_n_epochs epochs, embed the training pool
            with the current model and attach each grouped text's nearest non-positives, this many.
        mining_skip: the nearest non-positives to skip first (likely unlabelled paraphrases).
        mine_every_n_epochs: how often to mine (from the end of the first such interval on).
        max_length: tokens per text, [CLS] and [SEP] included; longer texts are cut.
        """
        super().__init__(loss_weight)
        checks = {
            "input": (input in INPUT_FIELDS, f"one of {sorted(INPUT_FIELDS)}"),
            "unit": (unit in ("row", "sentence", "line"), "row, sentence or line"),
            "pooling": (pooling in ("mean", "cls", "max"), "mean, cls or max"),
            "loss": (loss in LOSSES, f"one of {', '.join(LOSSES)}"),
            "distance": (distance in ("cosine", "euclidean"), "cosine or euclidean"),
            "samples_per_group": (samples_per_group >= 2, "at least 2 (an anchor and a positive)"),
            "margin": (margin >= 0, ">= 0"),
            "mined_negatives": (mined_negatives >= 0, ">= 0"),
            "mining_skip": (mining_skip >= 0, ">= 0"),
            "mine_every_n_epochs": (mine_every_n_epochs >= 1, ">= 1"),
            "max_length": (max_length >= 3, ">= 3"),
            "projection": (projection is None or projection > 0, "positive or null"),
            "score_range": (
                score_range is None or score_range[0] < score_range[1],
                "(low, high), low < high",
            ),
        }
        for key, (ok, want) in checks.items():
            if not ok:
                raise UserError(f"SentenceEmbedding.{key} must be {want}, got {locals()[key]!r}")
        if input == "pairs" and threshold is not None and score_range is not None:
            if not score_range[0] <= threshold <= score_range[1]:
                raise UserError(
                    f"SentenceEmbedding.threshold {threshold} lies outside score_range {score_range}"
                )
        self.input, self.threshold, self.score_range, self.unit = input, threshold, score_range, unit
        self.samples_per_group, self.pooling, self.projection = samples_per_group, pooling, projection
        self.loss_name, self.margin, self.distance = loss, margin, distance
        self.soft_margin, self.scale, self.gather_across_ranks = soft_margin, scale, gather_across_ranks
        self.mined_negatives, self.mining_skip = mined_negatives, mining_skip
        self.mine_every_n_epochs, self.max_length = mine_every_n_epochs, max_length
        self.fields = INPUT_FIELDS[input]
        self.value_fields = {
            "pairs": ("score",) if threshold is not None else (),
            "labelled": ("label",),
        }.get(input, ())
        self.number_fields = ("score",) if "score" in self.value_fields else ()
        self.train_pool: GroupChunks | None = None

    def init_args(self) -> dict:
        return {
            "input": self.input,
            "threshold": self.threshold,
            "score_range": self.score_range,
            "unit": self.unit,
            "samples_per_group": self.samples_per_group,
            "pooling": self.pooling,
            "projection": self.projection,
            "loss": self.loss_name,
            "margin": self.margin,
            "distance": self.distance,
            "soft_margin": self.soft_margin,
            "scale": self.scale,
            "gather_across_ranks": self.gather_across_ranks,
            "mined_negatives": self.mined_negatives,
            "mining_skip": self.mining_skip,
            "mine_every_n_epochs": self.mine_every_n_epochs,
            "max_length": self.max_length,
            "loss_weight": self.loss_weight,
        }

    @property
    def predict_fields(self) -> tuple[str, ...]:
        return ("text",)

    @property
    def monitor(self) -> tuple[str, str]:
        return ("spearman", "max") if self.value_fields == ("score",) else ("mrr@10", "max")

    def build_head(self, config: BackboneConfig) -> nn.Module:
        check_fits_positions(config, self.max_length, "SentenceEmbedding.max_length")
        return EmbeddingHead(config, self.pooling, self.projection)

    # ----- data (tasks/sentence_data.py) -----

    def tokenize(self, batch: dict[str, list], tokenizer: Tokenizer) -> dict[str, list]:
        return tokenize_columns(batch, tokenizer, self.unit)

    def build_examples(self, tokenized, tokenizer: Tokenizer, split: str, seed: int):
        columns = {name: tokenized[name] for name in tokenized.column_names}
        if "score" in columns:
            check_scores(columns["score"], self.score_range, split)
        if split == "predict":
            return predict_rows(columns, self.predict_fields)
        if split == "train":
            self.train_pool = group_chunks(
                columns,
                self.input,
                self.threshold,
                self.samples_per_group,
                self.mined_negatives,
                np.random.default_rng(seed),
            )
            return self.train_pool
        return eval_rows(columns, self.input)

    # ----- batches -----

    def _pad(self, token_lists: list[np.ndarray], tokenizer: Tokenizer) -> tuple[Tensor, Tensor]:
        """Texts -> input_ids, attention_mask (R, T) as [CLS] text [SEP], cut to max_length."""
        return pad_texts(token_lists, tokenizer, self.max_length)

    def collate(self, examples: list, seeds: list[int], tokenizer: Tokenizer) -> dict[str, Tensor]:
        if isinstance(examples[0][0], list):
            return collate_chunks(examples, seeds, tokenizer, self.max_length)
        return collate_rows(examples, tokenizer, self.max_length)

    def _eval_labels(self, batch: dict[str, Tensor]) -> Tensor:
        """Labels of an evaluation batch's texts, so the training loss can be scored on it too."""
        ids, values = batch["text_ids"], batch["values"]
        n = len(ids)
        if self.input == "labelled":
            return values.long()
        row = torch.arange(n, device=ids.device)
        if self.input == "triplets":
            return torch.cat([row, row, n + row])  # anchor and positive share a label
        positive = (
            values >= self.threshold if self.threshold is not None else torch.ones_like(row, dtype=torch.bool)
        )
        return torch.cat([row, torch.where(positive, row, n + row)])

    # ----- model -----

    def forward(self, backbone: Backbone, head: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        hidden = backbone.encode(batch["input_ids"], padding_mask(batch))  # (R, T, D)
        return {"embeddings": head(hidden, batch["attention_mask"])}  # (R, E)

    def loss(self, outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> dict[str, Tensor]:
        embeddings = outputs["embeddings"]
        labels = batch["labels"] if "labels" in batch else self._eval_labels(batch)
        gathered = self.gather_across_ranks and world_size() > 1 and "labels" in batch
        if gathered:
            embeddings, _ = gather_rows(embeddings)
            labels, _ = gather_rows(labels)
        if self.loss_name == "in_batch_negatives":
            anchors, positives = pair_rows(labels)
            if len(anchors) == 0:  # no positive pair in this batch: nothing to rank
                return {"loss": embeddings.sum() * 0}
            others = torch.ones(len(labels), dtype=torch.bool, device=labels.device)
            others[anchors] = others[positives] = False
            loss = in_batch_negatives_loss(
                embeddings[anchors],
                embeddings[positives],
                self.scale,
                labels[anchors],
                embeddings[others],
                labels[others],
            )
            stats = {}
        else:
            loss, stats = triplet_margin_loss(
                embeddings, labels, self.loss_name, self.margin, self.distance, self.soft_margin
            )
        return {"loss": scale_gathered_loss(loss) if gathered else loss, **stats}

    # ----- evaluation -----

    def metrics(self, vocab_size: int) -> MetricCollection:
        metrics = {
            "loss": MeanMetric(),
            "retrieval": EmbeddingRetrieval(),
            "baseline_retrieval": EmbeddingRetrieval(prefix="baseline_"),
        }
        if "score" in self.value_fields:
            metrics |= {"spearman": SpearmanCorrCoef(), "baseline_spearman": SpearmanCorrCoef()}
        if self.input == "triplets":
            metrics |= {"triplet_accuracy": MeanMetric(), "baseline_triplet_accuracy": MeanMetric()}
        return MetricCollection(metrics)

    def update_metrics(
        self,
        metrics: MetricCollection,
        outputs: dict[str, Tensor],
        batch: dict[str, Tensor],
        tokenizer: Tokenizer,
    ) -> None:
        if "text_ids" not in batch:
            return
        n = len(batch["text_ids"])
        metrics["loss"].update(self.loss(outputs, batch)["loss"], weight=n)
        baseline = bag_of_pieces(batch["input_ids"], tokenizer)
        for prefix, vectors in (("", outputs["embeddings"].float()), ("baseline_", baseline)):
            unit = torch.nn.functional.normalize(vectors, dim=-1)
            blocks = unit.view(-1, n, unit.shape[-1])  # (F, B, E): field f of every row
            self._update_retrieval(metrics[f"{prefix}retrieval"], blocks, batch)
            if f"{prefix}spearman" in metrics:
                metrics[f"{prefix}spearman"].update((blocks[0] * blocks[1]).sum(-1), batch["values"].float())
            if f"{prefix}triplet_accuracy" in metrics:
                closer = (blocks[0] * blocks[1]).sum(-1) > (blocks[0] * blocks[2]).sum(-1)
                metrics[f"{prefix}triplet_accuracy"].update(closer.float().mean(), weight=n)

    def _update_retrieval(self, metric: EmbeddingRetrieval, blocks: Tensor, batch: dict[str, Tensor]) -> None:
        """Pairs: the first text of each positive pair retrieves its second among all second texts.
        Triplets: the anchor retrieves its positive among all positives and negatives. Labelled:
        each text retrieves any other text of its label."""
        ids, values = batch["text_ids"], batch["values"]
        none = torch.full_like(ids[:, 0], -1)
        if self.input == "labelled":
            metric.update(blocks[0], values.long(), ids[:, 0], blocks[0], values.long(), ids[:, 0])
        elif self.input == "triplets":
            corpus = torch.cat([blocks[1], blocks[2]])
            corpus_ids = torch.cat([ids[:, 1], ids[:, 2]])
            metric.update(blocks[0], ids[:, 1], ids[:, 0], corpus, corpus_ids, corpus_ids)
        else:
            query = (
                values >= self.threshold
                if self.threshold is not None
                else torch.ones_like(none, dtype=torch.bool)
            )
            metric.update(blocks[0][query], ids[query, 1], none[query], blocks[1], ids[:, 1], ids[:, 1])

    def predict(
        self, outputs: dict[str, Tensor], batch: dict[str, Tensor], tokenizer: Tokenizer
    ) -> list[dict]:
        """One record per text: the text (as the model read it, after truncation) and its embedding."""
        texts = [
            tokenizer.decode(row[mask.bool()][1:-1].tolist())
            for row, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)
        ]
        vectors = outputs["embeddings"].float().tolist()
        return [
            {"text": t, "embedding": [round(x, 6) for x in v]} for t, v in zip(texts, vectors, strict=True)
        ]

    # ----- offline hard-negative mining -----

    def on_train_epoch_start(self, model, name: str) -> None:
        epoch = model.current_epoch
        if (
            self.mined_negatives
            and self.train_pool is not None
            and epoch
            and epoch % self.mine_every_n_epochs == 0
        ):
            mine_negatives(model, name, self.train_pool, self._pad, self.mined_negatives, self.mining_skip)
            rank_zero_info(
                f"{name}: mined {self.mined_negatives} hard negative(s) per grouped text at epoch {epoch}"
            )
