"""Does one backbone trained on four tasks at once do better than four single-task models, and which
mixing rate is best? SST-2, TREC, SQuAD and STS-B, at equal total steps.

Every run: the 4-layer, 256-wide encoder of the task configs (pooler on, positions up to 256), its
own lower-cased 4k sentencepiece vocabulary trained on its training text (TREC alone has too few
distinct strings for 8k), batch 32, AdamW 5e-4, 10% warmup, linear decay, clip 1.0, seed 0, from
random initialisation, on the local files of ../shared/data (the experiments/configs/local
overlays). SQuAD windows are 256 tokens (stride 96) to keep a CPU step short. Single-task: each
task alone for `--steps` steps. Multi-task: one run of 4 x `--steps` steps over all four tasks (the
same total compute as the four single-task runs together), once per mixing strategy of
datamodules/mixture.py: examples-proportional with cap K, temperature-scaled (T = 2) and equal.
Scored on each task's validation split after the last step: SST-2 / TREC accuracy and macro-F1,
SQuAD EM / F1 (official v1.1 rules), STS-B Spearman.

    python benchmarks/multitask_mixing.py                 # everything (~45 min on 2 cores)
    python benchmarks/multitask_mixing.py --steps 100 --runs single,equal
    python benchmarks/multitask_mixing.py --runs ""      # the table and plot again, from the saved figures

Updates benchmarks/results/multitask_mixing.json (runs asked for replace their earlier figures),
prints a markdown table, draws multitask_mixing.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import yaml

from datamodules.mixture import MixtureConfig, mixing_rates
from experiments.cli import run
from experiments.plots import BarPanel, bar_chart

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CONFIGS = ROOT / "experiments" / "configs"
RESULTS = ROOT / "benchmarks" / "results"
TASKS = {  # task name -> (config, local-data overlay, metrics shown)
    "sst2": ("classify_sst2.yaml", "local/sst2.yaml", ("accuracy", "f1")),
    "trec": ("classify_trec.yaml", "local/trec.yaml", ("accuracy", "f1")),
    "qa": ("span_qa_squad.yaml", "local/squad.yaml", ("exact_match", "f1")),
    "triplet": ("siamese_stsb.yaml", "local/stsb.yaml", ("spearman",)),
}
MIXTURES = {  # run name -> data.mixture
    "proportional": {"strategy": "proportional", "cap": 4096},
    "temperature": {"strategy": "temperature", "temperature": 2.0},
    "equal": {"strategy": "equal"},
}
BACKBONE = {"d_model": 256, "n_heads": 4, "d_ff": 1024, "encoder_layers": 4, "max_len": 256, "pooler": True}
QA_WINDOW = {"max_length": 256, "stride": 96}


def task_config(name: str, data: Path) -> tuple[dict, dict]:
    """(task spec, data source) of one task: its config with the local overlay's source on top and
    the overlay's ../shared/data paths pointed at `data`."""
    config_file, overlay_file, _ = TASKS[name]
    config = yaml.safe_load((CONFIGS / config_file).read_text())
    overlay = yaml.safe_load((CONFIGS / overlay_file).read_text())
    task = config["model"]["tasks"][name]
    if name == "qa":
        task["init_args"] |= QA_WINDOW
    source = config["data"]["sources"][name] | overlay["data"]["sources"][name]
    for key, value in source.items():
        if isinstance(value, str) and value.startswith("../shared/data/"):
            source[key] = str(data / value.removeprefix("../shared/data/"))
    return task, source


def run_config(names: list[str], mixture: dict | None, data: Path) -> dict:
    """One training config over `names` (the shared settings above, their tasks and sources)."""
    specs = {name: task_config(name, data) for name in names}
    return {
        "seed_everything": 0,
        "model": {
            "tasks": {name: task for name, (task, _) in specs.items()},
            "backbone": BACKBONE,
            "optimizer": {"lr": 5.0e-4, "weight_decay": 0.01, "warmup": 0.1, "schedule": "linear"},
        },
        "data": {
            "sources": {name: source for name, (_, source) in specs.items()},
            "tokenizer": {"vocab_size": 4000, "lowercase": True},
            "batch_size": 32,
            "eval_batch_size": 128,
            **({"mixture": mixture} if mixture else {}),
        },
        "checkpoint": {"monitor": "val/score", "mode": "max"},
        "trainer": {
            "check_val_every_n_epoch": None,
            "gradient_clip_val": 1.0,
            "log_every_n_steps": 20,
            "logger": False,
            "accelerator": "cpu",
            "enable_progress_bar": False,
        },
    }


