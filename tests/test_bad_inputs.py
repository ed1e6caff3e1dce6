"""The bad-input matrix: mistakes in data files, configs, checkpoints and command lines, each run
through `polyhead` in process. Every one must end in one line naming the file, line or key and
what to do, a non-zero exit, no traceback, and nothing written to the run's outputs.

Mistakes tested elsewhere, not repeated here: tests/test_cli.py (missing, empty and blank training
file, a malformed JSON line, a text file that is not UTF-8, an unknown backbone key, d_model not
divisible by n_heads, an unknown task class, the exit of a real process); tests/test_sources.py
(missing column and a mapping to no field at the loader, aligned files of different lengths,
malformed SQuAD); tests/test_classify.py (malformed `LABEL text` lines); tests/test_seq2seq.py,
tests/test_triplet.py, tests/test_span_qa.py (empty and non-text fields, task settings);
tests/test_losses.py (unknown miner at the loss); tests/test_tokenizer.py (impossible vocabulary);
tests/test_freezing.py, tests/test_generation.py, tests/test_score.py (their settings);
tests/test_convert_cli.py (`polyhead convert` sources, a missing argument, truncated weights);
tests/test_sweep_spec.py (sweep specs); tests/test_safe_loading.py (a checkpoint that would run
code); tests/test_offline.py (hub names without a network).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from experiments.cli import main

from .conftest import ROOT, SEED_CORPUS, offline_env

QUICKSTART = str(ROOT / "experiments" / "configs" / "quickstart.yaml")
DOCUMENTS = SEED_CORPUS.read_text(encoding="utf-8").splitlines()  # 48 JSON lines: title, text
TINY = [
    *("--model.backbone.d_model", "32", "--model.backbone.n_heads", "2", "--model.backbone.d_ff", "64"),
    *("--data.batch_size", "8", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0"),
    *("--trainer.logger", "false", "--trainer.enable_progress_bar", "false"),
    *("--trainer.enable_model_summary", "false", "--checkpoint.monitor", "null"),
]


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    """One tokenizer cache for the module: the quickstart's vocabulary is trained once."""
    return tmp_path_factory.mktemp("polyhead-cache")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shared_cache) -> Path:
    """The quickstart's three tasks on a tiny backbone after 2 steps: a real checkpoint to misuse."""
    tmp = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as patch:
        for key, value in offline_env(tmp).items():
            patch.setenv(key, value)
        patch.setenv("POLYHEAD_CACHE", str(shared_cache))
        main(["fit", "--config", QUICKSTART, *TINY, "--checkpoint.dirpath", str(tmp)])
    return tmp / "last.ckpt"


@dataclass
class Inputs:
    """Builds a case's files under `tmp/in`; the run's outputs go to `tmp/out`."""

    tmp: Path
    request: pytest.FixtureRequest

    def file(self, name: str, content: str | bytes) -> str:
        path = self.tmp / "in" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        return str(path)

    def missing(self, name: str) -> str:
        return str(self.tmp / "in" / name)

    @property
    def checkpoint(self) -> str:
        return str(self.request.getfixturevalue("trained"))

    def outputs(self) -> list[str]:
        out = self.tmp / "out"
        return [
            *("--checkpoint.dirpath", str(out / "ckpt"), "--trainer.default_root_dir", str(out / "root")),
            *("--predictions.path", str(out / "predictions.jsonl")),
        ]

    def fit(self, *extra: str) -> list[str]:
        return ["fit", "--config", QUICKSTART, *TINY, *self.outputs(), *extra]

    def from_checkpoint(self, command: str, *extra: str, checkpoint: str | None = None) -> list[str]:
        return [
            command,
            "--config",
            QUICKSTART,
            *TINY,
            *self.outputs(),
            "--ckpt_path",
            checkpoint or self.checkpoint,
            *extra,
        ]

    def config(self, name: str, values: dict) -> str:
        return self.file(name, json.dumps(values))  # JSON is YAML

    def pairs(self, name: str, rows: str, **source) -> list[str]:
        """fit a one-task config (sentence pairs scored 0-5) on `rows` written to `name`."""
        config = {
            "model": {
                "tasks": {
                    "pairs": {
                        "class_path": "SentenceEmbedding",
                        "init_args": {
                            "input": "pairs",
                            "threshold": 4.0,
                            "score_range": [0.0, 5.0],
                            "max_length": 16,
                        },
                    }
                },
                "backbone": {"d_model": 32, "n_heads": 2, "d_ff": 64, "encoder_layers": 1, "max_len": 16},
            },
            "data": {
                "sources": {"pairs": {"path": self.file(name, rows), "holdout_every": 4, **source}},
                "tokenizer": {"vocab_size": 400},
                "batch_size": 4,
            },
        }
        return ["fit", "--config", self.config("pairs.yaml", config), *TINY[-8:], *self.outputs()]


