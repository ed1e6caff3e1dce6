"""What benchmarks/train_throughput.py compares: its cases (polyhead's architecture and task, HF's
counterpart written from the same BackboneConfig, the batch both train on) and the two models of a
case, refused unless they have the same parameter count and give the same loss. The protocol and the
cases are described in train_throughput.py's docstring.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from records import FIRST_TEXT_ID, SEED, T5_EOS, T5_PAD, T5_START
from torch import Tensor, nn
from transformers import (
    BertConfig,
    BertForPreTraining,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    T5Config,
    T5ForConditionalGeneration,
)

from datamodules.padding import mark_masks
from modules.backbone import Backbone, init_weights
from modules.config import BackboneConfig
from modules.convert_bert import bert_config_to_hf, polyhead_to_bert
from modules.convert_gpt2 import gpt2_config_to_hf, polyhead_to_gpt2
from modules.convert_llama import LLAMA
from modules.convert_t5 import polyhead_to_t5, t5_config_to_hf
from modules.lora import LoraConfig, add_lora
from tasks.base import Task
from tasks.mlm_nsp import IGNORE, MaskedLMNextSentence
from tasks.prefix_lm import PrefixLM
from tasks.seq2seq import Seq2Seq

MLM_RATE = 0.15


@dataclass
class Case:
    """One comparison: polyhead's architecture and task, HF's counterpart, the batch both train on."""

    config: BackboneConfig
    task: Task
    batch: dict[str, Tensor]  # polyhead's batch, as the task's collate gives it
    hf_inputs: dict[str, Any]  # the same tensors as HF's forward arguments
    hf_model: Callable[[BackboneConfig], PreTrainedModel]  # HF's model of a config, HF-initialised
    hf_weights: Callable[[nn.ModuleDict, BackboneConfig], dict[str, Tensor]]  # polyhead's, in HF's names


def mlm_nsp_batch(batch: int, seq: int, vocab: int, generator: torch.Generator) -> dict[str, Tensor]:
    """Random `[CLS] A [SEP] B [SEP]`-shaped inputs: no padding, segment B the second half, about
    MLM_RATE of the positions labelled with their token, random NSP labels."""
    input_ids = torch.randint(FIRST_TEXT_ID, vocab, (batch, seq), generator=generator)  # (B, T)
    selected = torch.rand(batch, seq, generator=generator) < MLM_RATE  # (B, T)
    return {
        "input_ids": input_ids,
        "token_type_ids": (torch.arange(seq) >= seq // 2).long().repeat(batch, 1),  # (B, T)
        "attention_mask": torch.ones(batch, seq, dtype=torch.long),  # (B, T)
        "mlm_labels": torch.where(selected, input_ids, IGNORE),  # (B, T)
        "mlm_positions": selected.flatten().nonzero().squeeze(1),  # (N,) as collate gives them
        "nsp_labels": torch.randint(2, (batch,), generator=generator),  # (B,)
    }


def seq2seq_batch(
    batch: int, source: int, target: int, vocab: int, generator: torch.Generator
) -> dict[str, Tensor]:
    """Random sources and targets, no padding; the decoder input is the target shifted right behind
    the start token, as Seq2Seq.collate makes it."""
    labels = torch.randint(FIRST_TEXT_ID, vocab, (batch, target), generator=generator)  # (B, T)
    start = torch.full((batch, 1), T5_START)  # (B, 1)
    return {
        "input_ids": torch.randint(FIRST_TEXT_ID, vocab, (batch, source), generator=generator),  # (B, S)
        "attention_mask": torch.ones(batch, source, dtype=torch.long),  # (B, S)
        "decoder_input_ids": torch.cat([start, labels[:, :-1]], dim=1),  # (B, T)
        "decoder_attention_mask": torch.ones(batch, target, dtype=torch.long),  # (B, T)
        "labels": labels,  # (B, T)
        "label_positions": torch.arange(labels.numel()),  # (N,) every target token is a label
    }


def lm_batch(batch: int, seq: int, vocab: int, generator: torch.Generator) -> dict[str, Tensor]:
    """Random sequences, no padding; each position's label is the next token (the last has none), as
    PrefixLM.collate makes them with `loss_on: all`."""
    input_ids = torch.randint(FIRST_TEXT_ID, vocab, (batch, seq), generator=generator)  # (B, T)
    labels = torch.cat([input_ids[:, 1:], torch.full((batch, 1), IGNORE)], dim=1)  # (B, T)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones(batch, seq, dtype=torch.long),  # (B, T)
        "labels": labels,
        "label_positions": (labels != IGNORE).flatten().nonzero().squeeze(1),  # (N,) as collate gives them
    }


def sized(args: argparse.Namespace, **layout) -> BackboneConfig:
    """The benchmark's size (width, depth, heads, dropout) in the layout of one case."""
    size = {
        "vocab_size": args.vocab,
        "d_model": args.d_model,
        "n_heads": args.heads,
        "d_ff": 4 * args.d_model,
        "encoder_layers": args.layers,
        "dropout": args.dropout,
        "attention_dropout": args.dropout,
    }
    return BackboneConfig(**(size | layout))


