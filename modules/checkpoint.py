"""Reading polyhead checkpoints safely: `torch.load(weights_only=True)` never runs code from the file,
and every way a file can fail to be a usable checkpoint ends in one UserError naming it."""

from __future__ import annotations

import hashlib
import random
import re
from pathlib import Path

import numpy as np
import torch

from modules.errors import UserError
from modules.lora import LoraConfig, without_adapters

SECTIONS = ("backbone", "tasks", "tokenizer")
"""What the "polyhead" section must hold for the checkpoint to run on its own."""


def code_the_pickle_wants(error: Exception) -> str | None:
    """The global a refused weights_only load asked to import and call (torch names it in its error),
    or None when the load failed for another reason (truncated, not a pickle)."""
    wanted = re.search(r"GLOBAL ([\w.]+)", str(error))
    return wanted.group(1) if wanted else None


def load_weights_only(path: str | Path, map_location: str = "cpu") -> object:
    """torch.load with weights_only=True: tensors, containers and plain values only. A file whose
    pickle names anything else (a function to call, a class to build) is refused before any of it
    runs; a missing, truncated or foreign file is a UserError naming it. Memory-mapped: a run reads
    a checkpoint up to three times (its architecture, its tokenizer, its weights), and only the
    tensors it uses are read from disk, once, however large the model."""
    path = Path(path)
    if path.is_dir():
        raise UserError(
            f"{path}: is a directory; a polyhead checkpoint is one file (.ckpt). For a HuggingFace model "
            "directory, convert it first: polyhead convert DIR OUT.ckpt"
        )
    if not path.is_file():
        raise UserError(f"checkpoint not found: {str(path)!r}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    except Exception as error:
        wanted = code_the_pickle_wants(error)
        if wanted:
            raise UserError(
                f"{path}: refused: loading it would run code ({wanted}), which a checkpoint never "
                "needs; nothing from it was run. Use a checkpoint that polyhead fit or polyhead convert wrote"
            ) from None
        raise UserError(
            f"{path}: not a readable checkpoint ({type(error).__name__}); it may be truncated or not a "
            "checkpoint at all: use another one (last.ckpt, or a step=N.ckpt beside it)"
        ) from None


def read_checkpoint(path: str | Path, map_location: str = "cpu", whole: bool = True) -> dict:
    """-> the checkpoint dict; its "polyhead" section holds the backbone config, tasks and tokenizer.
    whole=False leaves a LoRA checkpoint's frozen weights in its base (`restore_frozen_weights`),
    for a reader of the sections alone: the base is read, and its weights hashed, where they load."""
    checkpoint = load_weights_only(path, map_location)
    if not isinstance(checkpoint, dict) or not checkpoint.get("polyhead"):
        raise UserError(f"{path}: not a polyhead checkpoint (no 'polyhead' section)")
    missing = [name for name in SECTIONS if name not in checkpoint["polyhead"]]
    if "state_dict" not in checkpoint:
        missing.append("state_dict (the weights)")
    if missing:
        raise UserError(
            f"{path}: incomplete polyhead checkpoint, it lacks {', '.join(missing)}; it cannot run on its "
            "own: use a checkpoint that polyhead fit or polyhead convert wrote"
        )
    if whole:
        restore_frozen_weights(checkpoint, path)
    return checkpoint


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the names and bytes of `tensors`: the same weights give the same digest, on any machine."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def read_lora_base(checkpoint: dict, path: str | Path) -> dict:
    """The base checkpoint a LoRA checkpoint (read from `path`) names in its "lora_base" entry; one
    that cannot be read is a UserError naming both files."""
    base = checkpoint["polyhead"]["lora_base"]["path"]
    try:
        return read_checkpoint(base)
    except UserError as error:
        raise UserError(
            f"{path}: keeps LoRA adapters only; its frozen weights are those of {base}, which "
            f"cannot be read ({error}). Put that checkpoint back where it was"
        ) from None


def restore_frozen_weights(
    checkpoint: dict, path: str | Path, base_weights: dict[str, torch.Tensor] | None = None
) -> None:
    """Put back the frozen weights a LoRA checkpoint left out (its "lora_base" entry: the base
    checkpoint it was fine-tuned from, the names it takes from there, their digest), in place, so the
    checkpoint is whole again; one with every weight is left alone. `base_weights`: the base's state
    dict (adapters folded in) where the caller has read it already. A base that is gone or holds
    other weights than the run trained on is a UserError naming both files."""
    base = checkpoint["polyhead"].get("lora_base")
    state = checkpoint["state_dict"]
    if not base or all(key in state for key in base["keys"]):
        return
    weights = base_weights if base_weights is not None else without_adapters(read_lora_base(checkpoint, path))
    taken = {key: weights[key] for key in base["keys"] if key in weights}
    if len(taken) != len(base["keys"]) or tensor_digest(taken) != base["sha256"]:
        raise UserError(
            f"{path}: keeps LoRA adapters only, trained on the frozen weights of {base['path']}, which now "
            "holds other weights; put back the checkpoint the run started from"
        )
    state.update(taken)


FREE_IN_A_RUN = ("vocab_size", "dropout", "attention_dropout", "init", "init_std")
"""Backbone fields a run from a checkpoint may set as it likes: the vocabulary comes from the
checkpoint's tokenizer, and the others change training, not what the weights compute."""


LORA_SHAPING = ("rank", "alpha", "targets")
"""model.lora fields that change what the weights compute (its dropout changes only training)."""


def check_same_model(
    saved: dict, backbone: dict | None, tasks: dict[str, str], lora: dict, path: str
) -> None:
    """A run that continues or evaluates a checkpoint (--ckpt_path) must build the model that wrote it.

    saved: the checkpoint's "polyhead" section; backbone: the run's backbone settings (None: the
    checkpoint's); tasks: the run's task name -> task class name; lora: the run's model.lora. Any
    other architecture, set of tasks or adapters is a UserError naming each difference, before
    anything is built."""
    differences = [
        f"model.backbone.{key} is {backbone[key]!r} (checkpoint: {value!r})"
        for key, value in saved["backbone"].items()
        if backbone is not None and key not in FREE_IN_A_RUN and key in backbone and backbone[key] != value
    ]
    saved_tasks = {name: spec["class"] for name, spec in saved["tasks"].items()}
    if tasks != saved_tasks:
        differences.append(f"model.tasks are {tasks} (checkpoint: {saved_tasks})")
    run_lora, saved_lora = LoraConfig(**lora), LoraConfig(**saved.get("lora", {}))
    if run_lora.enabled or saved_lora.enabled:
        differences += [
            f"model.lora.{key} is {getattr(run_lora, key)!r} (checkpoint: {getattr(saved_lora, key)!r})"
            for key in LORA_SHAPING
            if getattr(run_lora, key) != getattr(saved_lora, key)
        ]
    if not differences:
        return
    shown = "; ".join(differences[:4]) + (
        f"; and {len(differences) - 4} more" if len(differences) > 4 else ""
    )
    raise UserError(
        f"{path} holds another model than this config builds: {shown}. Drop those settings (a run from "
        f"--ckpt_path takes the checkpoint's architecture; --model.backbone null drops a config's), or "
        f"start a new run from its matching weights with --model.init_from {path}"
    )


def load_matching(module: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """Copy every tensor whose name and shape match into `module`; report what happened to each.

    -> {"loaded": [...], "new": [...], "unexpected": [...], "mismatched": [...]}: loaded tensors;
    the module's tensors the checkpoint lacks (they keep their fresh initialisation); checkpoint
    tensors the module has no place for; and names present in both with different shapes (kept
    fresh, with both shapes in the entry). Nothing is skipped silently and nothing raises.
    """
    own = module.state_dict()
    report: dict[str, list[str]] = {"loaded": [], "new": [], "unexpected": [], "mismatched": []}
    matching = {}
    for name, tensor in state_dict.items():
        if name not in own:
            report["unexpected"].append(name)
        elif own[name].shape != tensor.shape:
            report["mismatched"].append(f"{name} {tuple(tensor.shape)} -> {tuple(own[name].shape)}")
        else:
            matching[name] = tensor
            report["loaded"].append(name)
    report["new"] = [name for name in own if name not in state_dict]
    module.load_state_dict(matching, strict=False)
    return report


def load_report_table(report: dict[str, list[str]], source: str) -> str:
    """The load report as lines a user reads at the start of a run: counts, then every name that
    did not load (loaded names are many and expected, so only counted)."""
    lines = [f"weights from {source}: " + ", ".join(f"{len(names)} {kind}" for kind, names in report.items())]
    for kind in ("new", "unexpected", "mismatched"):
        lines.extend(f"  {kind:<10} {name}" for name in report[kind])
    return "\n".join(lines)


def random_states() -> dict:
    """The generators training draws from (torch CPU and CUDA, numpy, random), as checkpoint data
    of tensors and plain numbers only, so weights_only loading accepts it."""
    numpy = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "key": torch.from_numpy(numpy["state"]["key"].astype(np.int64)),
            "pos": int(numpy["state"]["pos"]),
            "has_gauss": int(numpy["has_gauss"]),
            "gauss": float(numpy["gauss"]),
        },
        "python": random.getstate(),
    }


def restore_random_states(states: dict) -> None:
    """Undo `random_states`; CUDA states only where the same number of devices exists."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    numpy = states["numpy"]
    key = numpy["key"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", key, numpy["pos"], numpy["has_gauss"], numpy["gauss"]))
    random.setstate(states["python"])
