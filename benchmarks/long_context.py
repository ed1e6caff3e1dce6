"""Long inputs: peak memory and time of one training step against sequence length, for full
attention, LSH attention, and LSH + reversible layers + chunked feed-forward, beside the
`reformer-pytorch` package (lucidrains) at matched settings.

Every (method, length) runs in its own process, so its peak memory is its own: on a CPU the peak
resident set of the step minus the resident set before it, with the process's address space capped
at --memory-gib (an allocation past it fails and is reported as "out of memory" rather than taking
the machine down); on a GPU torch's peak allocated bytes, with the allocator capped at
--memory-gib. A measurement past --max-seconds is stopped. A method stops at the first length
that does not fit or runs over time. The model is an encoder of 4
layers, width 256, 4 heads, feed-forward 1024, batch 1, over a 256-token vocabulary, trained as a
language model over every position (logits for every position, cross-entropy, AdamW step); LSH uses
4 hash rounds and 64-token buckets, the chunked feed-forward 8 slices, reformer-pytorch the same
(its ReformerLM is always reversible). Prints a table, the length where LSH starts to beat full
attention, writes benchmarks/results/long_context.json and long_context.png.

    python benchmarks/long_context.py --peer-python /path/to/venv-with-reformer-pytorch/bin/python
    python benchmarks/long_context.py --lengths 1024,2048 --methods full,lsh     # a quick look
    python benchmarks/long_context.py --update --lengths 131072 --methods lsh_reversible --max-seconds 1800
    python benchmarks/long_context.py --device cuda --memory-gib 16 --lengths 65536,131072,262144,524288,1048576
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
METHODS = ("full", "lsh", "lsh_reversible", "reformer_pytorch")
SIZE = dict(d_model=256, n_heads=4, d_ff=1024, layers=4, vocab=256, n_hashes=4, bucket_size=64, ff_chunks=8)


def resident_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process, in MiB (the child cannot import records.py from
    another interpreter's path order, so it reads /proc itself)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(f"{field}:"))
    return int(line.split()[1]) / 1024


def polyhead_model(method: str, length: int) -> tuple[torch.nn.Module, callable]:
    """An encoder of SIZE with the method's attention, and logits(ids) over every position."""
    from modules.backbone import Backbone
    from modules.config import BackboneConfig

    config = BackboneConfig(
        vocab_size=SIZE["vocab"], d_model=SIZE["d_model"], n_heads=SIZE["n_heads"], d_ff=SIZE["d_ff"],
        encoder_layers=SIZE["layers"], max_len=length, norm="pre", embedding_norm=False, pooler=False,
        type_vocab_size=0, dropout=0.0, attention_dropout=0.0,
        attention="full" if method == "full" else "lsh", lsh_n_hashes=SIZE["n_hashes"],
        lsh_bucket_size=SIZE["bucket_size"], reversible=method == "lsh_reversible",
        ff_chunks=SIZE["ff_chunks"] if method == "lsh_reversible" else 1,
    )  # fmt: skip
    backbone = Backbone(config)
    return backbone, lambda ids: backbone.encode(ids) @ backbone.token_embedding.T  # (B, T, V)


def reformer_model(length: int) -> tuple[torch.nn.Module, callable]:
    """reformer-pytorch's ReformerLM at SIZE: the same widths, depth, hashing and chunking."""
    from reformer_pytorch import ReformerLM

    model = ReformerLM(
        num_tokens=SIZE["vocab"], dim=SIZE["d_model"], depth=SIZE["layers"], max_seq_len=length,
        heads=SIZE["n_heads"], dim_head=SIZE["d_model"] // SIZE["n_heads"], bucket_size=SIZE["bucket_size"],
        n_hashes=SIZE["n_hashes"], ff_chunks=SIZE["ff_chunks"], causal=False, absolute_position_emb=True,
    )  # fmt: skip
    return model, model


def measure(method: str, length: int, device: torch.device, steps: int, memory_gib: float) -> dict:
    """Train `steps` + 1 steps (the first is warm-up) at `length` tokens; -> ms per step and peak MiB."""
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index  # it takes no "cuda"
        torch.cuda.set_per_process_memory_fraction(
            min(1.0, memory_gib * 2**30 / torch.cuda.get_device_properties(index).total_memory), index
        )
    torch.manual_seed(0)
    model, logits_of = (
        reformer_model(length) if method == "reformer_pytorch" else polyhead_model(method, length)
    )
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, SIZE["vocab"], (1, length), device=device)

    def step() -> None:
        logits = logits_of(ids)  # (1, T, V)
        F.cross_entropy(logits.flatten(0, 1).float(), ids.flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: optimizer state, allocator growth
    before = resident_mib("VmRSS")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = resident_mib("VmHWM") - before
    return {"ms_per_step": 1000 * (time.perf_counter() - start) / steps, "peak_mib": peak}


def child(args: argparse.Namespace) -> None:
    """One (method, length) in this process; prints RESULT {json}."""
    torch.set_num_threads(args.threads)
    if args.device == "cpu":
        limit = int(args.memory_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        result = measure(args.child, args.length, torch.device(args.device), args.steps, args.memory_gib)
    except (MemoryError, torch.OutOfMemoryError, RuntimeError) as error:
        if "memory" not in str(error).lower() and not isinstance(error, MemoryError):
            raise
        result = {"out_of_memory": True}
    print("RESULT " + json.dumps(result), flush=True)


def run_one(args: argparse.Namespace, method: str, length: int) -> dict:
    python = args.peer_python if method == "reformer_pytorch" else sys.executable
    command = [
        python, __file__, "--child", method, "--length", str(length), "--device", args.device,
        "--steps", str(args.steps), "--threads", str(args.threads), "--memory-gib", str(args.memory_gib),
    ]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads)}
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.max_seconds)
    except subprocess.TimeoutExpired:
        return {"over_time": True}
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:  # killed (the kernel's OOM killer) or crashed: say how, keep going
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"out_of_memory": done.returncode in (-9, 137), "error": tail}
    return json.loads(line[len("RESULT ") :])


