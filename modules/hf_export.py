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
from pathlib import Path

import safetensors.torch
from torch import Tensor

from datamodules.tokenizer import HFTokenizer, SentencePieceTokenizer, Tokenizer
from modules.checkpoint import read_checkpoint
from modules.config import BackboneConfig
from modules.convert import StateDict
from modules.convert_bert import bert_config_to_hf, polyhead_to_bert
from modules.convert_gpt2 import gpt2_config_to_hf, polyhead_to_gpt2
from modules.convert_llama import LLAMA, RotaryDecoder
from modules.convert_qwen import QWEN2, QWEN3
from modules.convert_t5 import polyhead_to_t5, t5_config_to_hf
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


def export_hf(checkpoint_path: Path, out: Path) -> Conversion:
    """A polyhead checkpoint -> a HF directory at `out` (see the module docstring)."""
    if out.exists():
        raise UserError(f"{out}: already exists; remove it or choose another output directory")
    checkpoint = read_checkpoint(checkpoint_path)
    saved = checkpoint["polyhead"]
    config = BackboneConfig.from_dict(saved["backbone"])
    tokenizer = Tokenizer.from_state_dict(saved["tokenizer"])
    state = without_adapters(checkpoint)  # a LoRA run's updates folded in
    backbone = _strip(state, "backbone.")
    try:
        if config.architecture == "encoder":
            model_type, head_prefix = (
                "bert",
                _head_of(  # BERT's NSP head is the pooled one
                    checkpoint,
                    "MaskedLMNextSentence",
                    lambda args: args.get("nsp_head", "pooled") == "pooled",
                ),
            )
            head = None if head_prefix is None else _strip(state, head_prefix)
            hf_config = bert_config_to_hf(config, tokenizer.pad_id, with_heads=head is not None)
            weights = polyhead_to_bert(backbone, head, config)
            exported = [*backbone.values(), *(head or {}).values()]
        elif config.architecture == "encoder-decoder":
            model_type, head_prefix = "t5", _head_of(checkpoint, "Seq2Seq", lambda args: not args.get("copy"))
            tokenizer.require(("pad", "eos", "start"), "export to HF T5")
            lm_head = state.get(f"{head_prefix}decoder.weight") if head_prefix else None
            hf_config = t5_config_to_hf(config, tokenizer.pad_id, tokenizer.eos_id, tokenizer.start_id)
            weights = polyhead_to_t5(backbone, lm_head, config)
            exported = [*backbone.values(), *([] if lm_head is None else [lm_head])]
        else:
            head_prefix = _head_of(checkpoint, "PrefixLM")
            lm_head = state.get(f"{head_prefix}decoder.weight") if head_prefix else None
            if config.position == "rotary":
                family = _rotary_family(config)
                model_type = family.model_type
                hf_config = family.config_to_hf(config, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
                weights = family.from_polyhead(backbone, lm_head, config)
            else:
                model_type = "gpt2"
                hf_config = gpt2_config_to_hf(config, tokenizer.eos_id, tokenizer.pad_id)
                weights = polyhead_to_gpt2(backbone, lm_head, config)
            exported = list(weights.values())
    except UserError as error:
        raise UserError(f"{checkpoint_path}: {error}") from None
    files = _tokenizer_files(tokenizer, model_type)

    def write(directory: Path) -> None:
        directory.mkdir()
        (directory / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        safetensors.torch.save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
        for name, content in files.items():
            (directory / name).write_bytes(content)

    create_atomically(out, write)
    return Conversion(
        model_type=model_type,
        architecture=hf_config["architectures"][0],
        source=str(checkpoint_path),
        written=out,
        parameters=sum(t.numel() for t in exported),  # ours: a tied copy HF keeps twice counts once
        embedding_rows=config.vocab_size,
        tokenizer=tokenizer,
        tasks={},
        tokenizer_files=sorted(files),
    )
