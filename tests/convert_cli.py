"""What the `polyhead convert` test files share: the command run in this process, its one-line
refusals, MLM/NSP batches of real token ids that a converted BERT and HF's both read, and for the
decoder-only families a short summarizer fine-tune and the logits to compare."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import Tensor

from experiments.cli import main
from tasks.base import label_positions
from tasks.generative import IGNORE


def polyhead(*args: str) -> None:
    """`polyhead ARGS` in this process; a user mistake raises SystemExit with its one-line message."""
    main(list(args))


def fails(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        polyhead(*args)
    message = str(exit_info.value.code)
    assert exit_info.value.code not in (0, None)
    assert message.startswith("polyhead: error:") and "\n" not in message, message
    assert "Traceback" not in capsys.readouterr().err
    return message


def bert_batch(tokenizer, pairs: list[tuple[str, str]]) -> dict[str, Tensor]:
    """[CLS] A [SEP] B [SEP] rows of real token ids, right-padded, with segments, every real position
    a masked-LM target (so the task's forward returns logits at all of them)."""
    rows = []
    for a, b in pairs:
        ids_a, ids_b = tokenizer.encode([a, b])
        rows.append(([tokenizer.cls_id, *ids_a, tokenizer.sep_id], [*ids_b, tokenizer.sep_id]))
    length = max(len(a) + len(b) for a, b in rows)
    input_ids = torch.full((len(rows), length), tokenizer.pad_id)
    token_type_ids = torch.zeros_like(input_ids)
    attention_mask = torch.zeros_like(input_ids)
    for i, (a, b) in enumerate(rows):
        input_ids[i, : len(a) + len(b)] = torch.tensor(a + b)
        token_type_ids[i, len(a) : len(a) + len(b)] = 1
        attention_mask[i, : len(a) + len(b)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE)
    return {
        "input_ids": input_ids,
        "token_type_ids": token_type_ids,
        "attention_mask": attention_mask,
        "mlm_labels": labels,
        "mlm_positions": label_positions(labels),
        "nsp_labels": torch.zeros(len(rows), dtype=torch.long),
        "task": "mlm_nsp",
    }


def fine_tune_summarizer(checkpoint: Path, rows: list[dict], tmp_path: Path, *overrides: str) -> Path:
    """Three PrefixLM steps (task `summarize`) on `rows` from `checkpoint` by --model.init_from alone,
    with `overrides` on the command line. -> the run's last.ckpt"""
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = {"max_source_length": 40, "max_target_length": 16, "generation": {"max_new_tokens": 8}}
    source = {"path": str(tmp_path / "rows.jsonl"), "validation_path": str(tmp_path / "rows.jsonl")}
    config = {
        "model": {"tasks": {"summarize": {"class_path": "PrefixLM", "init_args": task}}},
        "data": {"sources": {"summarize": source}, "batch_size": 3},
        "trainer": {"max_steps": 3, "logger": False, "limit_val_batches": 1, "enable_progress_bar": False},
        "checkpoint": {"dirpath": str(tmp_path / "run"), "monitor": None},
    }
    (tmp_path / "fit.yaml").write_text(json.dumps(config))
    polyhead("fit", "--config", str(tmp_path / "fit.yaml"), "--model.init_from", str(checkpoint), *overrides)
    return tmp_path / "run" / "last.ckpt"


def decoder_logits(backbone, head, ids: Tensor, mask: Tensor | None = None) -> Tensor:
    """(B, T) -> (B, T, V) next-token logits of a decoder-only polyhead backbone and its LM head."""
    return head(backbone.decode(ids, mask), backbone.token_embedding)
