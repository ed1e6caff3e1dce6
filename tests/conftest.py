"""Shared fixtures: every test writes caches, W&B files and checkpoints under a temp dir, offline;
tiny models run on one thread; the HF reference directories of the conversion tests."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

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


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models: more intra-op threads only add contention (seconds of it on a busy
    machine). Used as `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# The HF reference directories are built once per session; tests/hf_models.py is imported inside
# the fixtures because importing it skips the test where transformers (a dev extra) is missing.


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory) -> Path:
    """A tiny BertForPreTraining directory as save_pretrained writes it, with its tokenizer.json."""
    from .hf_models import bert_directory

    return bert_directory(tmp_path_factory.mktemp("hf-bert"))


T5_VARIANTS = {  # (feed_forward_proj, tie_word_embeddings, an LM head of its own)
    "v1.0-relu-tied": ("relu", True, False),
    "v1.1-gated-gelu-tied-unscaled": ("gated-gelu", False, False),
    "v1.1-gated-gelu-own-lm-head": ("gated-gelu", False, True),
}


@pytest.fixture(scope="session", params=list(T5_VARIANTS))
def t5_dir(request, tmp_path_factory) -> Path:
    """A tiny T5ForConditionalGeneration directory with its tokenizer, in each of T5_VARIANTS."""
    from .hf_models import t5_directory

    return t5_directory(tmp_path_factory.mktemp(f"hf-t5-{request.param}"), *T5_VARIANTS[request.param])


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory) -> Path:
    """A tiny GPT2LMHeadModel directory as save_pretrained writes it, with its tokenizer.json."""
    from .hf_models import gpt2_directory

    return gpt2_directory(tmp_path_factory.mktemp("hf-gpt2"))


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    """A tiny LlamaForCausalLM directory as save_pretrained writes it, with its tokenizer.json."""
    from .hf_models import llama_directory

    return llama_directory(tmp_path_factory.mktemp("hf-llama"))


@pytest.fixture(scope="session", params=["qwen2", "qwen3"])
def qwen_dir(request, tmp_path_factory) -> Path:
    """A tiny Qwen2ForCausalLM or Qwen3ForCausalLM directory as save_pretrained writes it, with a
    Qwen-style tokenizer.json."""
    from .hf_models import qwen_directory

    return qwen_directory(tmp_path_factory.mktemp(f"hf-{request.param}"), request.param)
