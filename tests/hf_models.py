"""Small HF models shaped like BERT's, T5's, GPT-2's, LLaMA's and Qwen's, the reference the conversion tests
compare against: random weights (no downloads), every parameter perturbed so that a swapped or
dropped tensor (biases and norms start at 0 and 1) cannot go unnoticed, saved as `save_pretrained`
lays them out; and the comparisons of a decoder-only polyhead model with its HF original.

Importing this module skips the importing test module where transformers (a dev extra) is missing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from modules.backbone import Backbone
from modules.generation import GenerationConfig, generate
from modules.heads import LanguageModelHead
from modules.model import MultiTaskModel

from .convert_cli import decoder_logits, polyhead
from .hf_tokenizers import (
    GPT2_EOS,
    LLAMA_BOS,
    LLAMA_EOS,
    QWEN_EOS,
    QWEN_PAD,
    SENTENCES,
    bert_wordpiece,
    gpt2_byte_bpe,
    llama_byte_bpe,
    qwen_byte_bpe,
    t5_sentencepiece,
)

transformers = pytest.importorskip("transformers", reason="transformers (a dev extra) is the reference")

ATOL = RTOL = 1e-5  # ours and HF's outputs agree to this, absolute (and relative), in fp32
T5_EXTRA_IDS = 5


@torch.no_grad()
def perturb(model: nn.Module, scale: float = 0.1) -> None:
    """Add noise to every parameter (tied ones once), so zero biases and unit norms become distinct."""
    for param in model.parameters():
        param.add_(scale * torch.randn_like(param))


def tiny_t5_config(vocab_size: int, feed_forward_proj: str, tie: bool):
    """A T5 small enough for CPU whose shapes still tell its dimensions apart: n_heads * d_kv = 64
    != d_model (head_dim is independent), more decoder layers than encoder layers."""
    return transformers.T5Config(
        vocab_size=vocab_size,
        d_model=32,
        d_kv=16,
        d_ff=48,
        num_layers=2,
        num_decoder_layers=3,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
        feed_forward_proj=feed_forward_proj,
        tie_word_embeddings=tie,
        decoder_start_token_id=0,  # as hub T5 configs say; transformers 5 leaves it out
    )


def bert_directory(root: Path) -> Path:
    """A BertForPreTraining directory as save_pretrained writes it, with its tokenizer.json."""
    trained = bert_wordpiece(SENTENCES * 4)
    hf_tokenizer = transformers.BertTokenizerFast(tokenizer_object=trained)
    config = transformers.BertConfig(
        vocab_size=trained.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=trained.token_to_id("[PAD]"),
    )
    torch.manual_seed(0)
    model = transformers.BertForPreTraining(config).eval()
    perturb(model)
    model.save_pretrained(root)
    hf_tokenizer.save_pretrained(root)
    return root


def t5_directory(root: Path, feed_forward_proj: str, tie: bool, own_lm_head: bool) -> Path:
    """A T5ForConditionalGeneration directory with T5's spiece.model (and the tokenizer.json that
    transformers 5 writes beside it, as hub T5s have both). transformers 5 ties even an unscaled LM
    head to `shared` unless it is given weights of its own (`own_lm_head`, as flan-t5 has)."""
    proto = t5_sentencepiece(SENTENCES * 5)
    (root / "spiece.model").write_bytes(proto)
    (root / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "T5Tokenizer", "extra_ids": T5_EXTRA_IDS})
    )
    hf_tokenizer = transformers.T5Tokenizer.from_pretrained(root)
    config = tiny_t5_config(len(hf_tokenizer), feed_forward_proj, tie)
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(config).eval()
    if own_lm_head:
        model.lm_head.weight = nn.Parameter(
            torch.randn(config.vocab_size, config.d_model) * config.d_model**-0.5
        )
    perturb(model)
    model.save_pretrained(root)
    hf_tokenizer.save_pretrained(root)
    (root / "spiece.model").write_bytes(proto)  # save_pretrained of transformers 5 leaves it out
    return root


def tiny_gpt2_config(vocab_size: int, eos_id: int, tie: bool = True):
    """A GPT-2 small enough for CPU whose shapes tell its dimensions apart: d_ff (n_inner) is not
    4 x n_embd, and the position table is longer than any test sequence."""
    return transformers.GPT2Config(
        vocab_size=vocab_size,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_inner=48,
        n_positions=64,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        tie_word_embeddings=tie,
    )


def gpt2_directory(root: Path) -> Path:
    """A GPT2LMHeadModel directory as save_pretrained writes it, with its tokenizer.json."""
    trained = gpt2_byte_bpe(SENTENCES * 4)
    hf_tokenizer = transformers.GPT2TokenizerFast(
        tokenizer_object=trained, bos_token=GPT2_EOS, eos_token=GPT2_EOS, unk_token=GPT2_EOS
    )
    config = tiny_gpt2_config(trained.get_vocab_size(), trained.token_to_id(GPT2_EOS))
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    perturb(model)
    model.save_pretrained(root)
    hf_tokenizer.save_pretrained(root)
    return root


def tiny_llama_config(vocab_size: int, eos_id: int, tie: bool = False, config_class=None, **overrides):
    """A LLaMA (or a model of its layout, by `config_class`: Qwen2Config, Qwen3Config) small enough
    for CPU whose shapes tell its dimensions apart: 2 key/value heads for 4 query heads, head_dim 6
    (n_heads * head_dim = 24 != hidden_size 32), intermediate 48, a rotary base of 500 (not the
    default)."""
    values = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=6,
        max_position_embeddings=64,
        rope_parameters={"rope_theta": 500.0, "rope_type": "default"},
        eos_token_id=eos_id,
        tie_word_embeddings=tie,
    )
    return (config_class or transformers.LlamaConfig)(**(values | overrides))


def llama_directory(root: Path) -> Path:
    """A LlamaForCausalLM directory as save_pretrained writes it, with a LLaMA-3-style byte-level
    BPE tokenizer.json (<|begin_of_text|> put in front of every text, <|end_of_text|>)."""
    trained = llama_byte_bpe(SENTENCES * 4)
    hf_tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=trained, bos_token=LLAMA_BOS, eos_token=LLAMA_EOS
    )
    config = tiny_llama_config(
        trained.get_vocab_size(), trained.token_to_id(LLAMA_EOS), bos_token_id=trained.token_to_id(LLAMA_BOS)
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    perturb(model)
    model.save_pretrained(root)
    hf_tokenizer.save_pretrained(root)
    return root


QWEN_CLASSES = {"qwen2": "Qwen2", "qwen3": "Qwen3"}  # model_type -> transformers' class prefix
QWEN_SPARE_ROWS = 8  # Qwen's embedding tables have rows no token uses (151936 for 151665 ids)


def qwen_class(model_type: str, suffix: str = "ForCausalLM"):
    """transformers' Qwen2 / Qwen3 class with `suffix` ("ForCausalLM", "Config", "Model")."""
    return getattr(transformers, QWEN_CLASSES[model_type] + suffix)


