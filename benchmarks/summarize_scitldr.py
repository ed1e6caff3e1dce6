"""Summarizing SciTLDR: polyhead's encoder-decoder and decoder-only summarizers, with and without
MLM+NSP pretraining, side by side with HuggingFace T5 (../shared/peers/c_t5_scitldr.py).

The peer's protocol: "summarize: " + the abstract's sentences joined by spaces, cut to 255 pieces +
</s>; the first TLDR as the training target, cut to 63 + </s>; an 8k unigram sentencepiece
vocabulary from the training text; 4 + 4 layers of width 256, ReLU, relative positions (T5's
layout); AdamW 5e-4, 10% warmup, linear decay, weight decay 0.01, clip 1.0, batch 32, seed 0, the
same number of steps; greedy decoding of at most 64 tokens on the first 200 test papers; ROUGE-1/2/L
F x 100 with stemming, each output against its best reference. polyhead runs
experiments/configs/summarize_seq2seq.yaml (once at the peer's exact settings: lr 5e-4, no copy
head; then at its own defaults: lr 2e-3, without and with the copy head) and
summarize_prefix_lm.yaml (also in LLaMA's layout: rotary positions, grouped-query attention,
SwiGLU, RMSNorm, no biases); the pretrained variant first trains MLM+NSP on the training abstracts
(the same backbone, its encoder only) and starts the summarizer from that checkpoint
(--model.init_from). Every checkpoint is scored twice: plain greedy (the peer's decoding) and greedy
with no_repeat_ngram_size 3. Beside ROUGE: how many of the 200 outputs are distinct, and how many
repeat a word trigram (a decoder stuck in a loop).

    python benchmarks/summarize_scitldr.py                       # everything (~1.5 h on 2 cores)
    python benchmarks/summarize_scitldr.py --no-peer --runs "seq2seq + copy"
    python benchmarks/summarize_scitldr.py --no-peer --runs "seq2seq + copy after MLM+NSP" \
        --pretrain-steps 300 --steps 800 --results benchmarks/results/summarize_scitldr_cpu_hour.json

Writes benchmarks/results/summarize_scitldr.json (or --results) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from experiments.cli import run

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CONFIGS = ROOT / "experiments" / "configs"
RESULTS = ROOT / "benchmarks" / "results"
PEER = SHARED / "peers" / "c_t5_scitldr.py"
COPY, LR = "--model.tasks.summarize.init_args.copy", "--model.optimizer.lr"
LLAMA_LAYOUT = [  # rotary positions, 2 kv heads for 4, SwiGLU as wide in parameters as the ReLU block
    *("--model.backbone.position", "rotary", "--model.backbone.n_kv_heads", "2"),
    *("--model.backbone.norm_type", "rmsnorm", "--model.backbone.embedding_norm", "false"),
    *(
        "--model.backbone.gated_ff",
        "true",
        "--model.backbone.activation",
        "silu",
        "--model.backbone.d_ff",
        "680",
    ),
    *("--model.backbone.bias", "false", "--model.backbone.type_vocab_size", "0"),
]
RUNS = {  # name -> (config, starts from the MLM+NSP checkpoint, extra arguments)
    "seq2seq at the peer's settings": ("summarize_seq2seq.yaml", False, [COPY, "false", LR, "5e-4"]),
    "seq2seq": ("summarize_seq2seq.yaml", False, [COPY, "false"]),
    "seq2seq + copy": ("summarize_seq2seq.yaml", False, []),
    "prefix_lm": ("summarize_prefix_lm.yaml", False, []),
    "prefix_lm in LLaMA layout": ("summarize_prefix_lm.yaml", False, LLAMA_LAYOUT),
    "seq2seq + copy after MLM+NSP": ("summarize_seq2seq.yaml", True, []),
}
NO_REPEAT_ARG = "--model.tasks.summarize.init_args.generation.no_repeat_ngram_size"
METRICS = ("rouge1", "rouge2", "rougeL")


def data_args(data: Path, test_file: Path) -> list[str]:
    scitldr = data / "scitldr"
    return [
        "--config", str(CONFIGS / "local" / "scitldr.yaml"),
        "--data.sources.summarize.path", str(scitldr / "train.jsonl"),
        "--data.sources.summarize.validation_path", str(scitldr / "dev.jsonl"),
        "--data.sources.summarize.test_path", str(test_file),
        "--data.sources.summarize.predict_path", str(test_file),
        "--model.tasks.summarize.init_args.max_source_length", "256",
        "--model.tasks.summarize.init_args.max_target_length", "64",
        "--model.tasks.summarize.init_args.generation.max_new_tokens", "64",
        "--data.eval_batch_size", "32",
        "--trainer.logger", "false",
        "--trainer.accelerator", "cpu",
    ]  # fmt: skip


def first_rows(source: Path, n: int, out: Path) -> Path:
    """The first n papers of the test file, as the peer scores them (a copy under the work dir)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        "".join(source.read_text(encoding="utf-8").splitlines(keepends=True)[:n]), encoding="utf-8"
    )
    return out


