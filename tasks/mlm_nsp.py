"""BERT pre-training: masked-LM + next-sentence prediction, the two losses summed.

Inputs are `[CLS] A [SEP] B [SEP]` with segment ids 0 for A and 1 for B. B continues A half of
the time; otherwise it is a span from another document (label 1). Tokens are masked by BERT's rule
(tasks/masking.py): of the non-special tokens 15% are selected; of those 80% become [MASK], 10% a
random token, 10% stay as they are, and the model predicts the original token at every selected
position.
"""

from __future__ import annotations

import random
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
from modules.heads import MaskedLMHead, PooledClassifierHead, SegmentMatchHead
from tasks.base import Task, at_positions, check_fits_positions, label_positions, packed_rows
from tasks.masking import (
    IGNORE,
    check_masking_rates,
    mask_tokens,
    masked_token_records,
    unigram_log_probs,
    unigram_scores,
)
from tasks.sentences import split_sentences

IS_NEXT, RANDOM_NEXT = 0, 1
NSP_HEADS = ("pooled", "match")


@dataclass
class SentenceTable:
    """All sentences of a split as one flat token array; documents are ranges of sentences."""

    tokens: np.ndarray  # (total_tokens,) int32
    sentence_starts: np.ndarray  # (n_sentences + 1,) offsets into tokens
    doc_starts: np.ndarray  # (n_docs + 1,) offsets into sentences

    @classmethod
    def from_documents(cls, documents: list[list[list[int]]], special: np.ndarray) -> SentenceTable:
        """special: (V,) bool, True for ids that are not text. A sentence of special ids only (empty,
        or all [UNK]: text the vocabulary cannot spell) is left out, as MLM could mask nothing in it."""
        kept = [[s for s in doc if s and not special[s].all()] for doc in documents]
        sentences = [s for doc in kept for s in doc]
        lengths = [len(s) for s in sentences]
        doc_sizes = [len(doc) for doc in kept]
        return cls(
            tokens=np.fromiter((t for s in sentences for t in s), dtype=np.int32, count=sum(lengths)),
            sentence_starts=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            doc_starts=np.concatenate([[0], np.cumsum(doc_sizes)]).astype(np.int64),
        )

    def span(self, first: int, stop: int) -> np.ndarray:
        """Tokens of sentences [first, stop)."""
        return self.tokens[self.sentence_starts[first] : self.sentence_starts[stop]]

    def length(self, sentence: int) -> int:
        return int(self.sentence_starts[sentence + 1] - self.sentence_starts[sentence])


class PairedSegments(Sequence):
    """NSP instances as sentence ranges (6 ints each), cut to max_tokens when read."""

    def __init__(self, table: SentenceTable, spans: np.ndarray, max_tokens: int) -> None:
        self.table, self.spans, self.max_tokens = table, spans, max_tokens  # spans: (N, 5) a0 a1 b0 b1 label

    def __len__(self) -> int:
        return len(self.spans)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray, int]:
        a0, a1, b0, b1, label = (int(v) for v in self.spans[index])
        a, b = self.table.span(a0, a1), self.table.span(b0, b1)
        while len(a) + len(b) > self.max_tokens:  # trim the longer segment from its end
            if len(a) > len(b):
                a = a[:-1]
            else:
                b = b[:-1]
        return a, b, label


def pair_segments(table: SentenceTable, max_tokens: int, short_seq_prob: float, rng: random.Random) -> list:
    """One pass over every document: chunks of consecutive sentences up to a target length, each
    split into A and B; B is replaced by a span of another document half of the time.

    The target is the full length except, with probability short_seq_prob, a random shorter one,
    so the model also sees short inputs as at fine-tuning time.
    """
    n_docs = len(table.doc_starts) - 1
    pairs = []

    def draw_target() -> int:
        return rng.randint(2, max_tokens) if rng.random() < short_seq_prob else max_tokens

    for doc in range(n_docs):
        first, end = int(table.doc_starts[doc]), int(table.doc_starts[doc + 1])
        target, chunk_start, length, i = draw_target(), first, 0, first
        while i < end:
            length += table.length(i)
            if i == end - 1 or length >= target:
                a_end = rng.randint(chunk_start + 1, i) if i > chunk_start else i + 1
                if i == chunk_start or rng.random() < 0.5:
                    other = rng.randrange(n_docs - 1)
                    other += other >= doc  # any document but this one
                    o_first, o_end = int(table.doc_starts[other]), int(table.doc_starts[other + 1])
                    b0 = rng.randrange(o_first, o_end)
                    b1, b_len, wanted = (
                        b0,
                        0,
                        target - sum(table.length(s) for s in range(chunk_start, a_end)),
                    )
                    while b1 < o_end and (b1 == b0 or b_len < wanted):
                        b_len += table.length(b1)
                        b1 += 1
                    pairs.append((chunk_start, a_end, b0, b1, RANDOM_NEXT))
                    i = a_end - 1  # the unused sentences of this chunk start the next one
                else:
                    pairs.append((chunk_start, a_end, a_end, i + 1, IS_NEXT))
                chunk_start, length, target = i + 1, 0, draw_target()
            i += 1
    return pairs