def bert_case(args: argparse.Namespace) -> Case:
    """MLM + NSP on BackboneConfig's defaults, which are BERT's layout, against BertForPreTraining."""
    config = sized(args, max_len=args.seq, ff_dropout=0.0)  # BERT: no dropout between the FF projections
    batch = mlm_nsp_batch(args.batch, args.seq, args.vocab, torch.Generator().manual_seed(SEED))
    return Case(
        config=config,
        task=MaskedLMNextSentence(max_length=args.seq),
        batch=batch,
        hf_inputs={
            "input_ids": batch["input_ids"],
            "token_type_ids": batch["token_type_ids"],
            "attention_mask": batch["attention_mask"],
            "labels": batch["mlm_labels"],
            "next_sentence_label": batch["nsp_labels"],
        },
        hf_model=lambda c: BertForPreTraining(BertConfig.from_dict(bert_config_to_hf(c, 0, with_heads=True))),
        hf_weights=lambda model, c: polyhead_to_bert(
            model["backbone"].state_dict(), model["head"].state_dict(), c
        ),
    )


def t5_case(args: argparse.Namespace) -> Case:
    """Seq2Seq on T5 v1.0's layout (as backbone_config_from_t5 reads HF's T5Config defaults) against
    T5ForConditionalGeneration; the target is a quarter of the source."""
    config = sized(  # T5 has one dropout_rate, for attention and hidden states alike
        args,
        decoder_layers=args.layers,
        position="relative",
        type_vocab_size=0,
        norm="pre",
        norm_type="rmsnorm",
        norm_eps=1e-6,
        embedding_norm=False,
        activation="relu",
        bias=False,
        scale_attention=False,
        pooler=False,
        scale_tied_output=True,
        init="t5",
    )
    target = args.seq // 4
    batch = seq2seq_batch(args.batch, args.seq, target, args.vocab, torch.Generator().manual_seed(SEED))
    return Case(
        config=config,
        task=Seq2Seq(max_source_length=args.seq, max_target_length=target),
        batch=batch,
        # Seq2Seq's batch keys are HF's argument names, but for the labelled positions it gathers at
        hf_inputs={k: v for k, v in batch.items() if k != "label_positions"} | {"use_cache": False},
        hf_model=lambda c: T5ForConditionalGeneration(
            T5Config.from_dict(t5_config_to_hf(c, T5_PAD, T5_EOS, T5_START))
        ),
        hf_weights=lambda model, c: polyhead_to_t5(model["backbone"].state_dict(), None, c),
    )


def gpt2_case(args: argparse.Namespace) -> Case:
    """PrefixLM with the loss on every next token, in GPT-2's layout (as backbone_config_from_gpt2
    reads HF's GPT2Config defaults), against GPT2LMHeadModel."""
    config = sized(
        args,
        encoder_layers=0,
        decoder_layers=args.layers,
        max_len=args.seq,
        type_vocab_size=0,
        norm="pre",
        norm_eps=1e-5,
        embedding_norm=False,
        activation="gelu_tanh",
        ff_dropout=0.0,
        pooler=False,
    )
    batch = lm_batch(args.batch, args.seq, args.vocab, torch.Generator().manual_seed(SEED))
    target = args.seq // 4  # PrefixLM's lengths only bound its inputs; this batch is built whole
    return Case(
        config=config,
        task=PrefixLM(max_source_length=args.seq - target, max_target_length=target, loss_on="all"),
        batch=batch,
        hf_inputs={
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "labels": batch["input_ids"],
            "use_cache": False,
        },
        hf_model=lambda c: GPT2LMHeadModel(GPT2Config.from_dict(gpt2_config_to_hf(c, None, None))),
        hf_weights=lambda model, c: polyhead_to_gpt2(model["backbone"].state_dict(), None, c),
    )


