"""Generation token for token as HF's `T5ForConditionalGeneration.generate` on converted weights:
greedy, beam search (n-best, length penalty) and n-gram blocking. Weights are perturbed well beyond
their initialisation so the outputs depend on the source; eos is picked from a free run so that
some rows end early and others run on.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import Tensor, nn

from modules.backbone import Backbone
from modules.generation import GenerationConfig, generate

from .test_generation import eos_for_some_rows, right_padded

HF_STEPS = 12


def t5_pair():
    """A tiny HF T5 (v1.0: ReLU, tied and scaled output) and our converted backbone + its projection."""
    transformers = pytest.importorskip("transformers", reason="transformers (a dev extra) is the reference")
    from modules.convert_t5 import backbone_config_from_t5, t5_to_polyhead

    torch.manual_seed(0)
    hf_config = transformers.T5Config(
        vocab_size=12,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
        feed_forward_proj="relu",
        tie_word_embeddings=True,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    hf = transformers.T5ForConditionalGeneration(hf_config).eval()
    with torch.no_grad():
        for param in hf.parameters():
            param.add_(0.5 * torch.randn_like(param))
    config = backbone_config_from_t5(hf_config)
    state, lm_head = t5_to_polyhead(hf.state_dict(), config)
    assert lm_head is None
    backbone = Backbone(config).eval()
    backbone.load_state_dict(state, strict=True)

    def project(hidden: Tensor) -> Tensor:
        return (hidden * config.d_model**-0.5) @ backbone.token_embedding.T

    return hf, backbone, project


def hf_generate(hf: nn.Module, source: Tensor, source_mask: Tensor, eos: int, **options):
    """HF generate with every option that changes tokens stated; -> (new tokens, sequence scores or None).

    HF beam search fills the columns after a hypothesis's eos with eos when pad_token_id is 0 (it
    picks `pad or eos`); those are set to pad here, as ours are.
    """
    out = hf.generate(
        input_ids=source,
        attention_mask=source_mask,
        max_new_tokens=HF_STEPS,
        min_length=0,
        do_sample=False,
        repetition_penalty=1.0,
        decoder_start_token_id=0,
        eos_token_id=eos,
        pad_token_id=0,
        return_dict_in_generate=True,
        output_scores=True,
        **({"no_repeat_ngram_size": 0} | options),
    )
    tokens = out.sequences[:, 1:]
    after_eos = (tokens == eos).long().cumsum(dim=1) - (tokens == eos).long() > 0
    return tokens.masked_fill(after_eos, 0), getattr(out, "sequences_scores", None)


def t5_case():
    """The T5 pair, sources, and an eos that ends some rows early (HF's 1 is rarely produced by a random
    model, so eos is taken from a free greedy run)."""
    hf, backbone, project = t5_pair()
    source, source_mask = right_padded([9, 6, 4, 2], 9, vocab=12)
    free = generate(
        backbone, project, source, source_mask, GenerationConfig(max_new_tokens=HF_STEPS), start_id=0
    )
    return hf, backbone, project, source, source_mask, eos_for_some_rows(free.tokens)


def test_greedy_matches_hf_t5_generate():
    hf, backbone, project, source, source_mask, eos = t5_case()
    settings = GenerationConfig(max_new_tokens=HF_STEPS, eos_id=eos, pad_id=0)
    ours = generate(backbone, project, source, source_mask, settings, start_id=0)
    theirs, _ = hf_generate(hf, source, source_mask, eos, num_beams=1)
    assert ours.tokens.tolist() == theirs.tolist()
    ended = (ours.tokens == eos).any(dim=1)
    assert ended.any() and not ended.all(), "the case needs rows that end early and rows that run on"


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_beam_search_matches_hf_t5_generate(alpha):
    hf, backbone, project, source, source_mask, eos = t5_case()
    settings = GenerationConfig(
        strategy="beam",
        num_beams=3,
        num_return_sequences=3,
        length_penalty=alpha,
        max_new_tokens=HF_STEPS,
        eos_id=eos,
    )
    ours = generate(backbone, project, source, source_mask, settings, start_id=0)
    theirs, their_scores = hf_generate(
        hf,
        source,
        source_mask,
        eos,
        num_beams=3,
        num_return_sequences=3,
        length_penalty=alpha,
        early_stopping="never",
    )
    assert ours.tokens.tolist() == theirs.tolist()
    torch.testing.assert_close(ours.scores, their_scores, rtol=1e-5, atol=1e-5)
    ended = (ours.tokens == eos).any(dim=1)
    assert ended.any() and not ended.all(), "the case needs hypotheses that end early and ones that run on"


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_no_repeat_ngram_matches_hf_t5_generate(strategy):
    """With repeated bigrams banned, our tokens are HF's token for token; without the ban the case repeats."""
    hf, backbone, project, source, source_mask, eos = t5_case()
    beams = 3 if strategy == "beam" else 1
    beam_settings = {"num_beams": beams, "num_return_sequences": beams} if beams > 1 else {}
    settings = GenerationConfig(
        strategy=strategy, max_new_tokens=HF_STEPS, eos_id=eos, no_repeat_ngram_size=2, **beam_settings
    )
    ours = generate(backbone, project, source, source_mask, settings, start_id=0)
    theirs, _ = hf_generate(
        hf, source, source_mask, eos, no_repeat_ngram_size=2, num_beams=beams, early_stopping="never",
        **({"num_return_sequences": beams} if beams > 1 else {}),
    )  # fmt: skip
    assert ours.tokens.tolist() == theirs.tolist()
    free = generate(
        backbone, project, source, source_mask, replace(settings, no_repeat_ngram_size=0), start_id=0
    )
    assert any(has_repeated_bigram(row, eos) for row in free.tokens.tolist()), (
        "the case must repeat without the ban"
    )
    assert not any(has_repeated_bigram(row, eos) for row in ours.tokens.tolist())


def has_repeated_bigram(row: list[int], eos: int) -> bool:
    """Brute force, on the tokens up to the eos (padding follows it)."""
    row = row[: row.index(eos) + 1] if eos in row else row
    bigrams = list(zip(row, row[1:], strict=False))
    return len(bigrams) != len(set(bigrams))
