"""Training throughput and peak memory: polyhead against HuggingFace transformers at the same
architecture, batch, sequence length, dtype (fp32) and thread count.

Issue 8 ("Speed and scale") asks for polyhead >= 1.3x HF's training throughput on CPU in fp32 at
this small config, with no more peak memory; this script measures both. Four cases:

- bert: polyhead's post-LN encoder with the MaskedLMNextSentence heads and loss (tasks/mlm_nsp.py)
  against `BertForPreTraining`;
- t5: polyhead's pre-RMSNorm encoder-decoder with relative position bias and the Seq2Seq task
  (tasks/seq2seq.py), in T5 v1.0's layout (ReLU, output tied to the embeddings and scaled), against
  `T5ForConditionalGeneration`;
- gpt2: polyhead's pre-LayerNorm decoder with learned positions and the PrefixLM task
  (tasks/prefix_lm.py) with the loss on every next token (`loss_on: all`), in GPT-2's layout (tanh
  GELU, biases, output tied to the embeddings), against `GPT2LMHeadModel`;
- llama: the same task in LLaMA's layout (pre-RMSNorm, rotary positions, half as many key/value heads
  as query heads, SwiGLU of width 8/3 x d_model rounded to 8, no biases, output tied, no dropout but
  on attention), against `LlamaForCausalLM`.

Both sides of a case are one `BackboneConfig`: HF's config is written from it by
`bert_config_to_hf` (modules/convert_bert.py), `t5_config_to_hf` (modules/convert_t5.py),
`gpt2_config_to_hf` (modules/convert_gpt2.py) or `LLAMA.config_to_hf` (modules/convert_llama.py),
which refuse any field HF would compute differently. The parameter counts must then be equal (no
difference is allowed for: there is none), HF starts from a copy of polyhead's initial weights, and
before anything is timed both must give the same loss on the benchmark batch with dropout off.

Default config: 4 layers (and 4 decoder layers for t5), d_model 256, 4 heads, d_ff 1024, vocabulary
8000, sequence 128 (t5: source 128, target seq / 4 = 32), batch 32, fp32, dropout 0.1 on both sides
(hidden states and attention probabilities; T5's single dropout_rate is both), torch's default
thread count unless --threads. Batches are random tokens, all of them real (attention masks all
ones), the same tensors for both sides: for bert segment A is the first half and B the second, about
15% of positions carry an MLM label, NSP labels are random; for t5 the decoder reads the labels
shifted right behind the start token (teacher forcing) and every target token is a label; for gpt2
and llama every position but the last predicts the next token (HF shifts its labels itself).

The timed unit is one training step: forward, loss, backward, AdamW step (lr 5e-4, weight decay 0.01
on matrices and embeddings only, grouped for both sides by polyhead's modules/optim.py). Both models
are built in one process and warmed up (3 steps each), then timed in alternating blocks of --steps
steps (polyhead, HF, polyhead, ...) --repeats times, so a change in the machine's load touches both
alike; throughput is the median over repeats of real input tokens per second (t5: source + target
tokens). Peak memory is measured for each side alone in a fresh process (this script again, with a
hidden flag): the peak resident set (VmHWM) after warm-up + --steps steps, minus the resident set
after imports (VmRSS).

What differs is how each library computes the same network, which is what is measured: polyhead
projects MLM logits at the masked positions only (HF: at every position) and fuses q/k/v (and
T5's cross-attention k/v) into one matmul. Dropout sits where each original puts it (BERT and GPT-2:
none between the feed-forward projections, `ff_dropout: 0.0`, as an imported BERT or GPT-2 gets; T5:
there too), except that polyhead's pre-norm stack also drops after its final norm (T5's place),
which GPT-2 does not: one dropout more on polyhead's side. HF T5 and GPT-2 are called with
use_cache=False: training needs no KV cache.

    python benchmarks/train_throughput.py                           # every case, default config
    python benchmarks/train_throughput.py --threads 2 --repeats 9   # the threads the peers used
    python benchmarks/train_throughput.py --cases t5 --batch 16 --seq 256
    python benchmarks/train_throughput.py --quick                   # a tiny smoke run
    python benchmarks/train_throughput.py --cases llama --lora 8    # LoRA: polyhead against HF + peft

--lora R fine-tunes with rank-R adapters on --lora-targets (default query,value) on both sides of the
llama case: polyhead's `model.lora` (modules/lora.py) and HF's `peft.get_peft_model` on the LLaMA
projections of the same targets (q_proj, v_proj, ...), everything else frozen (the tied LM head
too), with the trainable counts refused unless equal. The loss check runs before the adapters
are added; they start with B = 0, which leaves the loss as it was.

Prints one line per case (tokens/s of both sides and their ratio, peak MiB of both and their ratio)
and writes benchmarks/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from records import SEED, resident_mib, synchronize, write_record
from throughput_cases import (
    CASES,
    Case,
    check_same_loss,
    hf_copy,
    loss_of,
    on_device,
    parameter_count,
    polyhead_model,
    trainable_count,
    with_adapters,
)
from torch import Tensor, nn

from modules.flops import network_cost, peak_flops
from modules.lora import TARGETS, LoraConfig
from modules.optim import OptimizerConfig, build_optimizer
from modules.speed import SpeedConfig, apply_speed
from tasks.base import batch_stack_sizes, batch_tokens

ROOT = Path(__file__).resolve().parents[1]
OPTIMIZER = OptimizerConfig(lr=5e-4, weight_decay=0.01, warmup=0, schedule="constant")
WARMUP_STEPS = 3
SIDES = ("polyhead", "hf")
QUICK = {"steps": 2, "repeats": 2, "batch": 4, "seq": 32, "layers": 1, "d_model": 64}
"""--quick: a config small enough to run in seconds; flags given explicitly still win."""
BERT_BASE = {"layers": 12, "d_model": 768, "heads": 12, "vocab": 30522, "seq": 512}
"""--bert-base: BERT-base's size (110M parameters with its heads), at sequence 512."""