def llama_case(args: argparse.Namespace) -> Case:
    """PrefixLM with the loss on every next token, in LLaMA's layout with grouped-query attention,
    against LlamaForCausalLM. LLaMA has dropout on attention only: the rest is off on both sides."""
    config = sized(
        args,
        encoder_layers=0,
        decoder_layers=args.layers,
        n_kv_heads=max(1, args.heads // 2),
        d_ff=8 * args.d_model // 3 // 8 * 8,
        max_len=args.seq,
        position="rotary",
        type_vocab_size=0,
        norm="pre",
        norm_type="rmsnorm",
        norm_eps=1e-6,
        embedding_norm=False,
        activation="silu",
        gated_ff=True,
        bias=False,
        dropout=0.0,
        ff_dropout=0.0,
        pooler=False,
    )
    gpt2 = gpt2_case(args)  # the same batch and task
    return dataclasses.replace(
        gpt2,
        config=config,
        hf_model=lambda c: LlamaForCausalLM(LlamaConfig.from_dict(LLAMA.config_to_hf(c, None, None, None))),
        hf_weights=lambda model, c: LLAMA.from_polyhead(model["backbone"].state_dict(), None, c),
    )


CASES = {"bert": bert_case, "t5": t5_case, "gpt2": gpt2_case, "llama": llama_case}


def on_device(case: Case, device: torch.device) -> Case:
    """The case with its batch (both sides' views of it) on `device`; polyhead's batch first says
    which masks hide nothing, as the data loader's collate does on the host (`mark_masks`)."""

    def moved(tensors: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in tensors.items()}

    batch = mark_masks(dict(case.batch))
    return dataclasses.replace(case, batch=moved(batch), hf_inputs=moved(case.hf_inputs))


def polyhead_model(config: BackboneConfig, task: Task) -> nn.ModuleDict:
    """The backbone and the task's head, built and initialised as MultiTaskModel builds them."""
    backbone = Backbone(config)
    head = task.build_head(config)
    init_weights(head, config)
    return nn.ModuleDict({"backbone": backbone, "head": head})


def hf_copy(case: Case, config: BackboneConfig, polyhead: nn.ModuleDict) -> PreTrainedModel:
    """HF's model of `config` holding polyhead's weights. Only tied aliases (HF's decoder / lm_head /
    embed_tokens copies of the embeddings) and buffers (BERT's position and segment ids) may be left
    unloaded; anything else means the two models are not the same network."""
    model = case.hf_model(config)
    missing, unexpected = model.load_state_dict(case.hf_weights(polyhead, config), strict=False)
    aliases = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {
        n for n, _ in model.named_parameters()
    }
    unloaded = set(missing) - aliases - {n for n, _ in model.named_buffers()}
    if unexpected or unloaded:
        raise RuntimeError(f"HF model differs: unexpected {unexpected}, not loaded {sorted(unloaded)}")
    return model


def polyhead_loss(case: Case, model: nn.ModuleDict) -> Callable[[], Tensor]:
    """The task's own forward and loss on the batch, as MultiTaskModel.training_step runs them."""
    task = case.task
    return lambda: task.loss(task.forward(model["backbone"], model["head"], case.batch), case.batch)["loss"]


def hf_loss(case: Case, model: PreTrainedModel) -> Callable[[], Tensor]:
    """HF's forward with labels on the batch: the loss HF computes itself."""
    return lambda: model(**case.hf_inputs).loss


def loss_of(case: Case, side: str, model: nn.Module) -> Callable[[], Tensor]:
    """The loss closure of `side` ("polyhead" or "hf") for its model."""
    return polyhead_loss(case, model) if side == "polyhead" else hf_loss(case, model)


HF_LORA_MODULES = {
    "query": ["q_proj"],
    "key": ["k_proj"],
    "value": ["v_proj"],
    "output": ["o_proj"],
    "feed_forward": ["gate_proj", "up_proj", "down_proj"],
}
"""polyhead's LoRA targets (modules/lora.py) -> the LlamaForCausalLM projections peft adapts for them."""


def with_adapters(side: str, model: nn.Module, lora: LoraConfig) -> nn.Module:
    """`model` with LoRA adapters on `lora`'s targets and every other weight frozen (the tied LM
    head included), as each side's users fine-tune: polyhead's `model.lora`, HF's
    `peft.get_peft_model` (LLaMA's projection names, HF_LORA_MODULES)."""
    if side == "polyhead":
        add_lora(model["backbone"], lora)
        model["head"].requires_grad_(False)
        return model
    import peft  # the peer of this comparison only

    modules = [name for target in lora.targets for name in HF_LORA_MODULES[target]]
    settings = peft.LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=modules
    )
    return peft.get_peft_model(model, settings)


def trainable_count(model: nn.Module) -> int:
    """Parameters the optimizer updates."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def parameter_count(model: nn.Module) -> int:
    """Distinct parameters: a tied matrix counts once."""
    return sum(p.numel() for p in model.parameters())


def check_same_loss(case: Case, polyhead: nn.ModuleDict) -> float:
    """Refuse to time two models that do not compute the same thing: with dropout off, in train mode
    as they are timed, in fp32, polyhead's weights must give the same loss in polyhead and in HF
    (on a GPU to 1e-3: its kernels sum in other orders). -> the loss."""
    quiet = dataclasses.replace(case.config, dropout=0.0, attention_dropout=0.0, ff_dropout=0.0)
    ours = polyhead_model(quiet, case.task)
    ours.load_state_dict(polyhead.state_dict())
    device = next(polyhead.parameters()).device
    theirs = hf_copy(case, quiet, polyhead).to(device)
    with torch.no_grad():
        loss, reference = polyhead_loss(case, ours.to(device).train())(), hf_loss(case, theirs.train())()
    tolerance = 1e-4 if device.type == "cpu" else 1e-3
    if not torch.allclose(loss, reference, rtol=1e-5, atol=tolerance):
        raise RuntimeError(f"polyhead's loss {loss.item():.6f} != HF's {reference.item():.6f}")
    return loss.item()
