"""Loading never runs code from a file: a checkpoint whose pickle would call a function is refused,
naming what it asked for, by every way polyhead reads checkpoints; configs are data, never code.
Each crafted file would create a marker file if anything ran it."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest
import torch

from experiments.cli import main
from modules.checkpoint import read_checkpoint
from modules.errors import UserError
from modules.model import MultiTaskModel

from .conftest import ROOT

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")

QUICKSTART = str(ROOT / "experiments" / "configs" / "quickstart.yaml")
FAST = ["--trainer.max_steps", "1", "--trainer.limit_val_batches", "0", "--trainer.logger", "false"]


class RunsCode:
    """Pickles as a call to os.system: loading it unsafely runs the command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def crafted(path: Path, marker: Path, layout: str) -> Path:
    """A file laid out as a polyhead checkpoint or a HF weights file, one of whose values is code."""
    payload = RunsCode(f"touch {marker}")
    if layout == "checkpoint":
        content = {
            "state_dict": {"w": torch.zeros(2)},
            "polyhead": {"backbone": {}, "tasks": {}, "tokenizer": payload},
        }
    else:
        content = {"bert.embeddings.word_embeddings.weight": payload}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(content, path)
    return path


def refused(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    message = exit_info.value.code
    assert isinstance(message, str) and message.startswith("polyhead: error: ") and "\n" not in message
    assert "Traceback" not in capsys.readouterr().err
    return message


ENTRY_POINTS = {
    "validate --ckpt_path": lambda ckpt, tmp: [
        "validate",
        "--config",
        QUICKSTART,
        *FAST,
        "--ckpt_path",
        str(ckpt),
    ],
    "fit --model.init_from": lambda ckpt, tmp: [
        "fit",
        "--config",
        QUICKSTART,
        *FAST,
        "--model.init_from",
        str(ckpt),
    ],
    "fit --ckpt_path last": lambda ckpt, tmp: [
        *(
            "fit",
            "--config",
            QUICKSTART,
            *FAST,
            "--checkpoint.dirpath",
            str(ckpt.parent),
            "--ckpt_path",
            "last",
        )
    ],
}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_a_checkpoint_that_would_run_code_is_refused(entry, tmp_path, capsys):
    marker = tmp_path / "ran"
    checkpoint = crafted(tmp_path / "run" / "last.ckpt", marker, "checkpoint")
    message = refused(ENTRY_POINTS[entry](checkpoint, tmp_path), capsys)
    assert f"{checkpoint}: refused: loading it would run code (posix.system)" in message, message
    assert not marker.exists(), "the pickle ran"


def test_reading_a_checkpoint_in_python_refuses_it_too(tmp_path):
    marker = tmp_path / "ran"
    checkpoint = crafted(tmp_path / "evil.ckpt", marker, "checkpoint")
    for read in (read_checkpoint, MultiTaskModel.from_checkpoint):
        with pytest.raises(UserError, match=r"refused: loading it would run code \(posix.system\)"):
            read(checkpoint)
    assert not marker.exists()


def test_hf_weights_that_would_run_code_are_refused(tmp_path, capsys):
    marker = tmp_path / "ran"
    model = tmp_path / "bert"
    crafted(model / "pytorch_model.bin", marker, "weights")
    (model / "config.json").write_text(json.dumps({"model_type": "bert"}))
    message = refused(["convert", str(model), str(tmp_path / "out.ckpt")], capsys)
    assert "pytorch_model.bin: refused: loading it would run code (posix.system)" in message, message
    assert "weights_only" not in message, (
        "torch's own hint (load with weights_only=False) must not be passed on"
    )
    assert not marker.exists() and not (tmp_path / "out.ckpt").exists()


def test_a_config_is_data_never_code(tmp_path, capsys):
    """YAML's python tags, and a class_path naming something that is not a task, are refused
    before anything is called."""
    marker = tmp_path / "ran"
    tagged = tmp_path / "tagged.yaml"
    tagged.write_text(f'seed_everything: !!python/object/apply:os.system ["touch {marker}"]\n')
    assert "python/object/apply" in refused(
        ["fit", "--config", QUICKSTART, "--config", str(tagged), *FAST], capsys
    )
    spawn = json.dumps({"class_path": "subprocess.Popen", "init_args": {"args": ["touch", str(marker)]}})
    message = refused(["fit", "--config", QUICKSTART, *FAST, "--model.tasks.mlm_nsp", spawn], capsys)
    assert "subprocess.Popen does not correspond to a subclass of Task" in message
    assert not marker.exists()


PRODUCT = ["modules", "tasks", "datamodules", "experiments", "benchmarks"]
UNSAFE = {"eval", "exec", "pickle.load", "pickle.loads", "yaml.load", "yaml.unsafe_load", "torch.hub.load"}


def dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def test_the_code_loads_files_only_in_ways_that_run_no_code():
    """Every torch.load in polyhead passes weights_only=True, and nothing evals, execs, unpickles or
    reads YAML with a loader that builds objects."""
    found = []
    for path in sorted(p for package in PRODUCT for p in (ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            name, where = dotted(node.func), f"{path.relative_to(ROOT)}:{node.lineno}"
            if name == "torch.load":
                safe = any(
                    k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                    for k in node.keywords
                )
                found += [] if safe else [f"{where} torch.load without weights_only=True"]
            elif name in UNSAFE:
                found.append(f"{where} {name}")
    assert not found, found