def qwen_directory(root: Path, model_type: str) -> Path:
    """A Qwen2ForCausalLM (tied, as Qwen2.5's small models) or Qwen3ForCausalLM (untied) directory as
    save_pretrained writes it, with a Qwen-style tokenizer.json (no bos; Qwen2.5-Instruct's eos
    <|im_end|> and pad <|endoftext|>) and a config.json that, as the hub's do, names <|endoftext|> as
    bos_token_id and has spare embedding rows."""
    trained = qwen_byte_bpe(SENTENCES * 4)
    hf_tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=trained, eos_token=QWEN_EOS, pad_token=QWEN_PAD
    )
    config = tiny_llama_config(
        trained.get_vocab_size() + QWEN_SPARE_ROWS,
        trained.token_to_id(QWEN_EOS),
        tie=model_type == "qwen2",
        config_class=qwen_class(model_type, "Config"),
        bos_token_id=trained.token_to_id(QWEN_PAD),
    )
    torch.manual_seed(0)
    model = qwen_class(model_type)(config).eval()
    perturb(model)
    model.save_pretrained(root)
    hf_tokenizer.save_pretrained(root)
    return root


def loaded_cleanly(model_class, directory: Path):
    """`model_class.from_pretrained(directory)` in eval mode, with no missing, unexpected or misshapen key."""
    model, info = model_class.from_pretrained(directory, output_loading_info=True)
    assert not any(info[kind] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


# ------------------------------------------------------------------- a decoder-only model and its HF original


def polyhead_pair(hf, backbone_config, to_polyhead) -> tuple:
    """(HF causal LM, its polyhead Backbone, the polyhead LM head) holding the same weights, converted
    by the family's `backbone_config` (HF config -> BackboneConfig) and `to_polyhead`."""
    config = backbone_config(hf.config)
    state, lm_head = to_polyhead(hf.state_dict(), config)
    backbone = Backbone(config).eval()
    backbone.load_state_dict(state, strict=True)
    head = LanguageModelHead(config).eval()
    if lm_head is not None:
        head.load_state_dict({"decoder.weight": lm_head}, strict=True)
    return hf, backbone, head


def assert_logits_match_over_right_padding(hf, backbone, head, vocab_size: int) -> None:
    """Three rows of 21, 13 and 5 real tokens: every real position's logits agree."""
    ids = torch.randint(0, vocab_size, (3, 21))
    mask = (torch.arange(21)[None, :] < torch.tensor([21, 13, 5])[:, None]).long()  # (B, T)
    with torch.no_grad():
        ours, theirs = (
            decoder_logits(backbone, head, ids, mask),
            hf(input_ids=ids, attention_mask=mask).logits,
        )
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], atol=ATOL, rtol=RTOL)


