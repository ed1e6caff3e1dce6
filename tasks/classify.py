"""Text classification on the shared encoder: one text or a sentence pair -> one of a set of labels.

Inputs are `[CLS] text [SEP]`, or `[CLS] a [SEP] b [SEP]` with segment ids 0 for `[CLS] a [SEP]` and
1 for `b [SEP]`; BERT's pooler reads `[CLS]` and a linear `PooledClassifierHead` gives one logit per
label; the loss is cross-entropy (optionally label-smoothed). Labels are names (ints are read as
their decimal names). The label set is given in the config (`labels: [...]`, which fixes the order
of the logits) or collected from the training split and sorted; either way it is saved with the
task's settings and inside the head's weights, so a checkpoint alone predicts label names.

Validation reports accuracy, macro-F1 and per-class F1 (`f1_<label>`) through torchmetrics, next to
the majority-class baseline: always predicting the most frequent training label.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torchmetrics import MeanMetric, MetricCollection

from datamodules.padding import padding_mask
from datamodules.tokenizer import Tokenizer
from modules.backbone import Backbone, init_weights
from modules.config import BackboneConfig
from modules.errors import UserError
from modules.heads import PooledClassifierHead
from tasks.base import Task, check_fits_positions
from tasks.metrics import ClassificationScores

Example = tuple[np.ndarray, np.ndarray | None, str | None]
"""One input: tokens of the text, of the pair's second text (None: single text), label name (None: predict)."""


def sorted_labels(names) -> list[str]:
    """Label names in a stable order: numerically when every name is an integer (2 before 10), else
    alphabetically, so the same data give the same logit order in every run."""
    names = set(names)
    if all(re.fullmatch(r"-?\d+", n) for n in names):
        return sorted(names, key=int)
    return sorted(names)


def encode_names(labels: list[str]) -> Tensor:
    """Label names -> (bytes,) uint8 tensor of their JSON, so they travel in the state dict."""
    return torch.tensor(list(json.dumps(labels).encode()), dtype=torch.uint8)


def decode_names(encoded: Tensor) -> list[str]:
    return json.loads(bytes(encoded.tolist()).decode())


