"""polyhead vs the HF BERT peer (../shared/peers/a_bert_mlm_nsp.py) on WikiText-2, side by side.

Same data file and split (articles by level-1 heading, every 10th article held out, section
headings dropped), model size (4 layers, hidden 256, 4 heads, FFN 1024, 128 tokens), batch 32,
steps, AdamW 5e-4 with 10% warmup and linear decay, weight decay 0.01, clip 1.0, seed 0, fp32,
2 threads, lower-cased 8k vocabularies. Prints one table: validation MLM loss / accuracy, NSP
accuracy, and training tokens per second, with polyhead / HF ratios.

    python benchmarks/peer_mlm_nsp.py --steps 600
    python benchmarks/peer_mlm_nsp.py --steps 600 --polyhead-arg=--model.backbone.dropout=0   # a variant
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
WIKITEXT = SHARED / "data" / "wikitext2" / "wiki.test.raw"
PEER = SHARED / "peers" / "a_bert_mlm_nsp.py"
# The peer counts the two formula lines of "Constant k filter" that look like headings as text.
HEADING = r"^ = (?!1 (rad|henry) )[^=].* = $"


def run_peer(steps: int, out: Path) -> dict:
    result = subprocess.run(
        [sys.executable, str(PEER), "--steps", str(steps), "--out", str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    line = next(x for x in result.stdout.splitlines() if x.startswith("SUMMARY "))
    return json.loads(line[len("SUMMARY ") :])


def run_polyhead(steps: int, out: Path, extra: list[str]) -> dict:
    env = os.environ | {"WANDB_MODE": "offline", "WANDB_DIR": str(out), "OMP_NUM_THREADS": "2"}
    args = [
        sys.executable, "-m", "experiments.cli", "fit",
        "--config", str(ROOT / "experiments" / "configs" / "pretrain_mlm_nsp.yaml"),
        "--data.sources.mlm_nsp.path", str(WIKITEXT),
        "--data.sources.mlm_nsp.heading_pattern", HEADING,
        "--data.tokenizer.lowercase", "true",
        "--trainer.max_steps", str(steps),
        "--trainer.val_check_interval", str(steps),
        "--trainer.accelerator", "cpu",
        "--trainer.logger.init_args.save_dir", str(out),
        "--checkpoint.dirpath", str(out / "checkpoints"),
        *extra,
    ]  # fmt: skip
    subprocess.run(args, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    run_dir = glob.glob(str(out / "wandb" / "offline-run-*"))[0]
    wandb = str(Path(sys.executable).with_name("wandb"))
    inspected = subprocess.run(
        [wandb, "leet", "inspect", "--summary", "--json", run_dir], capture_output=True, text=True, check=True
    )
    summary = json.loads(inspected.stdout)["summary"]
    return {
        "val_mlm_loss": summary["val/mlm_nsp/mlm_loss"],
        "val_mlm_acc": summary["val/mlm_nsp/mlm_accuracy"],
        "val_nsp_acc": summary["val/mlm_nsp/nsp_accuracy"],
        "tokens_per_s": summary["train/lengths"] / summary["train/time"],
        "train_wall_s": summary["train/time"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument(
        "--polyhead-arg", action="append", default=[], metavar="ARG",
        help="one more argument for polyhead's run (a variant), e.g. --polyhead-arg=--model.backbone.dropout=0",
    )  # fmt: skip
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ours = run_polyhead(args.steps, Path(tmp) / "polyhead", args.polyhead_arg)
        peer = run_peer(args.steps, Path(tmp) / "peer")
    peer_row = {
        "val_mlm_loss": peer["val_mlm_loss"],
        "val_mlm_acc": peer["val_mlm_acc"],
        "val_nsp_acc": peer["val_nsp_acc"],
        "tokens_per_s": peer["tokens_per_s_real"],
        "train_wall_s": peer["train_wall_s"],
    }
    print(f"{'metric (' + str(args.steps) + ' steps)':<26}{'polyhead':>12}{'HF BERT':>12}{'ratio':>9}")
    for key in ("val_mlm_loss", "val_mlm_acc", "val_nsp_acc", "tokens_per_s", "train_wall_s"):
        print(f"{key:<26}{ours[key]:>12.4g}{peer_row[key]:>12.4g}{ours[key] / peer_row[key]:>9.2f}")


if __name__ == "__main__":
    main()