def loops(text: str) -> bool:
    """Whether a word trigram occurs twice: the mark of a decoder stuck repeating itself."""
    words = text.lower().split()
    trigrams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    return len(trigrams) != len(set(trigrams))


def output_stats(outputs: list[str]) -> dict:
    return {"distinct": len(set(outputs)), "looping": sum(map(loops, outputs)), "n": len(outputs)}


def pretrain(data: Path, steps: int, work: Path) -> Path:
    """MLM+NSP on the training abstracts with the summarizer's backbone (its encoder) -> checkpoint."""
    config = yaml.safe_load((CONFIGS / "summarize_seq2seq.yaml").read_text())
    config["model"]["tasks"] = {
        "mlm_nsp": {"class_path": "MaskedLMNextSentence", "init_args": {"max_length": 256}}
    }
    config["model"]["backbone"]["pooler"] = True  # NSP reads the pooled [CLS]
    scitldr = data / "scitldr"
    config["data"]["sources"] = {
        "mlm_nsp": {
            "path": str(scitldr / "train.jsonl"),
            "validation_path": str(scitldr / "dev.jsonl"),
            "columns": {"text": "source"},
        }
    }
    config["trainer"] |= {
        "max_steps": steps,
        "val_check_interval": steps,
        "logger": False,
        "accelerator": "cpu",
    }
    path = work / "pretrain.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    shutil.rmtree(work / "pretrain", ignore_errors=True)
    run(["fit", "--config", str(path), "--checkpoint.dirpath", str(work / "pretrain")])
    return work / "pretrain" / "last.ckpt"


def polyhead_run(
    name: str, data: Path, test_file: Path, steps: int, init_from: Path | None, work: Path
) -> dict:
    """Train one configuration, then score its greedy outputs as the peer does, and again with
    no_repeat_ngram_size 3 (the same checkpoint, only decoding changes)."""
    config, _, extra = RUNS[name]
    where = work / name.replace(" ", "_").replace("+", "")
    shutil.rmtree(where, ignore_errors=True)  # else Lightning saves last-v1.ckpt beside an old last.ckpt
    args = ["--config", str(CONFIGS / config), *data_args(data, test_file), *extra,
            "--checkpoint.dirpath", str(where)]  # fmt: skip
    start = ["--model.init_from", str(init_from)] if init_from else []
    began = time.time()
    run(["fit", *args, *start, "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps),
         "--trainer.limit_val_batches", "1"])  # fmt: skip
    wall = time.time() - began
    checkpoint = ["--ckpt_path", str(where / "last.ckpt")]
    result = score(args + [NO_REPEAT_ARG, "0", *checkpoint], where / "predictions.jsonl")
    result["no_repeat_3"] = score(
        args + [NO_REPEAT_ARG, "3", *checkpoint], where / "predictions_no_repeat.jsonl"
    )
    return result | {"train_wall_s": round(wall, 1)}


def score(args: list[str], predictions: Path) -> dict:
    """ROUGE on the test papers (and the lead-1 baseline), then the outputs themselves via predict."""
    metrics = run(["test", *args]).trainer.callback_metrics
    scores = {m: round(100 * float(metrics[f"test/summarize/{m}"]), 2) for m in METRICS}
    lead = {m: round(100 * float(metrics[f"test/summarize/baseline_{m}"]), 2) for m in METRICS}
    run(["predict", *args, "--predictions.path", str(predictions)])
    outputs = [json.loads(line)["generated"] for line in predictions.read_text().splitlines()]
    return {**scores, **output_stats(outputs), "lead1": lead, "examples": outputs[:3]}


