"""LoRA (modules/lora.py): the update each adapted slice adds, against HF peft on the same LLaMA,
what trains, and a real run: frozen weights stay bit-identical, the checkpoint evaluates from
--ckpt_path alone, and loads merged into a model without adapters (init_from, export to HF)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modules.checkpoint import read_checkpoint
from modules.config import BackboneConfig
from modules.convert_llama import LLAMA
from modules.errors import UserError
from modules.freezing import FreezeConfig
from modules.lora import TARGETS, LoraConfig, LoRALinear, add_lora, merge_lora
from modules.model import MultiTaskModel
from modules.optim import OptimizerConfig
from tasks.mlm_nsp import MaskedLMNextSentence
from tasks.seq2seq import Seq2Seq

from .convert_cli import decoder_logits, fails, fine_tune_summarizer, polyhead
from .hf_models import (
    ATOL,
    RTOL,
    assert_export_computes_the_fine_tuned_logits,
    perturb,
    polyhead_pair,
    tiny_llama_config,
    transformers,
)
from .hf_tokenizers import SENTENCES

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(
    d_model=32, n_heads=2, d_ff=64, encoder_layers=2, decoder_layers=2, position="relative", norm="pre"
)


def test_each_adapted_slice_adds_its_own_low_rank_update_and_the_rest_is_the_frozen_layer():
    """float64, written out: slices 0-3 and 8-11 of a 12-wide output get scale * B_i A_i x, 4-7 none."""
    torch.manual_seed(0)
    base = nn.Linear(6, 12).double()
    weight, bias = base.weight.detach().clone(), base.bias.detach().clone()
    layer = LoRALinear(base, [(0, 4), (8, 4)], rank=2, alpha=3.0, dropout=0.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 7, 6, dtype=torch.float64)
    a0, a1 = layer.lora_A[:2], layer.lora_A[2:]
    b0, b1 = layer.lora_B[:4], layer.lora_B[4:]
    expected = x @ weight.T + bias  # (5, 7, 12)
    expected[..., 0:4] += 1.5 * (x @ a0.T @ b0.T)
    expected[..., 8:12] += 1.5 * (x @ a1.T @ b1.T)
    y = layer(x)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y[..., 4:8], F.linear(x, weight, bias)[..., 4:8], rtol=0, atol=0)
    torch.testing.assert_close(F.linear(x, weight + layer.delta(), bias), expected, rtol=1e-12, atol=1e-12)


def test_lora_on_a_llama_computes_what_hf_peft_computes_with_the_same_adapters():
    """peft puts LoRA on every projection of HF's LlamaForCausalLM (q, k, v of unequal widths with
    grouped kv heads; o; gate, up, down); polyhead's adapters on the matching slices of its fused
    projections, given peft's A and B, give the same logits, before and after merging."""
    peft = pytest.importorskip("peft", reason="peft (a dev extra) is the reference")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(tiny_llama_config(90, 7)).eval()
    perturb(hf)
    hf, backbone, head = polyhead_pair(hf, LLAMA.backbone_config, LLAMA.to_polyhead)
    rank, alpha = 4, 8.0
    hf_names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    adapted = peft.get_peft_model(
        hf, peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=hf_names, lora_dropout=0.0)
    ).eval()
    add_lora(backbone, LoraConfig(rank=rank, alpha=alpha, targets=list(TARGETS)))
    ours_of = {  # polyhead's adapted layer -> the HF projections whose slices it stacks, in order
        "self_attn.qkv": ("self_attn", ["q_proj", "k_proj", "v_proj"]),
        "self_attn.out": ("self_attn", ["o_proj"]),
        "ff.up": ("mlp", ["gate_proj", "up_proj"]),
        "ff.down": ("mlp", ["down_proj"]),
    }
    with torch.no_grad():
        for i, layer in enumerate(backbone.decoder.layers):
            for ours_name, (block, names) in ours_of.items():
                theirs = [getattr(getattr(adapted.base_model.model.model.layers[i], block), n) for n in names]
                for projection in theirs:  # peft starts B at zero: give it values, so the update counts
                    projection.lora_B["default"].weight.normal_(std=0.1)
                ours = layer.get_submodule(ours_name)
                ours.lora_A.copy_(torch.cat([p.lora_A["default"].weight for p in theirs]))
                ours.lora_B.copy_(torch.cat([p.lora_B["default"].weight for p in theirs]))
    ids = torch.randint(0, 90, (2, 11))
    with torch.no_grad():
        theirs = adapted(input_ids=ids).logits
        torch.testing.assert_close(decoder_logits(backbone, head, ids), theirs, atol=ATOL, rtol=RTOL)
        merge_lora(backbone)
        assert not any(isinstance(m, LoRALinear) for m in backbone.modules())
        torch.testing.assert_close(decoder_logits(backbone, head, ids), theirs, atol=ATOL, rtol=RTOL)


