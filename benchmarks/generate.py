"""Text generation throughput: polyhead's `generate` (modules/generation.py) against HuggingFace
transformers' `T5ForConditionalGeneration.generate` (or, with --model gpt2, the decoder-only
`GPT2LMHeadModel.generate`), on the same config and the same weights.

Issue 8 ("Speed and scale") asks for polyhead >= 2x HF's generation throughput; this script
measures both. Two cases, on one batch of sources:

- greedy: the most likely token each step;
- beam: beam search with --beams beams per source (default 4), the best hypothesis returned.

The models: an HF T5 in v1.0's layout (ReLU feed-forward, output tied to the embeddings and scaled
by d_model ** -0.5) is built from a `transformers.T5Config` with HF's random initialisation, and
every parameter is then perturbed by N(0, 0.5), as tests/test_generation_hf.py does: at HF's
initialisation cross-attention is close to uniform, and every source would decode alike. Its state
dict is converted by the project's own converter (`backbone_config_from_t5`, `t5_to_polyhead` in
modules/convert_t5.py) into a polyhead `Backbone`, whose logits come from polyhead's
`LanguageModelHead`, as tasks/seq2seq.py projects them. Both are the same network with the same
weights in fp32.

Default config: 4 encoder + 4 decoder layers, d_model 256, 4 heads of 64, d_ff 4 x d_model = 1024,
vocabulary 8000, T5's 32 relative-position buckets up to distance 128; a batch of 16 random sources
(ids from 5 up, T5's low ids being special) of 128 columns, right-padded with T5's pad id 0 behind
each row's real tokens (row 0 is full; the others keep between half and all of the columns), 64 new
tokens per row. Both decoders start from T5's start token, pad id 0.

--model gpt2: the same widths in GPT-2's layout (pre-LayerNorm, learned positions for prompt + new
tokens, biases, tanh GELU, output tied to the embeddings), --layers decoder layers, built as
`GPT2LMHeadModel` and converted by `backbone_config_from_gpt2` / `gpt2_to_polyhead`
(modules/convert_gpt2.py). --model llama: LLaMA's layout (pre-RMSNorm, rotary positions, SwiGLU of
width 8/3 x d_model rounded to 8, no biases, output tied), with grouped-query attention (half as many
key/value heads as query heads), built as `LlamaForCausalLM` and converted by modules/convert_llama.py.
For both, the sources become prompts, LEFT-padded (the pad in front of each row's real tokens, so
every row's next token lands in the same column, as decoder-only generation needs); both sides
continue each prompt from its own last real token, with positions counted from its first.

Both sides do the same work: every row generates exactly --new-tokens tokens. Neither side has an
eos: polyhead runs with `eos_id=None`, which decodes every row for max_new_tokens, and HF's
T5Config is built with `eos_token_id=None` (and generate is passed `eos_token_id=None`), so no
hypothesis ever finishes early and HF's stopping criterion is the length alone. Every returned
output is checked to have that many tokens. Without an eos nothing ends before the last step, so
beam search is the same on both sides (n-best, length penalty 1, which all-equal lengths make moot;
HF's `early_stopping="never"`, polyhead's only rule).

Before anything is timed, each side generates once per case on the CPU in fp32 and the tokens must
be equal token for token, or the script refuses to time them. On a GPU the tokens may then differ:
with no eos the work is the same whatever tokens come out, but a near-tie between two candidates can
flip with the order of a sum and the rest of the row follows it (the benchmark's T5, at its
perturbed weights, is that fragile: on the CPU its logits in fp32 and in fp64 differ by several
percent). The record says, for the timed device, whether the tokens were equal, which rows
diverged, and, both sides fed HF's tokens, the relative difference of their logits and how often
their argmax agree. The timed device's first generate call is also each side's warm-up. HF is
called with use_cache=True (its default KV cache), do_sample=False, num_return_sequences=1 and
disable_compile=True (no torch.compile on either side). --cuda-graph and --hf-static-cache give both
sides their fixed-shape decoding: polyhead's step recorded as a CUDA graph, HF's StaticCache, with
which HF's generate compiles the forward on a GPU (mode reduce-overhead, itself CUDA graphs). Both models are in eval mode and both calls
run under torch.inference_mode.

The timed unit is one generate call on the whole batch: encoding the sources, then decoding
--new-tokens steps. Calls are timed in alternating blocks (polyhead, HF, polyhead, ...) --repeats
times, so a change in the machine's load touches both alike; throughput is the median over repeats
of generated tokens per second, generated tokens being the tokens returned: rows x new tokens, one
output per source (beams are not counted).

    python benchmarks/generate.py                          # both cases, default config
    python benchmarks/generate.py --threads 1 --repeats 9  # a pinned thread count, more repeats
    python benchmarks/generate.py --cases beam --beams 8 --batch 32
    python benchmarks/generate.py --device cuda
    python benchmarks/generate.py --device cuda --cuda-graph  # polyhead's step replayed as a CUDA graph
    python benchmarks/generate.py --model gpt2             # decoder-only, against HF GPT-2
    python benchmarks/generate.py --quick                  # a tiny smoke run

Prints one line per case (tokens/s of both sides and their ratio, polyhead / HF) and writes
benchmarks/results/generate.json (generate_gpt2.json, generate_llama.json for --model gpt2, llama;
_cuda before .json on a GPU).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial

import torch
from generation_models import HF_MODELS, polyhead_copy, source_batch, teacher_forced_logits
from records import SEED, T5_PAD, T5_START, synchronize, write_record
from torch import Tensor
from transformers import PreTrainedModel

from modules.backbone import Backbone
from modules.generation import GenerationConfig, generate
from modules.heads import LanguageModelHead

SIDES = ("polyhead", "hf")
CASES = ("greedy", "beam")
QUICK = {"repeats": 2, "batch": 4, "seq": 16, "new_tokens": 8, "layers": 1, "d_model": 64, "vocab": 500}
"""--quick: a config small enough to run in seconds; flags given explicitly still win."""

Generate = Callable[[], Tensor]
"""One timed call: generate on the whole batch -> the new tokens (rows, new tokens)."""


def polyhead_run(
    backbone: Backbone,
    head: LanguageModelHead,
    source: Tensor,
    mask: Tensor,
    case: str,
    args: argparse.Namespace,
) -> Generate:
    """polyhead's generate for a case: no eos, so every row decodes --new-tokens steps."""
    beam = {"num_beams": args.beams} if case == "beam" else {}
    settings = GenerationConfig(
        strategy=case,
        max_new_tokens=args.new_tokens,
        eos_id=None,
        pad_id=T5_PAD,
        cuda_graph=args.cuda_graph,
        **beam,
    )

    def project(hidden: Tensor) -> Tensor:
        return head(hidden, backbone.token_embedding)  # (N, D) -> (N, V)

    start = T5_START if backbone.encoder is not None else None  # decoder-only: continue the prompt

    def run() -> Tensor:
        with torch.inference_mode():
            return generate(backbone, project, source, mask, settings, start_id=start).tokens

    return run


