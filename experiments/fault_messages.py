"""One line for the faults a user can act on that arrive as library exceptions, not UserErrors:
a data loader worker that died or failed, and trainer settings Lightning refuses. `polyhead`
prints the line instead of a traceback; every other exception stays a traceback (a bug to report).
"""

from __future__ import annotations

import re

from lightning.fabric.utilities.exceptions import MisconfigurationException

WORKER_DIED = re.compile(
    r"DataLoader worker \(pid(?:\(s\))? ([\d, ]+)\) (is killed by signal: [^.]+|exited unexpectedly)"
)
WORKER_RAISED = re.compile(r"Caught (\w+) in DataLoader worker process (\d+)\.\nOriginal Traceback", re.S)
RESUME = "the checkpoints saved so far are intact: resume with --ckpt_path"


def explain(error: BaseException) -> str | None:
    """The message for `error`, or None when it is not a fault this module knows."""
    text = str(error)
    raised = WORKER_RAISED.match(text)
    if raised:  # torch re-raises a worker's exception with the worker's traceback as its message
        original = text.rstrip().splitlines()[-1]
        reason = original.split(": ", 1)[1] if ": " in original else original
        return f"data loader worker {raised.group(2)} failed: {raised.group(1)}: {reason}"
    died = WORKER_DIED.search(text) if isinstance(error, RuntimeError) else None
    if died:
        how = died.group(2).replace("is killed by signal:", "was killed by signal")
        return (
            f"a data loader worker process (pid {died.group(1).strip()}) {how}; the system may have run out "
            "of memory: lower data.num_workers or data.batch_size (data.num_workers 0 loads in the main "
            f"process, where an error in the data shows itself); {RESUME}"
        )
    if isinstance(error, MisconfigurationException):
        return f"trainer: {' '.join(text.split())}; fix the trainer settings"
    return None
