"""polyhead checkpoint -> HuggingFace model directory: the export half of `polyhead convert --to-hf`.

A checkpoint whose backbone BERT, T5, GPT-2, LLaMA, Qwen2 or Qwen3 can compute becomes a directory
that `BertForPreTraining` / `BertModel` / `T5ForConditionalGeneration` / `GPT2LMHeadModel` /
`LlamaForCausalLM` / `Qwen2ForCausalLM` / `Qwen3ForCausalLM.from_pretrained` load: config.json,
model.safetensors and the tokenizer files. BERT's MLM and pooled NSP heads go along when the
checkpoint has them (else the encoder alone, as `BertModel`); the LM head of the others when it is
their own (not polyhead's copy head). A decoder-only backbone is GPT-2 with learned positions; with
rotary ones, Qwen3 if it norms queries and keys, Qwen2 if it biases q, k and v, else LLaMA.
modules/convert_bert.py, convert_t5.py, convert_gpt2.py, convert_llama.py and convert_qwen.py map
configs and tensors; modules/hf_import.py is the import half, modules/hf_files.py what both share.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
from torch import Tensor

from datamodules.tokenizer import HFTokenizer, SentencePieceTokenizer, Tokenizer
from modules.checkpoint import read_checkpoint
from modules.config import BackboneConfig
from modules.convert import KeyMap, StateDict
from modules.convert_bert import bert_config_to_hf, bert_keys, polyhead_to_bert
from modules.convert_gpt2 import HF_PREFIX as GPT2_PREFIX
from modules.convert_gpt2 import gpt2_config_to_hf, gpt2_keys, polyhead_to_gpt2
from modules.convert_llama import HF_PREFIX as LLAMA_PREFIX
from modules.convert_llama import LLAMA, RotaryDecoder, llama_keys
from modules.convert_qwen import QWEN2, QWEN3
from modules.convert_t5 import polyhead_to_t5, t5_config_to_hf, t5_keys
from modules.errors import UserError
from modules.hf_files import HF_TOKEN_KEYS, Conversion, create_atomically
from modules.lora import without_adapters

TOKENIZER_CLASSES = {
    "bert": "BertTokenizer",
    "t5": "T5Tokenizer",
    "gpt2": "GPT2Tokenizer",
    "llama": "PreTrainedTokenizerFast",
    "qwen2": "PreTrainedTokenizerFast",
    "qwen3": "PreTrainedTokenizerFast",
}


def _head_of(
    checkpoint: dict, task_class: str, usable: Callable[[dict], bool] = lambda args: True
) -> str | None:
    """The state-dict prefix of the first task of class `task_class` (with usable settings), or None."""
    for name, spec in checkpoint["polyhead"]["tasks"].items():
        if spec["class"] == task_class and usable(spec["init_args"]):
            return f"heads.{name}."
    return None


def _strip(state: dict[str, Tensor], prefix: str) -> StateDict:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _rotary_family(config: BackboneConfig) -> RotaryDecoder:
    """The HF family a rotary decoder is written as: the one whose projections it has (what else
    differs, `config_to_hf` refuses by key); biases everywhere are LLaMA's to refuse."""
    if config.qk_norm:
        return QWEN3
    return QWEN2 if config.attention_qkv_bias and not config.bias else LLAMA


def _tokenizer_files(tokenizer: Tokenizer, model_type: str) -> dict[str, bytes]:
    """The tokenizer as transformers reads it: tokenizer.json, or T5's spiece.model, with a
    tokenizer_config.json naming its class and special tokens. polyhead's own sentencepiece
    vocabulary in a BERT- or GPT-2-shaped model is written as spiece.model alone: neither family's
    tokenizer reads it."""
    tokens = {
        HF_TOKEN_KEYS[role]: piece for role, piece in tokenizer.special.items() if role in HF_TOKEN_KEYS
    }
    settings = {"tokenizer_class": TOKENIZER_CLASSES[model_type], **tokens}
    if isinstance(tokenizer, HFTokenizer):
        files = {"tokenizer.json": tokenizer.tokenizer_json.encode()}
    else:
        assert isinstance(tokenizer, SentencePieceTokenizer)
        files = {"spiece.model": tokenizer.model_proto}
        if model_type != "t5":
            return files
        settings["extra_ids"] = tokenizer.extra_ids
    return files | {"tokenizer_config.json": json.dumps(settings, indent=2).encode()}