def hf_run(
    hf: PreTrainedModel, source: Tensor, mask: Tensor, case: str, args: argparse.Namespace
) -> Generate:
    """HF's generate for a case, every option that changes the tokens or the work stated (beam search's
    only for beam: HF warns of unused ones); T5's start token, or GPT-2's prompt, is cut off, so it
    returns what polyhead does."""
    beam = {"length_penalty": 1.0, "early_stopping": "never"} if case == "beam" else {}
    options = beam | {
        "max_new_tokens": args.new_tokens,
        "min_new_tokens": 0,
        "num_beams": args.beams if case == "beam" else 1,
        "num_return_sequences": 1,
        "do_sample": False,
        "no_repeat_ngram_size": 0,
        "repetition_penalty": 1.0,
        "pad_token_id": T5_PAD,
        "eos_token_id": None,
        "use_cache": True,
        "disable_compile": not args.hf_static_cache,
    }
    if args.hf_static_cache:  # HF's own fixed-shape cache; on a GPU generate then compiles the forward
        options["cache_implementation"] = "static"
    if hf.config.is_encoder_decoder:
        options["decoder_start_token_id"] = T5_START
    given = 1 if hf.config.is_encoder_decoder else source.size(1)  # T5's start token, or GPT-2's prompt

    def run() -> Tensor:
        with torch.inference_mode():
            return hf.generate(input_ids=source, attention_mask=mask, **options)[:, given:]  # (B, L)

    return run