class MaskedLMNextSentence(Task):
    """Masked-LM + next-sentence prediction (BERT). Needs a `text` field: one document per example."""

    stacks = "encoder"
    fields = ("text",)
    list_fields = ("text",)  # a document given as its list of sentences (SciTLDR's abstracts) is used as is
    special_tokens = ("pad", "cls", "sep", "mask")

    def __init__(
        self,
        max_length: int = 128,
        mlm_probability: float = 0.15,
        mask_fraction: float = 0.8,
        random_fraction: float = 0.1,
        short_seq_prob: float = 0.1,
        dupe_factor: int = 5,
        pack: bool = False,
        nsp_head: str = "pooled",
        loss_weight: float = 1.0,
    ) -> None:
        """
        max_length: tokens per input, [CLS] and both [SEP] included.
        mlm_probability: share of non-special tokens the model must predict.
        mask_fraction / random_fraction: of those, replaced by [MASK] / a random token (the rest stay).
        short_seq_prob: share of inputs built to a random shorter length.
        dupe_factor: passes over the corpus, each with new A/B pairings, that make up one split.
        pack: put consecutive inputs of a batch into shared rows of max_length tokens, each input
            attending only to itself with positions from 0 (Backbone.encode's document_ids): the
            same outputs and loss as one input per row, with less padding when inputs are short.
        nsp_head: "pooled" reads NSP from BERT's pooled [CLS] (BERT's own head, the one `polyhead
            convert` maps); "match" from how well each segment's tokens find a match in the other
            (modules/heads.py SegmentMatchHead), which learns within a small budget.
        """
        super().__init__(loss_weight)
        if max_length < 8:
            raise UserError(f"MaskedLMNextSentence max_length must be at least 8, got {max_length}")
        check_masking_rates(mlm_probability, mask_fraction, random_fraction)
        if nsp_head not in NSP_HEADS:
            raise UserError(
                f"MaskedLMNextSentence nsp_head must be one of {', '.join(NSP_HEADS)}, got {nsp_head!r}"
            )
        self.nsp_head = nsp_head
        self.max_length, self.mlm_probability = max_length, mlm_probability
        self.mask_fraction, self.random_fraction = mask_fraction, random_fraction
        self.short_seq_prob, self.dupe_factor, self.pack = short_seq_prob, dupe_factor, pack
        self.unigram_log_probs: Tensor | None = None  # baseline: training-token frequencies
        self.majority_nsp_label = IS_NEXT

    def init_args(self) -> dict:
        return {
            "max_length": self.max_length,
            "mlm_probability": self.mlm_probability,
            "mask_fraction": self.mask_fraction,
            "random_fraction": self.random_fraction,
            "short_seq_prob": self.short_seq_prob,
            "dupe_factor": self.dupe_factor,
            "pack": self.pack,
            "nsp_head": self.nsp_head,
            "loss_weight": self.loss_weight,
        }

    def build_head(self, config: BackboneConfig) -> nn.Module:
        check_fits_positions(config, self.max_length, "MaskedLMNextSentence.max_length")
        if self.nsp_head == "match":
            return nn.ModuleDict({"mlm": MaskedLMHead(config), "nsp": SegmentMatchHead(config)})
        if not config.pooler:
            raise UserError(
                "task MaskedLMNextSentence with nsp_head: pooled needs model.backbone.pooler: true (NSP reads "
                "the pooled [CLS]); or set nsp_head: match"
            )
        return nn.ModuleDict(
            {"mlm": MaskedLMHead(config), "nsp": PooledClassifierHead(config, num_classes=2)}
        )

    def tokenize(self, batch: dict[str, list], tokenizer: Tokenizer) -> dict[str, list]:
        documents = [
            [s.strip() for s in text if s.strip()] if isinstance(text, list) else split_sentences(text)
            for text in batch["text"]
        ]
        flat = tokenizer.encode([s for doc in documents for s in doc])
        out, k = [], 0
        for doc in documents:
            out.append(flat[k : k + len(doc)])
            k += len(doc)
        return {"sentences": out}

    def build_examples(self, tokenized, tokenizer: Tokenizer, split: str, seed: int) -> PairedSegments:
        table = SentenceTable.from_documents(tokenized["sentences"], tokenizer.special_mask.numpy())
        n_docs = len(table.doc_starts) - 1
        if n_docs < 2:
            raise UserError(
                f"the {split} data of task MaskedLMNextSentence has {n_docs} non-empty document(s); next-sentence "
                "prediction needs at least 2 (check the source's `documents` setting)"
            )
        rng = random.Random(seed)
        spans = [
            p
            for _ in range(self.dupe_factor)
            for p in pair_segments(table, self.max_length - 3, self.short_seq_prob, rng)
        ]
        rng.shuffle(spans)
        examples = PairedSegments(
            table, np.asarray(spans, dtype=np.int64).reshape(-1, 5), self.max_length - 3
        )
        if split == "train":
            self.unigram_log_probs = unigram_log_probs(table.tokens, tokenizer.vocab_size)
            self.majority_nsp_label = int(np.bincount(examples.spans[:, 4], minlength=2).argmax())
        return examples

    def example_length(self, example: tuple[np.ndarray, np.ndarray, int]) -> int:
        a, b, _ = example
        return len(a) + len(b) + 3  # [CLS] A [SEP] B [SEP]

    def collate(self, examples: list, seeds: list[int], tokenizer: Tokenizer) -> dict[str, Tensor]:
        """-> input_ids, token_type_ids, attention_mask, mlm_labels (R, T), mlm_positions (N,) (the
        masked positions, see `label_positions`) and nsp_labels (B,): R = B rows of one input each,
        or fewer rows packing several with `pack`, which adds document_ids (R, T) and cls_positions
        (B,), each input's [CLS] as an index into the flattened (R * T). The match NSP head also gets
        pair_ids (R, T), the input each token belongs to (-1 at padding)."""
        inputs = []
        for (a, b, _), seed in zip(examples, seeds, strict=True):
            ids = torch.from_numpy(
                np.concatenate([[tokenizer.cls_id], a, [tokenizer.sep_id], b, [tokenizer.sep_id]])
            ).long()
            masked, target = mask_tokens(
                ids,
                torch.Generator().manual_seed(seed),
                tokenizer,
                self.mlm_probability,
                self.mask_fraction,
                self.random_fraction,
            )
            inputs.append((masked, target, len(a) + 2))  # the first column of segment B
        lengths = [len(masked) for masked, _, _ in inputs]
        rows = packed_rows(lengths, self.max_length) if self.pack else [[i] for i in range(len(inputs))]
        length = max(sum(len(inputs[i][0]) for i in row) for row in rows)
        shape = (len(rows), length)
        input_ids = torch.full(shape, tokenizer.pad_id, dtype=torch.long)
        token_type_ids = torch.zeros(shape, dtype=torch.long)
        attention_mask = torch.zeros(shape, dtype=torch.long)
        labels = torch.full(shape, IGNORE, dtype=torch.long)
        document_ids = torch.zeros(shape, dtype=torch.long)
        cls_positions = torch.zeros(len(inputs), dtype=torch.long)
        pair_ids = torch.full(shape, -1, dtype=torch.long)
        for r, row in enumerate(rows):
            start = 0
            for document, i in enumerate(row):
                masked, target, segment_b = inputs[i]
                end = start + len(masked)
                input_ids[r, start:end], labels[r, start:end], attention_mask[r, start:end] = (
                    masked,
                    target,
                    1,
                )
                token_type_ids[r, start + segment_b : end] = 1
                document_ids[r, start:] = document  # padding after the last input joins it, masked
                cls_positions[i] = r * length + start
                pair_ids[r, start:end] = i
                start = end
        batch = {
            "input_ids": input_ids,
            "token_type_ids": token_type_ids,
            "attention_mask": attention_mask,
            "mlm_labels": labels,
            "mlm_positions": label_positions(labels, IGNORE),
            "nsp_labels": torch.tensor([label for _, _, label in examples], dtype=torch.long),
        }
        if self.pack:
            batch |= {"document_ids": document_ids, "cls_positions": cls_positions}
        if self.nsp_head == "match":
            batch["pair_ids"] = pair_ids
        return batch

    def forward(self, backbone: Backbone, head: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        hidden = backbone.encode(
            batch["input_ids"], padding_mask(batch), batch["token_type_ids"], batch.get("document_ids")
        )  # (R, T, D)
        masked = at_positions(hidden, batch["mlm_positions"])  # (N, D)
        return {
            "mlm_logits": head["mlm"](masked, backbone.token_embedding),  # (N, V)
            "nsp_logits": self.nsp_logits(backbone, head["nsp"], hidden, batch),  # (B, 2)
        }

    def nsp_logits(
        self, backbone: Backbone, head: nn.Module, hidden: Tensor, batch: dict[str, Tensor]
    ) -> Tensor:
        """hidden: (R, T, D) -> NSP logits (B, 2), one row per input."""
        if self.nsp_head == "match":
            return head(
                hidden,
                batch["attention_mask"],
                batch["token_type_ids"],
                batch["pair_ids"],
                len(batch["nsp_labels"]),
            )
        firsts = hidden  # (B, T, D) whose column 0 is each input's [CLS], as the pooler reads it
        if "cls_positions" in batch:  # packed rows: gather each input's [CLS]
            firsts = at_positions(hidden, batch["cls_positions"])[:, None]  # (B, 1, D)
        return head(backbone.pool(firsts))

    def loss(self, outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> dict[str, Tensor]:
        targets = at_positions(batch["mlm_labels"], batch["mlm_positions"])  # (N,)
        mlm = F.cross_entropy(outputs["mlm_logits"].float(), targets)
        nsp = F.cross_entropy(outputs["nsp_logits"].float(), batch["nsp_labels"])
        return {"loss": mlm + nsp, "mlm_loss": mlm, "nsp_loss": nsp}

    def metrics(self, vocab_size: int) -> MetricCollection:
        return MetricCollection(
            {
                "loss": MeanMetric(),
                "mlm_loss": MeanMetric(),
                "nsp_loss": MeanMetric(),
                "perplexity": Perplexity(),
                "mlm_accuracy": MulticlassAccuracy(vocab_size, average="micro"),
                "nsp_accuracy": MulticlassAccuracy(2, average="micro"),
                "baseline_mlm_loss": MeanMetric(),
                "baseline_mlm_accuracy": MeanMetric(),
                "baseline_nsp_accuracy": MeanMetric(),
            }
        )

    def update_metrics(
        self,
        metrics: MetricCollection,
        outputs: dict[str, Tensor],
        batch: dict[str, Tensor],
        tokenizer: Tokenizer,
    ) -> None:
        losses = self.loss(outputs, batch)
        targets = at_positions(batch["mlm_labels"], batch["mlm_positions"])  # (N,)
        n_masked, n_pairs = targets.numel(), batch["nsp_labels"].numel()
        metrics["loss"].update(losses["loss"], weight=n_pairs)
        metrics["mlm_loss"].update(losses["mlm_loss"], weight=n_masked)
        metrics["nsp_loss"].update(losses["nsp_loss"], weight=n_pairs)
        metrics["perplexity"].update(outputs["mlm_logits"].float()[None], targets[None])
        metrics["mlm_accuracy"].update(outputs["mlm_logits"], targets)
        metrics["nsp_accuracy"].update(outputs["nsp_logits"], batch["nsp_labels"])
        if self.unigram_log_probs is not None:
            baseline_loss, baseline_accuracy = unigram_scores(self.unigram_log_probs, targets)
            metrics["baseline_mlm_loss"].update(baseline_loss, weight=n_masked)
            metrics["baseline_mlm_accuracy"].update(baseline_accuracy, weight=n_masked)
            majority = (batch["nsp_labels"] == self.majority_nsp_label).float().mean()
            metrics["baseline_nsp_accuracy"].update(majority, weight=n_pairs)

    def predict(
        self, outputs: dict[str, Tensor], batch: dict[str, Tensor], tokenizer: Tokenizer
    ) -> list[dict]:
        """Per pair: the two segments, the model's guess at every masked token, P(B follows A)."""
        if "document_ids" in batch:
            raise UserError(
                "predict with MaskedLMNextSentence pack: false (one pair per row, one record per pair)"
            )
        labels, ids = batch["mlm_labels"], batch["input_ids"]
        original = torch.where(labels != IGNORE, labels, ids)
        masked = masked_token_records(labels, outputs["mlm_logits"], tokenizer)
        is_next = outputs["nsp_logits"].float().softmax(-1)[:, IS_NEXT].tolist()
        records = []
        for row in range(len(ids)):
            real = batch["attention_mask"][row].bool()
            segment = batch["token_type_ids"][row]
            records.append(
                {
                    "segment_a": tokenizer.decode(original[row][real & (segment == 0)].tolist()),
                    "segment_b": tokenizer.decode(original[row][real & (segment == 1)].tolist()),
                    "masked": masked[row],
                    "is_next_probability": round(is_next[row], 4),
                    "is_next_label": int(batch["nsp_labels"][row]) == IS_NEXT,
                }
            )
        return records