def train(names: list[str], mixture: dict | None, steps: int, data: Path, work: Path) -> dict:
    """Fit one run -> its validation scores (x 100) per task, rates and wall time."""
    work.mkdir(parents=True, exist_ok=True)
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump(run_config(names, mixture, data), sort_keys=False))
    began = time.time()
    cli = run(
        ["fit", "--config", str(config), "--checkpoint.dirpath", str(work / "checkpoints"),
         "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps)]
    )  # fmt: skip
    wall = round(time.time() - began, 1)
    metrics = cli.trainer.callback_metrics
    scores = {
        name: {m: round(100 * float(metrics[f"val/{name}/{m}"]), 2) for m in TASKS[name][2]} for name in names
    }
    sizes = {name: len(examples) for name, examples in cli.datamodule.examples["train"].items()}
    rates = mixing_rates(sizes, MixtureConfig(**(mixture or {})))
    return {
        "scores": scores,
        "train_examples": sizes,
        "mixing_rates": {name: round(rate, 3) for name, rate in rates.items()},
        "steps": steps,
        "train_wall_s": wall,
    }


def markdown(results: dict) -> str:
    columns = [(name, metric) for name, (_, _, metrics) in TASKS.items() for metric in metrics]
    header = " | ".join(f"{name} {metric}" for name, metric in columns)
    lines = [f"| run | steps | {header} |", "|---|---|" + "---|" * len(columns)]
    single = results.get("single", {})
    if single:
        cells = [f"{single[n]['scores'][n][m]:.1f}" if n in single else "" for n, m in columns]
        steps = " + ".join(str(single[n]["steps"]) for n in TASKS if n in single)
        lines.append(f"| single-task (one model per task) | {steps} | " + " | ".join(cells) + " |")
    for run_name in MIXTURES:
        if run_name in results:
            r = results[run_name]
            cells = [f"{r['scores'][n][m]:.1f}" for n, m in columns]
            lines.append(f"| multi-task, {run_name} | {r['steps']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """Each task's main metric (the last it lists: F1, Spearman), a bar per run that has figures; a
    task a run lacks gets no bar."""
    main_metric = {name: metrics[-1] for name, (_, _, metrics) in TASKS.items()}
    runs = {}  # label -> task -> its scores
    if "single" in results:
        runs["single-task"] = {name: result["scores"][name] for name, result in results["single"].items()}
    runs |= {f"multi-task, {name}": results[name]["scores"] for name in MIXTURES if name in results}
    panel = BarPanel(
        title="one backbone, four tasks: single-task vs multi-task at equal total steps",
        categories=[f"{name}\n{main_metric[name]}" for name in TASKS],
        series={
            label: [scores.get(name, {}).get(main_metric[name], math.nan) for name in TASKS]
            for label, scores in runs.items()
        },
    )
    bar_chart(path, [panel], ylabel="validation score x 100")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=150, help="steps per task (multi-task runs: 4x)")
    parser.add_argument("--runs", default="single," + ",".join(MIXTURES), help="comma-separated")
    parser.add_argument("--data", type=Path, default=SHARED / "data")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "multitask_mixing")
    args = parser.parse_args()
    sys.argv = sys.argv[:1]  # the CLI runs below get their arguments explicitly
    os.environ.setdefault("WANDB_MODE", "offline")
    RESULTS.mkdir(parents=True, exist_ok=True)
    target = RESULTS / "multitask_mixing.json"
    results = json.loads(target.read_text()) if target.exists() else {}
    for run_name in [r.strip() for r in args.runs.split(",") if r.strip()]:
        if run_name == "single":
            for name in TASKS:
                result = train([name], None, args.steps, args.data, args.work / "single" / name)
                results.setdefault("single", {})[name] = result
                print(f"single {name}: {result}", flush=True)
        else:
            result = train(
                list(TASKS), MIXTURES[run_name], args.steps * len(TASKS), args.data, args.work / run_name
            )
            results[run_name] = result
            print(f"{run_name}: {result}", flush=True)
        target.write_text(json.dumps(results, indent=1))
    print(markdown(results))
    plot(results, RESULTS / "multitask_mixing.png")


if __name__ == "__main__":
    main()
