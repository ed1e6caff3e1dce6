"""Masked-LM alone, on long windows of whole documents (RoBERTa's objective: no next-sentence task).

Each example is one window `[CLS] tokens [SEP]` of at most max_length tokens. A document that fits
stays whole in one window; a longer one is cut into consecutive pieces of max_length - 2 tokens (the
last one shorter), each full piece filling a window, so every token of a document is in exactly one
window, in order. With `concatenate` (the default) consecutive documents, and the last piece of a long one,
share a window while they fit, each followed by [SEP]: `[CLS] doc1 [SEP] doc2 [SEP] ...`. That is
RoBERTa's FULL-SENTENCES packing, except that a document which fits a window is never cut across
two: windows come close to max_length instead of being mostly padding, and attention runs across
the [SEP] as in RoBERTa. Tokens are masked by BERT's rule (tasks/masking.py) and the loss is the
cross-entropy at the masked positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.text import Perplexity

from datamodules.padding import padding_mask
from datamodules.tokenizer import Tokenizer
from modules.backbone import Backbone
from modules.config import BackboneConfig
from modules.errors import UserError
from modules.heads import MaskedLMHead
from tasks.base import Task, at_positions, check_fits_positions, label_positions, packed_rows
from tasks.generative import pad_rows
from tasks.masking import (
    IGNORE,
    check_masking_rates,
    mask_tokens,
    masked_token_records,
    unigram_log_probs,
    unigram_scores,
)


def document_pieces(doc_starts: np.ndarray, piece_length: int) -> np.ndarray:
    """(D + 1,) offsets of documents in one token array -> (P, 2) [start, stop) of every document's
    consecutive pieces of at most piece_length tokens, in order (an empty document has none)."""
    lengths = np.diff(doc_starts)
    counts = -(-lengths // piece_length)  # (D,) pieces per document, rounded up
    first_piece = np.repeat(np.cumsum(counts) - counts, counts)  # (P,) index of its document's first
    starts = np.repeat(doc_starts[:-1], counts) + (np.arange(counts.sum()) - first_piece) * piece_length
    stops = np.minimum(starts + piece_length, np.repeat(doc_starts[1:], counts))
    return np.stack([starts, stops], axis=1).astype(np.int64)


def window_ids(pieces: list[np.ndarray], tokenizer: Tokenizer) -> Tensor:
    """The pieces of one window -> (L,) ids `[CLS] piece [SEP] piece [SEP] ...`."""
    parts = [[tokenizer.cls_id]] + [part for piece in pieces for part in (piece, [tokenizer.sep_id])]
    return torch.from_numpy(np.concatenate(parts).astype(np.int64))


@dataclass
class Windows(Sequence):
    """The windows of a split as ranges of one flat token array: window w is pieces
    window_starts[w] : window_starts[w + 1], each a [start, stop) range of `tokens`."""

    tokens: np.ndarray  # (total_tokens,) int32, every document one after another
    pieces: np.ndarray  # (P, 2) int64 start, stop
    window_starts: np.ndarray  # (W + 1,) int64 offsets into pieces

    def __len__(self) -> int:
        return len(self.window_starts) - 1

    def __getitem__(self, window: int) -> list[np.ndarray]:
        """The token arrays of the pieces in one window, in order."""
        first, stop = self.window_starts[window], self.window_starts[window + 1]
        return [self.tokens[start:end] for start, end in self.pieces[first:stop]]


class MaskedLM(Task):
    """Masked-LM on windows of documents (see the module docstring). Needs a `text` field: one
    document per example, or its list of paragraphs."""

    stacks = "encoder"
    fields = ("text",)
    list_fields = ("text",)
    special_tokens = ("pad", "cls", "sep", "mask")

    def __init__(
        self,
        max_length: int = 512,
        concatenate: bool = True,
        mlm_probability: float = 0.15,
        mask_fraction: float = 0.8,
        random_fraction: float = 0.1,
        loss_weight: float = 1.0,
    ) -> None:
        """
        max_length: tokens per window, [CLS] and every [SEP] included.
        concatenate: consecutive documents share a window while they fit (false: one document, or
            one piece of a long document, per window; windows of short documents are then mostly
            padding).
        mlm_probability: share of non-special tokens the model must predict.
        mask_fraction / random_fraction: of those, replaced by [MASK] / a random token (the rest stay).
        """
        super().__init__(loss_weight)
        if max_length < 3:
            raise UserError(f"MaskedLM max_length must be at least 3 ([CLS] token [SEP]), got {max_length}")
        check_masking_rates(mlm_probability, mask_fraction, random_fraction)
        self.max_length, self.concatenate = max_length, concatenate
        self.mlm_probability = mlm_probability
        self.mask_fraction, self.random_fraction = mask_fraction, random_fraction
        self.unigram_log_probs: Tensor | None = None  # baseline: training-token frequencies

    def init_args(self) -> dict:
        return {
            "max_length": self.max_length,
            "concatenate": self.concatenate,
            "mlm_probability": self.mlm_probability,
            "mask_fraction": self.mask_fraction,
            "random_fraction": self.random_fraction,
            "loss_weight": self.loss_weight,
        }

    def build_head(self, config: BackboneConfig) -> nn.Module:
        check_fits_positions(config, self.max_length, "MaskedLM.max_length")
        return MaskedLMHead(config)

    def tokenize(self, batch: dict[str, list], tokenizer: Tokenizer) -> dict[str, list]:
        """Each document's lines (or list items) encoded one by one and joined: a line break becomes
        a word boundary, as the tokenizer was trained on lines."""
        documents = [
            [line.strip() for line in (text if isinstance(text, list) else text.splitlines()) if line.strip()]
            for text in batch["text"]
        ]
        flat = tokenizer.encode([line for doc in documents for line in doc])
        ids, k = [], 0
        for doc in documents:
            ids.append([token for line in flat[k : k + len(doc)] for token in line])
            k += len(doc)
        return {"ids": ids}

    def build_examples(self, tokenized, tokenizer: Tokenizer, split: str, seed: int) -> Windows:
        """Documents -> windows. A piece of special tokens only (empty, or all [UNK]: text the
        vocabulary cannot spell) is left out, as masked-LM could mask nothing in it."""
        documents = tokenized["ids"]
        lengths = [len(doc) for doc in documents]
        tokens = np.fromiter((t for doc in documents for t in doc), dtype=np.int32, count=sum(lengths))
        doc_starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        pieces = document_pieces(doc_starts, self.max_length - 2)
        text_before = np.concatenate([[0], np.cumsum(~tokenizer.special_mask.numpy()[tokens])])
        pieces = pieces[text_before[pieces[:, 1]] > text_before[pieces[:, 0]]]
        if not len(pieces):
            raise UserError(
                f"the {split} data of task MaskedLM holds no text the vocabulary can spell "
                "(check the source's `documents` and `columns` settings)"
            )
        if self.concatenate:  # each piece costs its tokens and its [SEP]; the window one [CLS]
            rows = packed_rows((pieces[:, 1] - pieces[:, 0] + 1).tolist(), self.max_length - 1)
            window_sizes = [len(row) for row in rows]
        else:
            window_sizes = [1] * len(pieces)
        if split == "train":
            self.unigram_log_probs = unigram_log_probs(tokens, tokenizer.vocab_size)
        return Windows(tokens, pieces, np.concatenate([[0], np.cumsum(window_sizes)]).astype(np.int64))

    def example_length(self, example: list[np.ndarray]) -> int:
        return sum(len(piece) for piece in example) + len(example) + 1  # [CLS] piece [SEP] piece [SEP]

    def collate(self, examples: list, seeds: list[int], tokenizer: Tokenizer) -> dict[str, Tensor]:
        """-> input_ids, attention_mask, mlm_labels (B, T) and mlm_positions (N,), the masked
        positions (see `label_positions`)."""
        inputs, targets = [], []
        for pieces, seed in zip(examples, seeds, strict=True):
            masked, labels = mask_tokens(
                window_ids(pieces, tokenizer),
                torch.Generator().manual_seed(seed),
                tokenizer,
                self.mlm_probability,
                self.mask_fraction,
                self.random_fraction,
            )
            inputs.append(masked)
            targets.append(labels)
        input_ids, attention_mask = pad_rows(inputs, tokenizer.pad_id)  # (B, T)
        padded_labels, _ = pad_rows(targets, IGNORE)  # (B, T)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "mlm_labels": padded_labels,
            "mlm_positions": label_positions(padded_labels, IGNORE),
        }

    def forward(self, backbone: Backbone, head: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        hidden = backbone.encode(batch["input_ids"], padding_mask(batch))  # (B, T, D)
        masked = at_positions(hidden, batch["mlm_positions"])  # (N, D)
        return {"mlm_logits": head(masked, backbone.token_embedding)}  # (N, V)

    def loss(self, outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> dict[str, Tensor]:
        targets = at_positions(batch["mlm_labels"], batch["mlm_positions"])  # (N,)
        return {"loss": F.cross_entropy(outputs["mlm_logits"].float(), targets)}

    def metrics(self, vocab_size: int) -> MetricCollection:
        return MetricCollection(
            {
                "loss": MeanMetric(),
                "accuracy": MulticlassAccuracy(vocab_size, average="micro"),
                "perplexity": Perplexity(),
                "baseline_loss": MeanMetric(),
                "baseline_accuracy": MeanMetric(),
            }
        )

    def update_metrics(
        self,
        metrics: MetricCollection,
        outputs: dict[str, Tensor],
        batch: dict[str, Tensor],
        tokenizer: Tokenizer,
    ) -> None:
        """Every metric is per masked token, so batches weigh by how many they hold."""
        targets = at_positions(batch["mlm_labels"], batch["mlm_positions"])  # (N,)
        n_masked = targets.numel()
        metrics["loss"].update(self.loss(outputs, batch)["loss"], weight=n_masked)
        metrics["accuracy"].update(outputs["mlm_logits"], targets)
        metrics["perplexity"].update(outputs["mlm_logits"].float()[None], targets[None])
        if self.unigram_log_probs is not None:
            baseline_loss, baseline_accuracy = unigram_scores(self.unigram_log_probs, targets)
            metrics["baseline_loss"].update(baseline_loss, weight=n_masked)
            metrics["baseline_accuracy"].update(baseline_accuracy, weight=n_masked)

    def predict(
        self, outputs: dict[str, Tensor], batch: dict[str, Tensor], tokenizer: Tokenizer
    ) -> list[dict]:
        """Per window: its text and the model's guess at every masked token."""
        labels, ids = batch["mlm_labels"], batch["input_ids"]
        original = torch.where(labels != IGNORE, labels, ids)
        masked = masked_token_records(labels, outputs["mlm_logits"], tokenizer)
        return [
            {
                "text": tokenizer.decode(original[row][batch["attention_mask"][row].bool()].tolist()),
                "masked": guesses,
            }
            for row, guesses in enumerate(masked)
        ]