@dataclass(frozen=True)
class HFModel:
    """A checkpoint as a HF model: its family, config.json, state dict, and where the backbone's
    tensors went (`keys`: the backbone's key table, each HF name under `prefix`)."""

    model_type: str
    config: dict
    weights: StateDict
    parameters: int  # ours: a tied copy HF keeps twice counts once
    keys: list[KeyMap]
    prefix: str


def hf_model(checkpoint: dict, state: dict[str, Tensor], path: Path) -> HFModel:
    """The HF model that computes what `checkpoint`'s backbone and heads with weights `state`
    (a whole state dict without adapters) compute; what it cannot be written as raises a UserError
    naming `path`."""
    saved = checkpoint["polyhead"]
    config = BackboneConfig.from_dict(saved["backbone"])
    tokenizer = Tokenizer.from_state_dict(saved["tokenizer"])
    backbone = _strip(state, "backbone.")
    try:
        if config.architecture == "encoder":
            head_prefix = _head_of(  # BERT's NSP head is the pooled one
                checkpoint,
                "MaskedLMNextSentence",
                lambda args: args.get("nsp_head", "pooled") == "pooled",
            )
            head = None if head_prefix is None else _strip(state, head_prefix)
            return HFModel(
                "bert",
                bert_config_to_hf(config, tokenizer.pad_id, with_heads=head is not None),
                polyhead_to_bert(backbone, head, config),
                sum(t.numel() for t in [*backbone.values(), *(head or {}).values()]),
                bert_keys(config, "bert." if head is not None else "")[0],
                "",
            )
        if config.architecture == "encoder-decoder":
            head_prefix = _head_of(checkpoint, "Seq2Seq", lambda args: not args.get("copy"))
            tokenizer.require(("pad", "eos", "start"), "export to HF T5")
            lm_head = state.get(f"{head_prefix}decoder.weight") if head_prefix else None
            return HFModel(
                "t5",
                t5_config_to_hf(config, tokenizer.pad_id, tokenizer.eos_id, tokenizer.start_id),
                polyhead_to_t5(backbone, lm_head, config),
                sum(t.numel() for t in [*backbone.values(), *([] if lm_head is None else [lm_head])]),
                t5_keys(config),
                "",
            )
        head_prefix = _head_of(checkpoint, "PrefixLM")
        lm_head = state.get(f"{head_prefix}decoder.weight") if head_prefix else None
        if config.position == "rotary":
            family = _rotary_family(config)
            model_type, prefix, keys = family.model_type, LLAMA_PREFIX, llama_keys(config)
            hf_config = family.config_to_hf(config, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
            weights = family.from_polyhead(backbone, lm_head, config)
        else:
            model_type, prefix, keys = "gpt2", GPT2_PREFIX, gpt2_keys(config)
            hf_config = gpt2_config_to_hf(config, tokenizer.eos_id, tokenizer.pad_id)
            weights = polyhead_to_gpt2(backbone, lm_head, config)
        return HFModel(model_type, hf_config, weights, sum(t.numel() for t in weights.values()), keys, prefix)
    except UserError as error:
        raise UserError(f"{path}: {error}") from None


def export_hf(checkpoint_path: Path, out: Path) -> Conversion:
    """A polyhead checkpoint -> a HF directory at `out` (see the module docstring)."""
    if out.exists():
        raise UserError(f"{out}: already exists; remove it or choose another output directory")
    checkpoint = read_checkpoint(checkpoint_path)
    saved = checkpoint["polyhead"]
    config = BackboneConfig.from_dict(saved["backbone"])
    tokenizer = Tokenizer.from_state_dict(saved["tokenizer"])
    model = hf_model(checkpoint, without_adapters(checkpoint), checkpoint_path)  # LoRA updates folded in
    files = _tokenizer_files(tokenizer, model.model_type)

    def write(directory: Path) -> None:
        directory.mkdir()
        (directory / "config.json").write_text(json.dumps(model.config, indent=2) + "\n")
        safetensors.torch.save_file(model.weights, directory / "model.safetensors", metadata={"format": "pt"})
        for name, content in files.items():
            (directory / name).write_bytes(content)

    create_atomically(out, write)
    return Conversion(
        model_type=model.model_type,
        architecture=model.config["architectures"][0],
        source=str(checkpoint_path),
        written=out,
        parameters=model.parameters,
        embedding_rows=config.vocab_size,
        tokenizer=tokenizer,
        tasks={},
        files=["config.json", "model.safetensors", *sorted(files)],
    )
