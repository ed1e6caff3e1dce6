"""The `polyhead` command end to end: the quickstart trains, logs to W&B offline, leaves a checkpoint
that runs on its own; user mistakes end in one line naming the problem, never a traceback."""

from __future__ import annotations

import glob
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments.cli import main
from modules.model import MultiTaskModel

from .conftest import ROOT, offline_env

QUICKSTART = str(ROOT / "experiments" / "configs" / "quickstart.yaml")


def polyhead(args: list[str], tmp: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "experiments.cli", *args],
        cwd=ROOT,
        env=offline_env(tmp) | {"COLUMNS": "200"},  # wide enough for Lightning's metric table
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def wandb_summary(run_dir: str) -> dict:
    """Read an offline run back the way a user would, without the network."""
    wandb = str(Path(sys.executable).with_name("wandb"))
    out = subprocess.run(
        [wandb, "leet", "inspect", "--summary", "--json", run_dir], capture_output=True, text=True, timeout=60
    )
    return json.loads(out.stdout)


def test_quickstart_fast_mode_trains_logs_offline_and_checkpoints(tmp_path):
    fast = ["--trainer.max_steps", "12", "--trainer.val_check_interval", "6"]
    where = [
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "runs"),
        "--checkpoint.dirpath",
        str(tmp_path / "ckpt"),
    ]
    result = polyhead(["fit", "--config", QUICKSTART, *fast, *where], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Final validation metrics" in result.stdout + result.stderr
    runs = glob.glob(str(tmp_path / "runs" / "wandb" / "offline-run-*"))
    assert len(runs) == 1, "expected one offline W&B run"
    run = wandb_summary(runs[0])
    summary = run["summary"]
    for metric in ("loss", "mlm_loss", "mlm_accuracy", "perplexity", "nsp_accuracy", "baseline_mlm_loss"):
        assert f"val/mlm_nsp/{metric}" in summary, f"val/mlm_nsp/{metric} missing from the W&B summary"
    for metric in ("loss", "recall@1", "mrr@10", "baseline_mrr@10"):
        assert f"val/triplet/{metric}" in summary, f"val/triplet/{metric} missing from the W&B summary"
    for metric in ("loss", "rouge1", "rouge2", "rougeL", "rougeLsum", "baseline_rouge1"):
        assert f"val/summarize/{metric}" in summary, f"val/summarize/{metric} missing from the W&B summary"
    assert summary["val/summarize/samples"]["_type"] == "table-file", "generated examples are a W&B table"
    assert summary["val/mlm_nsp/perplexity"] == pytest.approx(
        torch.tensor(summary["val/mlm_nsp/mlm_loss"]).exp().item(), rel=1e-3
    )
    assert run["config"]["model"]["backbone"]["d_model"] == 128, "the resolved config is logged"
    assert run["config"]["resolved"]["vocab_size"] == 2000

    # the checkpoint alone (no config, no data) rebuilds the model and its tokenizer
    model = MultiTaskModel.from_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    task = model.tasks["mlm_nsp"]
    tok = model.tokenizer
    a, b = tok.encode(["The bees returned to the hive.", "Honey was stored in the comb."])
    batch = task.collate([(a, b, 0)], [0], tok) | {"task": "mlm_nsp"}
    with torch.no_grad():
        outputs = model(batch)
    assert outputs["nsp_logits"].shape == (1, 2) and torch.isfinite(outputs["mlm_logits"]).all()

    # and validates, tests and predicts through the CLI
    from_checkpoint = [
        "--config",
        QUICKSTART,
        "--ckpt_path",
        str(tmp_path / "ckpt" / "last.ckpt"),
        "--trainer.logger",
        "false",
    ]
    result = polyhead(["validate", *from_checkpoint], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "val/mlm_nsp/mlm_loss" in result.stdout
    documents = str(ROOT / "seeds" / "quickstart" / "documents.jsonl")
    test_data = [
        *("--data.sources.mlm_nsp.test_path", documents),
        *("--data.sources.triplet.test_path", documents),
        *("--data.sources.summarize.test_path", documents),
    ]
    result = polyhead(["test", *from_checkpoint, *test_data], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for metric in (
        "mlm_nsp/nsp_accuracy",
        "triplet/recall@1",
        "summarize/rougeL",
        "summarize/baseline_rougeL",
    ):
        assert f"test/{metric}" in result.stdout
    assert "test/mlm_nsp/baseline" not in result.stdout, "the unigram baseline needs training data"
    predictions = tmp_path / "out" / "predictions.jsonl"
    # a run from a checkpoint uses the checkpoint's own tokenizer, whatever the data settings would train
    other_vocab = ["--data.tokenizer.vocab_size", "1000"]
    texts = tmp_path / "texts.txt"
    texts.write_text("The bees returned to the hive.\nA river ran through the town.\n")
    articles = tmp_path / "articles.jsonl"
    articles.write_text(
        '{"source": "The bees returned to the hive."}\n{"source": "A river ran through the town."}\n'
    )
    embed_texts = ["--data.sources.triplet.predict_path", str(texts)]
    summarize = [
        "--data.sources.summarize.predict_path",
        str(articles),
        "--model.tasks.summarize.init_args.generation.max_new_tokens",
        "5",
    ]
    result = polyhead(
        [
            "predict",
            *from_checkpoint,
            *test_data,
            *embed_texts,
            *summarize,
            *other_vocab,
            "--predictions.path",
            str(predictions),
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(records) > 100 and not list(predictions.parent.glob("*.tmp*"))
    embedded = [r for r in records if r["task"] == "triplet"]
    assert [r["text"] for r in embedded] == texts.read_text().splitlines()
    assert all(len(r["embedding"]) == 128 for r in embedded)
    assert abs(sum(x * x for x in embedded[0]["embedding"]) - 1) < 1e-3, "embeddings are unit vectors"
    summaries = [r for r in records if r["task"] == "summarize"]
    assert [r["input"] for r in summaries] == [
        "summarize: The bees returned to the hive.",
        "summarize: A river ran through the town.",
    ]
    assert all(isinstance(r["generated"], str) for r in summaries)
    first = records[0]
    assert first["task"] == "mlm_nsp" and first["segment_a"] and first["segment_b"]
    assert 0.0 <= first["is_next_probability"] <= 1.0
    assert first["masked"] and all({"target", "predicted", "correct"} <= set(m) for m in first["masked"])

    # one task of three given data: that task is tested or predicted, the others left out and said so
    only = tmp_path / "only"
    result = polyhead(
        ["predict", *from_checkpoint, *summarize, "--predictions.path", str(only / "predictions.jsonl")],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "no predict data for task(s) mlm_nsp, triplet; they are left out" in result.stdout + result.stderr
    records = [json.loads(line) for line in (only / "predictions.jsonl").read_text().splitlines()]
    assert [r["task"] for r in records] == ["summarize", "summarize"]
    result = polyhead(["test", *from_checkpoint, *test_data[-2:]], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test/summarize/rougeL" in result.stdout and "test/mlm_nsp" not in result.stdout
    result = polyhead(["test", *from_checkpoint], tmp_path)
    assert (
        result.returncode != 0
        and "this command needs test data: set data.sources.mlm_nsp.test_path" in result.stderr
    )


def _fails_with(args: list[str], *expected: str, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    message = str(exit_info.value.code)
    assert exit_info.value.code not in (0, None)
    assert message.startswith("polyhead: error:") and "\n" not in message, message
    for text in expected:
        assert text in message, f"{text!r} not in {message!r}"
    assert "Traceback" not in capsys.readouterr().err
    return message


def test_missing_file_names_the_key_and_path(tmp_path, capsys):
    _fails_with(
        ["fit", "--config", QUICKSTART, "--data.sources.mlm_nsp.path", str(tmp_path / "nope.jsonl")],
        "data.sources.mlm_nsp.path",
        "nope.jsonl",
        capsys=capsys,
    )


def test_empty_corpus(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    _fails_with(
        ["fit", "--config", QUICKSTART, "--data.sources.mlm_nsp.path", str(empty)], "empty", capsys=capsys
    )


def test_corpus_of_blank_texts_is_empty(tmp_path, capsys):
    blank = tmp_path / "blank.jsonl"
    blank.write_text('{"text": "   "}\n{"text": ""}\n')
    _fails_with(
        ["fit", "--config", QUICKSTART, "--data.sources.mlm_nsp.path", str(blank)], "empty", capsys=capsys
    )


def test_unknown_config_key(tmp_path, capsys):
    config = tmp_path / "typo.yaml"
    config.write_text(Path(QUICKSTART).read_text().replace("  d_ff: 512", "  d_ff: 512\n    dff: 512"))
    _fails_with(["fit", "--config", str(config)], "dff", capsys=capsys)
    _fails_with(["fit", "--config", QUICKSTART, "--model.backbone.n_layer", "3"], "n_layer", capsys=capsys)


def test_bad_lines_are_located(tmp_path, capsys):
    malformed = tmp_path / "bad.jsonl"
    malformed.write_text('{"text": "fine. fine."}\n{"text": oops}\n')
    _fails_with(
        ["fit", "--config", QUICKSTART, "--data.sources.mlm_nsp.path", str(malformed)],
        "bad.jsonl, line 2",
        capsys=capsys,
    )
    latin = tmp_path / "latin.txt"
    latin.write_bytes("ok line.\ncaf\xe9 au lait.\n".encode("latin-1"))
    _fails_with(
        ["fit", "--config", QUICKSTART, "--data.sources.mlm_nsp.path", str(latin)],
        "line 2",
        "encoding",
        capsys=capsys,
    )


def test_impossible_sizes_and_unknown_task(capsys):
    _fails_with(
        ["fit", "--config", QUICKSTART, "--model.backbone.d_model", "130"], "divisible", capsys=capsys
    )
    _fails_with(
        ["fit", "--config", QUICKSTART, "--model.tasks.mlm_nsp.class_path", "NoSuchTask"],
        "NoSuchTask",
        capsys=capsys,
    )


def test_error_exit_from_a_real_process(tmp_path):
    result = polyhead(
        ["fit", "--config", QUICKSTART, "--data.sources.mlm_nsp.path", "missing.jsonl"], tmp_path
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("polyhead: error: data.sources.mlm_nsp.path: file not found")
    )


def test_a_run_resumed_mid_epoch_continues_exactly(tmp_path):
    """Stopping after step 4 and resuming from its checkpoint gives the same losses at steps 5..8 as
    the uninterrupted run: the checkpoint carries the model, optimizer, schedule, where the
    mixture's batch stream stood and the random generators (dropout is on)."""
    settings = [
        "fit", "--config", QUICKSTART,
        "--model.backbone.d_model", "32", "--model.backbone.n_heads", "2", "--model.backbone.d_ff", "64",
        "--data.batch_size", "8", "--trainer.max_steps", "8", "--trainer.limit_val_batches", "0",
        "--trainer.log_every_n_steps", "1", "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
        "--checkpoint.monitor", "null", "--checkpoint.every_n_train_steps", "4", "--checkpoint.save_top_k", "-1",
    ]  # fmt: skip

    def losses(name: str, *extra: str) -> dict[int, dict[str, float]]:
        where = [
            "--trainer.logger.save_dir",
            str(tmp_path / name),
            "--checkpoint.dirpath",
            str(tmp_path / name),
        ]
        result = polyhead([*settings, *where, *extra], tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        rows = {}
        for path in sorted((tmp_path / name).glob("**/metrics.csv")):
            lines = path.read_text().splitlines()
            header = lines[0].split(",")
            for line in lines[1:]:
                row = dict(zip(header, line.split(","), strict=True))
                values = {
                    k: float(v)
                    for k, v in row.items()
                    if k.startswith("train/") and k.endswith("/loss") and v
                }
                if values:
                    rows.setdefault(int(row["step"]), {}).update(values)
        return rows

    straight = losses("straight")
    checkpoint = next((tmp_path / "straight").glob("*step=4*.ckpt"))
    resumed = losses("resumed", "--ckpt_path", str(checkpoint))
    later = sorted(step for step in straight if step >= 4)
    assert len(later) == 4 and later == sorted(resumed), (sorted(straight), sorted(resumed))
    for step in later:  # each task's latest loss, as logged at that step (the resumed run's start fresh)
        assert resumed[step] and resumed[step].keys() <= straight[step].keys(), step
        for task, loss in resumed[step].items():
            assert loss == pytest.approx(straight[step][task], rel=1e-5), (step, task)
