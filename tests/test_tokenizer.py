"""The sentencepiece tokenizer: fixed special ids, exact round trips, no unknown tokens, cached, portable."""

from __future__ import annotations

import json

import pytest

from datamodules.tokenizer import SPECIAL_TOKENS, Tokenizer, TokenizerConfig, cache_root
from modules.errors import UserError

from .conftest import SEED_CORPUS


@pytest.fixture(scope="module")
def lines() -> list[str]:
    return [
        line for row in SEED_CORPUS.read_text().splitlines() for line in json.loads(row)["text"].splitlines()
    ]


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_round_trip_is_exact_and_never_unknown(lines, model_type):
    tok = Tokenizer.train(lines, TokenizerConfig(vocab_size=1200, model_type=model_type), "seed corpus")
    assert [tok.id_to_piece([i])[0] for i in range(len(SPECIAL_TOKENS))] == list(SPECIAL_TOKENS)
    odd = "  Two  spaces, tabs\tand ünïcödé — plus 日本語 and an emoji 🐝 at 12:30!"
    for text in [*lines[:50], odd]:
        ids = tok.encode([text])[0]
        assert tok.unk_id not in ids, f"unknown token in {text!r}"
        assert tok.decode(ids) == text
    assert tok.vocab_size == 1200


def test_trained_once_then_cached_and_restored_from_state(lines):
    config = TokenizerConfig(vocab_size=800)
    first = Tokenizer.train(lines, config, "seed corpus")
    cached = list((cache_root() / "tokenizers").glob("*.model"))
    assert len(cached) == 1
    again = Tokenizer.train(lines, config, "seed corpus")
    assert (
        again.fingerprint == first.fingerprint
        and len(list((cache_root() / "tokenizers").glob("*.model"))) == 1
    )
    restored = Tokenizer.from_state_dict(first.state_dict())
    assert restored.encode(lines[:5]) == first.encode(lines[:5])


def test_lowercase_option(lines):
    tok = Tokenizer.train(lines, TokenizerConfig(vocab_size=800, lowercase=True), "seed corpus")
    assert tok.encode(["The Town"]) == tok.encode(["the town"])


def test_too_large_vocabulary_is_a_clear_error():
    with pytest.raises(UserError, match="data.tokenizer.vocab_size"):
        Tokenizer.train(["tiny corpus of a few words."] * 3, TokenizerConfig(vocab_size=5000), "tiny")
    with pytest.raises(UserError, match="empty"):
        Tokenizer.train(["", "  "], TokenizerConfig(), "blank")
