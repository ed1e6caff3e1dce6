"""What text-to-text tasks share: prompts from templates, targets, generation, ROUGE / BLEU.

A generative task reads one or more input fields and a `target` field, writes the input as a
prompt through a template (T5's task prefixes: "summarize: {source}"), and learns to produce the
target. Two architectures implement it on the shared backbone: `Seq2Seq` (encoder-decoder) and
`PrefixLM` (decoder only, `ARTICLE </s> SUMMARY </s>`). Validation generates with the task's
decoding settings and scores the outputs against every reference with ROUGE (and BLEU for
translation), next to the lead-1 baseline: the first sentence of the input text as the output.
"""

from __future__ import annotations

import dataclasses
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric, MetricCollection
from torchmetrics.text import SacreBLEUScore

from datamodules.sources import texts_of
from datamodules.tokenizer import Tokenizer
from modules.config import BackboneConfig
from modules.errors import UserError
from modules.generation import GenerationConfig
from modules.heads import LanguageModelHead
from tasks.base import Task, at_positions, label_positions
from tasks.metrics import RougeScore, SquadScore
from tasks.sentences import split_sentences

IGNORE = -100
PREFIXES = {
    "summarize": "summarize: {source}",
    "translate English to German": "translate English to German: {source}",
    "translate English to French": "translate English to French: {source}",
    "translate English to Romanian": "translate English to Romanian: {source}",
    "question": "question: {question}",
    "question with context": "question: {question} context: {context}",
    "none": "{source}",
}
"""T5's task prefixes by name; `template` takes any other."""
SAMPLE_ROWS = 8  # (input, reference, output) rows kept per evaluation for the W&B table


def template_fields(template: str) -> tuple[str, ...]:
    """The `{field}` names a template fills in, in order of first use."""
    names = [name for _, name, _, _ in string.Formatter().parse(template) if name]
    bad = [n for n in names if not re.fullmatch(r"[A-Za-z_]\w*", n)]
    if bad or not names:
        raise UserError(
            f"template {template!r} needs at least one {{field}} and plain field names, got {names or 'none'}"
        )
    return tuple(dict.fromkeys(names))


