"""Soak: does a long run hold its memory? Runs left going for days must not creep towards the
machine's limit.

Trains the quickstart (experiments/configs/quickstart.yaml: three tasks on one backbone, a
validation with generation every 100 steps, W&B offline, checkpoints) for `--steps` steps in this
process and reads its resident memory (VmRSS in /proc/self/status) every `--every` steps. The first
`--warmup` steps fill the allocator's pools, the caches and the first validations' buffers; after
them the resident memory may rise by at most `--bound` MiB over the rest of the run. Prints the
samples, the growth after warm-up and its least-squares slope per 1000 steps, writes
benchmarks/results/soak.json, and exits 1 when the bound is exceeded.

    python benchmarks/soak.py                              # 2000 steps, bound 64 MiB
    python benchmarks/soak.py --steps 5000 --every 100 -- --data.batch_size 16
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
from records import resident_mib

from experiments.cli import run

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "soak.json"


class ResidentMemory(pl.Callback):
    """Records (step, resident MiB) every `every` training steps."""

    def __init__(self, every: int = 50) -> None:
        self.every = every
        self.samples: list[tuple[int, float]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        if trainer.global_step % self.every == 0:
            self.samples.append((trainer.global_step, resident_mib("VmRSS")))


def slope_per_1000(samples: list[tuple[int, float]]) -> float:
    """Least-squares slope of resident MiB against steps, per 1000 steps."""
    n = len(samples)
    mean_step = sum(s for s, _ in samples) / n
    mean_mib = sum(m for _, m in samples) / n
    spread = sum((s - mean_step) ** 2 for s, _ in samples)
    return 1000 * sum((s - mean_step) * (m - mean_mib) for s, m in samples) / spread if spread else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--every", type=int, default=50, help="steps between samples")
    parser.add_argument("--warmup", type=int, default=300, help="steps before the bound applies")
    parser.add_argument("--bound", type=float, default=64.0, help="MiB the run may grow after warm-up")
    parser.add_argument("--out", default=str(ROOT / "runs" / "soak"), help="W&B run and checkpoints")
    parser.add_argument("cli", nargs="*", help="more `polyhead fit` arguments, after --")
    options = parser.parse_args()
    started = time.time()
    cli = run(
        [
            *("fit", "--config", str(ROOT / "experiments" / "configs" / "quickstart.yaml")),
            *("--trainer.max_steps", str(options.steps), "--trainer.enable_progress_bar", "false"),
            *(
                "--trainer.logger.init_args.save_dir",
                options.out,
                "--checkpoint.dirpath",
                f"{options.out}/checkpoints",
            ),
            *("--trainer.callbacks+=__main__.ResidentMemory", f"--trainer.callbacks.every={options.every}"),
            *options.cli,
        ]
    )
    minutes = (time.time() - started) / 60
    (memory,) = [c for c in cli.trainer.callbacks if isinstance(c, ResidentMemory)]
    after = [(step, mib) for step, mib in memory.samples if step >= options.warmup]
    if len(after) < 2:
        print(
            f"soak: fewer than 2 samples after --warmup {options.warmup}; run more --steps", file=sys.stderr
        )
        return 2
    growth = max(mib for _, mib in after) - after[0][1]
    slope = slope_per_1000(after)
    print("step   resident MiB")
    for step, mib in memory.samples:
        print(f"{step:>5}  {mib:8.1f}")
    passed = growth <= options.bound
    print(
        f"\n{options.steps} steps in {minutes:.1f} min; after step {after[0][0]}: {after[0][1]:.1f} MiB, "
        f"peak {max(m for _, m in after):.1f} MiB, growth {growth:.1f} MiB (bound {options.bound:g}), "
        f"slope {slope:+.1f} MiB per 1000 steps: {'PASS' if passed else 'FAIL'}"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "steps": options.steps,
                "minutes": round(minutes, 1),
                "warmup": options.warmup,
                "bound_mib": options.bound,
                "growth_mib": round(growth, 1),
                "slope_mib_per_1000_steps": round(slope, 2),
                "passed": passed,
                "extra_arguments": options.cli,
                "samples": [[step, round(mib, 1)] for step, mib in memory.samples],
            },
            indent=1,
        )
        + "\n"
    )
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