def peer_run(steps: int, n_test: int, python: str, work: Path) -> dict:
    out = work / "peer"
    env = os.environ | {"OMP_NUM_THREADS": "2"}
    result = subprocess.run(
        [python, str(PEER), "--steps", str(steps), "--n_test", str(n_test), "--out", str(out)],
        capture_output=True, text=True, check=True, env=env,
    )  # fmt: skip
    line = next(x for x in result.stdout.splitlines() if x.startswith("SUMMARY "))
    summary = json.loads(line[len("SUMMARY ") :])
    outputs = [json.loads(x)["pred"] for x in (out / "preds.jsonl").read_text().splitlines()]
    return {
        **{m: summary["model"][m] for m in METRICS},
        **output_stats(outputs),
        "train_wall_s": summary["train_wall_s"],
        "lead1": {m: summary["lead1"][m] for m in METRICS},
        "title": {m: summary["title"][m] for m in METRICS},
        "examples": outputs[:3],
    }


def markdown(results: dict) -> str:
    lines = [
        "| model | decoding | ROUGE-1 | ROUGE-2 | ROUGE-L | distinct outputs | looping outputs | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def row(who: str, decoding: str, r: dict, wall: str) -> str:
        return (
            f"| {who} | {decoding} | {r['rouge1']:.1f} | {r['rouge2']:.1f} | {r['rougeL']:.1f} "
            f"| {r['distinct']} of {r['n']} | {r['looping']} | {wall} |"
        )

    for name, r in results["runs"].items():
        who = "HF T5 (peer)" if name == "peer" else f"polyhead {name}"
        wall = f"{r['train_wall_s']:.0f}" if r.get("train_wall_s") is not None else ""
        lines.append(row(who, "greedy", r, wall))
        if "no_repeat_3" in r:
            lines.append(row(who, "greedy, no_repeat_ngram_size 3", r["no_repeat_3"], ""))
    lead = next(iter(results["runs"].values()))["lead1"]
    lines.append(
        f"| lead-1 (first sentence) | | {lead['rouge1']:.1f} | {lead['rouge2']:.1f} | {lead['rougeL']:.1f} | | | |"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--pretrain-steps", type=int, default=200)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, from: {', '.join(RUNS)}")
    parser.add_argument("--data", type=Path, default=SHARED / "data")
    parser.add_argument("--no-peer", action="store_true", help="skip the HF T5 peer")
    parser.add_argument(
        "--peer-python", default=sys.executable, help="a Python with transformers and sentencepiece"
    )
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "summarize_scitldr")
    parser.add_argument(
        "--results", type=Path, default=RESULTS / "summarize_scitldr.json", help="the JSON record to update"
    )
    args = parser.parse_args()
    names = [n.strip() for n in args.runs.split(",")]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        parser.error(f"unknown runs {unknown}; known: {', '.join(RUNS)}")
    sys.argv = sys.argv[:1]  # the CLI runs below get their arguments explicitly
    os.environ.setdefault("WANDB_MODE", "offline")
    test_file = first_rows(args.data / "scitldr" / "test.jsonl", args.n_test, args.work / "test_first.jsonl")
    target = args.results
    target.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(target.read_text()) if target.exists() else {}
    results["protocol"] = {"steps": args.steps, "pretrain_steps": args.pretrain_steps, "n_test": args.n_test}
    results.setdefault("runs", {})
    checkpoint = None
    for name in names:
        if RUNS[name][1] and checkpoint is None:
            began = time.time()
            checkpoint = pretrain(args.data, args.pretrain_steps, args.work)
            results["protocol"]["pretrain_wall_s"] = round(time.time() - began, 1)
        results["runs"][name] = polyhead_run(
            name, args.data, test_file, args.steps, checkpoint if RUNS[name][1] else None, args.work
        )
        print(f"  {name}: {results['runs'][name]}", flush=True)
        target.write_text(json.dumps(results, indent=1))
    if not args.no_peer:
        results["runs"]["peer"] = peer_run(args.steps, args.n_test, args.peer_python, args.work)
        target.write_text(json.dumps(results, indent=1))
    print(markdown(results))


if __name__ == "__main__":
    main()
