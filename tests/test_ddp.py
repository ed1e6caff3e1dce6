"""Two CPU processes under DDP follow the same loss curve as one process at the same global batch;
with cross-rank gathering, sentence-embedding training is exactly the one-process run."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments.objective_guard import broken_anywhere

from .conftest import ROOT, SEED_CORPUS, offline_env

QUICKSTART = str(ROOT / "experiments" / "configs" / "quickstart.yaml")


def train(devices: int, global_batch: int, config: str, tmp_path, *extra: str) -> tuple[list[float], dict]:
    prefix = tmp_path / f"run-{devices}-{abs(hash(extra))}"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.ddp_curve",
            str(devices),
            str(global_batch),
            str(prefix),
            config,
            *extra,
        ],
        cwd=ROOT,
        env=offline_env(tmp_path) | {"OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(prefix.with_suffix(".json").read_text()), torch.load(prefix.with_suffix(".pt"))


GATHER = ("--model.tasks.triplet.init_args.gather_across_ranks", "true")


@pytest.fixture(scope="module")
def one_process_curve(tmp_path_factory) -> list[float]:
    return train(1, 16, QUICKSTART, tmp_path_factory.mktemp("one"), *GATHER)[0]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_process(strategy, one_process_curve, tmp_path):
    """The trainer configs for DDP and for FSDP2 with each block sharded (modules/sharding.py),
    on 2 CPU processes (gloo) instead of every GPU, in fp32."""
    one = one_process_curve
    trainer_config = str(ROOT / "experiments" / "configs" / "trainer" / f"{strategy}.yaml")
    on_cpu = ("--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.precision", "32-true")
    two, _ = train(2, 16, QUICKSTART, tmp_path, *GATHER, "--config", trainer_config, *on_cpu)
    assert len(one) == len(two) == 8
    # Same examples, masks and initial weights; the only difference is that each rank averages the
    # MLM loss over its own masked tokens before gradients are averaged, so allow 2% per step.
    for step, (a, b) in enumerate(zip(one, two, strict=True)):
        assert abs(a - b) <= 0.02 * a, f"step {step}: 1 process {a:.4f} vs 2 processes {b:.4f}"


@pytest.fixture
def embedding_config(tmp_path) -> str:
    config = tmp_path / "embeddings.yaml"
    config.write_text(
        f"""
seed_everything: 0
model:
  tasks:
    t:
      class_path: SentenceEmbedding
      init_args: {{input: labelled, unit: sentence, loss: batch_hard, max_length: 48, samples_per_group: 2}}
  backbone: {{d_model: 64, n_heads: 2, d_ff: 128, encoder_layers: 2, max_len: 48, pooler: false}}
  optimizer: {{lr: 1.0e-3, warmup: 0.0}}
data:
  sources:
    t: {{path: {SEED_CORPUS}, holdout_every: 8, columns: {{label: title}}}}
  tokenizer: {{vocab_size: 1000}}
trainer: {{accelerator: cpu}}
"""
    )
    return str(config)


def test_gathered_embeddings_under_ddp_equal_one_process(embedding_config, tmp_path):
    gather = ["--model.tasks.t.init_args.gather_across_ranks", "true"]
    one, one_weights = train(1, 16, embedding_config, tmp_path, *gather)
    two, two_weights = train(2, 16, embedding_config, tmp_path, *gather)
    assert one[-1] < one[0], "the curve should move (training happens)"
    # every rank mines over the whole global batch and the gradient scale is restored: the same
    # losses and the same final weights as one process, up to float summation order
    assert two == pytest.approx(one, rel=1e-4)
    for name, weight in one_weights.items():
        assert torch.allclose(weight, two_weights[name], atol=1e-5), name
    local, _ = train(2, 16, embedding_config, tmp_path)
    assert local != pytest.approx(one, rel=1e-4), "without gathering each rank mines only its half"


def test_reversible_layers_under_ddp_equal_one_process(embedding_config, tmp_path):
    """Reversible layers compute their parameters' gradients in their own backward pass; DDP must
    still find and average every one of them (modules/reversible.py)."""
    reversible = ["--model.tasks.t.init_args.gather_across_ranks", "true", "--model.backbone.norm", "pre",
                  "--model.backbone.reversible", "true", "--model.backbone.ff_chunks", "2"]  # fmt: skip
    one, one_weights = train(1, 16, embedding_config, tmp_path, *reversible)
    two, two_weights = train(2, 16, embedding_config, tmp_path, *reversible)
    assert one[-1] < one[0], "the curve should move (training happens)"
    assert two == pytest.approx(one, rel=1e-4)
    for name, weight in one_weights.items():
        assert torch.allclose(weight, two_weights[name], atol=1e-5), name


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_lora_adapters_under_ddp_and_fsdp_equal_one_process(strategy, embedding_config, tmp_path):
    """With LoRA the backbone's weights are frozen and only the adapters train: both strategies must
    skip the frozen ones and average every adapter's gradient (modules/lora.py)."""
    lora = ["--model.tasks.t.init_args.gather_across_ranks", "true", "--model.lora.rank", "4",
            "--model.lora.targets", "[query, value, feed_forward]", "--model.optimizer.lr", "1e-2"]  # fmt: skip
    trainer_config = str(ROOT / "experiments" / "configs" / "trainer" / f"{strategy}.yaml")
    on_cpu = ("--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.precision", "32-true")
    one, one_weights = train(1, 16, embedding_config, tmp_path, *lora)
    two, two_weights = train(2, 16, embedding_config, tmp_path, *lora, "--config", trainer_config, *on_cpu)
    assert one[-1] < one[0], "the curve should move (training happens)"
    assert two == pytest.approx(one, rel=1e-4)
    adapters = [name for name in one_weights if name.endswith(("lora_A", "lora_B"))]
    assert adapters and all(one_weights[name].abs().sum() > 0 for name in adapters if name.endswith("lora_B"))
    for name, weight in one_weights.items():
        assert torch.allclose(weight, two_weights[name], atol=1e-5), name


def _guard_verdict(rank: int, port: int, out: str) -> None:
    """One of two gloo processes: rank 0's loss is NaN, rank 1's finite; writes its verdict."""
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2
    )
    loss = torch.tensor(float("nan") if rank == 0 else 1.0)
    Path(out, f"{rank}.json").write_text(json.dumps(broken_anywhere(loss)))
    torch.distributed.destroy_process_group()


def test_a_non_finite_loss_in_one_process_stops_every_process(tmp_path):
    """The guard's decision is shared: a process whose own loss is finite stops too, at the same
    step, instead of waiting for the stopped one in the next gradient all-reduce."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.multiprocessing.spawn(_guard_verdict, args=(port, str(tmp_path)), nprocs=2)
    assert [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)] == [True, True]