def pairs_jsonl(bad_line: str) -> str:
    good = [
        json.dumps({"sentence1": f"A sentence {i}.", "sentence2": f"Another {i}.", "score": i % 5})
        for i in range(20)
    ]
    return "\n".join([good[0], bad_line, *good[1:]]) + "\n"


def pairs_tsv(inputs: Inputs, name: str, lines: str) -> list[str]:
    """fit on a headerless score/sentence1/sentence2 TSV: one good line, `lines`, then 20 good ones."""
    good = "".join(f"{k % 5}.0\tSentence {k}.\tOther {k}.\n" for k in range(20))
    return inputs.pairs(
        name,
        f"4.0\tA cat sat.\tA cat sits.\n{lines}\n{good}",
        format="tsv",
        quoting=False,
        column_names=["score", "sentence1", "sentence2"],
    )


def one_task_config() -> dict:
    """The quickstart with its masked-LM task only."""
    config = yaml.safe_load(Path(QUICKSTART).read_text())
    for section in (config["model"]["tasks"], config["data"]["sources"]):
        for name in ("triplet", "summarize"):
            section.pop(name)
    return config


def without_tokenizer(path: str) -> dict:
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["polyhead"]["tokenizer"]
    return checkpoint


def weights_only(path: str) -> dict:
    """The checkpoint as `polyhead convert` or save_weights_only writes it: no optimizer or loop state."""
    checkpoint = torch.load(path, weights_only=True)
    for key in ("optimizer_states", "lr_schedulers", "loops"):
        checkpoint.pop(key, None)
    return checkpoint


def damaged_sweep(inputs: Inputs, spec_text: str) -> str:
    """A sweeps directory holding sweep `lr` with `spec_text` as its saved spec -> the directory."""
    return str(Path(inputs.file("sweeps/lr/spec.yaml", spec_text)).parents[1])


def save(inputs: Inputs, name: str, checkpoint: dict) -> str:
    path = inputs.missing(name)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return path


