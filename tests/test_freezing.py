"""Transfer-learning controls: parameter depths, freezing policies (permanent and gradual) and
layer-wise learning-rate decay, checked parameter by parameter."""

from __future__ import annotations

import pytest
import torch

from datamodules.tokenizer import Tokenizer, TokenizerConfig
from modules.config import BackboneConfig
from modules.errors import UserError
from modules.freezing import FreezeConfig, parameter_depth
from modules.model import MultiTaskModel
from modules.optim import OptimizerConfig, build_optimizer
from tasks.mlm_nsp import MaskedLMNextSentence
from tasks.seq2seq import Seq2Seq

from .test_cli import QUICKSTART, polyhead

TINY = dict(
    d_model=32, n_heads=2, d_ff=64, encoder_layers=2, decoder_layers=3, position="relative", norm="pre"
)


@pytest.fixture(scope="module")
def tokenizer(documents) -> Tokenizer:
    lines = [line for doc in documents for line in doc["text"].splitlines()]
    return Tokenizer.train(lines, TokenizerConfig(vocab_size=600), "seed corpus")


def model_with(tokenizer, freeze=FreezeConfig(), summarize=True, **optimizer) -> MultiTaskModel:
    tasks = {"mlm": MaskedLMNextSentence()} | ({"summarize": Seq2Seq()} if summarize else {})
    config = BackboneConfig(**TINY)
    return MultiTaskModel(tasks, config, OptimizerConfig(**optimizer), tokenizer, freeze=freeze)


def test_depths_run_from_the_embeddings_through_both_stacks_to_the_heads(tokenizer):
    model = model_with(tokenizer)
    depth = {name: parameter_depth(name, model.backbone_config) for name, _ in model.named_parameters()}
    assert depth["backbone.embeddings.tokens.weight"] == 0
    assert depth["backbone.encoder.layers.0.ff.up.weight"] == 1
    assert depth["backbone.encoder.layers.1.self_attn.qkv.weight"] == 2
    assert depth["backbone.encoder.relative_bias.bias.weight"] == 1
    assert depth["backbone.encoder.final_norm.weight"] == 2
    assert depth["backbone.decoder.layers.0.cross_attn.q.weight"] == 3
    assert depth["backbone.decoder.layers.2.ff.down.weight"] == 5
    assert depth["backbone.pooler.weight"] == 5
    assert all(d == 6 for name, d in depth.items() if name.startswith("heads."))


def test_feature_extraction_and_bottom_layers_stop_gradients_where_they_should(tokenizer):
    model = model_with(tokenizer, FreezeConfig(policy="feature_extraction"), summarize=False)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("heads.") for name in trainable)
    model = model_with(tokenizer, FreezeConfig(policy="bottom", layers=1))
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    depth = model.backbone_config
    assert frozen == {name for name, _ in model.named_parameters() if parameter_depth(name, depth) <= 1}
    assert "backbone.encoder.layers.0.ff.up.weight" in frozen
    assert "backbone.encoder.layers.1.ff.up.weight" not in frozen


def test_gradual_unfreezing_releases_one_layer_per_period_from_the_top(tokenizer):
    freeze = FreezeConfig(policy="feature_extraction", unfreeze_every=2)
    config = BackboneConfig(**TINY)
    assert [freeze.highest_frozen(config, epoch) for epoch in range(0, 14, 2)] == [5, 4, 3, 2, 1, 0, -1]
    model = model_with(tokenizer, freeze)
    assert all(p.requires_grad for p in model.parameters()), "DDP needs the trainable set fixed"
    model._set_frozen(epoch=6)  # layers up to depth 2 frozen
    for param in model.parameters():
        param.grad = torch.ones_like(param)
    model.on_after_backward()
    for name, param in model.named_parameters():
        assert (param.grad is None) == (parameter_depth(name, model.backbone_config) <= 2), name


def test_layer_decay_gives_each_parameter_lr_times_decay_to_its_distance_from_the_top(tokenizer):
    model = model_with(tokenizer, lr=1e-3, layer_decay=0.5)
    optimizer = build_optimizer(
        model, model.optimizer_config, 100, lambda n: parameter_depth(n, model.backbone_config)
    )["optimizer"]
    lr_of = {id(p): group["initial_lr"] for group in optimizer.param_groups for p in group["params"]}
    decay_of = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    assert len(lr_of) == sum(1 for _ in model.parameters())
    for name, param in model.named_parameters():
        expected = 1e-3 * 0.5 ** (6 - parameter_depth(name, model.backbone_config))
        assert lr_of[id(param)] == pytest.approx(expected), name
        assert decay_of[id(param)] == (0.01 if param.ndim >= 2 else 0.0), name


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(policy="all"), "policy must be"),
        (dict(policy="bottom"), "needs layers >= 1"),
        (dict(policy="none", layers=2), "layers applies to policy 'bottom'"),
        (dict(policy="bottom", layers=1, unfreeze_every=-1), "must be >= 0"),
    ],
)
def test_bad_freeze_settings_are_named(settings, message):
    with pytest.raises(UserError, match=message):
        FreezeConfig(**settings)


def test_frozen_layers_stay_bit_identical_through_a_real_run(tmp_path):
    """Pretrain briefly, then train from that checkpoint with the embeddings and the encoder frozen
    (quickstart: 2 encoder + 2 decoder layers): every frozen tensor in the new checkpoint equals the
    pretrained one and the rest moved. Freezing the whole backbone is refused: the quickstart's
    summarizer and sentence-embedding heads own no weights and would have nothing to train."""
    tiny = [
        "fit", "--config", QUICKSTART, "--model.backbone.d_model", "32", "--model.backbone.n_heads", "2",
        "--model.backbone.d_ff", "64", "--data.batch_size", "8", "--trainer.max_steps", "4",
        "--trainer.limit_val_batches", "0", "--trainer.logger", "false", "--checkpoint.monitor", "null",
    ]  # fmt: skip
    first = polyhead([*tiny, "--checkpoint.dirpath", str(tmp_path / "a")], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    pretrained = tmp_path / "a" / "last.ckpt"
    start = ["--model.init_from", str(pretrained), "--checkpoint.dirpath", str(tmp_path / "b")]
    refused = polyhead([*tiny, *start, "--model.freeze.policy", "feature_extraction"], tmp_path)
    assert refused.returncode != 0 and "nothing to train: its head has no weights" in refused.stderr
    assert "Traceback" not in refused.stderr
    bottom = ["--model.freeze.policy", "bottom", "--model.freeze.layers", "2"]
    second = polyhead([*tiny, *start, *bottom], tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "frozen parameters" in second.stdout + second.stderr
    before = torch.load(pretrained, weights_only=False)["state_dict"]
    after = torch.load(tmp_path / "b" / "last.ckpt", weights_only=False)["state_dict"]
    frozen = [k for k in before if k.startswith(("backbone.embeddings.", "backbone.encoder."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    moved = [
        k
        for k in before
        if k.startswith(("backbone.decoder.", "heads.")) and not torch.equal(before[k], after[k])
    ]
    assert moved
