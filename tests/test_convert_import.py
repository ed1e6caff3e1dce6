"""`polyhead convert` HF -> polyhead: tiny HF BertForPreTraining and T5ForConditionalGeneration
directories (tests/hf_models.py, with tokenizers built in the test) become polyhead checkpoints whose
outputs equal HF's on real token ids from the converted tokenizer; also from a tokenizer.json alone
and from the hub cache; bad sources end in one line and write nothing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from datamodules.tokenizer import HFTokenizer, SentencePieceTokenizer
from modules.checkpoint import read_checkpoint
from modules.model import MultiTaskModel
from tasks.generative import IGNORE
from tasks.mlm_nsp import MaskedLMNextSentence

from .conftest import ROOT, offline_env
from .convert_cli import bert_batch, fails, polyhead
from .hf_models import ATOL, RTOL, transformers
from .hf_tokenizers import SENTENCES

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bert_converts_with_its_tokenizer_and_computes_what_hf_computes(bert_dir, tmp_path, capsys):
    out = tmp_path / "bert.ckpt"
    polyhead("convert", str(bert_dir), str(out))
    report = capsys.readouterr().out
    assert "bert (BertForPreTraining)" in report and "tokenizers (WordPiece, tokenizer.json)" in report
    assert "mlm_nsp (MaskedLMNextSentence)" in report and str(out) in report

    model = MultiTaskModel.from_checkpoint(out)
    tokenizer = model.tokenizer
    assert isinstance(tokenizer, HFTokenizer) and isinstance(model.tasks["mlm_nsp"], MaskedLMNextSentence)
    theirs_tokenizer = transformers.AutoTokenizer.from_pretrained(bert_dir)
    for text in [*SENTENCES, "An UNSEEN sentence, with Çafé accents."]:
        ids = tokenizer.encode([text])[0]
        assert ids == theirs_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_id not in tokenizer.encode([SENTENCES[0]])[0]

    hf = transformers.BertForPreTraining.from_pretrained(bert_dir).eval()
    batch = bert_batch(tokenizer, [(SENTENCES[0], SENTENCES[1]), (SENTENCES[2], "Short.")])
    with torch.no_grad():
        ours = model(batch)
        theirs = hf(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            token_type_ids=batch["token_type_ids"],
        )
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(ours["mlm_logits"], theirs.prediction_logits[real], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(ours["nsp_logits"], theirs.seq_relationship_logits, atol=ATOL, rtol=RTOL)


def test_t5_converts_with_its_sentencepiece_model_and_computes_what_hf_computes(t5_dir, tmp_path, capsys):
    out = tmp_path / "t5.ckpt"
    polyhead(
        "convert", str(t5_dir), str(out), "--task", "summarize"
    )  # named as a fine-tuning config names it
    report = capsys.readouterr().out
    assert "t5 (T5ForConditionalGeneration)" in report and "sentencepiece" in report
    assert "summarize (Seq2Seq)" in report

    model = MultiTaskModel.from_checkpoint(out)
    tokenizer, task = model.tokenizer, model.tasks["summarize"]
    own_lm_head = "lm_head.weight" in load_file(t5_dir / "model.safetensors")
    assert (
        ("heads.summarize.decoder.weight" in model.state_dict())
        == own_lm_head
        != model.backbone_config.tie_embeddings
    )
    assert isinstance(tokenizer, SentencePieceTokenizer)
    assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.start_id, tokenizer.cls_id) == (0, 1, 0, None)
    theirs_tokenizer = transformers.T5Tokenizer.from_pretrained(t5_dir)
    for text in SENTENCES:
        assert [*tokenizer.encode([text])[0], tokenizer.eos_id] == theirs_tokenizer(text)["input_ids"]

    hf = transformers.T5ForConditionalGeneration.from_pretrained(t5_dir).eval()
    examples = [
        {"prompt_ids": [*tokenizer.encode([f"summarize: {s}"])[0], tokenizer.eos_id], "target": t}
        for s, t in [(SENTENCES[4], SENTENCES[0]), (SENTENCES[3], "Pieces.")]
    ]
    for example in examples:
        example |= {
            "target": [*tokenizer.encode([example["target"]])[0], tokenizer.eos_id],
            "prompt": "",
            "lead": "",
        }
    batch = task.collate(examples, [0, 0], tokenizer) | {"task": "summarize"}
    labels = batch["labels"]
    assert torch.equal(
        hf._shift_right(labels)[labels != IGNORE], batch["decoder_input_ids"][labels != IGNORE]
    )
    backbone = model.backbone
    with torch.no_grad():
        memory = backbone.encode(batch["input_ids"], batch["attention_mask"])
        hidden = backbone.decode(
            batch["decoder_input_ids"], batch["decoder_attention_mask"], memory, batch["attention_mask"]
        )  # (B, T, D)
        ours = model.heads["summarize"](hidden[labels != IGNORE], backbone.token_embedding)  # (N, V)
        loss = model(batch)["target_loss"]
        theirs = hf(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            decoder_input_ids=batch["decoder_input_ids"],
            decoder_attention_mask=batch["decoder_attention_mask"],
            labels=labels,
            use_cache=False,
        )
    # unscaled T5 logits reach ~20 here, where float32 roundoff alone is ~1e-5: ATOL of the largest one
    scale = max(1.0, theirs.logits.abs().max().item())
    torch.testing.assert_close(ours, theirs.logits[labels != IGNORE], atol=ATOL * scale, rtol=RTOL)
    assert float(loss) == pytest.approx(float(theirs.loss), rel=1e-4)  # the task's loss is HF's


def test_bad_sources_end_in_one_line_naming_the_file_and_write_nothing(bert_dir, tmp_path, capsys):
    out = tmp_path / "out.ckpt"
    assert "no such directory" in fails(
        capsys, "convert", str(tmp_path / "nope" / "deeper" / "dir"), str(out)
    )
    (tmp_path / "empty").mkdir()
    message = fails(capsys, "convert", str(tmp_path / "empty"), str(out))
    assert "no config.json" in message and "save_pretrained" in message

    gemma = tmp_path / "gemma"
    gemma.mkdir()
    (gemma / "config.json").write_text(json.dumps({"model_type": "gemma"}))
    message = fails(capsys, "convert", str(gemma), str(out))
    assert (
        "config.json: model_type 'gemma' is not supported" in message
        and "'llama' (LlamaForCausalLM)" in message
        and "'qwen3' (Qwen3ForCausalLM)" in message
    )

    truncated = tmp_path / "truncated"
    truncated.mkdir()
    for path in bert_dir.iterdir():
        (truncated / path.name).write_bytes(path.read_bytes())
    weights = (bert_dir / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    message = fails(capsys, "convert", str(truncated), str(out))
    assert "model.safetensors: not a readable weights file" in message and "truncated" in message

    message = fails(capsys, "convert", "someone/some-bert", str(out))  # conftest sets HF_HUB_OFFLINE=1
    assert "HF_HUB_OFFLINE" in message and "local model directory" in message
    assert "required: out" in fails(capsys, "convert", str(bert_dir))
    assert "a task name is letters" in fails(capsys, "convert", str(bert_dir), str(out), "--task", "my task")
    assert not out.exists() and not list(tmp_path.glob(".out.ckpt*"))

    polyhead("convert", str(bert_dir), str(out))
    assert "already exists" in fails(capsys, "convert", str(bert_dir), str(out))


def test_t5_saved_without_spiece_model_converts_with_its_tokenizer_json(t5_dir, tmp_path):
    """transformers 5 writes T5's tokenizer as tokenizer.json only; the same ids come from it."""
    bare = tmp_path / "t5-json-only"
    bare.mkdir()
    for path in t5_dir.iterdir():
        if path.name != "spiece.model":
            (bare / path.name).write_bytes(path.read_bytes())
    polyhead("convert", str(bare), str(tmp_path / "t5.ckpt"))
    tokenizer = MultiTaskModel.from_checkpoint(tmp_path / "t5.ckpt").tokenizer
    assert isinstance(tokenizer, HFTokenizer)
    assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.start_id, tokenizer.unk_id) == (0, 1, 0, 2)
    theirs = transformers.AutoTokenizer.from_pretrained(bare)
    for text in SENTENCES:
        assert [*tokenizer.encode([text])[0], tokenizer.eos_id] == theirs(text)["input_ids"]
    sentinel = theirs.convert_tokens_to_ids("<extra_id_0>")
    assert tokenizer.is_special(torch.tensor([sentinel])).item() and tokenizer.decode([sentinel]) == ""


def test_a_hub_name_converts_from_the_hf_cache_offline(bert_dir, tmp_path):
    """A hub name goes through huggingface_hub: here from its cache (HF_HUB_OFFLINE=1), laid out as a
    download leaves it, in a fresh process (the hub library reads HF_HUB_CACHE when imported)."""
    snapshot = tmp_path / "hub" / "models--someone--tiny-bert" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    for path in bert_dir.iterdir():
        (snapshot / path.name).write_bytes(path.read_bytes())
    done = subprocess.run(
        [sys.executable, "-m", "experiments.cli", "convert", "someone/tiny-bert", str(tmp_path / "hub.ckpt")],
        cwd=ROOT,
        env=offline_env(tmp_path) | {"HF_HUB_CACHE": str(tmp_path / "hub")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"from {snapshot}" in done.stdout
    assert (
        read_checkpoint(tmp_path / "hub.ckpt")["polyhead"]["tasks"]["mlm_nsp"]["class"]
        == "MaskedLMNextSentence"
    )