def test_adapters_start_as_the_loaded_model_and_only_they_and_the_heads_train(documents):
    from datamodules.tokenizer import Tokenizer, TokenizerConfig

    lines = [line for doc in documents for line in doc["text"].splitlines()]
    tokenizer = Tokenizer.train(lines, TokenizerConfig(vocab_size=600), "seed corpus")
    tasks = {"mlm": MaskedLMNextSentence(), "summarize": Seq2Seq()}
    lora = LoraConfig(rank=4, targets=["query", "key", "value", "output", "feed_forward"])
    torch.manual_seed(0)
    plain = MultiTaskModel(tasks, BackboneConfig(**TINY), OptimizerConfig(), tokenizer).eval()
    adapted = MultiTaskModel(tasks, BackboneConfig(**TINY), OptimizerConfig(), tokenizer, lora=lora).eval()
    adapted.load_state_dict(plain.state_dict(), strict=False)  # the same frozen weights
    ids = torch.randint(5, 600, (3, 9))
    with torch.no_grad():  # (with gradients on, SDPA may pick another kernel for the trainable one)
        torch.testing.assert_close(adapted.backbone.encode(ids), plain.backbone.encode(ids), rtol=0, atol=0)

    trainable = {name for name, p in adapted.named_parameters() if p.requires_grad}
    backbone_trainable = {name for name in trainable if name.startswith("backbone.")}
    # the adapters, and the pooler: a sentence head's first layer, untrained unless NSP trained it
    assert backbone_trainable and all(
        name.rsplit(".", 1)[-1] in ("lora_A", "lora_B") or name.startswith("backbone.pooler.")
        for name in backbone_trainable
    )
    assert {"backbone.pooler.weight", "backbone.pooler.bias"} <= backbone_trainable
    # every projection got adapters: q|k|v, output, both FF layers; in the decoder cross q, k|v and output too
    adapted_layers = {name.rsplit(".", 1)[0] for name in backbone_trainable if "lora_" in name}
    assert len(adapted_layers) == 2 * 4 + 2 * 7
    assert {name for name in trainable if not name.startswith("backbone.")} == {
        name for name, _ in plain.named_parameters() if name.startswith("heads.")
    }


