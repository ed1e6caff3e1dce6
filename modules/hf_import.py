"""HuggingFace model directory -> polyhead checkpoint: the import half of `polyhead convert`.

`import_hf` reads a directory (or hub name) through modules/hf_files.py and maps its config and
tensors with the family's converter (modules/convert_bert.py, convert_t5.py, convert_gpt2.py,
convert_llama.py, convert_qwen.py; which one is `FAMILIES`' job). The result is a checkpoint laid
out exactly as a polyhead run writes one, with the pretraining heads as a task (BERT: `mlm_nsp`,
MaskedLMNextSentence; T5: `seq2seq`, Seq2Seq; GPT-2, LLaMA and Qwen: `prefix_lm`, PrefixLM), so
`--model.init_from` (fine-tune), `validate|test|predict --ckpt_path` and
`MultiTaskModel.from_checkpoint` take it as they take a trained one; it holds no optimizer state,
so `fit --ckpt_path` (resume) refuses it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import lightning
import torch
from torch import Tensor

from modules.config import BackboneConfig
from modules.convert import StateDict
from modules.convert_bert import BERT_DEFAULTS, backbone_config_from_bert, bert_to_polyhead
from modules.convert_gpt2 import GPT2_DEFAULTS, backbone_config_from_gpt2, gpt2_to_polyhead
from modules.convert_llama import LLAMA, RotaryDecoder
from modules.convert_qwen import QWEN2, QWEN3
from modules.convert_t5 import T5_DEFAULTS, backbone_config_from_t5, t5_to_polyhead
from modules.errors import UserError
from modules.hf_files import (
    FIX,
    Conversion,
    check_tokenizer_fits,
    create_atomically,
    locate,
    read_json,
    read_tokenizer,
    read_weights,
)
from modules.model import MultiTaskModel
from modules.optim import OptimizerConfig
from tasks.mlm_nsp import MaskedLMNextSentence
from tasks.prefix_lm import PrefixLM
from tasks.seq2seq import Seq2Seq


@dataclass(frozen=True)
class Family:
    """What import needs to know of one model_type: config.json's defaults, the class its weights
    come from, how its config maps; for generative families, how its weights map and the headless
    class whose checkpoints have no LM head."""

    defaults: dict
    architecture: str
    backbone_config: Callable[[SimpleNamespace, StateDict], BackboneConfig]
    to_polyhead: Callable[[StateDict, BackboneConfig], tuple[StateDict, Tensor | None]] | None = None
    headless: str = ""


def _rotary_decoder(
    family: RotaryDecoder, headless: str, architecture: str = "", defaults: dict | None = None
) -> Family:
    """A family of LLaMA's layout (modules/convert_llama.py), read as `family` from its own class
    (`architecture`) and config.json `defaults` where they differ from `family`'s."""
    return Family(
        family.defaults if defaults is None else defaults,
        architecture or family.architecture,
        lambda hf, state: family.backbone_config(hf),
        family.to_polyhead,
        headless,
    )


FAMILIES = {
    "bert": Family(BERT_DEFAULTS, "BertForPreTraining", lambda hf, state: backbone_config_from_bert(hf)),
    "t5": Family(
        T5_DEFAULTS,
        "T5ForConditionalGeneration",
        lambda hf, state: backbone_config_from_t5(hf, lm_head_in_weights="lm_head.weight" in state),
        t5_to_polyhead,
        "T5Model",
    ),
    "gpt2": Family(
        GPT2_DEFAULTS,
        "GPT2LMHeadModel",
        lambda hf, state: backbone_config_from_gpt2(hf),
        gpt2_to_polyhead,
        "GPT2Model",
    ),
    "llama": _rotary_decoder(LLAMA, "LlamaModel"),
    # LLaMA's layout; its sliding window (4096 unless config.json says null) is refused
    "mistral": _rotary_decoder(
        LLAMA, "MistralModel", "MistralForCausalLM", LLAMA.defaults | {"sliding_window": 4096}
    ),
    "qwen2": _rotary_decoder(QWEN2, "Qwen2Model"),
    "qwen3": _rotary_decoder(QWEN3, "Qwen3Model"),
}


