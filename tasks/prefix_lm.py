"""A decoder-only summarizer: `ARTICLE </s> SUMMARY </s>` through the causal decoder stack.

One sequence holds the prompt, a </s> separator and the summary; the decoder predicts every next
token under the causal mask. By default only the summary's predictions (its tokens and its final
</s>) count in the loss, so the model is taught to summarize rather than to write articles;
`loss_on: all` trains on every next token (the full language-model loss). To summarize, the
prompt and its </s> are fed alone, left-padded so every row's next token lands in the same
column, and the continuation up to </s> is the summary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from torch import Tensor, nn

from datamodules.padding import padding_mask
from datamodules.tokenizer import Tokenizer
from modules.backbone import Backbone
from modules.config import BackboneConfig
from modules.errors import UserError
from modules.generation import GenerationConfig, generate
from tasks.base import at_positions, check_fits_positions, packed_rows
from tasks.generative import IGNORE, GenerativeTask, pad_rows


class PrefixLM(GenerativeTask):
    """Decoder-only text-to-text with the loss on the target (see the module docstring)."""

    stacks = "decoder"

    def __init__(
        self,
        prefix: str = "summarize",
        template: str | None = None,
        max_source_length: int = 384,
        max_target_length: int = 128,
        label_smoothing: float = 0.0,
        metrics: Sequence[Literal["rouge", "bleu", "squad"]] = ("rouge",),
        generation: GenerationConfig = GenerationConfig(),
        loss_on: Literal["target", "all"] = "target",
        pack: bool = False,
        loss_weight: float = 1.0,
    ) -> None:
        """
        loss_on: "target" (the summary's tokens only) or "all" (every next token, article included).
        max_source_length + max_target_length must fit the backbone's max_len (one sequence holds
        both). pack: training sequences share rows of max_source_length + max_target_length tokens,
        each attending only to itself with positions from 0 (Backbone.decode's document_ids): the
        same loss with less padding. The other arguments are those of every generative task
        (tasks/generative.py).
        """
        super().__init__(
            prefix,
            template,
            max_source_length,
            max_target_length,
            label_smoothing,
            metrics,
            generation,
            loss_weight,
        )
        if loss_on not in ("target", "all"):
            raise UserError(f"PrefixLM.loss_on must be 'target' or 'all', got {loss_on!r}")
        self.loss_on, self.pack = loss_on, pack

    def init_args(self) -> dict:
        return super().init_args() | {"loss_on": self.loss_on, "pack": self.pack}

    def prompt_ids(self, prompts: list[str], tokenizer: Tokenizer) -> list[list[int]]:
        """The vocabulary's beginning-of-text token (an imported LLaMA's <s>) in front of each prompt,
        where it has one: the model read every text so in pretraining."""
        ids = tokenizer.encode(prompts)
        return ids if tokenizer.bos_id is None else [[tokenizer.bos_id, *row] for row in ids]

    def build_head(self, config: BackboneConfig) -> nn.Module:
        check_fits_positions(
            config,
            self.max_source_length + self.max_target_length,
            "PrefixLM.max_source_length + max_target_length",
        )
        return super().build_head(config)

    def collate(self, examples: list[dict], seeds: list[int], tokenizer: Tokenizer) -> dict[str, Any]:
        batch: dict[str, Any] = {
            "prompt": [e["prompt"] for e in examples],
            "lead": [e["lead"] for e in examples],
        }
        if "target" in examples[0]:
            sequences, labels = [], []
            for e in examples:
                sequence = np.concatenate([e["prompt_ids"], e["target"]])  # ARTICLE </s> SUMMARY </s>
                next_tokens = sequence[1:].astype(np.int64)  # position t predicts token t + 1
                if self.loss_on == "target":
                    next_tokens[: len(e["prompt_ids"]) - 1] = IGNORE  # predictions of the article itself
                sequences.append(sequence[:-1])
                labels.append(next_tokens)
            rows = [[i] for i in range(len(examples))]
            if self.pack:
                rows = packed_rows(
                    [len(s) for s in sequences], self.max_source_length + self.max_target_length
                )
                batch["document_ids"], _ = pad_rows(
                    [
                        np.concatenate([np.full(len(sequences[i]), d) for d, i in enumerate(row)])
                        for row in rows
                    ],
                    0,
                )  # (R, T); padding joins document 0, masked
            sequences, labels = (
                [np.concatenate([part[i] for i in row]) for row in rows] for part in (sequences, labels)
            )
            batch["input_ids"], batch["attention_mask"] = pad_rows(sequences, tokenizer.pad_id)  # (R, T)
            padded, real = pad_rows(labels, tokenizer.pad_id)
            batch["labels"] = padded.masked_fill(real == 0, IGNORE)  # (R, T)
            batch = self.with_label_positions(batch)
        if "target" not in examples[0] or "references" in examples[0]:  # it will generate
            batch["prompt_ids"], batch["prompt_attention_mask"] = pad_rows(
                [e["prompt_ids"] for e in examples], tokenizer.pad_id, left=True
            )  # (B, P)
        if "references" in examples[0]:
            batch["references"] = [e["references"] for e in examples]
        return batch

    def forward(self, backbone: Backbone, head: nn.Module, batch: dict) -> dict[str, Tensor]:
        outputs: dict[str, Tensor] = {}
        if "labels" in batch:
            hidden = backbone.decode(
                batch["input_ids"], padding_mask(batch), document_ids=batch.get("document_ids")
            )  # (R, T, D)
            outputs["target_loss"] = self.target_loss(
                head, at_positions(hidden, batch["label_positions"]), backbone.token_embedding, batch
            )
        if not backbone.training and "prompt_ids" in batch:  # evaluation or predict data
            result = generate(
                backbone,
                lambda h: head(h, backbone.token_embedding),
                batch["prompt_ids"],
                batch["prompt_attention_mask"],
                self.decoding,
            )
            outputs["generated"] = result.tokens
            if result.scores is not None:
                outputs["scores"] = result.scores
        return outputs