def check_same_tokens(case: str, runs: dict[str, Generate], shape: tuple[int, int]) -> None:
    """Refuse to time two generations that differ: on the CPU, in fp32, both sides' tokens must be
    equal token for token (see the docstring)."""
    outputs = generated(case, runs, shape)
    if not torch.equal(outputs["polyhead"], outputs["hf"]):
        rows = (outputs["polyhead"] != outputs["hf"]).any(dim=1).nonzero().flatten().tolist()
        raise RuntimeError(f"{case}: polyhead's tokens differ from HF's in rows {rows}")


def agreement(outputs: dict[str, Tensor], logits: Callable[[Tensor], dict]) -> dict:
    """How far the two sides' generations agree on the timed device: whether the tokens are equal,
    the rows that diverged, and, both fed HF's tokens, the relative difference of their logits and
    how often their argmax agree."""
    ours, theirs = outputs["polyhead"], outputs["hf"]
    forced = logits(theirs)
    difference = float((forced["polyhead"] - forced["hf"]).norm() / forced["hf"].norm())
    same_choice = forced["polyhead"].argmax(-1) == forced["hf"].argmax(-1)  # (B, L)
    return {
        "tokens_equal": bool(torch.equal(ours, theirs)),
        "rows_that_diverged": (ours != theirs).any(dim=1).nonzero().flatten().tolist(),
        "teacher_forced_logits_relative_difference": float(f"{difference:.3g}"),
        "teacher_forced_same_argmax": round(float(same_choice.float().mean()), 5),
    }


def generated(case: str, runs: dict[str, Generate], shape: tuple[int, int]) -> dict[str, Tensor]:
    """Each side's generate, once (it doubles as its warm-up); both must return `shape` (rows, new
    tokens), every row at full length."""
    outputs = {side: run() for side, run in runs.items()}
    for side, tokens in outputs.items():
        if tuple(tokens.shape) != shape:
            raise RuntimeError(f"{case}: {side} returned {tuple(tokens.shape)} tokens, expected {shape}")
    return outputs


