"""T5-style text-to-text on the encoder-decoder backbone.

The encoder reads the prompt ("summarize: <article>"); the decoder learns the target by teacher
forcing: its input is the target shifted right behind the tokenizer's decoder start token (<s>
in polyhead's vocabularies, <pad> in T5's), so position t sees target tokens before t only and
predicts token t. The loss is cross-entropy over the target's real tokens (padding ignored),
optionally label-smoothed. Evaluation also generates from the prompt alone
(modules/generation.py) and scores the text. With `copy`, a pointer-generator head
(modules/heads.py) lets the decoder copy source tokens as well as generate them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch.nn.functional as F
from torch import Tensor, nn

from datamodules.padding import padding_mask
from datamodules.tokenizer import Tokenizer
from modules.backbone import Backbone
from modules.config import BackboneConfig
from modules.generation import GenerationConfig, generate
from modules.heads import PointerGeneratorHead
from tasks.base import at_positions, check_fits_positions
from tasks.generative import IGNORE, GenerativeTask, pad_rows


class Seq2Seq(GenerativeTask):
    """Encoder-decoder text-to-text with a task prefix (see the module docstring)."""

    stacks = "encoder-decoder"
    special_tokens = ("pad", "eos", "start")

    def __init__(
        self,
        prefix: str = "summarize",
        template: str | None = None,
        max_source_length: int = 512,
        max_target_length: int = 128,
        label_smoothing: float = 0.0,
        metrics: Sequence[Literal["rouge", "bleu", "squad"]] = ("rouge",),
        generation: GenerationConfig = GenerationConfig(),
        copy: bool = False,
        loss_weight: float = 1.0,
    ) -> None:
        """
        copy: predict with a pointer-generator head, which mixes the vocabulary softmax with copying
            source tokens (summaries reuse the article's words; a copied word needs no learning).
        The other arguments are those of every generative task (tasks/generative.py).
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
        self.copy = copy

    def init_args(self) -> dict:
        return super().init_args() | {"copy": self.copy}

    def build_head(self, config: BackboneConfig) -> nn.Module:
        check_fits_positions(config, self.max_source_length, "Seq2Seq.max_source_length")
        check_fits_positions(config, self.max_target_length, "Seq2Seq.max_target_length")
        return PointerGeneratorHead(config) if self.copy else super().build_head(config)

    def use_tokenizer(self, tokenizer: Tokenizer, name: str) -> None:
        super().use_tokenizer(tokenizer, name)
        self.start_id = tokenizer.start_id  # generation's first decoder input

    def collate(self, examples: list[dict], seeds: list[int], tokenizer: Tokenizer) -> dict[str, Any]:
        input_ids, attention_mask = pad_rows([e["prompt_ids"] for e in examples], tokenizer.pad_id)
        batch: dict[str, Any] = {
            "input_ids": input_ids,  # (B, S)
            "attention_mask": attention_mask,
            "prompt": [e["prompt"] for e in examples],
            "lead": [e["lead"] for e in examples],
        }
        if "target" in examples[0]:
            targets = [e["target"] for e in examples]
            shifted = [np.concatenate([[tokenizer.start_id], t[:-1]]) for t in targets]
            batch["decoder_input_ids"], batch["decoder_attention_mask"] = pad_rows(shifted, tokenizer.pad_id)
            labels, real = pad_rows(targets, tokenizer.pad_id)
            batch["labels"] = labels.masked_fill(real == 0, IGNORE)  # (B, T)
            batch = self.with_label_positions(batch)
        if "references" in examples[0]:
            batch["references"] = [e["references"] for e in examples]
        return batch

    def forward(self, backbone: Backbone, head: nn.Module, batch: dict) -> dict[str, Tensor]:
        memory = backbone.encode(batch["input_ids"], padding_mask(batch))  # (B, S, D)
        source = (batch["attention_mask"], batch["input_ids"])  # what the copy head copies from
        outputs: dict[str, Tensor] = {}
        if "labels" in batch:
            hidden = backbone.decode(
                batch["decoder_input_ids"],
                padding_mask(batch, "decoder_attention_mask"),
                memory,
                padding_mask(batch),
            )  # (B, T, D)
            if self.copy:  # the copy head needs every row's positions to attend over its source
                log_probs = at_positions(
                    head(hidden, backbone.token_embedding, memory, *source), batch["label_positions"]
                )  # (N, V)
                targets = at_positions(batch["labels"], batch["label_positions"])  # (N,)
                outputs["target_loss"] = F.cross_entropy(
                    log_probs, targets, label_smoothing=self.label_smoothing
                )
            else:
                outputs["target_loss"] = self.target_loss(
                    head, at_positions(hidden, batch["label_positions"]), backbone.token_embedding, batch
                )
        if not backbone.training:
            result = generate(
                backbone,
                self._projection(backbone, head, memory, source),
                batch["input_ids"],
                batch["attention_mask"],
                self.decoding,
                start_id=self.start_id,
                memory=memory,
            )
            outputs["generated"] = result.tokens
            if result.scores is not None:
                outputs["scores"] = result.scores
        return outputs

    def _projection(self, backbone: Backbone, head: nn.Module, memory: Tensor, source: tuple[Tensor, Tensor]):
        """Decoder states (N, D) -> next-token scores (N, V), as `generate` calls it.

        generate keeps the N = B * n rows of a batch grouped by source (n beams or samples each, in
        order), so for the copy head the n rows of source b are n queries against memory b.
        """
        if not self.copy:
            return lambda hidden: head(hidden, backbone.token_embedding)

        def copy_or_generate(hidden: Tensor) -> Tensor:
            b = memory.size(0)
            queries = hidden.view(b, hidden.size(0) // b, hidden.size(-1))  # (B, n, D)
            return head(queries, backbone.token_embedding, memory, *source).flatten(0, 1)  # (N, V)

        return copy_or_generate
