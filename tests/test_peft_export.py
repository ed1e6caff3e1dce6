"""`polyhead convert --to-peft` (modules/peft_export.py): a LoRA checkpoint's adapters as a HF peft
adapter directory. peft itself loads each onto the HF model the run's base was imported from, and
must compute what the whole fine-tuned model, exported by `--to-hf`, computes: BERT (the pooler
trained beside the adapters, saved whole), T5 (cross-attention's fused k | v), GPT-2 (HF fuses
q | k | v too: one block-diagonal update) and LLaMA (grouped kv heads, gate | up)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import lightning
import pytest
import torch

from modules.lora import TARGETS, LoraConfig, LoRALinear
from modules.model import MultiTaskModel
from tasks.classify import Classify

from .convert_cli import fails, polyhead
from .hf_models import loaded_cleanly, qwen_class, transformers
from .hf_tokenizers import SENTENCES

peft = pytest.importorskip("peft", reason="peft (a dev extra) loads the exported adapters")
pytestmark = pytest.mark.usefixtures("one_thread")


def lora_checkpoint(
    base: Path, out: Path, lora: LoraConfig, trained_pooler: bool = False, tasks: dict | None = None
) -> Path:
    """A LoRA model of `tasks` (default: the base's) from `base` by init_from, its adapters (and
    pooler) moved off their start as training would move them, saved as a run saves it: adapters
    and what trained, naming `base`."""
    loaded = MultiTaskModel.from_checkpoint(base)
    model = MultiTaskModel(
        tasks or loaded.tasks, None, tokenizer=loaded.tokenizer, init_from=str(base), lora=lora
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, LoRALinear):
                for weight in (layer.lora_A, layer.lora_B):
                    weight.copy_(0.2 * torch.randn(weight.shape, generator=generator))
        if trained_pooler:
            for weight in model.backbone.pooler.parameters():
                weight.add_(0.2 * torch.randn(weight.shape, generator=generator))
    return saved_as_a_run(model, out)


def saved_as_a_run(model: MultiTaskModel, out: Path) -> Path:
    """`model` written to `out` as a run's checkpoint: its state dict and the "polyhead" section."""
    checkpoint = {"epoch": 0, "global_step": 1, "pytorch-lightning_version": lightning.__version__}
    checkpoint["state_dict"] = model.state_dict()
    model.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, out)
    return out


def assert_adapter_computes_the_merged_export(
    hf_dir: Path, tuned: Path, hf_class, tmp_path: Path, capsys, inputs: dict
) -> dict:
    """--to-peft of `tuned`, loaded by peft onto `hf_dir`'s model, gives every output the `--to-hf`
    export of `tuned` gives. -> adapter_config.json"""
    polyhead("convert", "--to-peft", str(tuned), str(tmp_path / "adapter"))
    report = capsys.readouterr().out
    assert "LoRA adapter from polyhead checkpoint" in report and f"goes on     {hf_dir.resolve()}" in report
    polyhead("convert", "--to-hf", str(tuned), str(tmp_path / "merged"))
    merged = loaded_cleanly(hf_class, tmp_path / "merged")
    adapted = peft.PeftModel.from_pretrained(hf_class.from_pretrained(hf_dir), tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs, ours = adapted(**inputs), merged(**inputs)
        untouched = hf_class.from_pretrained(hf_dir).eval()(**inputs)
    for name in ("logits", "prediction_logits", "seq_relationship_logits", "pooler_output"):
        if name in ours:
            # merged weights (W + BA, rounded once) and peft's unmerged sum round apart in float32
            torch.testing.assert_close(theirs[name], ours[name], atol=1e-4, rtol=1e-4)
            assert not torch.allclose(untouched[name], ours[name], atol=1e-3)  # the adapters count
    return json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())


