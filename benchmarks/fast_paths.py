"""What each fast path buys: the quickstart trained with one switch at a time, real tokens per
second and peak memory against the same run without it.

Each variant is `polyhead fit --config experiments/configs/quickstart.yaml` (MLM + NSP, sentence
embeddings and seq2seq summarization on one backbone) plus one switch, run in its own process with
W&B, validation and checkpoints off. A callback times every training step; throughput counts the
real (non-padding) tokens of the steps after the first --warmup (which hold torch.compile's
compilation and the allocator's growth), so a switch that only removes padding (packing, length
grouping) shows as more real tokens per second. Peak memory is the process's peak resident set
over the run minus the resident set before training. Prints one line per variant with its ratio
to the baseline and writes benchmarks/results/fast_paths.json.

    python benchmarks/fast_paths.py                                 # every variant, 150 steps each
    python benchmarks/fast_paths.py --variants baseline,pack --steps 80
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from records import resident_mib, write_record

from experiments.cli import run
from tasks.base import batch_tokens

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "experiments" / "configs" / "quickstart.yaml")
VARIANTS = {
    "baseline": [],
    "pack": ["--model.tasks.mlm_nsp.init_args.pack", "true"],
    "group_by_length": ["--data.group_by_length", "50"],
    "bf16-mixed": ["--trainer.precision", "bf16-mixed"],
    "compile": ["--model.speed.compile", "true"],
    "activation_checkpointing": ["--model.speed.activation_checkpointing", "true"],
}


class StepClock(pl.Callback):
    """Real tokens and wall time of every training step after the first `warmup`."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.tokens, self.seconds, self.started = warmup, 0, 0.0, 0.0
        self.resident_at_start = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self.resident_at_start = resident_mib("VmRSS")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > self.warmup:
            self.seconds += time.perf_counter() - self.started
            self.tokens += batch_tokens(batch)


def run_variant(name: str, steps: int, warmup: int) -> dict:
    """Train one variant in this process -> its tokens/s and peak memory."""
    clock = json.dumps({"class_path": "__main__.StepClock", "init_args": {"warmup": warmup}})
    arguments = [
        *("fit", "--config", QUICKSTART, "--trainer.max_steps", str(steps)),
        *(
            "--trainer.limit_val_batches",
            "0",
            "--trainer.logger",
            "false",
            "--trainer.enable_checkpointing",
            "false",
        ),
        *("--checkpoint.monitor", "null", "--trainer.enable_progress_bar", "false"),
        *("--trainer.enable_model_summary", "false", "--trainer.callbacks+", clock, *VARIANTS[name]),
    ]
    cli = run(arguments)
    timed = next(c for c in cli.trainer.callbacks if isinstance(c, StepClock))
    return {
        "tokens_per_s": round(timed.tokens / timed.seconds, 1),
        "peak_mib": round(resident_mib("VmHWM") - timed.resident_at_start, 1),
    }


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated, of: " + ", ".join(VARIANTS)
    )
    parser.add_argument("--steps", type=int, default=150, help="training steps per variant")
    parser.add_argument("--warmup", type=int, default=40, help="steps left out of the timing")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in each run")
    parser.add_argument("--run-one", help=argparse.SUPPRESS)  # VARIANT: the subprocess's job
    args = parser.parse_args(argv)
    if args.run_one:
        torch.set_num_threads(args.threads)
        print(json.dumps(run_variant(args.run_one, args.steps, args.warmup)))
        return
    names = args.variants.split(",")
    unknown = set(names) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    results = {}
    print(f"{'variant':<26}{'tokens/s':>10}{'ratio':>8}{'peak MiB':>10}{'ratio':>8}")
    for name in names:
        command = [sys.executable, __file__, "--run-one", name, *argv]
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        if done.returncode:
            raise SystemExit(f"variant {name} failed:\n{done.stderr[-3000:]}")
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
        base = results.get("baseline", results[name])
        speed = results[name]["tokens_per_s"] / base["tokens_per_s"]
        memory = results[name]["peak_mib"] / base["peak_mib"]
        print(
            f"{name:<26}{results[name]['tokens_per_s']:>10.0f}{speed:>8.2f}{results[name]['peak_mib']:>10.0f}{memory:>8.2f}",
            flush=True,
        )
    setting = {"steps": args.steps, "warmup": args.warmup, "threads": args.threads}
    write_record("fast_paths", argv, torch.device("cpu"), {"setting": setting, "variants": results})


if __name__ == "__main__":
    main(sys.argv[1:])