def truncated(inputs: Inputs, name: str) -> str:
    whole = Path(inputs.checkpoint).read_bytes()
    return inputs.file(name, whole[: len(whole) // 2])


def long_text() -> str:
    lines = list(DOCUMENTS)
    lines.insert(3, json.dumps({"title": "All of it", "text": "A sentence. " * 100_001}))
    return "\n".join(lines) + "\n"


def with_empty_title(row: int) -> str:
    lines = list(DOCUMENTS)
    lines[row - 1] = json.dumps(json.loads(lines[row - 1]) | {"title": ""})
    return "\n".join(lines) + "\n"


@dataclass
class Case:
    id: str
    command: Callable[[Inputs], list[str]]
    expected: tuple[str, ...]


MLM = "--data.sources.mlm_nsp.path"
CASES = [
    # ------------------------------------------------------------------------------- data files
    Case(
        "validation file missing",
        lambda i: i.fit("--data.sources.mlm_nsp.validation_path", i.missing("val.jsonl")),
        ("data.sources.mlm_nsp.validation_path: file not found", "val.jsonl"),
    ),
    Case(
        "predict file missing",
        lambda i: i.from_checkpoint("predict", "--data.sources.mlm_nsp.predict_path", i.missing("in.jsonl")),
        ("data.sources.mlm_nsp.predict_path", "file not found", "in.jsonl"),
    ),
    Case(
        "predict file with the training data's column names",  # the quickstart maps source -> text
        lambda i: i.from_checkpoint(
            "predict",
            *("--data.sources.mlm_nsp.predict_path", str(SEED_CORPUS)),
            *("--data.sources.triplet.predict_path", i.file("texts.txt", "A short note.\n")),
            *("--data.sources.summarize.predict_path", i.file("in.jsonl", '{"text": "A short note."}\n')),
        ),
        (
            "missing column(s) ['source']",
            "data.sources.summarize.predict_path is read without",
            "rename its columns",
        ),
    ),
    Case(
        "a directory as the data file",
        lambda i: i.fit(MLM, str(Path(i.file("corpus/a.jsonl", DOCUMENTS[0])).parent)),
        ("data.sources.mlm_nsp.path", "corpus' is a directory"),
    ),
    Case(
        "an extension that names no format",
        lambda i: i.fit(MLM, i.file("corpus.dat", DOCUMENTS[0])),
        ("data.sources.mlm_nsp.format: cannot tell the format", "corpus.dat"),
    ),
    Case(
        "a CSV file with a header only",
        lambda i: i.fit("--data.sources.summarize.path", i.file("titles.csv", "title,text\n")),
        ("titles.csv: a header line and no rows",),
    ),
    Case(
        "JSON lines in Latin-1",
        lambda i: i.fit(
            MLM, i.file("latin.jsonl", (DOCUMENTS[0] + '\n{"text": "Caf\xe9 au lait."}\n').encode("latin-1"))
        ),
        ("latin.jsonl, line 2: not valid utf-8 (byte 0xe9)", "encoding"),
    ),
    Case(
        "CSV in Latin-1",
        lambda i: i.fit(
            "--data.sources.summarize.path",
            i.file("latin.csv", "title,text\nCaf\xe9,Au lait.\n".encode("latin-1")),
        ),
        ("latin.csv, line 2: not valid utf-8", "encoding"),
    ),
    Case(
        "a JSON line that is not an object",
        lambda i: i.fit(MLM, i.file("list.jsonl", DOCUMENTS[0] + "\n[1, 2]\n")),
        ("list.jsonl, line 2: expected a JSON object per line",),
    ),
    Case(
        "a JSON lines file cut mid-line",
        lambda i: i.fit(MLM, i.file("cut.jsonl", "\n".join(DOCUMENTS) + "\n" + DOCUMENTS[0][:40])),
        ("cut.jsonl, line 49: malformed JSON",),
    ),
    Case(
        "the column a task reads is missing",
        lambda i: i.fit(
            "--data.sources.triplet.path",
            i.file(
                "untitled.jsonl",
                "".join(json.dumps({"text": json.loads(d)["text"]}) + "\n" for d in DOCUMENTS),
            ),
        ),
        ("untitled.jsonl: missing column(s) ['title']", "data.sources.triplet.columns"),
    ),
    Case(
        "a number where text belongs",
        lambda i: i.fit(MLM, i.file("numbers.jsonl", '{"title": "t", "text": 5}\n' + "\n".join(DOCUMENTS))),
        ("numbers.jsonl: field 'text' must hold text", "5 at line 1"),
    ),
    Case(
        "an empty text in a row",
        lambda i: i.fit("--data.sources.summarize.path", i.file("titles.jsonl", with_empty_title(6))),
        ("titles.jsonl, line 6: field 'target' is empty",),
    ),
    Case(
        "an over-long text",
        lambda i: i.fit(MLM, i.file("long.jsonl", long_text())),
        ("long.jsonl, line 4", "1,200,012 characters", "data.sources.mlm_nsp.max_text_chars"),
    ),
    Case(
        "a NaN score in JSON lines",
        lambda i: i.pairs(
            "scores.jsonl", pairs_jsonl('{"sentence1": "A cat.", "sentence2": "A cat.", "score": NaN}')
        ),
        ("scores.jsonl, line 2: field 'score' is nan, not a finite number",),
    ),
    Case(
        "a NaN score in a TSV file",
        lambda i: pairs_tsv(i, "scores.tsv", "1.0\tA dog.\tA bird.\nnan\tA dog ran.\tThe dog runs."),
        ("scores.tsv, line 3: field 'score' is empty (no value, null or NaN)",),
    ),
    Case(
        "a word where a TSV score belongs",
        lambda i: pairs_tsv(i, "words.tsv", "high\tA dog ran.\tThe dog runs."),
        ("words.tsv, line 2: field 'score' is 'high', not a number",),
    ),
    # ---------------------------------------------------------------------------------- configs
    Case(
        "an unknown key in a data source",
        lambda i: i.fit("--data.sources.mlm_nsp.paht", "corpus.jsonl"),
        ("data.sources", "'paht' is not accepted"),
    ),
    Case(
        "an MLM input longer than the backbone's positions",
        lambda i: i.fit("--model.tasks.mlm_nsp.init_args.max_length", "128"),
        ("MaskedLMNextSentence.max_length = 128 exceeds model.backbone.max_len=64",),
    ),
    Case(
        "a seq2seq target longer than the backbone's positions",
        lambda i: i.fit("--model.tasks.summarize.init_args.max_target_length", "100"),
        ("Seq2Seq.max_target_length = 100 exceeds model.backbone.max_len=64",),
    ),
    Case(
        "an abbreviated option, which must not silently mean a longer one",
        lambda i: i.fit("--trainer.max_step", "5"),
        ("unrecognized arguments: --trainer.max_step 5",),
    ),
    Case("an unknown trainer key", lambda i: i.fit("--trainer.max_stepz", "5"), ("--trainer.max_stepz",)),
    Case(
        "a word where a number belongs",
        lambda i: i.fit("--data.batch_size", "eight"),
        ('"data.batch_size"', "Expected a <class 'int'>", "eight"),
    ),
    Case(
        "a wrong type in the config file",
        lambda i: [
            "fit",
            "--config",
            QUICKSTART,
            "--config",
            i.config("steps.yaml", {"trainer": {"max_steps": "lots"}}),
        ],
        ('"trainer.max_steps"', "lots"),
    ),
    Case(
        "a config file that is not YAML",
        lambda i: ["fit", "--config", i.file("broken.yaml", "model:\n  tasks: [\n  backbone: {d_model: 3\n")],
        ("broken.yaml, line 4, column 1: not valid YAML", "fix the file"),
    ),
    Case(
        "a config file that does not exist",
        lambda i: ["fit", "--config", i.missing("quickstrat.yaml")],
        ("quickstrat.yaml", "does not exist"),
    ),
    Case(
        "a source for a task the model does not have",
        lambda i: i.fit("--data.sources.extra", json.dumps({"path": str(SEED_CORPUS), "holdout_every": 8})),
        ("data.sources and model.tasks must name the same tasks", "sources without a task ['extra']"),
    ),
    Case(
        "an unknown miner",
        lambda i: i.fit("--model.tasks.triplet.init_args.loss", "hardest_negatives"),
        ("SentenceEmbedding.loss must be one of batch_hard", "hardest_negatives"),
    ),
    Case(
        "an unknown distance",
        lambda i: i.fit("--model.tasks.triplet.init_args.distance", "manhattan"),
        ('"distance"', "'cosine', 'euclidean'", "manhattan"),
    ),
    Case(
        "an unknown position encoding",
        lambda i: i.fit("--model.backbone.position", "absolute"),
        ('"position"', "'learned', 'sinusoidal', 'relative'", "absolute"),
    ),
    Case(
        "no attention heads",
        lambda i: i.fit("--model.backbone.n_heads", "0"),
        ("model.backbone.n_heads must be positive, got 0",),
    ),
    Case(
        "a dropout above 1",
        lambda i: i.fit("--model.backbone.dropout", "1.5"),
        ("model.backbone.dropout must be in [0, 1), got 1.5",),
    ),
    Case(
        "an empty batch",
        lambda i: i.fit("--data.batch_size", "0"),
        ("data.batch_size must be positive, got 0",),
    ),
    Case(
        "a batch size both per process and global",
        lambda i: i.fit("--data.global_batch_size", "16"),
        ("data.batch_size (per process) or data.global_batch_size (all processes), not both",),
    ),
    Case(
        "a vocabulary too small for the text",
        lambda i: i.fit("--data.tokenizer.vocab_size", "10"),
        ("data.tokenizer", "data.tokenizer.vocab_size must hold"),
    ),
    Case(
        "a mixing temperature of 0",
        lambda i: i.fit("--data.mixture.temperature", "0"),
        ("data.mixture.temperature must be positive",),
    ),
    Case(
        "task weights summing to 0 (W&B on: not even its run directory may appear)",
        lambda i: i.fit(
            *(f"--model.tasks.{t}.init_args.loss_weight=0" for t in ("mlm_nsp", "triplet", "summarize")),
            *("--trainer.logger=WandbLogger", f"--trainer.logger.save_dir={i.tmp / 'out' / 'runs'}"),
        ),
        ("every task has loss_weight 0", "give at least one task a positive loss_weight"),
    ),
    # ------------------------------------------------------------------------------ checkpoints
    Case(
        "a checkpoint that does not exist",
        lambda i: i.from_checkpoint("validate", checkpoint=i.missing("nope.ckpt")),
        ("checkpoint not found", "nope.ckpt"),
    ),
    Case(
        "a truncated checkpoint",
        lambda i: i.from_checkpoint("validate", checkpoint=truncated(i, "half.ckpt")),
        ("half.ckpt: not a readable checkpoint", "truncated"),
    ),
    Case(
        "a text file as the checkpoint",
        lambda i: i.from_checkpoint("test", checkpoint=i.file("notes.ckpt", "my best run\n")),
        ("notes.ckpt: not a readable checkpoint",),
    ),
    Case(
        "a checkpoint of another architecture",
        lambda i: i.from_checkpoint("validate", "--model.backbone.encoder_layers", "3"),
        ("holds another model", "model.backbone.encoder_layers is 3 (checkpoint: 2)", "--model.init_from"),
    ),
    Case(
        "a checkpoint of other tasks",
        lambda i: [
            "validate",
            "--config",
            i.config("mlm.yaml", one_task_config()),
            *TINY,
            *i.outputs(),
            "--ckpt_path",
            i.checkpoint,
        ],
        ("holds another model", "model.tasks are {'mlm_nsp': 'MaskedLMNextSentence'}", "--model.init_from"),
    ),
    Case(
        "a checkpoint without its tokenizer",
        lambda i: i.from_checkpoint(
            "validate", checkpoint=save(i, "bare.ckpt", without_tokenizer(i.checkpoint))
        ),
        ("bare.ckpt: incomplete polyhead checkpoint, it lacks tokenizer",),
    ),
    Case(
        "resuming from a checkpoint of weights only",
        lambda i: i.fit("--ckpt_path", save(i, "weights.ckpt", weights_only(i.checkpoint))),
        ("weights.ckpt: holds weights only", "--model.init_from"),
    ),
    Case(
        "a model directory to start from",
        lambda i: i.fit("--model.init_from", str(Path(i.file("bert/config.json", "{}")).parent)),
        ("bert: is a directory", "polyhead convert DIR OUT.ckpt"),
    ),
    Case(
        "a truncated last.ckpt to resume",
        lambda i: i.fit(
            "--checkpoint.dirpath", str(Path(truncated(i, "run/last.ckpt")).parent), "--ckpt_path", "last"
        ),
        ("last.ckpt: not a readable checkpoint",),
    ),
    Case(
        "a local sweep whose saved spec was damaged",
        lambda i: ["compare", "--sweep", "lr", "--sweeps-dir", damaged_sweep(i, "seeds: 1\n")],
        ("spec.yaml: damaged", "`seeds: N` and the sweep's `spec:`"),
    ),
    Case(
        "a local sweep whose saved spec is not YAML",
        lambda i: ["compare", "--sweep", "lr", "--sweeps-dir", damaged_sweep(i, "spec: {method: grid\n")],
        ("spec.yaml, line 2, column 1: not valid YAML",),
    ),
    # ------------------------------------------------------------------------------ command line
    Case(
        "an unknown subcommand",
        lambda i: ["trian", "--config", QUICKSTART],
        ("invalid choice: 'trian'", "'fit'"),
    ),
    Case("no subcommand", lambda i: [], ('"subcommand"', "fit,validate,test,predict")),
    Case("no config", lambda i: ["fit"], ("required", "fit.model.tasks", "fit.data.sources")),
    Case(
        "an option without its value", lambda i: i.fit("--ckpt_path"), ("--ckpt_path: expected one argument",)
    ),
    Case("an unknown option", lambda i: i.fit("--nonsense"), ("unrecognized arguments: --nonsense",)),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_a_mistake_ends_in_one_line_naming_it_and_writes_nothing(
    case, tmp_path, shared_cache, request, monkeypatch, capsys
):
    monkeypatch.setenv("POLYHEAD_CACHE", str(shared_cache))
    inputs = Inputs(tmp_path, request)
    command = case.command(inputs)
    with pytest.raises(SystemExit) as exit_info:
        main(command)
    message = exit_info.value.code
    assert isinstance(message, str), f"exit code {message!r}: a message is printed and the exit status is 1"
    assert message.startswith("polyhead: error: ") and "\n" not in message, message
    for text in case.expected:
        assert text in message, f"{text!r} not in {message!r}"
    assert "Traceback" not in capsys.readouterr().err
    written = [str(p) for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert not written, f"left behind: {written}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for a GPU a CPU machine lacks")
def test_asking_for_a_gpu_on_a_cpu_machine(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", QUICKSTART, *TINY, "--trainer.accelerator", "gpu"])
    message = exit_info.value.code
    assert message.startswith("polyhead: error: trainer: ") and "gpu" in message and "\n" not in message
    assert "Traceback" not in capsys.readouterr().err