def compiled(side: str, model: nn.Module) -> nn.Module:
    """`model` with torch.compile as each side's users turn it on: polyhead's `model.speed.compile`
    (each transformer block), HF's `torch_compile` of its Trainer (the whole model)."""
    if side == "polyhead":
        apply_speed(model["backbone"], SpeedConfig(compile=True))
    else:
        model.compile()
    return model


def training_step(model: nn.Module, loss: Callable[[], Tensor], precision: str) -> Callable[[], None]:
    """-> the timed unit for `model` (put in train mode): forward + loss + backward + AdamW step.

    Both sides get polyhead's AdamW (decay on matrices and embeddings, not on biases or norm scales)
    at a constant learning rate; the schedule build_optimizer also returns is not stepped.
    precision "bf16" runs forward and loss under bf16 autocast, with fp32 weights, gradients and
    optimizer state: what Lightning's `precision: bf16-mixed` does.
    """
    model.train()
    optimizer = build_optimizer(model, OPTIMIZER, total_steps=1, depth=lambda name: 0)["optimizer"]
    device = next(model.parameters()).device

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            value = loss()
        value.backward()
        optimizer.step()

    return step


def tokens_per_second(step: Callable[[], None], steps: int, tokens: int, device: torch.device) -> float:
    """Real input tokens per second over `steps` consecutive steps."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return steps * tokens / (time.perf_counter() - start)


def measure_throughput(case: Case, args: argparse.Namespace) -> dict:
    """Both sides in this process, warmed up, then timed in alternating blocks (see the docstring)."""
    device = torch.device(args.device)
    torch.manual_seed(SEED)
    case = on_device(case, device)
    ours = polyhead_model(case.config, case.task)
    theirs = hf_copy(case, case.config, ours)
    parameters = parameter_count(ours)
    if parameter_count(theirs) != parameters:
        raise RuntimeError(f"polyhead has {parameters} parameters, HF {parameter_count(theirs)}")
    ours, theirs = ours.to(device), theirs.to(device)
    start_loss = check_same_loss(case, ours)
    models = dict(zip(SIDES, (ours, theirs), strict=True))
    if args.lora:
        models = {side: with_adapters(side, model, lora_config(args)) for side, model in models.items()}
        counts = {side: trainable_count(model) for side, model in models.items()}
        if counts["polyhead"] != counts["hf"]:
            raise RuntimeError(
                f"LoRA trains {counts['polyhead']} parameters in polyhead, {counts['hf']} in HF"
            )
    if args.compile:
        models = {side: compiled(side, model) for side, model in models.items()}
    steps = {
        side: training_step(model, loss_of(case, side, model), args.precision)
        for side, model in models.items()
    }
    for step in steps.values():
        for _ in range(WARMUP_STEPS):
            step()
    tokens = batch_tokens(case.batch)
    rates: dict[str, list[float]] = {side: [] for side in SIDES}
    for _ in range(args.repeats):
        for side, step in steps.items():
            rates[side].append(tokens_per_second(step, args.steps, tokens, device))
    medians = {side: statistics.median(r) for side, r in rates.items()}
    if args.profile:
        print_profile(steps, device)
    # the network's FLOPs (modules/flops.py), the same for both sides: MFU compares as throughput does
    cost = network_cost(ours["backbone"], ours["head"], case.task.stacks)
    flops_per_token = cost.training_flops(*batch_stack_sizes(case.batch)) / tokens
    peak = peak_flops(device, torch.bfloat16 if args.precision == "bf16" else torch.float32, args.peak_tflops)
    return {
        "parameters": parameters,
        "trainable_parameters": trainable_count(models["polyhead"]),
        "tokens_per_step": tokens,
        "loss_at_start": round(start_loss, 4),
        "hf_attention": theirs.config._attn_implementation,
        "tokens_per_s": {side: round(rate, 1) for side, rate in medians.items()},
        "tokens_per_s_repeats": {side: [round(x, 1) for x in r] for side, r in rates.items()},
        "model_flops_per_token": flops_per_token,
        "peak_flops": peak,
        "mfu": {side: round(flops_per_token * rate / peak, 4) for side, rate in medians.items()}
        if peak
        else None,
    }


def print_profile(steps: dict[str, Callable[[], None]], device: torch.device) -> None:
    """Where each side's step spends its time: torch.profiler over 3 steps, the 15 costliest
    operators by their own time on the device (the GPU's kernels; on a CPU, its operators)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    for side, step in steps.items():
        with torch.profiler.profile(activities=activities) as profiler:
            for _ in range(3):
                step()
            synchronize(device)
        order = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(
            f"\n{side}: 3 steps\n"
            + profiler.key_averages().table(sort_by=order, row_limit=15, max_name_column_width=60)
        )


def peak_memory_here(case_name: str, side: str, args: argparse.Namespace) -> float:
    """In a fresh process: how far warm-up + --steps steps of one side alone raise the peak memory
    above where it stood after imports: the resident set on a CPU, the allocated GPU memory on a
    GPU (weights, gradients, optimizer state and activations, either way). HF keeps its own
    initialisation here: weights do not change what memory a step takes."""
    device = torch.device(args.device)
    after_imports = resident_mib("VmRSS")
    torch.manual_seed(SEED)
    case = on_device(CASES[case_name](args), device)
    model = polyhead_model(case.config, case.task) if side == "polyhead" else case.hf_model(case.config)
    model = model.to(device)
    if args.lora:
        model = with_adapters(side, model, lora_config(args))
    if args.compile:
        model = compiled(side, model)
    step = training_step(model, loss_of(case, side, model), args.precision)
    for _ in range(WARMUP_STEPS + args.steps):
        step()
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resident_mib("VmHWM") - after_imports


def peak_memory(case_name: str, side: str, args: argparse.Namespace) -> float:
    """`peak_memory_here` in a subprocess of this script with the same command line (so the same
    threads: the given number, or torch's default)."""
    command = [
        *(sys.executable, str(Path(__file__).resolve()), *args.argv),
        *("--peak-memory-of", f"{case_name}:{side}"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode:
        raise RuntimeError(f"peak memory of {case_name}:{side} failed:\n{result.stderr}")
    return float(result.stdout.split()[-1])


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=5, help="timed steps per block")
    parser.add_argument("--repeats", type=int, default=5, help="timed blocks per side")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument(
        "--cases", default="bert,t5,gpt2,llama", help="comma-separated, of: " + ", ".join(CASES)
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128, help="tokens per input (t5: source; target seq/4)")
    parser.add_argument("--layers", type=int, default=4, help="encoder layers (t5: and decoder layers)")
    parser.add_argument("--d-model", type=int, default=256, help="width; d_ff is 4 x d_model")
    parser.add_argument("--heads", type=int, default=4, help="attention heads")
    parser.add_argument("--vocab", type=int, default=8000, help="vocabulary size")
    parser.add_argument("--dropout", type=float, default=0.1, help="hidden and attention dropout, both sides")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    parser.add_argument(
        "--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: bf16 autocast, as bf16-mixed"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile both sides (see `compiled`)")
    parser.add_argument(
        "--peak-tflops", type=float, help="one device's peak, for MFU (default: a known GPU's)"
    )
    parser.add_argument(
        "--lora", type=int, default=0, help="LoRA rank: adapters alone train (llama only; HF: peft)"
    )
    parser.add_argument(
        "--lora-targets", default="query,value", help="comma-separated, of: " + ", ".join(TARGETS)
    )
    parser.add_argument("--profile", action="store_true", help="print each side's costliest operators")
    parser.add_argument("--quick", action="store_true", help=f"a tiny smoke run: {QUICK}")
    parser.add_argument("--bert-base", action="store_true", help=f"BERT-base's size: {BERT_BASE}")
    parser.add_argument("--peak-memory-of", help=argparse.SUPPRESS)  # CASE:SIDE, the subprocess's job
    args = parser.parse_args(argv)
    for preset, flag in ((QUICK, args.quick), (BERT_BASE, args.bert_base)):
        if flag:
            parser.set_defaults(**preset)
    args = parser.parse_args(argv)
    args.argv = argv
    unknown = set(args.cases.split(",")) - set(CASES)
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}; known: {', '.join(CASES)}")
    if args.lora and args.cases != "llama":
        parser.error("--lora compares with peft on LLaMA's projection names: use it with --cases llama")
    return args


def lora_config(args: argparse.Namespace) -> LoraConfig:
    """--lora's adapters: the rank, alpha = 2 x rank, no dropout (values do not change the work)."""
    return LoraConfig(rank=args.lora, alpha=2.0 * args.lora, targets=args.lora_targets.split(","))


HEADER = (
    f"{'case':<6}{'polyhead tok/s':>16}{'HF tok/s':>12}{'ratio':>8}"
    f"{'polyhead peak MiB':>20}{'HF peak MiB':>14}{'ratio':>8}{'MFU polyhead':>14}{'MFU HF':>8}"
)


def table_row(name: str, result: dict) -> str:
    """One case's line, under HEADER."""
    rate, peak, mfu = result["tokens_per_s"], result["peak_mib"], result["mfu"]
    mfus = f"{mfu['polyhead']:>14.1%}{mfu['hf']:>8.1%}" if mfu else f"{'-':>14}{'-':>8}"
    return (
        f"{name:<6}{rate['polyhead']:>16.0f}{rate['hf']:>12.0f}{result['throughput_ratio']:>8.2f}"
        f"{peak['polyhead']:>20.1f}{peak['hf']:>14.1f}{result['memory_ratio']:>8.2f}{mfus}"
    )


def main(argv: list[str]) -> None:
    args = parse_arguments(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    if args.peak_memory_of:
        print(peak_memory_here(*args.peak_memory_of.split(":"), args))
        return
    results = {}
    print(HEADER)
    for name in args.cases.split(","):
        result = measure_throughput(CASES[name](args), args)
        result["peak_mib"] = {side: round(peak_memory(name, side, args), 1) for side in SIDES}
        result["throughput_ratio"] = round(
            result["tokens_per_s"]["polyhead"] / result["tokens_per_s"]["hf"], 3
        )
        result["memory_ratio"] = round(result["peak_mib"]["polyhead"] / result["peak_mib"]["hf"], 3)
        results[name] = result
        print(table_row(name, result), flush=True)
    setting = {k: v for k, v in vars(args).items() if k not in ("cases", "peak_memory_of", "argv")}
    setting |= {"d_ff": 4 * args.d_model, "warmup_steps": WARMUP_STEPS}
    setting |= {"lr": OPTIMIZER.lr, "weight_decay": OPTIMIZER.weight_decay}
    write_record("train_throughput", argv, torch.device(args.device), {"setting": setting, "cases": results})


if __name__ == "__main__":
    main(sys.argv[1:])