def fit_pair(len_a: int, len_b: int, budget: int) -> tuple[int, int]:
    """Tokens kept of a pair so that a + b <= budget, trimming the longer text first (BERT's rule:
    a short text stays whole, two long ones end up equal, the first one token longer if odd)."""
    if len_a + len_b <= budget:
        return len_a, len_b
    keep_b = min(len_b, max(budget - len_a, budget // 2))
    return min(len_a, budget - keep_b), keep_b


class LabelledClassifierHead(nn.Module):
    """`PooledClassifierHead` over a label set that may be learned after the model is built.

    `labels` is the task's list of names (shared, so what the head learns the task knows). Until it
    is known the head has no classifier; `set_labels` builds one when training data name the labels.
    The names are also a buffer of the state dict, and loading a state dict that carries names
    adopts them: `polyhead validate/predict --ckpt_path` then works without `labels` in the config.
    """

    def __init__(self, config: BackboneConfig, labels: list[str], dropout: float) -> None:
        super().__init__()
        self.config, self.labels, self.dropout = config, labels, dropout
        self.classify: PooledClassifierHead | None = None
        self.register_buffer("label_names", encode_names([]))
        if labels:
            self.set_labels(list(labels))

    def set_labels(self, names: list[str]) -> None:
        """Name the classes; a new or resized classifier starts from fresh weights."""
        if self.classify is not None and names == self.labels:
            return
        self.labels[:] = names
        device = self.label_names.device
        self.classify = PooledClassifierHead(self.config, len(names), self.dropout).to(device)
        init_weights(self.classify, self.config)
        self.classify.train(self.training)  # made while loading into an eval-mode model: no dropout
        self.label_names = encode_names(names).to(device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        saved = state_dict.get(prefix + "label_names")
        if saved is not None:
            names = decode_names(saved)
            if self.classify is not None and names != self.labels:
                raise UserError(
                    f"the checkpoint's classifier was trained on labels {names}, but the task's labels are "
                    f"{self.labels}; remove `labels` from the task's settings or make them equal"
                )
            self.set_labels(names)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, pooled: Tensor) -> Tensor:
        """pooled: (B, D) -> logits (B, n_labels)"""
        if self.classify is None:
            raise UserError(
                "the classifier has no label set: give the task's `labels`, train it on labelled data, "
                "or load a trained checkpoint (--ckpt_path)"
            )
        return self.classify(pooled)


class Classify(Task):
    """Single-text or sentence-pair classification (see the module docstring)."""

    stacks = "encoder"
    special_tokens = ("pad", "cls", "sep")
    value_fields = ("label",)

    def __init__(
        self,
        text_fields: Sequence[str] = ("text",),
        labels: Sequence[str | int] | None = None,
        max_length: int = 128,
        label_smoothing: float = 0.0,
        dropout: float = 0.1,
        loss_weight: float = 1.0,
    ) -> None:
        """
        text_fields: the input's text field, or two for a sentence pair (e.g. [text, text_pair];
            map your columns onto them with the source's `columns`).
        labels: the label set, in logit order; None: every label of the training split, sorted.
        max_length: tokens per input, [CLS] and [SEP]s included; longer inputs are cut (a pair's
            longer text first) and the cuts counted.
        label_smoothing: cross-entropy label smoothing (0: none).
        dropout: on the pooled vector before the classifier.
        """
        super().__init__(loss_weight)
        text_fields = tuple(text_fields)
        if (
            len(text_fields) not in (1, 2)
            or len(set(text_fields)) != len(text_fields)
            or "label" in text_fields
        ):
            raise UserError(
                f"Classify.text_fields must be one or two distinct field names other than 'label', got {list(text_fields)}"
            )
        if max_length < 2 * len(text_fields) + 1:
            raise UserError(
                f"Classify.max_length must leave each text a token besides [CLS] and [SEP], got {max_length}"
            )
        if not 0 <= dropout < 1:
            raise UserError(f"Classify.dropout must be in [0, 1), got {dropout}")
        if not 0 <= label_smoothing < 1:
            raise UserError(f"Classify.label_smoothing must be in [0, 1), got {label_smoothing}")
        names = [str(label) for label in labels] if labels is not None else []
        if labels is not None and (len(names) < 2 or len(set(names)) != len(names)):
            raise UserError(f"Classify.labels must name at least 2 distinct labels, got {names}")
        self.fields, self.max_length = text_fields, max_length
        self.label_smoothing, self.dropout = label_smoothing, dropout
        self.labels: list[str] = names  # empty until known; shared with the head
        self.head: LabelledClassifierHead | None = None
        self.majority: str | None = None  # the baseline's answer, from the training labels

    def init_args(self) -> dict:
        return {
            "text_fields": list(self.fields),
            "labels": list(self.labels) or None,
            "max_length": self.max_length,
            "label_smoothing": self.label_smoothing,
            "dropout": self.dropout,
            "loss_weight": self.loss_weight,
        }

    @property
    def monitor(self) -> tuple[str, str]:
        return "f1", "max"

    def build_head(self, config: BackboneConfig) -> nn.Module:
        if not config.pooler:
            raise UserError(
                "task Classify needs model.backbone.pooler: true (it classifies the pooled [CLS])"
            )
        if len(self.fields) == 2 and config.type_vocab_size < 2:
            raise UserError(
                "a sentence-pair Classify task needs model.backbone.type_vocab_size >= 2 (segment ids 0 and 1)"
            )
        check_fits_positions(config, self.max_length, "Classify.max_length")
        self.head = LabelledClassifierHead(config, self.labels, self.dropout)
        return self.head

    # ----- data -----

    def tokenize(self, batch: dict[str, list], tokenizer: Tokenizer) -> dict[str, list]:
        out = {f"{name}_ids": tokenizer.encode(batch[name]) for name in self.fields}
        if "label" in batch:  # a new column: datasets would cast names in `label` back to its int type
            out["label_name"] = [str(label) for label in batch["label"]]
        return out

    def label_ids(self, names: list[str], split: str) -> list[int]:
        """Label names -> logit indices; a name outside the label set stops the run, naming it."""
        if not self.labels:
            raise UserError(
                "task Classify has no label set: give its `labels`, train it, or load a trained checkpoint"
            )
        index = {name: i for i, name in enumerate(self.labels)}
        unknown = Counter(name for name in names if name not in index)
        if unknown:
            found = ", ".join(f"{name!r} ({count}x)" for name, count in sorted(unknown.items()))
            raise UserError(
                f"the {split} data of task Classify has label(s) {found} outside the known labels "
                f"{self.labels}; fix the data, or list every label in the task's `labels`"
            )
        return [index[name] for name in names]

    def learn_labels(self, names: list[str]) -> None:
        """From the training labels: the label set (when not given), the majority class, and a
        warning for given labels that never occur in training."""
        counts = Counter(names)
        if not self.labels:
            if len(counts) < 2:
                raise UserError(
                    f"the train data of task Classify has a single label {sorted(counts)}; classification needs at least 2"
                )
            learned = sorted_labels(counts)
            if self.head is not None:
                self.head.set_labels(learned)
            else:
                self.labels.extend(learned)
            rank_zero_info(f"Classify: {len(learned)} labels from the training data: {learned}")
        self.label_ids(names, "train")
        missing = [label for label in self.labels if not counts[label]]
        if missing:
            rank_zero_warn(
                f"Classify: label(s) {missing} have no training example; the model can hardly learn to predict them"
            )
        self.majority = max(self.labels, key=lambda label: counts[label])

    def build_examples(self, tokenized, tokenizer: Tokenizer, split: str, seed: int) -> list[Example]:
        """Inputs cut to max_length (the cuts counted and reported) with their label names. Labels
        are checked here when the label set is known; otherwise (a run from a checkpoint, whose
        weights bring the labels) when batches are made."""
        names = list(tokenized["label_name"]) if "label_name" in tokenized.column_names else None
        if split == "train":
            self.learn_labels(names)
        elif names is not None and self.labels:
            self.label_ids(names, split)
        columns = [tokenized[f"{name}_ids"] for name in self.fields]
        budget = self.max_length - 1 - len(self.fields)  # [CLS] and one [SEP] per text
        examples, cut = [], 0
        for row, texts in enumerate(zip(*columns, strict=True)):
            a, b = texts[0], texts[1] if len(texts) == 2 else []
            keep_a, keep_b = fit_pair(len(a), len(b), budget)
            cut += keep_a < len(a) or keep_b < len(b)
            pair = np.asarray(b[:keep_b], np.int32) if len(texts) == 2 else None
            examples.append((np.asarray(a[:keep_a], np.int32), pair, names[row] if names else None))
        if cut:
            rank_zero_info(
                f"Classify {split}: cut {cut} of {len(examples)} inputs to max_length={self.max_length} tokens"
            )
        return examples

    def collate(self, examples: list[Example], seeds: list[int], tokenizer: Tokenizer) -> dict[str, Tensor]:
        rows = [
            [
                tokenizer.cls_id,
                *a.tolist(),
                tokenizer.sep_id,
                *([] if b is None else [*b.tolist(), tokenizer.sep_id]),
            ]
            for a, b, _ in examples
        ]
        length = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), length), tokenizer.pad_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros_like(input_ids)  # (B, T)
        token_type_ids = torch.zeros_like(input_ids)  # (B, T): 1 on `b [SEP]`
        for i, (row, (a, _, _)) in enumerate(zip(rows, examples, strict=True)):
            input_ids[i, : len(row)] = torch.tensor(row)
            attention_mask[i, : len(row)] = 1
            token_type_ids[i, len(a) + 2 : len(row)] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        if examples[0][2] is not None:
            batch["labels"] = torch.tensor(self.label_ids([label for _, _, label in examples], "evaluation"))
        return batch

    # ----- model -----

    def forward(self, backbone: Backbone, head: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        hidden = backbone.encode(
            batch["input_ids"], padding_mask(batch), batch["token_type_ids"]
        )  # (B, T, D)
        return {"logits": head(backbone.pool(hidden))}  # (B, n_labels)

    def loss(self, outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> dict[str, Tensor]:
        loss = F.cross_entropy(
            outputs["logits"].float(), batch["labels"], label_smoothing=self.label_smoothing
        )
        return {"loss": loss}

    # ----- evaluation -----

    def metrics(self, vocab_size: int) -> MetricCollection:
        return MetricCollection(
            {
                "loss": MeanMetric(),
                "scores": ClassificationScores(self.labels),
                "baseline_scores": ClassificationScores(self.labels, prefix="baseline_", per_class=False),
            }
        )

    def update_metrics(
        self,
        metrics: MetricCollection,
        outputs: dict[str, Tensor],
        batch: dict[str, Tensor],
        tokenizer: Tokenizer,
    ) -> None:
        if "labels" not in batch:
            return
        labels = batch["labels"]  # (B,)
        metrics["loss"].update(self.loss(outputs, batch)["loss"], weight=len(labels))
        metrics["scores"].update(outputs["logits"].argmax(-1), labels)
        if self.majority is not None:
            metrics["baseline_scores"].update(
                torch.full_like(labels, self.labels.index(self.majority)), labels
            )

    def predict(
        self, outputs: dict[str, Tensor], batch: dict[str, Tensor], tokenizer: Tokenizer
    ) -> list[dict]:
        """Per input: its text(s) as the model read them (after cutting), the most probable label,
        and every label's probability."""
        probabilities = outputs["logits"].float().softmax(-1).tolist()  # (B, n_labels)
        records = []
        for row, probs in enumerate(probabilities):
            real = batch["attention_mask"][row].bool()
            ids, segment = batch["input_ids"][row], batch["token_type_ids"][row]
            first = ids[real & (segment == 0)][1:-1]  # between [CLS] and [SEP]
            record = {self.fields[0]: tokenizer.decode(first.tolist())}
            if len(self.fields) == 2:
                record[self.fields[1]] = tokenizer.decode(ids[real & (segment == 1)][:-1].tolist())
            record["label"] = self.labels[int(np.argmax(probs))]
            record["probabilities"] = {
                label: round(p, 4) for label, p in zip(self.labels, probs, strict=True)
            }
            records.append(record)
        return records