def crossover(results: dict, method: str, key: str) -> int | None:
    """The shortest length from which `method` beats full attention on `key` at every longer length
    it was measured at. Full attention that ran out of memory counts as beaten on both keys; one that
    ran past the time limit, on time only (its memory is unknown)."""
    lengths = sorted(int(n) for n in results[method])
    winning = None
    for length in reversed(lengths):
        ours, full = results[method][str(length)], results["full"].get(str(length), {})
        if key not in ours:
            continue
        full_lost = full.get("out_of_memory") or (key == "ms_per_step" and full.get("over_time"))
        if not full_lost and key not in full:
            continue  # nothing to compare with at this length
        if full_lost or ours[key] < full[key]:
            winning = length
        else:
            break
    return winning


def problem(row: dict) -> str:
    """Why a measurement has no figures."""
    if row.get("out_of_memory"):
        return "out of memory"
    return "over time limit" if row.get("over_time") else "failed"


def print_table(results: dict, methods: list[str], lengths: list[int]) -> None:
    header = f"{'tokens':>8}" + "".join(f"{m + ' ms':>22}{'MiB':>9}" for m in methods)
    print(header)
    for length in lengths:
        cells = []
        for method in methods:
            row = results[method].get(str(length))
            if row is None:
                cells.append(f"{'-':>22}{'-':>9}")
            elif "ms_per_step" not in row:
                cells.append(f"{problem(row):>22}{'':>9}")
            else:
                cells.append(f"{row['ms_per_step']:>22.0f}{row['peak_mib']:>9.0f}")
        print(f"{length:>8}" + "".join(cells))


def plot(results: dict, methods: list[str], path: Path) -> None:
    from experiments.plots import line_chart

    def series(key: str) -> dict:
        lines = {}
        for method in methods:
            fitted = sorted((int(n), r[key]) for n, r in results[method].items() if key in r)
            if fitted:
                lines[method] = ([n / 1024 for n, _ in fitted], [v for _, v in fitted])
        return lines

    line_chart(
        path, series("peak_mib"), "Peak memory of one training step", "tokens (k)", "MiB", log_axes=True
    )
    line_chart(path.with_name(path.stem + "_time.png"), series("ms_per_step"), "Time of one training step",
               "tokens (k)", "ms", log_axes=True)  # fmt: skip


def saved_results(device: torch.device) -> tuple[dict, list[str]]:
    """The results of the saved record for `device` and the commands that made them, when it was
    measured at this SIZE; else nothing."""
    from records import RESULTS

    path = RESULTS / ("long_context.json" if device.type == "cpu" else f"long_context_{device.type}.json")
    if not path.exists():
        return {}, []
    record = json.loads(path.read_text())
    if record.get("size") != SIZE:
        return {}, []
    return record["results"], [*record.get("earlier_commands", []), record["command"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768,65536")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory-gib", type=float, default=20.0, help="memory cap of each measurement")
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=240.0,
        help="time limit of each measurement (model building, warm-up step and timed steps)",
    )
    parser.add_argument(
        "--peer-python", default=sys.executable, help="a Python with reformer-pytorch installed"
    )
    parser.add_argument(
        "--update", action="store_true",
        help="add to the saved results (same model size and device) instead of starting afresh: "
        "each cell measured now replaces the saved one, e.g. to extend a table to longer inputs",
    )  # fmt: skip
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    from records import write_record

    lengths = [int(n) for n in args.lengths.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown --methods {unknown}; choose from {', '.join(METHODS)}")
    device = torch.device(args.device)
    results, earlier = saved_results(device) if args.update else ({}, [])
    for method in methods:
        results.setdefault(method, {})
    for method in methods:
        for length in lengths:
            results[method][str(length)] = run_one(args, method, length)
            print(f"{method} {length}: {results[method][str(length)]}", file=sys.stderr, flush=True)
            if "ms_per_step" not in results[method][str(length)]:
                break  # longer ones will not fit either
    methods = [m for m in METHODS if m in results]
    lengths = sorted({int(n) for cells in results.values() for n in cells})
    print_table(results, methods, lengths)
    summary = {}
    if "full" in results:
        for method in (m for m in methods if m != "full"):
            summary[method] = {key: crossover(results, method, key) for key in ("ms_per_step", "peak_mib")}
            print(f"{method} beats full attention from {summary[method]['ms_per_step']} tokens on time, "
                  f"from {summary[method]['peak_mib']} on memory")  # fmt: skip
    body = {"size": SIZE, "results": results, "crossover": summary, "earlier_commands": earlier}
    record = write_record("long_context", sys.argv[1:], device, body)
    plot(results, methods, record.with_suffix(".png"))
    print(f"wrote {record}")


if __name__ == "__main__":
    main()
