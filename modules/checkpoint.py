"""Reading polyhead checkpoints safely: `torch.load(weights_only=True)` never runs code from the file."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from modules.errors import UserError


def read_checkpoint(path: str | Path, map_location: str = "cpu") -> dict:
    """-> the checkpoint dict; its "polyhead" section holds the backbone config, tasks and tokenizer."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {str(path)!r}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise UserError(
            f"{path}: not a readable checkpoint ({type(error).__name__}); it may be truncated or not a polyhead file"
        ) from None
    if not isinstance(checkpoint, dict) or not checkpoint.get("polyhead"):
        raise UserError(f"{path}: not a polyhead checkpoint (no 'polyhead' section)")
    return checkpoint


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
