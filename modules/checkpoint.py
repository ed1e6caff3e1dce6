"""Reading polyhead checkpoints safely: `torch.load(weights_only=True)` never runs code from the file."""

from __future__ import annotations

from pathlib import Path

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
