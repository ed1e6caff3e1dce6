"""Shared fixtures: every test writes caches, W&B files and checkpoints under a temp dir, offline."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
SEED_CORPUS = ROOT / "seeds" / "quickstart" / "documents.jsonl"


def offline_env(tmp: Path) -> dict[str, str]:
    """Environment for a polyhead process that must touch nothing outside `tmp` and no network."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(
        WANDB_MODE="offline",
        WANDB_DIR=str(tmp / "wandb"),
        WANDB_DATA_DIR=str(tmp / "wandb-data"),
        WANDB_CACHE_DIR=str(tmp / "wandb-cache"),
        WANDB_CONFIG_DIR=str(tmp / "wandb-config"),
        WANDB_SILENT="true",
        POLYHEAD_CACHE=str(tmp / "polyhead-cache"),
        HF_DATASETS_CACHE=str(tmp / "hf-datasets"),
        HF_DATASETS_OFFLINE="1",
        HF_HUB_OFFLINE="1",
        PYTHONPATH=str(ROOT),
    )
    for key in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        Path(env[key]).mkdir(parents=True, exist_ok=True)
    return env


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    for key, value in offline_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    return tmp_path


@pytest.fixture
def python() -> str:
    return sys.executable


@pytest.fixture(scope="session")
def documents() -> list[dict]:
    """The quickstart's seed corpus: small real documents written for this project."""
    return [json.loads(line) for line in SEED_CORPUS.read_text().splitlines()]
