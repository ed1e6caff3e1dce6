"""What the benchmarks share: the ids and seed of their random inputs, waiting for the GPU before
reading the clock, how much memory this process holds, and the JSON record of a run."""

from __future__ import annotations

import json
import os
import platform
import time
from importlib.metadata import version
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
FIRST_TEXT_ID = 5  # random tokens avoid the low ids special tokens use
T5_PAD, T5_EOS, T5_START = 0, 1, 0  # T5's ids: its decoder starts from <pad>
SEED = 0


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work, so that a host clock read after it times the work itself."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resident_mib(field: str = "VmRSS") -> float:
    """A line of /proc/self/status in MiB (Linux): "VmRSS", the resident set now, or "VmHWM", its peak.

    Not getrusage's ru_maxrss: exec keeps the peak of the process that forked, so a benchmark's
    subprocess would start from its parent's peak.
    """
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(f"{field}:"))
    return int(line.split()[1]) / 1024  # given in kB


def write_record(
    script: str, argv: list[str], device: torch.device, body: dict, name: str | None = None
) -> Path:
    """Write benchmarks/results/<name>.json (<name>_cuda.json on a GPU; name defaults to the script's):
    the command, the date, the machine and the library versions, then `body` (the setting and the
    results)."""
    name = name or script
    machine = {"platform": platform.platform(), "cpus": os.cpu_count()}
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(device)
    record = {
        "command": " ".join(["python", f"benchmarks/{script}.py", *argv]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine,
        "versions": {"torch": torch.__version__, "transformers": version("transformers")},
        **body,
    }
    output = RESULTS / (f"{name}.json" if device.type == "cpu" else f"{name}_{device.type}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=1) + "\n")
    return output