def tokens_per_second(run: Generate, tokens: int, device: torch.device) -> float:
    """Generated tokens per second of one generate call."""
    synchronize(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    return tokens / (time.perf_counter() - start)


def measure(
    case: str,
    runs: dict[str, Generate],
    logits: Callable[[Tensor], dict],
    rows: int,
    args: argparse.Namespace,
) -> dict:
    """One case on the timed device: each side's warm-up call and how far the two agree, then
    alternating timed blocks (see the docstring)."""
    device = torch.device(args.device)
    check = agreement(generated(case, runs, (rows, args.new_tokens)), logits)
    tokens = rows * args.new_tokens
    rates: dict[str, list[float]] = {side: [] for side in SIDES}
    for _ in range(args.repeats):
        for side, run in runs.items():
            rates[side].append(tokens_per_second(run, tokens, device))
    medians = {side: statistics.median(r) for side, r in rates.items()}
    return {
        "num_beams": args.beams if case == "beam" else 1,
        "tokens_per_call": tokens,
        **check,
        "tokens_per_s": {side: round(rate, 1) for side, rate in medians.items()},
        "tokens_per_s_repeats": {side: [round(x, 1) for x in r] for side, r in rates.items()},
        "ratio": round(medians["polyhead"] / medians["hf"], 3),
    }


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed generate calls per side and case")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated, of: " + ", ".join(CASES))
    parser.add_argument("--beams", type=int, default=4, help="beam: beams per source")
    parser.add_argument("--batch", type=int, default=16, help="sources per generate call")
    parser.add_argument("--seq", type=int, default=128, help="source columns (rows are right-padded)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per row")
    parser.add_argument(
        "--model",
        default="t5",
        choices=list(HF_MODELS),
        help="the architecture: T5, or decoder-only GPT-2 or LLaMA",
    )
    parser.add_argument(
        "--layers",
        type=int,
        default=4,
        help="encoder layers, and as many decoder layers (gpt2: decoder layers)",
    )
    parser.add_argument("--d-model", type=int, default=256, help="width; d_ff is 4 x d_model")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (head width d_model / heads)")
    parser.add_argument("--vocab", type=int, default=8000, help="vocabulary size")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    parser.add_argument(
        "--cuda-graph",
        action="store_true",
        help="polyhead replays its decoding step as a CUDA graph (GenerationConfig.cuda_graph); "
        "on the CPU: the same fixed shapes, unrecorded",
    )
    parser.add_argument(
        "--hf-static-cache",
        action="store_true",
        help="HF decodes on its StaticCache (cache_implementation='static'), with which its generate "
        "compiles the model's forward on a GPU (torch.compile, mode reduce-overhead: CUDA graphs)",
    )
    parser.add_argument("--quick", action="store_true", help=f"a tiny smoke run: {QUICK}")
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    unknown = set(args.cases.split(",")) - set(CASES)
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}; known: {', '.join(CASES)}")
    return args


HEADER = f"{'case':<8}{'polyhead tok/s':>16}{'HF tok/s':>12}{'ratio':>8}"


def table_row(name: str, result: dict) -> str:
    """One case's line, under HEADER."""
    rate = result["tokens_per_s"]
    return f"{name:<8}{rate['polyhead']:>16.0f}{rate['hf']:>12.0f}{result['ratio']:>8.2f}"


def main(argv: list[str]) -> None:
    args = parse_arguments(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    device = torch.device(args.device)
    decoder_only = args.model != "t5"
    hf = HF_MODELS[args.model](args)
    backbone, head = polyhead_copy(hf)
    generator = torch.Generator().manual_seed(SEED)
    source, mask = source_batch(args.batch, args.seq, args.vocab, generator, decoder_only)
    cases = args.cases.split(",")

    def runs_of(case: str) -> dict[str, Generate]:
        return {
            "polyhead": polyhead_run(backbone, head, source, mask, case, args),
            "hf": hf_run(hf, source, mask, case, args),
        }

    for case in cases:
        check_same_tokens(case, runs_of(case), (args.batch, args.new_tokens))
    hf, backbone, head = hf.to(device), backbone.to(device), head.to(device)
    source, mask = source.to(device), mask.to(device)
    results = {}
    print(HEADER)
    logits = partial(teacher_forced_logits, backbone, head, hf, source, mask)
    for case in cases:
        results[case] = measure(case, runs_of(case), logits, args.batch, args)
        print(table_row(case, results[case]), flush=True)
    setting = {k: v for k, v in vars(args).items() if k != "cases"}
    setting |= {"d_ff": backbone.config.d_ff, "source_real_tokens": int(mask.sum())}
    setting |= {"parameters": sum(p.numel() for p in backbone.parameters())}
    setting |= {"hf_attention": hf.config._attn_implementation, "dtype": "fp32"}
    body = {"setting": setting, "cases": results}
    write_record("generate", argv, device, body, name=f"generate_{args.model}" if decoder_only else None)


if __name__ == "__main__":
    main(sys.argv[1:])
