"""The speed switches (modules/speed.py) and mixed precision change speed, never the result; the
model FLOPs behind MFU (modules/flops.py) are what torch's own FLOP counter counts."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from datamodules.padding import mark_masks
from modules.backbone import Backbone, _real_tokens, init_weights
from modules.config import BackboneConfig
from modules.flops import network_cost
from modules.lora import LoraConfig, add_lora
from modules.optim import OptimizerConfig, build_optimizer
from modules.speed import SpeedConfig, apply_speed
from tasks.base import label_positions
from tasks.mlm_nsp import IGNORE, MaskedLMNextSentence

CONFIG = BackboneConfig(vocab_size=200, d_model=64, n_heads=4, d_ff=128, encoder_layers=2, max_len=32)
LLAMA_LAYOUT = dataclasses.replace(  # rotary positions and grouped-query attention take other paths
    CONFIG,
    position="rotary",
    n_kv_heads=2,
    norm="pre",
    norm_type="rmsnorm",
    gated_ff=True,
    activation="silu",
    bias=False,
)
QWEN_LAYOUT = dataclasses.replace(  # q/k/v biases and per-head query/key norms: more modules per block
    LLAMA_LAYOUT, qkv_bias=True, qk_norm=True
)
LAYOUTS = pytest.mark.parametrize(
    "config", [CONFIG, LLAMA_LAYOUT, QWEN_LAYOUT], ids=["bert", "llama", "qwen"]
)
STEPS = 4


def mlm_nsp_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random [CLS] A [SEP] B [SEP]-shaped inputs with some padding, 15% MLM labels, NSP labels."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(7, CONFIG.vocab_size, (6, 32), generator=generator)  # (B, T)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, 20:] = 0
    labelled = (torch.rand(6, 32, generator=generator) < 0.15) & attention_mask.bool()
    return {
        "input_ids": input_ids,
        "token_type_ids": (torch.arange(32) >= 16).long().repeat(6, 1),
        "attention_mask": attention_mask,
        "mlm_labels": torch.where(labelled, input_ids, IGNORE),
        "mlm_positions": label_positions(torch.where(labelled, input_ids, IGNORE)),
        "nsp_labels": torch.randint(2, (6,), generator=generator),
    }


def train(config: BackboneConfig, speed: SpeedConfig, autocast: bool = False) -> list[float]:
    """STEPS AdamW steps of MLM + NSP from one fixed initialisation -> the losses."""
    torch.manual_seed(0)
    task = MaskedLMNextSentence(max_length=32)
    backbone, head = Backbone(config), task.build_head(config)
    init_weights(head, config)
    apply_speed(backbone, speed)
    model = torch.nn.ModuleDict({"backbone": backbone, "head": head}).train()
    optimizer = build_optimizer(model, OptimizerConfig(lr=1e-3, warmup=0), STEPS, lambda name: 0)["optimizer"]
    batch, losses = mlm_nsp_batch(), []
    for _ in range(STEPS):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = task.loss(task.forward(backbone, head, batch), batch)["loss"]
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@LAYOUTS
def test_activation_checkpointing_replays_dropout_and_gives_the_same_training(config):
    """Dropout on: the recomputed forward pass must draw the same masks, or the gradients differ."""
    plain = train(config, SpeedConfig())
    checkpointed = train(config, SpeedConfig(activation_checkpointing=True))
    assert checkpointed == pytest.approx(plain, rel=1e-5)
    assert plain[-1] < plain[0]  # it trains at all


@LAYOUTS
def test_compiled_blocks_train_as_eager_ones(config):
    quiet = dataclasses.replace(config, dropout=0.0, attention_dropout=0.0)  # compiled RNG differs
    eager = train(quiet, SpeedConfig())
    compiled = train(quiet, SpeedConfig(compile=True, activation_checkpointing=True))
    assert compiled == pytest.approx(eager, rel=1e-4)


def test_bf16_autocast_trains_close_to_fp32():
    quiet = dataclasses.replace(CONFIG, dropout=0.0, attention_dropout=0.0)
    fp32 = train(quiet, SpeedConfig())
    bf16 = train(quiet, SpeedConfig(), autocast=True)
    assert bf16 == pytest.approx(fp32, rel=2e-2)
    assert bf16 != fp32  # autocast really ran in bf16


def test_a_mask_that_hides_nothing_reaches_the_backbone_as_none(monkeypatch):
    task = MaskedLMNextSentence(max_length=32)
    backbone, head = Backbone(CONFIG).eval(), task.build_head(CONFIG)
    init_weights(head, CONFIG)
    full = mlm_nsp_batch() | {"attention_mask": torch.ones(6, 32, dtype=torch.long)}
    marked = mark_masks(dict(full))
    assert marked["unpadded"] == ("attention_mask",) and mark_masks(mlm_nsp_batch())["unpadded"] == ()
    masks, encode = [], Backbone.encode
    monkeypatch.setattr(
        Backbone,
        "encode",
        lambda self, ids, mask, *rest: masks.append(mask) or encode(self, ids, mask, *rest),
    )
    for batch in (marked, full):
        task.forward(backbone, head, batch)
    assert masks[0] is None and masks[1] is full["attention_mask"]


def test_a_mask_off_the_host_is_kept_unread():
    """Reading a GPU mask would stall the step; a meta tensor (no data) stands for one: reading it
    raises. A host mask is read: all ones is dropped, padding is kept."""
    kept = _real_tokens(torch.ones(2, 5, dtype=torch.long, device="meta"))
    assert kept.dtype == torch.bool and kept.shape == (2, 5)
    assert _real_tokens(torch.ones(2, 5, dtype=torch.long)) is None
    padded = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert torch.equal(_real_tokens(padded), padded.bool())


@LAYOUTS
def test_model_flops_equal_torch_flop_counter_on_the_encoder(config):
    """6 FLOPs per weight per token plus 12 * width * context per attention layer per token is
    exactly what the matmuls of a forward + backward pass do (SDPA's math kernel, whose matmuls
    torch's counter sees; the CPU flash kernel is invisible to it). Grouped kv heads make fewer
    weights, while every query head still scores every key."""
    backbone = Backbone(dataclasses.replace(config, dropout=0.0, attention_dropout=0.0))
    batch = mlm_nsp_batch()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        backbone.encode(batch["input_ids"], batch["attention_mask"]).sum().backward()
    cost = network_cost(backbone, torch.nn.Identity(), "encoder")
    assert cost.first.attention == 2 * 12 * 64  # 2 layers, each 12 FLOPs per key per unit of width
    tokens = batch["input_ids"].numel()  # every position is computed, padding included
    assert cost.training_flops(tokens, context=32) == counter.get_total_flops()


T5_LAYOUT = dataclasses.replace(
    CONFIG,
    decoder_layers=2,
    position="relative",
    norm="pre",
    norm_type="rmsnorm",
    activation="relu",
    bias=False,
    dropout=0.0,
    attention_dropout=0.0,
)


@pytest.mark.parametrize("freeze", [None, "lora"])
def test_model_flops_of_an_encoder_decoder_count_each_stack_over_its_own_tokens(freeze):
    """The encoder's weights multiply the source tokens, the decoder's (and a head's) the target
    tokens, and the decoder's cross-attention scores every source position: as torch's counter
    sees a T5-layout step with a real head, with and without LoRA."""
    torch.manual_seed(0)
    backbone, head = Backbone(T5_LAYOUT), torch.nn.Linear(T5_LAYOUT.d_model, 50)
    if freeze:
        add_lora(backbone, LoraConfig(rank=2, targets=["query", "value", "feed_forward"]))
        head.requires_grad_(False)
    source, target = torch.randint(5, 200, (3, 20)), torch.randint(5, 200, (3, 7))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        head(backbone.decode(target, memory=backbone.encode(source))).sum().backward()
    cost = network_cost(backbone, head, "encoder-decoder")
    assert cost.decoder is not None and cost.decoder.cross_attention > 0
    assert cost.training_flops(source.numel(), 20, target.numel(), 7) == counter.get_total_flops()


def test_a_decoder_only_task_on_an_encoder_decoder_is_not_charged_for_cross_attention():
    torch.manual_seed(0)
    backbone = Backbone(T5_LAYOUT)
    ids = torch.randint(5, 200, (3, 11))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        backbone.decode(ids).sum().backward()
    cost = network_cost(backbone, torch.nn.Identity(), "decoder")
    assert cost.decoder is None and cost.first.cross_attention == 0
    assert cost.training_flops(ids.numel(), 11) == counter.get_total_flops()


def lora_on_query_and_value(backbone: Backbone) -> None:
    add_lora(backbone, LoraConfig(rank=2, targets=["query", "value"]))


def bottom_layer_and_embeddings_frozen(backbone: Backbone) -> None:
    backbone.embeddings.requires_grad_(False)
    backbone.encoder.layers[0].requires_grad_(False)


@LAYOUTS
@pytest.mark.parametrize("freeze", [lora_on_query_and_value, bottom_layer_and_embeddings_frozen])
def test_model_flops_leave_out_the_backward_passes_frozen_weights_skip(config, freeze):
    """Frozen weights compute no gradient of their own, and none of their input when nothing
    before them trains: the count follows, as torch's counter sees the passes run (LoRA: the
    frozen W of layer 0's q | k | v forward only, its adapters' A without an input gradient)."""
    backbone = Backbone(dataclasses.replace(config, dropout=0.0, attention_dropout=0.0))
    whole = network_cost(backbone, torch.nn.Identity(), "encoder").training_flops(192, context=32)
    freeze(backbone)
    batch = mlm_nsp_batch()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        backbone.encode(batch["input_ids"], batch["attention_mask"]).sum().backward()
    cost = network_cost(backbone, torch.nn.Identity(), "encoder")
    assert cost.training_flops(batch["input_ids"].numel(), context=32) == counter.get_total_flops()
    assert cost.training_flops(192, context=32) < whole


def test_model_flops_of_lsh_layers_count_the_keys_each_query_can_score():
    """An LSH layer scores 2 buckets per hash round per query: n_hashes * 2 * bucket_size keys,
    counted as attention context; what torch's counter sees besides is the hashing's rotation."""
    config = dataclasses.replace(
        CONFIG, dropout=0.0, attention_dropout=0.0, attention="lsh", lsh_n_hashes=2, lsh_bucket_size=4
    )
    backbone = Backbone(config)
    ids = torch.randint(5, config.vocab_size, (2, 32))
    with FlopCounterMode(display=False) as counter:
        backbone.encode(ids).sum().backward()
    cost = network_cost(backbone, torch.nn.Identity(), "encoder")
    assert (cost.first.attention, cost.first.lsh_attention, cost.first.lsh_context) == (0, 2 * 12 * 64, 16)
    n_buckets = 32 // 4
    hashing = 2 * ids.numel() * config.d_model * config.lsh_n_hashes * n_buckets // 2 * config.encoder_layers
    assert cost.training_flops(ids.numel(), context=32) + hashing == counter.get_total_flops()
