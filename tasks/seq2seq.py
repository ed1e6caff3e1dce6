"""T5-style text-to-text on the encoder-decoder backbone.

The encoder reads the prompt ("summarize: <article>"); the decoder learns the target by teacher
forcing: its input is the target shifted right behind a start token (<s>), so position t sees
target tokens before t only and predicts token t. The loss is cross-entropy over the target's
real tokens (padding ignored), optionally label-smoothed. Evaluation also generates from the
prompt alone (modules/generation.py) and scores the text.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import Tensor, nn

from datamodules.tokenizer import Tokenizer
from modules.backbone import Backbone
from modules.generation import generate
from tasks.generative import IGNORE, START_ID, GenerativeTask, pad_rows


class Seq2Seq(GenerativeTask):
    """Encoder-decoder text-to-text with a task prefix (see the module docstring)."""

    stacks = "encoder-decoder"

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
            shifted = [np.concatenate([[START_ID], t[:-1]]) for t in targets]
            batch["decoder_input_ids"], batch["decoder_attention_mask"] = pad_rows(shifted, tokenizer.pad_id)
            labels, real = pad_rows(targets, tokenizer.pad_id)
            batch["labels"] = labels.masked_fill(real == 0, IGNORE)  # (B, T)
        if "references" in examples[0]:
            batch["references"] = [e["references"] for e in examples]
        return batch

    def forward(self, backbone: Backbone, head: nn.Module, batch: dict) -> dict[str, Tensor]:
        memory = backbone.encode(batch["input_ids"], batch["attention_mask"])  # (B, S, D)
        outputs: dict[str, Tensor] = {}
        if "labels" in batch:
            hidden = backbone.decode(
                batch["decoder_input_ids"], batch["decoder_attention_mask"], memory, batch["attention_mask"]
            )  # (B, T, D)
            selected = batch["labels"] != IGNORE
            outputs["logits"] = head(hidden[selected], backbone.token_embedding)  # (N, V)
        if not backbone.training:
            result = generate(
                backbone,
                lambda h: head(h, backbone.token_embedding),
                batch["input_ids"],
                batch["attention_mask"],
                self.decoding,
                start_id=START_ID,
                memory=memory,
            )
            outputs["generated"] = result.tokens
            if result.scores is not None:
                outputs["scores"] = result.scores
        return outputs
