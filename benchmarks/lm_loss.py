"""The language-model loss, plain against polyhead's: time and peak memory of one forward and
backward pass of the vocabulary projection and its cross-entropy.

plain: F.cross_entropy(F.linear(hidden, weight).float(), targets), what HF's models and torch's
own examples compute (the (N, V) logits, their float copy and log-softmax kept for backward);
polyhead: modules/lm_loss.py's linear_cross_entropy (a chunk of rows at a time, gradients formed in
place). Both get the same random hidden states (N, D), tied-embedding-like weight (V, D) and
targets, and must give the same loss and gradients before anything is timed (relative difference
under 1e-4 in fp32; 2e-2 under bf16 autocast, `--precision bf16`, where both round). Time: the
median of --repeats alternating calls after a warm-up. Memory: each side alone in a fresh
process, the growth of its peak (resident set on a CPU, allocated memory on a GPU) over one call.

    python benchmarks/lm_loss.py                                   # 4096 x 256 onto 8000 words
    python benchmarks/lm_loss.py --rows 16384 --width 768 --vocab 50257 --device cuda --precision bf16

Prints one line per side and the ratios (polyhead / plain) and writes
benchmarks/results/lm_loss.json (lm_loss_cuda.json on a GPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from records import SEED, resident_mib, synchronize, write_record

from modules.lm_loss import linear_cross_entropy

SIDES = ("polyhead", "plain")


def inputs(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden (N, D) and weight (V, D), both trained, and targets (N,), on the device."""
    generator = torch.Generator().manual_seed(SEED)
    hidden = torch.randn(args.rows, args.width, generator=generator)
    weight = torch.randn(args.vocab, args.width, generator=generator) * args.width**-0.5
    targets = torch.randint(args.vocab, (args.rows,), generator=generator)
    return (
        hidden.to(args.device).requires_grad_(),
        weight.to(args.device).requires_grad_(),
        targets.to(args.device),
    )


def loss_of(side: str, hidden, weight, targets) -> torch.Tensor:
    if side == "polyhead":
        return linear_cross_entropy(hidden, weight, targets)
    return F.cross_entropy(F.linear(hidden, weight).float(), targets)


PRECISION = {"fp32": None, "bf16": torch.bfloat16}
"""--precision -> the autocast dtype (None: no autocast)."""
TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2}
"""--precision -> the largest relative difference of the two sides' loss and gradients."""


def step(side: str, hidden, weight, targets, precision: str = "fp32") -> list[torch.Tensor]:
    """One forward and backward pass -> [loss, hidden's gradient, weight's gradient]."""
    hidden.grad = weight.grad = None
    dtype = PRECISION[precision]
    with torch.autocast(hidden.device.type, dtype=dtype, enabled=dtype is not None):
        loss = loss_of(side, hidden, weight, targets)
    loss.backward()
    return [loss.detach(), hidden.grad, weight.grad]


def seconds(side: str, tensors, args: argparse.Namespace) -> float:
    device = torch.device(args.device)
    synchronize(device)
    start = time.perf_counter()
    step(side, *tensors, args.precision)
    synchronize(device)
    return time.perf_counter() - start


def peak_growth_mib(side: str, args: argparse.Namespace) -> float:
    """In this process (a fresh one): how far one pass of `side` raises the peak memory."""
    tensors = inputs(args)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step(side, *tensors, args.precision)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    before = resident_mib("VmRSS")
    step(side, *tensors, args.precision)
    return resident_mib("VmHWM") - before


def memory_in_fresh_process(side: str, argv: list[str]) -> float:
    output = subprocess.run(
        [sys.executable, __file__, *argv, "--memory-of", side], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(output.splitlines()[-1])


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=4096, help="target positions N")
    parser.add_argument("--width", type=int, default=256, help="model width D")
    parser.add_argument("--vocab", type=int, default=8000, help="vocabulary size V")
    parser.add_argument("--repeats", type=int, default=9, help="timed calls per side")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    parser.add_argument("--precision", choices=list(PRECISION), default="fp32", help="fp32, or bf16 autocast")
    parser.add_argument("--memory-of", choices=SIDES, help=argparse.SUPPRESS)  # the fresh process's side
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_arguments(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_of:
        print(json.dumps(peak_growth_mib(args.memory_of, args)))
        return
    device = torch.device(args.device)
    tensors = inputs(args)
    ours, theirs = step("polyhead", *tensors, args.precision), step("plain", *tensors, args.precision)
    for name, a, b in zip(("loss", "hidden's gradient", "weight's gradient"), ours, theirs, strict=True):
        difference = float((a.double() - b.double()).norm() / b.double().norm())
        if difference > TOLERANCE[args.precision]:
            raise RuntimeError(f"polyhead's {name} differs from the plain computation's by {difference:.2e}")
    times: dict[str, list[float]] = {side: [] for side in SIDES}
    for _ in range(args.repeats):
        for side in SIDES:
            times[side].append(seconds(side, tensors, args))
    ms = {side: statistics.median(t) * 1e3 for side, t in times.items()}
    memory = {side: memory_in_fresh_process(side, argv) for side in SIDES}
    print(f"{'side':<10}{'ms':>10}{'peak MiB':>12}")
    for side in SIDES:
        print(f"{side:<10}{ms[side]:>10.1f}{memory[side]:>12.1f}")
    time_ratio, memory_ratio = ms["polyhead"] / ms["plain"], memory["polyhead"] / memory["plain"]
    print(f"polyhead / plain: time {time_ratio:.2f}, peak memory {memory_ratio:.2f}")
    setting = {k: v for k, v in vars(args).items() if k != "memory_of"} | {"threads": torch.get_num_threads()}
    body = {
        "setting": setting,
        "ms": {side: round(v, 1) for side, v in ms.items()},
        "ms_repeats": {side: [round(x * 1e3, 1) for x in t] for side, t in times.items()},
        "peak_growth_mib": {side: round(v, 1) for side, v in memory.items()},
        "time_ratio": round(time_ratio, 3),
        "memory_ratio": round(memory_ratio, 3),
    }
    write_record("lm_loss", argv, device, body)


if __name__ == "__main__":
    main(sys.argv[1:])
