"""`AtomicCheckpointIO`: how every Lightning checkpoint of a polyhead run is written and read.

Lightning's own writer serialises the whole checkpoint in memory, writes it to a temporary file in
the system's temp directory and moves it into place: a rename only when that directory is on the
checkpoint's filesystem, otherwise a copy onto the target, which a kill leaves half written (the
usual case on clusters: /tmp is local, checkpoints live on a shared filesystem). This writer puts
the temporary file beside the target, flushes it to disk and renames it over the target, so
`last.ckpt` is always a whole checkpoint, the previous one or the new one. Reading goes through
`load_weights_only`, so resuming (`--ckpt_path last` too) never runs code from a file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol

from modules.atomic_write import write_atomically
from modules.checkpoint import load_weights_only


def save_atomically(checkpoint: dict[str, Any], path: str | Path) -> None:
    """torch.save through modules/atomic_write.py: a kill mid-write leaves the target as it was."""
    write_atomically(path, lambda handle: torch.save(checkpoint, handle))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Local checkpoints written atomically (remote URLs keep Lightning's fsspec transaction), and
    every checkpoint read with weights_only."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path, storage_options)
        else:
            save_atomically(checkpoint, path)

    def load_checkpoint(
        self, path, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict:
        if not _is_local_file_protocol(path):
            return super().load_checkpoint(path, map_location, weights_only=True)
        return load_weights_only(path, map_location or "cpu")
