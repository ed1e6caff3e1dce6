"""Runs from a checkpoint `polyhead convert` imported from a tiny HF BERT (tests/hf_models.py): it
fine-tunes on classification with --model.init_from alone and exports as a BertModel; validate
takes it with --ckpt_path over a config that names another architecture."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from datamodules.tokenizer import HFTokenizer
from experiments.cli import run
from modules.checkpoint import read_checkpoint
from modules.model import MultiTaskModel

from .convert_cli import bert_batch, polyhead
from .hf_models import ATOL, RTOL, loaded_cleanly, transformers
from .hf_tokenizers import SENTENCES

pytestmark = pytest.mark.usefixtures("one_thread")


def one_task_config(task: str, task_class: str, train: Path, validation: Path, batch_size: int) -> dict:
    """The model and data sections of a run config: one task (max_length 32) reading the source named
    after it."""
    return {
        "model": {"tasks": {task: {"class_path": task_class, "init_args": {"max_length": 32}}}},
        "data": {
            "sources": {task: {"path": str(train), "validation_path": str(validation)}},
            "batch_size": batch_size,
        },
    }


def test_imported_bert_fine_tunes_on_classification_with_its_architecture_and_tokenizer(
    bert_dir, tmp_path, caplog, capsys
):
    """--model.init_from alone: no backbone typed out; a dropout override still applies; the run's
    checkpoint exports as a BertModel whose outputs are polyhead's."""
    polyhead("convert", str(bert_dir), str(tmp_path / "bert.ckpt"))
    rows = [{"text": s, "label": "long" if len(s) > 50 else "short"} for s in SENTENCES]
    for split in ("train", "val"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = one_task_config("sst2", "Classify", tmp_path / "train.jsonl", tmp_path / "val.jsonl", 3) | {
        "trainer": {"max_steps": 2, "logger": False, "limit_val_batches": 1, "enable_progress_bar": False},
        "checkpoint": {"dirpath": str(tmp_path / "run"), "monitor": None},
    }
    (tmp_path / "fit.yaml").write_text(json.dumps(config))
    with caplog.at_level(logging.INFO):
        polyhead(
            "fit", "--config", str(tmp_path / "fit.yaml"), "--model.init_from", str(tmp_path / "bert.ckpt"),
            "--model.backbone.dropout", "0.0",
        )  # fmt: skip
    converted_checkpoint = read_checkpoint(tmp_path / "bert.ckpt")
    backbone_tensors = sum(k.startswith("backbone.") for k in converted_checkpoint["state_dict"])
    assert f"{backbone_tensors} loaded" in caplog.text and "0 mismatched" in caplog.text  # the whole backbone
    assert "unexpected heads.mlm_nsp.nsp.classifier.weight" in caplog.text  # the table names the rest
    converted = converted_checkpoint["polyhead"]
    trained = read_checkpoint(tmp_path / "run" / "last.ckpt")
    expected = converted["backbone"] | {"dropout": 0.0}
    assert trained["polyhead"]["backbone"] == expected
    assert trained["polyhead"]["tokenizer"] == converted["tokenizer"]

    polyhead("convert", "--to-hf", str(tmp_path / "run" / "last.ckpt"), str(tmp_path / "hf"))
    assert "bert (BertModel)" in capsys.readouterr().out
    hf = loaded_cleanly(transformers.BertModel, tmp_path / "hf")
    ours = MultiTaskModel.from_checkpoint(tmp_path / "run" / "last.ckpt")
    batch = bert_batch(ours.tokenizer, [(SENTENCES[5], SENTENCES[2])])
    with torch.no_grad():
        hidden = ours.backbone.encode(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        theirs = hf(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            token_type_ids=batch["token_type_ids"],
        )
    torch.testing.assert_close(hidden, theirs.last_hidden_state, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(ours.backbone.pool(hidden), theirs.pooler_output, atol=ATOL, rtol=RTOL)


def test_validate_runs_a_converted_bert_where_the_config_names_another_backbone(bert_dir, tmp_path):
    """--ckpt_path with `--model.backbone null` over a config that names an architecture: the
    checkpoint's architecture, its MLM/NSP heads loaded strictly by Lightning, its tokenizer."""
    polyhead("convert", str(bert_dir), str(tmp_path / "bert.ckpt"))
    documents = [{"text": " ".join(SENTENCES[i : i + 3])} for i in range(4)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in documents))
    config = one_task_config(
        "mlm_nsp", "MaskedLMNextSentence", tmp_path / "docs.jsonl", tmp_path / "docs.jsonl", 4
    )
    config["model"]["backbone"] = {"d_model": 256, "n_heads": 4}  # a from-scratch config's architecture
    config["trainer"] = {"logger": False, "enable_progress_bar": False}
    (tmp_path / "validate.yaml").write_text(json.dumps(config))
    cli = run(
        [
            "validate",
            "--config",
            str(tmp_path / "validate.yaml"),
            "--ckpt_path",
            str(tmp_path / "bert.ckpt"),
            "--model.backbone",
            "null",
        ]
    )
    assert cli.model.backbone_config.d_model == 32 and isinstance(cli.model.tokenizer, HFTokenizer)
    assert 0 < cli.trainer.callback_metrics["val/mlm_nsp/mlm_loss"] < 20