def test_llama_adapters_on_every_projection_load_into_peft(llama_dir, tmp_path, capsys):
    polyhead("convert", str(llama_dir), str(tmp_path / "base.ckpt"))
    tuned = lora_checkpoint(
        tmp_path / "base.ckpt", tmp_path / "lora.ckpt", LoraConfig(rank=2, targets=list(TARGETS))
    )
    ids = torch.tensor(MultiTaskModel.from_checkpoint(tuned).tokenizer.encode([SENTENCES[1]]))
    config = assert_adapter_computes_the_merged_export(
        llama_dir, tuned, transformers.LlamaForCausalLM, tmp_path, capsys, {"input_ids": ids}
    )
    assert config["task_type"] == "CAUSAL_LM" and config["r"] == 2 and config["rank_pattern"] == {}
    assert config["target_modules"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    assert config["base_model_name_or_path"] == str(llama_dir.resolve()) and config["modules_to_save"] is None
    # the base is named inside: AutoPeftModel finds it, and computes what the merged export does
    auto = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    merged = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(
            auto(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-4, rtol=1e-4
        )
    umask = os.umask(0)
    os.umask(umask)
    for file in [*(tmp_path / "adapter").iterdir(), *(tmp_path / "merged").iterdir()]:
        # safetensors writes private files; an export is for sharing
        assert stat.S_IMODE(file.stat().st_mode) == 0o666 & ~umask, file


def test_qwen_adapters_on_biased_and_normed_projections_load_into_peft(qwen_dir, tmp_path, capsys):
    """Qwen2's q, k, v carry biases (the frozen layer's, kept apart from the update); Qwen3 norms
    queries and keys after the adapted projections."""
    polyhead("convert", str(qwen_dir), str(tmp_path / "base.ckpt"))
    tuned = lora_checkpoint(
        tmp_path / "base.ckpt", tmp_path / "lora.ckpt", LoraConfig(rank=2, targets=["query", "key", "value"])
    )
    ids = torch.tensor(MultiTaskModel.from_checkpoint(tuned).tokenizer.encode([SENTENCES[0]]))
    hf_class = qwen_class(json.loads((qwen_dir / "config.json").read_text())["model_type"])
    config = assert_adapter_computes_the_merged_export(
        qwen_dir, tuned, hf_class, tmp_path, capsys, {"input_ids": ids}
    )
    assert config["target_modules"] == ["k_proj", "q_proj", "v_proj"]


def test_gpt2_fused_attention_gets_one_block_diagonal_update(gpt2_dir, tmp_path, capsys):
    polyhead("convert", str(gpt2_dir), str(tmp_path / "base.ckpt"))
    tuned = lora_checkpoint(
        tmp_path / "base.ckpt",
        tmp_path / "lora.ckpt",
        LoraConfig(rank=2, alpha=8, targets=["query", "value", "output"]),
    )
    ids = torch.tensor(MultiTaskModel.from_checkpoint(tuned).tokenizer.encode([SENTENCES[2]]))
    config = assert_adapter_computes_the_merged_export(
        gpt2_dir, tuned, transformers.GPT2LMHeadModel, tmp_path, capsys, {"input_ids": ids}
    )
    # the MLP's c_proj is not adapted, so "c_proj" alone would say too much: full names
    assert config["fan_in_fan_out"] and "transformer.h.0.mlp.c_proj" not in config["target_modules"]
    assert {name.rpartition(".")[2] for name in config["target_modules"]} == {"c_attn", "c_proj"}
    fused = {name: rank for name, rank in config["rank_pattern"].items()}
    assert fused and all(name.endswith("attn.c_attn") and rank == 4 for name, rank in fused.items())
    assert all(config["alpha_pattern"][name] == 16 for name in fused)  # alpha / rank unchanged


def test_bert_adapters_save_the_trained_pooler_and_name_modules_in_full(bert_dir, tmp_path, capsys):
    polyhead("convert", str(bert_dir), str(tmp_path / "base.ckpt"))
    tuned = lora_checkpoint(
        tmp_path / "base.ckpt",
        tmp_path / "lora.ckpt",
        LoraConfig(rank=2, targets=["query", "value", "feed_forward"]),
        trained_pooler=True,
    )
    tokenizer = MultiTaskModel.from_checkpoint(tuned).tokenizer
    ids = torch.tensor([tokenizer.encode([SENTENCES[0]])[0][:12]])
    config = assert_adapter_computes_the_merged_export(
        bert_dir, tuned, transformers.BertForPreTraining, tmp_path, capsys, {"input_ids": ids}
    )
    assert config["modules_to_save"] == ["bert.pooler.dense"] and config["task_type"] is None
    assert config["auto_mapping"]["base_model_class"] == "BertForPreTraining"  # for AutoPeftModel
    # feed_forward's "dense" would also name the pooler's and the MLM transform's: full names instead
    assert "bert.encoder.layer.0.intermediate.dense" in config["target_modules"]
    assert "dense" not in config["target_modules"]


def test_a_classifier_run_exports_the_encoder_adapters_and_pooler_only(bert_dir, tmp_path, capsys):
    """A classifier's head is no part of HF's BertModel: the adapter is for the encoder (the base
    directory's model without its pretraining heads), the trained pooler beside it, nothing else."""
    polyhead("convert", str(bert_dir), str(tmp_path / "base.ckpt"))
    tuned = lora_checkpoint(
        tmp_path / "base.ckpt",
        tmp_path / "lora.ckpt",
        LoraConfig(rank=2),
        trained_pooler=True,
        tasks={"sst2": Classify(labels=["negative", "positive"], max_length=32)},
    )
    ids = torch.tensor([MultiTaskModel.from_checkpoint(tuned).tokenizer.encode([SENTENCES[0]])[0][:12]])
    config = assert_adapter_computes_the_merged_export(
        bert_dir, tuned, transformers.BertModel, tmp_path, capsys, {"input_ids": ids}
    )
    assert config["modules_to_save"] == ["pooler.dense"] and config["target_modules"] == ["query", "value"]
    assert config["task_type"] == "FEATURE_EXTRACTION"  # AutoPeftModel loads it onto BertModel


def test_t5_cross_attention_key_and_value_become_k_and_v(t5_dir, tmp_path, capsys):
    polyhead("convert", str(t5_dir), str(tmp_path / "base.ckpt"))
    tuned = lora_checkpoint(
        tmp_path / "base.ckpt", tmp_path / "lora.ckpt", LoraConfig(rank=2, targets=["key", "value"])
    )
    tokenizer = MultiTaskModel.from_checkpoint(tuned).tokenizer
    ids = torch.tensor(tokenizer.encode([SENTENCES[3]]))
    labels = torch.tensor([tokenizer.encode([SENTENCES[4]])[0][:5]])
    config = assert_adapter_computes_the_merged_export(
        t5_dir,
        tuned,
        transformers.T5ForConditionalGeneration,
        tmp_path,
        capsys,
        {"input_ids": ids, "labels": labels},
    )
    assert config["task_type"] == "SEQ_2_SEQ_LM" and config["target_modules"] == ["k", "v"]


def test_what_cannot_be_an_adapter_is_refused(llama_dir, tmp_path, capsys):
    polyhead("convert", str(llama_dir), str(tmp_path / "base.ckpt"))
    message = fails(capsys, "convert", "--to-peft", str(tmp_path / "base.ckpt"), str(tmp_path / "out"))
    assert "has no LoRA adapters (model.lora.rank 0)" in message and "--to-hf" in message
    base = MultiTaskModel.from_checkpoint(tmp_path / "base.ckpt")
    scratch = MultiTaskModel(
        base.tasks, base.backbone_config, tokenizer=base.tokenizer, lora=LoraConfig(rank=2)
    )
    scratch_path = saved_as_a_run(scratch, tmp_path / "scratch.ckpt")
    message = fails(capsys, "convert", "--to-peft", str(scratch_path), str(tmp_path / "out"))
    assert "started without --model.init_from" in message
    tuned = lora_checkpoint(tmp_path / "base.ckpt", tmp_path / "lora.ckpt", LoraConfig(rank=2))
    moved = tmp_path / "moved.ckpt"
    (tmp_path / "base.ckpt").rename(moved)
    message = fails(capsys, "convert", "--to-peft", str(tuned), str(tmp_path / "out"))
    assert f"{tmp_path / 'base.ckpt'}, which cannot be read" in message and not (tmp_path / "out").exists()
    moved.rename(tmp_path / "base.ckpt")
    (tmp_path / "out").mkdir()
    message = fails(capsys, "convert", "--to-peft", str(tuned), str(tmp_path / "out"))
    assert "already exists" in message
    assert fails(capsys, "convert", "--to-peft", "--to-hf", str(tuned), str(tmp_path / "o2"))
    assert not (tmp_path / "o2").exists()