def _prefix_lm_lengths(config: BackboneConfig) -> dict[str, int]:
    """PrefixLM's default prompt and target lengths (384 + 128), cut to fit the model's positions in
    the same 3 : 1 ratio where they do not."""
    if config.max_len >= 512:
        return {}
    target = config.max_len // 4
    return {"max_source_length": config.max_len - target, "max_target_length": target}


def import_hf(source: str, out: Path, task: str | None = None) -> Conversion:
    """HF BERT / T5 / GPT-2 / LLaMA / Qwen (directory or hub name) -> a polyhead checkpoint at `out`
    (see the module docstring).

    task: the name of the pretraining task in the checkpoint (default "mlm_nsp" / "seq2seq" /
    "prefix_lm"). Heads load by task name, so a fine-tuning config whose Seq2Seq task is called
    `summarize` starts from an untied T5's LM head only if the checkpoint names its task so too.
    """
    if task is not None and not re.fullmatch(r"[A-Za-z_]\w*", task):
        raise UserError(f"convert --task {task!r}: a task name is letters, digits and _ (as in model.tasks)")
    if out.exists():
        raise UserError(f"{out}: already exists; remove it or choose another output path")
    directory = locate(source)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise UserError(f"{directory}: no config.json; {FIX}")
    values = read_json(config_path)
    model_type = values.get("model_type")
    if model_type not in FAMILIES:
        supported = ", ".join(f"{name!r} ({family.architecture})" for name, family in FAMILIES.items())
        raise UserError(
            f"{config_path}: model_type {model_type!r} is not supported; polyhead converts {supported}"
        )
    family = FAMILIES[model_type]
    hf = SimpleNamespace(**(family.defaults | values))
    state, weights_path = read_weights(directory)
    try:
        config = family.backbone_config(hf, state)
    except (UserError, TypeError) as error:
        raise UserError(f"{config_path}: {error}") from None
    tokenizer = read_tokenizer(directory, model_type, hf)
    check_tokenizer_fits(config_path, hf, tokenizer, config.vocab_size)
    try:
        if model_type == "bert":
            name = task or "mlm_nsp"
            backbone, head = bert_to_polyhead(state, config)
            pretraining = MaskedLMNextSentence(max_length=min(128, config.max_len))  # BERT's phase-1 length
            tasks, heads = {name: pretraining}, {f"heads.{name}.{k}": v for k, v in head.items()}
        else:
            assert family.to_polyhead is not None
            name = task or ("seq2seq" if model_type == "t5" else "prefix_lm")
            backbone, lm_head = family.to_polyhead(state, config)
            if lm_head is None and not config.tie_embeddings:
                raise UserError(
                    f"no lm_head.weight: an untied model without its LM head ({family.headless}) has nothing "
                    "to generate with"
                )
            tasks = {name: Seq2Seq() if model_type == "t5" else PrefixLM(**_prefix_lm_lengths(config))}
            heads = {} if lm_head is None else {f"heads.{name}.decoder.weight": lm_head}
    except UserError as error:
        raise UserError(f"{weights_path}: {error}") from None
    model = MultiTaskModel(tasks, config, OptimizerConfig(), tokenizer)
    model.load_state_dict({f"backbone.{k}": v for k, v in backbone.items()} | heads, strict=True)
    checkpoint = {"epoch": 0, "global_step": 0, "pytorch-lightning_version": lightning.__version__}
    checkpoint["state_dict"] = model.state_dict()
    model.on_save_checkpoint(checkpoint)  # the "polyhead" section, exactly as training writes it
    # what a peft adapter trained on this checkpoint names as its base (modules/peft_export.py)
    local = Path(source).expanduser()
    checkpoint["polyhead"]["hf_source"] = str(local.resolve()) if local.is_dir() else source  # a hub name
    create_atomically(out, lambda path: torch.save(checkpoint, path))
    return Conversion(
        model_type=model_type,
        architecture=family.architecture,
        source=str(directory),
        written=out,
        parameters=sum(p.numel() for p in model.parameters()),
        embedding_rows=config.vocab_size,
        tokenizer=tokenizer,
        tasks={name: type(task).__name__ for name, task in tasks.items()},
        files=[],
    )
