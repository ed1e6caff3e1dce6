"""A LoRA checkpoint -> a HF peft adapter directory: `polyhead convert --to-peft`.

`polyhead convert --to-hf` folds a LoRA run's updates into the weights and writes the whole model.
A peft adapter directory (adapter_config.json, adapter_model.safetensors) keeps them apart: a few
megabytes that `peft.PeftModel.from_pretrained(base, OUT_DIR)` puts on the HF model of the run's
base checkpoint (the directory it was imported from, or `convert --to-hf BASE.ckpt`), to share, to
swap per request, or to serve beside other adapters of the same base.

polyhead's adapters sit on slices of fused projections (modules/lora.py); HF keeps most of those
projections apart, so each slice's pair (A_i, B_i) becomes the pair of the HF projection it is
(q_proj, v_proj, ...), found through the family's key table. Where HF fuses them too (GPT-2's c_attn
holds q | k | v), the P slices' pairs stack into one update of rank P * r whose B is block-diagonal,
with alpha times P so that alpha / rank, the scale, is unchanged: the same update, exactly. Every
exported module whose weights differ from the base's (the pooler and new head weights, which train
beside the adapters) is saved whole, as peft's `modules_to_save`.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import safetensors.torch
import torch
from torch import Tensor

from datamodules.tokenizer import Tokenizer
from modules.backbone import Backbone
from modules.checkpoint import read_checkpoint, read_lora_base, restore_frozen_weights
from modules.config import BackboneConfig
from modules.convert import KeyMap, StateDict
from modules.errors import UserError
from modules.hf_export import HFModel, hf_model
from modules.hf_files import Conversion, create_atomically
from modules.lora import LoraConfig, LoRALinear, add_lora, without_adapters

PEFT_PREFIX = "base_model.model."  # what peft's PeftModel puts before the HF model's own names
# peft's task type by the exported class (which AutoPeftModel loads); the decoder-only: CAUSAL_LM
TASK_TYPES = {
    "BertForPreTraining": None,
    "BertModel": "FEATURE_EXTRACTION",
    "T5ForConditionalGeneration": "SEQ_2_SEQ_LM",
}


def _rows(entry: KeyMap) -> list[tuple[int, int]]:
    """(start, end) of each HF tensor's rows within our weight."""
    bounds, start = [], 0
    for part in entry.our_parts:
        bounds.append((start, start + part[0]))
        start += part[0]
    return bounds


def hf_adapters(
    config: BackboneConfig, lora: LoraConfig, state: dict[str, Tensor], model: HFModel
) -> tuple[StateDict, dict[str, int]]:
    """(peft's adapter tensors, HF module name -> rank) of the adapters in `state` (a checkpoint's
    state dict), each on the HF projection its slice of a fused weight is in `model`."""
    with torch.device("meta"):  # only the adapters' places are needed, not weights
        backbone = Backbone(config)
        add_lora(backbone, lora)
    table = {entry.ours: entry for entry in model.keys}
    tensors: StateDict = {}
    ranks: dict[str, int] = {}
    r = lora.rank
    for name, layer in backbone.named_modules():
        if not isinstance(layer, LoRALinear):
            continue
        entry = table[f"{name}.weight"]
        rows = _rows(entry)
        a = state[f"backbone.{name}.lora_A"].view(len(layer.slices), r, -1)  # (P, r, d_in)
        b = state[f"backbone.{name}.lora_B"].split([width for _, width in layer.slices])  # P x (width, r)
        on_part: dict[int, list[int]] = defaultdict(list)  # HF tensor -> the slices within it
        for i, (start, width) in enumerate(layer.slices):
            part = next(j for j, (lo, hi) in enumerate(rows) if lo <= start and start + width <= hi)
            on_part[part].append(i)
        for part, slices in on_part.items():
            lo, hi = rows[part]
            target = model.prefix + entry.theirs[part].removesuffix(".weight")
            update_b = a.new_zeros(hi - lo, len(slices) * r)  # (rows, P' r): block-diagonal
            for k, i in enumerate(slices):
                start, width = layer.slices[i]
                update_b[start - lo : start - lo + width, k * r : (k + 1) * r] = b[i]
            tensors[f"{PEFT_PREFIX}{target}.lora_A.weight"] = a[slices].reshape(len(slices) * r, -1).clone()
            tensors[f"{PEFT_PREFIX}{target}.lora_B.weight"] = update_b
            ranks[target] = len(slices) * r
    return tensors, ranks