def pad_rows(rows: list[np.ndarray | list[int]], pad: int, left: bool = False) -> tuple[Tensor, Tensor]:
    """Token rows -> (ids (B, L), attention mask (B, L)), padded on the right (or the left)."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row)
        span = slice(length - n, length) if left else slice(0, n)
        ids[i, span], mask[i, span] = torch.as_tensor(row, dtype=torch.long), 1
    return ids, mask


TEXT_METRICS: dict[str, tuple[Callable[[str], Metric], str]] = {
    "rouge": (lambda prefix: RougeScore(prefix=prefix), "rougeL"),
    "bleu": (lambda prefix: SacreBLEUScore(), "bleu"),  # one value, named by its collection key
    "squad": (lambda prefix: SquadScore(prefix=prefix), "f1"),
}
"""Text metrics a generative task may report: name -> (factory taking a result-name prefix, main score)."""


@dataclass
class Truncations:
    """How many inputs and targets of a split were cut to fit, reported once per split."""

    inputs: int = 0
    targets: int = 0
    examples: int = 0


class GenerativeTask(Task):
    """Shared by Seq2Seq and PrefixLM: templates, tokenization of targets, evaluation by generation."""

    special_tokens = ("pad", "eos")

    def __init__(
        self,
        prefix: str = "summarize",
        template: str | None = None,
        max_source_length: int = 512,
        max_target_length: int = 128,
        label_smoothing: float = 0.0,
        metrics: Sequence[Literal["rouge", "bleu", "squad"]] = ("rouge",),
        generation: GenerationConfig = GenerationConfig(),
        loss_weight: float = 1.0,
    ) -> None:
        """
        prefix: the task prefix by name, one of PREFIXES ("summarize", "translate English to German",
            "question", "question with context", "none", ...); its template fills the input fields.
        template: your own prompt template instead, e.g. "headline: {body}"; its {fields} are read
            from the source (map columns onto them with the source's `columns`).
        max_source_length: tokens of the input (with </s>); longer inputs are cut and counted.
        max_target_length: tokens of the target (with </s>); longer targets are cut and counted.
        label_smoothing: cross-entropy label smoothing (0: none).
        metrics: what validation reports beside the loss: "rouge" (1, 2, L, Lsum), "bleu" and/or
            "squad" (SQuAD v1.1 exact match and F1, for questions answered as text); the first
            one's main score is the task's checkpointing monitor.
        generation: decoding for validation, test and predict (greedy, beam, sampling).
        """
        super().__init__(loss_weight)
        if template is None:
            if prefix not in PREFIXES:
                raise UserError(
                    f"unknown task prefix {prefix!r}; known prefixes: {', '.join(map(repr, PREFIXES))} "
                    "(or set `template` to your own, e.g. 'headline: {{body}}')"
                )
            template = PREFIXES[prefix]
        self.prefix, self.template = prefix, template
        self.input_fields = template_fields(template)
        if "target" in self.input_fields:
            raise UserError(f"template {template!r} uses {{target}}, the field the model must produce")
        unknown = sorted(set(metrics) - set(TEXT_METRICS))
        if unknown or not metrics:
            raise UserError(
                f"metrics must be a non-empty list from {', '.join(map(repr, TEXT_METRICS))}, got {list(metrics)}"
            )
        if not 0 <= label_smoothing < 1:
            raise UserError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if max_target_length < 2 or max_source_length < 2:
            raise UserError("max_source_length and max_target_length must be at least 2 (a token and </s>)")
        if isinstance(generation, dict):  # rebuilt from a checkpoint's plain settings
            generation = GenerationConfig(**generation)
        if generation.eos_id is not None or generation.pad_id != GenerationConfig.pad_id:
            raise UserError(
                "generation.eos_id and generation.pad_id come from the tokenizer; leave them unset"
            )
        self.max_source_length, self.max_target_length = max_source_length, max_target_length
        self.label_smoothing, self.metric_names = label_smoothing, tuple(metrics)
        self.generation = generation
        self.fields = (*self.input_fields, "target")
        self.list_fields = (
            self.fields
        )  # inputs given as lists of sentences are joined; targets are references
        self.samples: list[list[str]] = []

    def init_args(self) -> dict:
        return {
            "prefix": self.prefix,
            "template": self.template if self.template != PREFIXES.get(self.prefix) else None,
            "max_source_length": self.max_source_length,
            "max_target_length": self.max_target_length,
            "label_smoothing": self.label_smoothing,
            "metrics": list(self.metric_names),
            "generation": dataclasses.asdict(self.generation),  # eos_id / pad_id unset: the tokenizer's
            "loss_weight": self.loss_weight,
        }

    @property
    def predict_fields(self) -> tuple[str, ...]:
        return self.input_fields

    @property
    def monitor(self) -> tuple[str, str]:
        return TEXT_METRICS[self.metric_names[0]][1], "max"

    def build_head(self, config: BackboneConfig) -> nn.Module:
        return LanguageModelHead(config)

    def use_tokenizer(self, tokenizer: Tokenizer, name: str) -> None:
        """Generation stops at the tokenizer's </s> and pads with its pad."""
        super().use_tokenizer(tokenizer, name)
        self.decoding = dataclasses.replace(self.generation, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)

    # ----- data -----

    def prompt(self, example: dict) -> str:
        """The input fields of one example written through the template (lists of texts joined)."""
        return self.template.format(**{f: " ".join(texts_of(example[f])) for f in self.input_fields})

    def prompt_ids(self, prompts: list[str], tokenizer: Tokenizer) -> list[list[int]]:
        """Written prompts -> their token ids, before the cut to max_source_length and its </s>."""
        return tokenizer.encode(prompts)

    def tokenize(self, batch: dict[str, list], tokenizer: Tokenizer) -> dict[str, list]:
        rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
        prompts = [self.prompt(row) for row in rows]
        out = {"prompt": prompts, "source_ids": self.prompt_ids(prompts, tokenizer)}
        lead = self.input_fields[-1]  # the main text: source, or the context of a question
        out["lead"] = [next(iter(split_sentences(" ".join(texts_of(row[lead])))), "") for row in rows]
        if "target" in batch:
            references = [[t.strip() for t in texts_of(value) if t.strip()] for value in batch["target"]]
            out["references"] = references
            out["target_ids"] = [tokenizer.encode(refs) for refs in references]
        return out

    def cut(self, ids: Sequence[int], limit: int, eos_id: int) -> tuple[list[int], bool]:
        """ids -> (at most `limit` tokens ending in </s>, whether anything was cut)."""
        return [*ids[: limit - 1], eos_id], len(ids) > limit - 1

    def build_examples(self, tokenized, tokenizer: Tokenizer, split: str, seed: int) -> list[dict[str, Any]]:
        """Prompts and targets cut to their lengths (the cuts counted and reported). Training: one
        example per reference (each is a correct output); evaluation: one per input, scored
        against all its references; predict: prompts alone."""
        counts, examples = Truncations(), []
        for row in tokenized:
            prompt, cut_prompt = self.cut(row["source_ids"], self.max_source_length, tokenizer.eos_id)
            counts.examples += 1
            counts.inputs += cut_prompt
            example = {
                "prompt_ids": np.asarray(prompt, np.int32),
                "prompt": row["prompt"],
                "lead": row["lead"],
            }
            if "target_ids" not in row:
                examples.append(example)
                continue
            targets = []
            for ids in row["target_ids"]:
                target, cut_target = self.cut(ids, self.max_target_length, tokenizer.eos_id)
                counts.targets += cut_target
                targets.append(np.asarray(target, np.int32))
            if split == "train":
                examples.extend(example | {"target": t} for t in targets)
            else:
                examples.append(example | {"target": targets[0], "references": row["references"]})
        if counts.inputs or counts.targets:
            rank_zero_info(
                f"{type(self).__name__} {split}: cut {counts.inputs} of {counts.examples} inputs to "
                f"max_source_length={self.max_source_length} and {counts.targets} targets to "
                f"max_target_length={self.max_target_length} tokens"
            )
        return examples

    def example_length(self, example: dict[str, Any]) -> int:
        return len(example["prompt_ids"]) + len(example["target"])

    # ----- evaluation -----

    @staticmethod
    def with_label_positions(batch: dict[str, Any]) -> dict[str, Any]:
        """The batch with label_positions (N,): where its (R, T) labels are not IGNORE, flattened
        (see `label_positions`); the logits of a training step are computed there only."""
        return batch | {"label_positions": label_positions(batch["labels"], IGNORE)}

    def target_loss(self, head: nn.Module, hidden: Tensor, token_embedding: Tensor, batch: dict) -> Tensor:
        """(N, D) decoder states at the target positions -> the mean cross-entropy of their
        next-token predictions, without the (N, V) logits (LanguageModelHead.loss)."""
        targets = at_positions(batch["labels"], batch["label_positions"])  # (N,)
        return head.loss(hidden, token_embedding, targets, self.label_smoothing)

    def loss(self, outputs: dict[str, Tensor], batch: dict) -> dict[str, Tensor]:
        return {"loss": outputs["target_loss"]}

    def update_metrics(
        self, metrics: MetricCollection, outputs: dict[str, Tensor], batch: dict, tokenizer: Tokenizer
    ) -> None:
        if "labels" not in batch:
            return
        n_tokens = len(batch["label_positions"])
        metrics["loss"].update(self.loss(outputs, batch)["loss"], weight=n_tokens)
        n = self.generation.num_return_sequences
        self.score_outputs(metrics, self.decode_rows(outputs["generated"][::n], tokenizer), batch)

    def metrics(self, vocab_size: int) -> MetricCollection:
        metrics: dict[str, nn.Module] = {"loss": MeanMetric()}
        for name in self.metric_names:
            make = TEXT_METRICS[name][0]
            metrics |= {name: make(""), f"baseline_{name}": make("baseline_")}
        return MetricCollection(metrics)

    def score_outputs(self, metrics: MetricCollection, outputs: list[str], batch: dict) -> None:
        """Generated texts of one evaluation batch -> each text metric against every reference, the
        lead-1 baseline likewise, and the first rows kept for the W&B samples table."""
        references, lead = batch["references"], batch["lead"]
        for name in self.metric_names:
            metrics[name].update(outputs, references)
            metrics[f"baseline_{name}"].update(lead, references)
        room = SAMPLE_ROWS - len(self.samples)
        for prompt, refs, output in list(zip(batch["prompt"], references, outputs, strict=True))[:room]:
            self.samples.append([prompt, refs[0], output])

    def take_samples(self) -> tuple[list[str], list[list[str]]] | None:
        rows, self.samples = self.samples, []
        return (["input", "reference", "generated"], rows) if rows else None

    def decode_rows(self, tokens: Tensor, tokenizer: Tokenizer) -> list[str]:
        """(N, L) generated ids, padded after </s> -> N texts."""
        texts = []
        for row in tokens.tolist():
            if tokenizer.eos_id in row:
                row = row[: row.index(tokenizer.eos_id)]
            texts.append(tokenizer.decode([t for t in row if t != tokenizer.pad_id]))
        return texts

    def predict(self, outputs: dict[str, Tensor], batch: dict, tokenizer: Tokenizer) -> list[dict]:
        """One record per input: the prompt and its generation(s) (n-best when num_return_sequences > 1)."""
        texts = self.decode_rows(outputs["generated"], tokenizer)
        n = self.generation.num_return_sequences
        records = []
        for row, prompt in enumerate(batch["prompt"]):
            mine = texts[row * n : (row + 1) * n]
            record = {"input": prompt, "generated": mine[0] if n == 1 else mine}
            if "scores" in outputs and n > 1:
                record["scores"] = [round(s, 4) for s in outputs["scores"][row * n : (row + 1) * n].tolist()]
            records.append(record)
        return records
