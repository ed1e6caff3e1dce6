"""Every file polyhead writes for a user to keep (checkpoints, the run's config, predictions, a
sweep's spec, a cached tokenizer) appears whole or not at all: it is written to a hidden temporary
file beside the target, flushed to disk and renamed over it. A kill or a full disk mid-write leaves
the previous file (or none), never half of one, and the rename stays on one filesystem, where it is atomic.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def current_umask() -> int:
    """The process's umask. Reading it means setting it: it is set to the most private value for
    that instant, so a file another thread creates meanwhile is never more open than it should be."""
    umask = os.umask(0o077)
    os.umask(umask)
    return umask


def write_atomically(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Call `write` on a temporary file in the target's directory, fsync it, give it an ordinary new
    file's permissions (a temporary file is private to its owner, which would hide a shared run's
    files from the team) and rename it over `path`; then fsync the directory so the rename survives
    a power loss. A failure in `write` removes the temporary file and leaves the target as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    )
    try:
        with handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(handle.name, 0o666 & ~current_umask())
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def write_text_atomically(path: str | Path, text: str) -> None:
    write_atomically(path, lambda handle: handle.write(text.encode("utf-8")))
