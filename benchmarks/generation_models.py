"""The models and inputs of benchmarks/generate.py: HF's T5, GPT-2 and LLaMA built at the
benchmark's size (HF's random initialisation moved by noise, see generate.py's docstring), their
polyhead copies by the project's converters, the random sources, and both sides' logits on the same
tokens."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from records import FIRST_TEXT_ID, SEED, T5_PAD, T5_START
from torch import Tensor
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    T5Config,
    T5ForConditionalGeneration,
)

from modules.backbone import Backbone
from modules.convert_gpt2 import backbone_config_from_gpt2, gpt2_to_polyhead
from modules.convert_llama import LLAMA
from modules.convert_t5 import backbone_config_from_t5, t5_to_polyhead
from modules.heads import LanguageModelHead

PERTURBATION = 0.5  # std of the noise added to every HF parameter, as tests/test_generation_hf.py does
CONVERTERS = {
    "t5": (backbone_config_from_t5, t5_to_polyhead),
    "gpt2": (backbone_config_from_gpt2, gpt2_to_polyhead),
    "llama": (LLAMA.backbone_config, LLAMA.to_polyhead),
}
"""model_type -> (its config mapping, its state-dict mapping) in the project's converters."""


def hf_t5(args: argparse.Namespace) -> T5ForConditionalGeneration:
    """HF's T5 v1.0 at the benchmark's size, randomly initialised then perturbed (see the docstring),
    with no eos: HF then stops on the length alone."""
    config = T5Config(
        vocab_size=args.vocab,
        d_model=args.d_model,
        d_kv=args.d_model // args.heads,
        d_ff=4 * args.d_model,
        num_layers=args.layers,
        num_decoder_layers=args.layers,
        num_heads=args.heads,
        feed_forward_proj="relu",
        tie_word_embeddings=True,
        decoder_start_token_id=T5_START,
        pad_token_id=T5_PAD,
        eos_token_id=None,
    )
    return perturbed(lambda: T5ForConditionalGeneration(config))


def hf_gpt2(args: argparse.Namespace) -> GPT2LMHeadModel:
    """HF's GPT-2 at the benchmark's size, positions for prompt + new tokens, randomly initialised
    then perturbed (see the docstring), with no eos."""
    config = GPT2Config(
        vocab_size=args.vocab,
        n_embd=args.d_model,
        n_layer=args.layers,
        n_head=args.heads,
        n_inner=4 * args.d_model,
        n_positions=args.seq + args.new_tokens,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=T5_PAD,
    )
    return perturbed(lambda: GPT2LMHeadModel(config))


def hf_llama(args: argparse.Namespace) -> LlamaForCausalLM:
    """HF's LLaMA at the benchmark's size (see the docstring), randomly initialised then perturbed,
    with no eos."""
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.d_model,
        intermediate_size=8 * args.d_model // 3 // 8 * 8,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=max(1, args.heads // 2),
        max_position_embeddings=args.seq + args.new_tokens,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=T5_PAD,
    )
    return perturbed(lambda: LlamaForCausalLM(config))


def perturbed(build: Callable[[], PreTrainedModel]) -> PreTrainedModel:
    """The model `build` makes at HF's random initialisation (seeded), every parameter then moved by
    N(0, PERTURBATION), in eval mode."""
    torch.manual_seed(SEED)
    model = build()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(PERTURBATION * torch.randn_like(param))
    return model.eval()


def polyhead_copy(hf: PreTrainedModel) -> tuple[Backbone, LanguageModelHead]:
    """The same network in polyhead, by the project's converter: backbone and (tied) LM head.
    Loaded strictly, so every converted weight has its place and none is left at its initialisation."""
    config_from, to_polyhead = CONVERTERS[hf.config.model_type]
    config = config_from(hf.config)
    state, lm_head = to_polyhead(hf.state_dict(), config)
    if lm_head is not None:
        raise RuntimeError(
            "the benchmark's models tie their output to the embeddings; the converter gave a head"
        )
    backbone = Backbone(config).eval()
    backbone.load_state_dict(state, strict=True)
    return backbone, LanguageModelHead(config).eval()


def source_batch(
    batch: int, seq: int, vocab: int, generator: torch.Generator, left: bool = False
) -> tuple[Tensor, Tensor]:
    """Random sources, right-padded (`left`: left-padded prompts): row 0 fills all `seq` columns, the
    others keep a random length between seq / 2 and seq, beside T5's pad id. -> ids (B, S), attention
    mask (B, S) 1 at real tokens."""
    lengths = torch.randint(seq // 2, seq + 1, (batch,), generator=generator)  # (B,)
    lengths[0] = seq
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()  # (B, S)
    if left:
        mask = mask.flip(1)
    ids = torch.randint(FIRST_TEXT_ID, vocab, (batch, seq), generator=generator)  # (B, S)
    return ids.masked_fill(mask == 0, T5_PAD), mask


def teacher_forced_logits(
    backbone: Backbone,
    head: LanguageModelHead,
    hf: PreTrainedModel,
    source: Tensor,
    mask: Tensor,
    tokens: Tensor,
) -> dict[str, Tensor]:
    """Each side's next-token logits (B, L, V) at every generated position, both fed the same `tokens`
    (B, L) behind the same sources (T5: its start token then the tokens; decoder-only: the prompt,
    positions counted from each row's first real token, then the tokens)."""
    with torch.inference_mode():
        if backbone.encoder is not None:
            start = torch.full_like(tokens[:, :1], T5_START)
            decoder_in = torch.cat([start, tokens[:, :-1]], dim=1)  # (B, L)
            memory = backbone.encode(source, mask)  # (B, S, D)
            ours = head(backbone.decode(decoder_in, None, memory, mask), backbone.token_embedding)
            theirs = hf(input_ids=source, attention_mask=mask, decoder_input_ids=decoder_in).logits
            return {"polyhead": ours, "hf": theirs}
        sequence = torch.cat([source, tokens[:, :-1]], dim=1)  # (B, S + L - 1)
        real = torch.cat([mask, torch.ones_like(tokens[:, :-1])], dim=1)
        positions = (real.cumsum(dim=1) - 1).clamp_min(0)  # (B, S + L - 1)
        first = source.size(1) - 1  # the prompt's last column predicts the first new token
        hidden = backbone.decode(sequence, real, positions=positions)[:, first:]  # (B, L, D)
        theirs = hf(input_ids=sequence, attention_mask=real, position_ids=positions).logits[:, first:]
        return {"polyhead": head(hidden, backbone.token_embedding), "hf": theirs}


HF_MODELS = {"t5": hf_t5, "gpt2": hf_gpt2, "llama": hf_llama}
"""--model -> the HF model it builds from the arguments."""