def assert_generation_matches_hf(
    hf, backbone, head, vocab_size: int, pad_id: int, beams: int = 1, steps: int = 10
) -> None:
    """Prompts of 9, 4 and 7 tokens, left-padded with `pad_id`: polyhead's greedy (or beam) search
    gives HF's tokens, every one of `steps` (no eos, so no row stops early)."""
    lengths = torch.tensor([9, 4, 7])
    mask = (torch.arange(9)[None, :] >= (9 - lengths)[:, None]).long()  # (B, T) left padding
    ids = torch.randint(0, vocab_size, (3, 9)).masked_fill(mask == 0, pad_id)
    strategy = {"strategy": "beam", "num_beams": beams} if beams > 1 else {}
    with torch.no_grad():
        ours = generate(
            backbone,
            lambda h: head(h, backbone.token_embedding),
            ids,
            mask,
            GenerationConfig(max_new_tokens=steps, eos_id=None, pad_id=pad_id, **strategy),
        ).tokens
        theirs = hf.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            num_beams=beams,
            length_penalty=1.0,
            early_stopping="never" if beams > 1 else False,
            eos_token_id=None,
            pad_token_id=pad_id,
        )[:, ids.size(1) :]
    assert torch.equal(ours, theirs)


def assert_same_tensors(ours: dict[str, Tensor], theirs: dict[str, Tensor]) -> None:
    """The same keys, each with an equal tensor."""
    assert ours.keys() == theirs.keys()
    for key, tensor in ours.items():
        assert torch.equal(tensor, theirs[key]), key


def assert_export_computes_the_fine_tuned_logits(last: Path, hf_class, tmp_path: Path, capsys) -> None:
    """`polyhead convert --to-hf` of a summarizer run's `last` checkpoint (`fine_tune_summarizer`):
    `hf_class` loads it cleanly and computes the logits of its task `summarize`."""
    ours = MultiTaskModel.from_checkpoint(last).eval()
    polyhead("convert", "--to-hf", str(last), str(tmp_path / "hf"))
    assert f"{hf_class.config_class.model_type} ({hf_class.__name__})" in capsys.readouterr().out
    hf = loaded_cleanly(hf_class, tmp_path / "hf")
    ids = torch.tensor(ours.tokenizer.encode([f"summarize: {SENTENCES[1]}"]))
    with torch.no_grad():
        logits = decoder_logits(ours.backbone, ours.heads["summarize"], ids)
        torch.testing.assert_close(logits, hf(input_ids=ids).logits, atol=ATOL, rtol=RTOL)
