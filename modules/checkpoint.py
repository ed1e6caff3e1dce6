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