def as_in_base(state: dict[str, Tensor], base: dict[str, Tensor]) -> dict[str, Tensor]:
    """`state` with the base checkpoint's tensors where it has them, and NaN (equal to nothing) where
    the run made new ones (a head of another name): exported as the run's model is, the base's
    weights, to tell what trained."""
    return {
        key: base[key]
        if key in base and base[key].shape == t.shape
        else (torch.full_like(t, float("nan")) if t.is_floating_point() else t)
        for key, t in state.items()
    }


def changed_modules(tuned: StateDict, base: StateDict) -> list[str]:
    """The modules (a key's name up to its last dot) with a tensor that is new or not the base's."""
    return sorted(
        {
            key.rpartition(".")[0]
            for key, t in tuned.items()
            if key not in base or not torch.equal(t, base[key])
        }
    )


def target_names(adapted: list[str], weights: StateDict) -> list[str]:
    """peft's `target_modules`: the modules' last names (q_proj, v_proj) when those name no other
    module of the model, as in configs peft writes; else each module's full name (BERT's "dense" is
    also the pooler's)."""
    modules = {key.rpartition(".")[0] for key in weights}
    suffixes = sorted({name.rpartition(".")[2] for name in adapted})
    matched = {m for m in modules if m.rpartition(".")[2] in suffixes}
    return suffixes if matched == set(adapted) else sorted(adapted)


def export_peft(checkpoint_path: Path, out: Path) -> Conversion:
    """A LoRA checkpoint -> a peft adapter directory at `out` (see the module docstring)."""
    if out.exists():
        raise UserError(f"{out}: already exists; remove it or choose another output directory")
    checkpoint = read_checkpoint(checkpoint_path, whole=False)  # its frozen weights: from the base, below
    saved = checkpoint["polyhead"]
    lora = LoraConfig(**saved.get("lora", {}))
    if not lora.enabled:
        raise UserError(
            f"{checkpoint_path}: has no LoRA adapters (model.lora.rank 0); write the whole model with "
            "polyhead convert --to-hf"
        )
    if "lora_base" not in saved:
        raise UserError(
            f"{checkpoint_path}: its LoRA run started without --model.init_from, so its frozen weights "
            "are in no other model for an adapter to go on; write the whole model with polyhead convert --to-hf"
        )
    base_path = Path(saved["lora_base"]["path"])
    base = read_lora_base(checkpoint, checkpoint_path)
    base_weights = without_adapters(base)
    restore_frozen_weights(checkpoint, checkpoint_path, base_weights)
    state = checkpoint["state_dict"]
    plain = {k: v for k, v in state.items() if ".lora_" not in k}
    tuned = hf_model(checkpoint, plain, checkpoint_path)
    original = hf_model(checkpoint, as_in_base(plain, base_weights), checkpoint_path)
    config = BackboneConfig.from_dict(saved["backbone"])
    adapters, ranks = hf_adapters(config, lora, state, tuned)
    kept = changed_modules(tuned.weights, original.weights)
    whole = {
        PEFT_PREFIX + key: t.contiguous().clone()
        for key, t in tuned.weights.items()
        if key.rpartition(".")[0] in kept
    }
    patterns = {name: rank for name, rank in ranks.items() if rank != lora.rank}
    architecture = tuned.config["architectures"][0]
    task_type = TASK_TYPES.get(architecture, "CAUSAL_LM")
    hf_source = base["polyhead"].get("hf_source")
    adapter_config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": hf_source,
        # how AutoPeftModel finds a model class where the task type names none
        "auto_mapping": None
        if task_type
        else {
            "base_model_class": architecture,
            "parent_library": f"transformers.models.{tuned.model_type}.modeling_{tuned.model_type}",
        },
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": target_names(sorted(ranks), tuned.weights),
        "rank_pattern": patterns,
        "alpha_pattern": {name: lora.alpha * rank / lora.rank for name, rank in patterns.items()},
        "fan_in_fan_out": tuned.model_type == "gpt2",  # GPT-2's Conv1D keeps weights (in, out)
        "bias": "none",
        "modules_to_save": kept or None,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }

    def write(directory: Path) -> None:
        directory.mkdir()
        (directory / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
        safetensors.torch.save_file(
            adapters | whole, directory / "adapter_model.safetensors", metadata={"format": "pt"}
        )

    create_atomically(out, write)
    return Conversion(
        model_type=tuned.model_type,
        architecture=architecture,
        source=str(checkpoint_path),
        written=out,
        parameters=sum(t.numel() for t in (adapters | whole).values()),
        embedding_rows=config.vocab_size,
        tokenizer=Tokenizer.from_state_dict(saved["tokenizer"]),
        tasks={},
        files=["adapter_config.json", "adapter_model.safetensors"],
        base=hf_source
        or f"the HF model of {base_path} (not recorded: polyhead convert --to-hf {base_path} OUT)",
    )
