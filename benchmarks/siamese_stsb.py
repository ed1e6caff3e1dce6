"""Which negatives teach a siamese sentence encoder most? STS-B, at the sentence-transformers peer's
protocol (../shared/peers/b_siamese_stsb.py), side by side with the peer itself.

Every polyhead run: the 4-layer, 256-wide encoder of experiments/configs/siamese_stsb.yaml, mean
pooling, lower-cased 8k vocabulary from the training sentences, training pairs = sts-train pairs
with score >= 4 grouped into connected components, P x K = 32 groups x 2 sentences per step (the
64 sentences per step of the peer's 32-pair MNRL batches), AdamW 5e-4, 10% warmup, linear decay,
clip 1.0, seed 0, the same number of steps. Losses: triplet margin loss (cosine distance, margin
0.5) with random / semi-hard / batch-hard / batch-all mining, batch-hard plus offline-mined hard
negatives, and in-batch negatives (MNRL). Each once from random initialisation and once from an
MLM+NSP pretraining on WikiText-2 (experiments/configs/pretrain_mlm_nsp.yaml; the tokenizer is
then the pretraining one). Scored on sts-test exactly as the peer scores: Spearman x 100 of cosine
vs gold over all pairs; queries = s1 of pairs scoring >= 4, corpus = distinct s2, R@1, MRR@10.

    python benchmarks/siamese_stsb.py                 # everything (~1.5 h on 2 cores)
    python benchmarks/siamese_stsb.py --no-pretrain --no-peer --losses batch_hard
    python benchmarks/siamese_stsb.py --init-from runs/siamese_stsb/pretrain/last.ckpt  # reuse MLM+NSP
    python benchmarks/siamese_stsb.py --redraw --margin 0.2  # the table and plot again, from the saved figures
    python benchmarks/siamese_stsb.py --nsp-head match --no-scratch --no-peer  # pretrain with the match head

Updates benchmarks/results/siamese_stsb.json (the runs asked for replace their earlier figures, the
others stay; with --margin M, siamese_stsb_marginM.json; with --nsp-head match, ..._nsp_match.json),
prints a markdown table, draws the matching .png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from experiments.cli import run
from experiments.plots import BarPanel, bar_chart

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CONFIGS = ROOT / "experiments" / "configs"
RESULTS = ROOT / "benchmarks" / "results"
PEER = SHARED / "peers" / "b_siamese_stsb.py"
RUNS = {  # name -> task settings
    "random": {"loss": "random"},
    "semi_hard": {"loss": "semi_hard"},
    "batch_hard": {"loss": "batch_hard"},
    "batch_all": {"loss": "batch_all"},
    "batch_hard + mined": {"loss": "batch_hard", "mined_negatives": 4, "mining_skip": 2},
    "in_batch_negatives": {"loss": "in_batch_negatives"},
}
METRICS = {"spearman": "Spearman", "recall@1": "R@1", "mrr@10": "MRR@10", "recall@10": "R@10"}
PLOTTED_METRICS = ("spearman", "recall@1")  # a panel each
PLOTTED_SUITES = (("scratch", "random init"), ("pretrained", "MLM+NSP first"))  # a bar each
PLOTTED_PEERS = ("mnrl", "batchhard")  # a line each


def polyhead_args(data: Path, out: Path) -> list[str]:
    stsb = data / "stsb"
    return [
        "--config", str(CONFIGS / "siamese_stsb.yaml"),
        "--config", str(CONFIGS / "local" / "stsb.yaml"),
        "--data.sources.triplet.path", str(stsb / "sts-train.csv"),
        "--data.sources.triplet.validation_path", str(stsb / "sts-dev.csv"),
        "--data.sources.triplet.test_path", str(stsb / "sts-test.csv"),
        "--trainer.logger", "false",
        "--trainer.accelerator", "cpu",
        "--checkpoint.dirpath", str(out),
    ]  # fmt: skip


def test_scores(args: list[str]) -> dict[str, float]:
    metrics = run(["test", *args]).trainer.callback_metrics
    return {name: round(100 * float(metrics[f"test/triplet/{name}"]), 2) for name in METRICS}


def pretrain(data: Path, steps: int, nsp_head: str, out: Path) -> Path:
    """MLM + NSP on WikiText-2 for `steps` steps (the issue-2 config) -> its last checkpoint. NSP reads
    BERT's pooled [CLS] unless --nsp-head match, as in every figure recorded in siamese_stsb.json
    (the config itself now defaults to the match head)."""
    run(
        [
            "fit", "--config", str(CONFIGS / "pretrain_mlm_nsp.yaml"),
            "--data.sources.mlm_nsp.path", str(data / "wikitext2" / "wiki.test.raw"),
            "--data.tokenizer.lowercase", "true",
            "--model.tasks.mlm_nsp.init_args.nsp_head", nsp_head,
            "--trainer.max_steps", str(steps),
            "--trainer.val_check_interval", str(steps),
            "--trainer.logger", "false",
            "--trainer.accelerator", "cpu",
            "--checkpoint.dirpath", str(out),
        ]
    )  # fmt: skip
    return out / "last.ckpt"


def polyhead_suite(
    data: Path, steps: int, runs: list[str], init_from: Path | None, out: Path, margin: float | None
) -> dict:
    start = ["--model.init_from", str(init_from)] if init_from else []
    if margin is not None:
        start += ["--model.tasks.triplet.init_args.margin", str(margin)]
    results = {"untrained": test_scores([*polyhead_args(data, out / "untrained"), *start])}
    print(f"  untrained: {results['untrained']}", flush=True)
    for name in runs:
        where = out / name.replace(" + ", "_")
        settings = [f"--model.tasks.triplet.init_args.{key}={value}" for key, value in RUNS[name].items()]
        began = time.time()
        run(
            ["fit", *polyhead_args(data, where), *start, *settings,
             "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps)]
        )  # fmt: skip
        wall = round(time.time() - began, 1)
        results[name] = test_scores([*polyhead_args(data, where), "--ckpt_path", str(where / "last.ckpt")])
        results[name]["train_wall_s"] = wall
        print(f"  {name}: {results[name]}", flush=True)
    return results


def peer_suite(steps: int, python: str, out: Path) -> dict:
    """The sentence-transformers peer, run as its own process (it needs sentence-transformers)."""
    env = os.environ | {"OMP_NUM_THREADS": "2"}
    result = subprocess.run(
        [python, str(PEER), "--steps", str(steps), "--losses", "mnrl,batchhard,batchhard_cos,triplet",
         "--out", str(out)],
        capture_output=True, text=True, check=True, env=env,
    )  # fmt: skip
    line = next(x for x in result.stdout.splitlines() if x.startswith("SUMMARY "))
    raw = json.loads(line[len("SUMMARY ") :])["results"]
    keys = {"spearman": "test_spearman", "recall@1": "r_at_1", "mrr@10": "mrr_at_10", "recall@10": "r_at_10"}
    return {name: {ours: scores[theirs] for ours, theirs in keys.items()} for name, scores in raw.items()}


def markdown(results: dict) -> str:
    lines = ["| model | start | " + " | ".join(METRICS.values()) + " |", "|---|---|" + "---|" * len(METRICS)]
    for suite, label in (("scratch", "random init"), ("pretrained", "MLM+NSP"), ("peer", "random init")):
        for name, scores in results.get(suite, {}).items():
            who = f"sentence-transformers {name}" if suite == "peer" else f"polyhead {name}"
            lines.append(f"| {who} | {label} | " + " | ".join(f"{scores[m]:.1f}" for m in METRICS) + " |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """Spearman and R@1 per loss, a bar per polyhead suite, the peer's MNRL and BatchHard as lines
    across; a loss a suite lacks gets no bar."""
    names = list(dict.fromkeys(name for suite, _ in PLOTTED_SUITES for name in results.get(suite, {})))
    peer = results.get("peer", {})
    panels = [
        BarPanel(
            title=f"STS-B test {METRICS[metric]}",
            categories=[name.replace("_", " ") for name in names],
            series={
                label: [results[suite].get(name, {}).get(metric, math.nan) for name in names]
                for suite, label in PLOTTED_SUITES
                if suite in results
            },
            references={
                f"sentence-transformers {name}": peer[name][metric] for name in PLOTTED_PEERS if name in peer
            },
        )
        for metric in PLOTTED_METRICS
    ]
    bar_chart(path, panels, ylabel="sts-test score x 100", ylim=(0, 100))


def measure(args: argparse.Namespace, results: dict, target: Path) -> None:
    """Run the suites asked for into `results`, saving `target` after each, so that a long run
    interrupted keeps the suites it finished."""
    runs = [name.strip() for name in args.losses.split(",")]
    results["protocol"] = {"steps": args.steps, "pretrain_steps": args.pretrain_steps}
    if args.nsp_head != "pooled":
        results["protocol"]["nsp_head"] = args.nsp_head
    if args.margin is not None:
        results["protocol"]["margin"] = args.margin
    if not args.no_scratch:
        print("polyhead from random initialisation", flush=True)
        scratch = polyhead_suite(args.data, args.steps, runs, None, args.work / "scratch", args.margin)
        results["scratch"] = results.get("scratch", {}) | scratch
        target.write_text(json.dumps(results, indent=1))
    if not args.no_pretrain:
        print("polyhead after MLM+NSP pretraining", flush=True)
        where = args.work / ("pretrain" if args.nsp_head == "pooled" else f"pretrain_{args.nsp_head}")
        checkpoint = args.init_from or pretrain(args.data, args.pretrain_steps, args.nsp_head, where)
        pretrained = polyhead_suite(
            args.data, args.steps, runs, checkpoint, args.work / "pretrained", args.margin
        )
        results["pretrained"] = results.get("pretrained", {}) | pretrained
        target.write_text(json.dumps(results, indent=1))
    if not args.no_peer:
        print("sentence-transformers peer", flush=True)
        results["peer"] = peer_suite(args.steps, args.peer_python, args.work / "peer")
        target.write_text(json.dumps(results, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--losses", default=",".join(RUNS), help=f"comma-separated, from: {', '.join(RUNS)}")
    parser.add_argument("--data", type=Path, default=SHARED / "data")
    parser.add_argument("--no-scratch", action="store_true", help="skip the suite from random initialisation")
    parser.add_argument("--no-pretrain", action="store_true", help="skip the MLM+NSP-first suite")
    parser.add_argument(
        "--init-from", type=Path, help="an MLM+NSP checkpoint to start from instead of pretraining"
    )
    parser.add_argument("--no-peer", action="store_true", help="skip the sentence-transformers peer")
    parser.add_argument("--peer-python", default=sys.executable, help="a Python with sentence-transformers")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "siamese_stsb")
    parser.add_argument(
        "--margin", type=float, help="triplet margin instead of the config's (results in their own file)"
    )
    parser.add_argument(
        "--nsp-head",
        choices=("pooled", "match"),
        default="pooled",
        help="the NSP head of the MLM+NSP pretraining (match: results in their own file)",
    )
    parser.add_argument(
        "--redraw", action="store_true", help="train nothing: the table and plot again from the saved results"
    )
    args = parser.parse_args()
    sys.argv = sys.argv[:1]  # the CLI runs below get their arguments explicitly
    os.environ.setdefault("WANDB_MODE", "offline")
    RESULTS.mkdir(parents=True, exist_ok=True)
    margin = "" if args.margin is None else f"_margin{args.margin}"
    head = "" if args.nsp_head == "pooled" else f"_nsp_{args.nsp_head}"
    target = RESULTS / f"siamese_stsb{margin}{head}.json"
    if args.redraw and not target.exists():
        parser.error(f"--redraw: no saved results at {target}")
    results = json.loads(target.read_text()) if target.exists() else {}
    if not args.redraw:
        measure(args, results, target)
    print(markdown(results))
    plot(results, target.with_suffix(".png"))


if __name__ == "__main__":
    main()
