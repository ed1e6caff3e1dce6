"""The MFU ceiling of a transformer training step: its matrix products and its attention, timed bare.

Issue 8 asks for 50% MFU at BERT-base size on an H100 (`bash benchmarks/gpu.sh` measures the model:
26% so far, HF's BertForPreTraining 22%). The FLOPs that MFU counts (modules/flops.py) are those of the
weight matrix products, 6 per weight per token (the forward product, then the input's and the weight's
gradients), and of attention's two products per layer. This script runs exactly those products and
nothing else, on inputs of the step's shapes:

- matrix products: per layer, the fused q/k/v (d_model -> 3 d_model), output (d_model -> d_model),
  feed-forward up (d_model -> d_ff) and down (d_ff -> d_model) projections of the batch's tokens,
  each forward and its two backward products, --layers times;
- attention: `scaled_dot_product_attention` forward and backward at (batch, heads, seq, head_dim)
  without a mask (the fused kernel the device picks), --layers times.

Any implementation of the step computes these products, so their time bounds the step's from below,
and the step's FLOPs over that time is the most MFU any implementation can show on this device, at
this size, in this dtype (vocabulary projection, embeddings, norms, dropout, the optimizer: all extra).
Median of --repeats timed blocks of --steps steps after a warm-up block.

    python benchmarks/mfu_ceiling.py --device cuda          # BERT-base: 12 x 768 (3072), 12 heads, 32 x 512
    python benchmarks/mfu_ceiling.py --quick                # a tiny smoke run on the CPU

Prints one line per part (FLOPs a step, ms a step, TFLOP/s, MFU against the device's datasheet peak or
--peak-tflops) and writes benchmarks/results/mfu_ceiling.json (_cuda on a GPU).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from records import SEED, synchronize, write_record
from torch import Tensor

from modules.flops import peak_flops

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
QUICK = dict(layers=2, d_model=64, d_ff=256, heads=4, batch=2, seq=32, steps=2, repeats=2, device="cpu")


def matrix_products(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Callable[[], None]:
    """One step's weight products: per layer and weight W (in, out), Y = X W, dX = dY W^T, dW = X^T dY."""
    tokens, d, f = args.batch * args.seq, args.d_model, args.d_ff
    shapes = [(d, 3 * d), (d, d), (d, f), (f, d)]  # q/k/v, output, feed-forward up, down
    generator = torch.Generator(device=device).manual_seed(SEED)

    def random(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator, device=device, dtype=dtype)

    operands = [(random(tokens, n_in), random(n_in, n_out), random(tokens, n_out)) for n_in, n_out in shapes]

    def step() -> None:
        for _ in range(args.layers):
            for x, w, dy in operands:  # x (N, in), w (in, out), dy (N, out)
                x @ w  # noqa: B018  forward
                dy @ w.T  # noqa: B018  the input's gradient
                x.T @ dy  # noqa: B018  the weight's gradient

    return step


def attention(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Callable[[], None]:
    """One step's attention: forward and backward of SDPA at (B, H, T, Dh), per layer."""
    shape = (args.batch, args.heads, args.seq, args.d_model // args.heads)
    generator = torch.Generator(device=device).manual_seed(SEED)
    q, k, v = (
        torch.randn(shape, generator=generator, device=device, dtype=dtype).requires_grad_() for _ in range(3)
    )
    grad = torch.randn(shape, generator=generator, device=device, dtype=dtype)

    def step() -> None:
        for _ in range(args.layers):
            out = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, Dh)
            torch.autograd.grad(out, (q, k, v), grad)

    return step


def flops(args: argparse.Namespace) -> dict[str, float]:
    """Per step, as modules/flops.py counts them: 6 per weight per token; attention 12 L B T^2 D."""
    d, f, tokens = args.d_model, args.d_ff, args.batch * args.seq
    weights = args.layers * (4 * d * d + 2 * d * f)
    return {
        "matrix products": 6.0 * weights * tokens,
        "attention": 12.0 * args.layers * args.batch * args.seq**2 * d,
    }


def seconds_per_step(step: Callable[[], None], args: argparse.Namespace, device: torch.device) -> float:
    """Median over --repeats blocks of --steps steps, after one block of warm-up."""
    times = []
    for block in range(args.repeats + 1):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        synchronize(device)
        if block:
            times.append((time.perf_counter() - start) / args.steps)
    return statistics.median(times)


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--d-ff", type=int, default=3072)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=5, help="timed blocks")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak (default: a known GPU's)")
    parser.add_argument("--threads", type=int, help="torch threads on a CPU")
    parser.add_argument("--quick", action="store_true", help=f"a tiny smoke run: {QUICK}")
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    return args


def main(argv: list[str]) -> None:
    args = parse_arguments(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    peak = peak_flops(device, dtype, args.peak_tflops)
    work = flops(args)
    seconds = {
        "matrix products": seconds_per_step(matrix_products(args, device, dtype), args, device),
        "attention": seconds_per_step(attention(args, device, dtype), args, device),
    }
    work["both"], seconds["both"] = sum(work.values()), sum(seconds.values())
    print(f"{'part':<18}{'GFLOP/step':>12}{'ms/step':>10}{'TFLOP/s':>10}{'MFU':>8}")
    parts = {}
    for part, step_flops in work.items():
        rate = step_flops / seconds[part]
        mfu = f"{rate / peak:.1%}" if peak else "n/a"
        print(f"{part:<18}{step_flops / 1e9:>12.1f}{seconds[part] * 1e3:>10.2f}{rate / 1e12:>10.2f}{mfu:>8}")
        parts[part] = {"flops": step_flops, "seconds": seconds[part], "mfu": rate / peak if peak else None}
    setting = vars(args) | {"peak_flops": peak}
    write_record("mfu_ceiling", argv, device, {"setting": setting, "parts": parts})


if __name__ == "__main__":
    main(sys.argv[1:])