def test_evaluation_commands_fold_the_adapters_into_their_weights_and_fit_does_not(documents):
    """validate / test / predict train nothing: their start folds the adapters into the weights
    (one matmul per projection when decoding), computing what the adapters did; fit's own
    validation leaves them, since training goes on."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.trainer.states import TrainerFn

    from datamodules.tokenizer import Tokenizer, TokenizerConfig

    lines = [line for doc in documents for line in doc["text"].splitlines()]
    tokenizer = Tokenizer.train(lines, TokenizerConfig(vocab_size=600), "seed corpus")
    lora = LoraConfig(rank=4, targets=list(TARGETS))
    torch.manual_seed(0)
    model = MultiTaskModel({"summarize": Seq2Seq()}, BackboneConfig(**TINY), tokenizer=tokenizer, lora=lora)
    perturb(model)  # B starts at zero: give the adapters something to add
    model.eval()
    ids = torch.randint(5, 600, (3, 9))
    with torch.no_grad():
        adapted = model.backbone.decode(ids[:, :4], memory=model.backbone.encode(ids))
    model.trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    model.trainer.state.fn = TrainerFn.FITTING
    model.on_validation_start()
    assert any(isinstance(m, LoRALinear) for m in model.modules())
    model.trainer.state.fn = TrainerFn.PREDICTING
    model.on_predict_start()
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    with torch.no_grad():
        merged = model.backbone.decode(ids[:, :4], memory=model.backbone.encode(ids))
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"rank": -1}, "model.lora.rank must be >= 0"),
        ({"rank": 4, "targets": ["query", "ffn"]}, "model.lora.targets .* name one or more of query"),
        ({"rank": 4, "alpha": 0}, "model.lora.alpha must be positive"),
        ({"rank": 4, "dropout": 1.0}, r"model.lora.dropout must be in \[0, 1\)"),
    ],
)
def test_bad_lora_settings_are_named(settings, message):
    with pytest.raises(UserError, match=message):
        LoraConfig(**settings)


def test_lora_with_a_freezing_policy_is_refused(documents):
    from datamodules.tokenizer import Tokenizer, TokenizerConfig

    lines = [line for doc in documents for line in doc["text"].splitlines()]
    tokenizer = Tokenizer.train(lines, TokenizerConfig(vocab_size=600), "seed corpus")
    with pytest.raises(
        UserError, match="model.freeze.policy 'feature_extraction' applies to full fine-tuning"
    ):
        MultiTaskModel(
            {"mlm": MaskedLMNextSentence()},
            BackboneConfig(**TINY),
            OptimizerConfig(),
            tokenizer,
            freeze=FreezeConfig(policy="feature_extraction"),
            lora=LoraConfig(rank=4),
        )


def test_a_lora_fine_tune_keeps_the_imported_weights_and_its_checkpoint_serves_every_route(
    llama_dir, tmp_path, capsys
):
    """Import a LLaMA, fine-tune it with LoRA through the CLI: the checkpoint keeps the adapters
    only, naming the imported file for the rest (its LM head included), which reads back unchanged bit for bit; the
    adapters moved; `validate --ckpt_path` rebuilds the adapters from the checkpoint and refuses
    another rank; a run from it by init_from (no adapters) starts from the merged weights, computing
    the same logits; its HF export computes them too; and a base that changed or went is named."""
    polyhead("convert", str(llama_dir), str(tmp_path / "llama.ckpt"), "--task", "summarize")
    rows = [{"source": s, "target": s.split()[0]} for s in SENTENCES]
    last = fine_tune_summarizer(
        tmp_path / "llama.ckpt",
        rows,
        tmp_path,
        "--model.lora.rank",
        "4",
        "--model.lora.targets",
        "[query,value,feed_forward]",
    )
    imported = torch.load(tmp_path / "llama.ckpt", weights_only=True)["state_dict"]
    frozen = list(imported)  # the imported LM head too: LoRA leaves loaded weights, as peft does
    assert any(key.startswith("heads.summarize.") for key in frozen)
    kept = torch.load(last, weights_only=True)
    assert kept["polyhead"]["lora_base"]["path"] == str((tmp_path / "llama.ckpt").resolve())
    assert frozen and not any(key in kept["state_dict"] for key in frozen)
    tuned = read_checkpoint(last)["state_dict"]
    assert all(torch.equal(imported[key], tuned[key]) for key in frozen)
    adapters = [key for key in tuned if key.endswith(("lora_A", "lora_B"))]
    assert adapters and all(key.startswith("backbone.decoder.layers.") for key in adapters)
    assert any(tuned[key].abs().sum() > 0 for key in adapters if key.endswith("lora_B"))  # B left zero

    fit_config = str(tmp_path / "fit.yaml")
    polyhead("validate", "--config", fit_config, "--ckpt_path", str(last))
    message = fails(
        capsys, "validate", "--config", fit_config, "--ckpt_path", str(last), "--model.lora.rank", "8"
    )
    assert "model.lora.rank is 8 (checkpoint: 4)" in message
    # resuming (the config names no init_from: the base comes from the checkpoint) saves adapters only too
    polyhead("fit", "--config", fit_config, "--ckpt_path", str(last), "--trainer.max_steps", "5")
    resumed = torch.load(last, weights_only=True)
    assert resumed["global_step"] == 5 and all(key in resumed["state_dict"] for key in adapters)
    assert not any(key in resumed["state_dict"] for key in frozen)

    ours = MultiTaskModel.from_checkpoint(last).eval()
    ids = torch.tensor(ours.tokenizer.encode([f"summarize: {SENTENCES[1]}"]))
    restarted = MultiTaskModel(ours.tasks, None, tokenizer=ours.tokenizer, init_from=str(last)).eval()
    assert not any(isinstance(m, LoRALinear) for m in restarted.modules())
    with torch.no_grad():
        torch.testing.assert_close(
            decoder_logits(restarted.backbone, restarted.heads["summarize"], ids),
            decoder_logits(ours.backbone, ours.heads["summarize"], ids),
        )

    assert_export_computes_the_fine_tuned_logits(last, transformers.LlamaForCausalLM, tmp_path, capsys)

    changed = torch.load(tmp_path / "llama.ckpt", weights_only=True)
    changed["state_dict"][frozen[0]] += 1.0
    torch.save(changed, tmp_path / "llama.ckpt")
    message = fails(capsys, "validate", "--config", fit_config, "--ckpt_path", str(last))
    assert (
        f"trained on the frozen weights of {tmp_path / 'llama.ckpt'}, which now holds other weights"
        in message
    )
    (tmp_path / "llama.ckpt").unlink()
    message = fails(capsys, "validate", "--config", fit_config, "--ckpt_path", str(last))
    assert f"its frozen weights are those of {tmp_path / 'llama.ckpt'}, which cannot be read" in message
