"""Tokenizers: polyhead's sentencepiece vocabulary (fixed special ids, exact round trips, no unknown
tokens, cached, portable), a HF tokenizer.json (BERT's WordPiece, checked against transformers) and
T5's sentencepiece model with T5's special ids; special tokens by role, and tasks refused when the
vocabulary lacks one they need."""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from tokenizers import Tokenizer as Tokenizers

from datamodules.tokenizer import (
    SPECIAL_TOKENS,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    TokenizerConfig,
    cache_root,
)
from modules.config import BackboneConfig
from modules.errors import UserError
from modules.model import MultiTaskModel
from tasks.classify import Classify
from tasks.mlm_nsp import MaskedLMNextSentence
from tasks.seq2seq import Seq2Seq

from .conftest import SEED_CORPUS
from .hf_tokenizers import BERT_SPECIALS, SENTENCES, T5_SPECIALS, bert_wordpiece, t5_sentencepiece


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


def test_a_corpus_too_small_for_the_vocabulary_gets_the_pieces_it_holds():
    tiny = Tokenizer.train(["tiny corpus of a few words."] * 3, TokenizerConfig(vocab_size=5000), "tiny")
    assert 7 + 256 < tiny.vocab_size < 5000
    assert tiny.decode(tiny.encode(["a few words"])[0]) == "a few words"


def test_impossible_vocabulary_sizes_are_a_clear_error():
    with pytest.raises(UserError, match="data.tokenizer.vocab_size must hold"):
        Tokenizer.train(["tiny corpus of a few words."] * 3, TokenizerConfig(vocab_size=100), "tiny")
    with pytest.raises(UserError, match="empty"):
        Tokenizer.train(["", "  "], TokenizerConfig(), "blank")


# ------------------------------------------------------------------------ polyhead's layout, by role


def test_polyhead_vocabulary_keeps_its_ids_fingerprint_and_state(lines):
    """Checkpoints written before the tokenizer had backends must load and mean the same ids."""
    tok = Tokenizer.train(lines, TokenizerConfig(vocab_size=800, lowercase=True), "seed corpus")
    assert isinstance(tok, SentencePieceTokenizer)
    ids = [tok.pad_id, tok.unk_id, tok.start_id, tok.eos_id, tok.cls_id, tok.sep_id, tok.mask_id]
    assert ids == list(range(7))
    assert tok.state_dict().keys() == {"sentencepiece_model", "lowercase"}
    old_fingerprint = hashlib.sha256(tok.model_proto + bytes([True])).hexdigest()[:16]
    assert tok.fingerprint == old_fingerprint
    assert torch.equal(tok.replacement_ids, torch.arange(7, 800))
    assert tok.is_special(torch.tensor([[0, 6, 7], [3, 500, 1]])).tolist() == [
        [True, True, False],
        [True, False, True],
    ]


# ------------------------------------------------------------------- the tokenizer.json backend (BERT)


@pytest.fixture(scope="module")
def wordpiece():
    """(our HFTokenizer, transformers' BERT tokenizer) over one tokenizer.json."""
    transformers = pytest.importorskip("transformers", reason="transformers is the reference")
    trained = bert_wordpiece(SENTENCES * 3 + lines_of_seed())
    ours = HFTokenizer(trained.to_str(), BERT_SPECIALS)
    theirs = transformers.BertTokenizerFast(tokenizer_object=Tokenizers.from_str(trained.to_str()))
    return ours, theirs


def lines_of_seed() -> list[str]:
    return [
        line for row in SEED_CORPUS.read_text().splitlines() for line in json.loads(row)["text"].splitlines()
    ]


TEXTS = [
    *SENTENCES,
    "  CAFÉ   İSTANBUL naïve résumé — twice, at 12:30!  ",
    "Unseen words like zxqv and 日本語 still map to pieces.",
    "",
]


def test_wordpiece_ids_equal_transformers_and_are_real_pieces(wordpiece):
    ours, theirs = wordpiece
    for text in TEXTS:
        expected = theirs(text, add_special_tokens=False)["input_ids"]
        assert ours.encode([text])[0] == expected, text
    ids = ours.encode([SENTENCES[0]])[0]
    assert ids and ours.unk_id not in ids  # transformers 5 ignores a vocab_file silently: all [UNK]
    assert theirs(SENTENCES[0])["input_ids"] == [ours.cls_id, *ids, ours.sep_id]  # their post-processor
    assert (ours.pad_id, ours.cls_id, ours.sep_id, ours.mask_id) == tuple(
        theirs.convert_tokens_to_ids(["[PAD]", "[CLS]", "[SEP]", "[MASK]"])
    )
    assert ours.start_id is None and ours.eos_id is None  # BERT has neither


def test_wordpiece_decodes_as_transformers_and_offsets_point_into_the_original(wordpiece):
    ours, theirs = wordpiece
    normalize = ours.tk.normalizer.normalize_str
    for text, (ids, spans) in zip(TEXTS, ours.encode_with_offsets(TEXTS), strict=True):
        assert ids == ours.encode([text])[0]
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
        assert spans == theirs(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        pieces = ours.id_to_piece(ids)
        for (start, end), piece in zip(spans, pieces, strict=True):
            if piece != "[UNK]":  # the surface, lower-cased and accent-stripped, is the piece
                assert normalize(text[start:end]) == piece.removeprefix("##"), (text, piece)
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans)), "spans overlap or go back"
    # accented, upper-case words map back to their original characters, whatever pieces they became
    text = "We met at the CAFÉ in İSTANBUL."
    ids, spans = ours.encode_with_offsets([text])[0]
    for word in ("CAFÉ", "İSTANBUL"):
        start, end = text.index(word), text.index(word) + len(word)
        inside = [(s, e) for s, e in spans if start <= s < end]
        assert inside[0][0] == start and inside[-1][1] == end, (word, inside)


def test_special_ids_of_a_tokenizer_json_are_never_masked_or_drawn(wordpiece):
    ours, _ = wordpiece
    specials = [ours.pad_id, ours.unk_id, ours.cls_id, ours.sep_id, ours.mask_id]
    assert set(specials) <= ours.special_ids
    assert not set(ours.replacement_ids.tolist()) & set(specials)
    assert len(ours.replacement_ids) == ours.vocab_size - len(specials)
    assert ours.decode([ours.cls_id, *ours.encode(["the fox"])[0], ours.sep_id, ours.pad_id]) == "the fox"


def test_tokenizer_json_state_round_trips_through_a_weights_only_checkpoint(wordpiece, tmp_path):
    ours, _ = wordpiece
    torch.save({"tokenizer": ours.state_dict()}, tmp_path / "t.ckpt")
    state = torch.load(tmp_path / "t.ckpt", weights_only=True)["tokenizer"]
    restored = Tokenizer.from_state_dict(state)
    assert isinstance(restored, HFTokenizer) and restored.fingerprint == ours.fingerprint
    assert restored.encode(TEXTS) == ours.encode(TEXTS)
    other = HFTokenizer(ours.tokenizer_json, BERT_SPECIALS | {"mask": "[UNK]"})
    assert other.fingerprint != ours.fingerprint


def test_truncation_stored_in_a_tokenizer_json_never_cuts_text(wordpiece):
    ours, _ = wordpiece
    limited = Tokenizers.from_str(ours.tokenizer_json)
    limited.enable_truncation(max_length=4)
    long = " ".join(SENTENCES)
    assert ours.encode([long]) == HFTokenizer(limited.to_str(), BERT_SPECIALS).encode([long])


# ----------------------------------------------------------------------- a T5-style sentencepiece model


@pytest.fixture(scope="module")
def t5_model(tmp_path_factory) -> tuple[bytes, Path]:
    """(spiece.model bytes, a directory holding it as T5's tokenizer files)."""
    proto = t5_sentencepiece(SENTENCES * 5)
    directory = tmp_path_factory.mktemp("t5-tokenizer")
    (directory / "spiece.model").write_bytes(proto)
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "T5Tokenizer", "extra_ids": 5})
    )
    return proto, directory


def test_t5_sentencepiece_has_t5s_special_ids_and_sentinels(t5_model):
    proto, directory = t5_model
    tok = SentencePieceTokenizer(proto, special=T5_SPECIALS, extra_ids=5)
    pieces = spm.SentencePieceProcessor(model_proto=proto).get_piece_size()
    assert (tok.pad_id, tok.eos_id, tok.unk_id, tok.start_id) == (0, 1, 2, 0)
    assert tok.cls_id is tok.sep_id is tok.mask_id is None
    assert tok.vocab_size == pieces + 5
    assert tok.id_to_piece([pieces, tok.vocab_size - 1]) == ["<extra_id_4>", "<extra_id_0>"]
    assert tok.is_special(torch.arange(tok.vocab_size)).nonzero().flatten().tolist() == [
        0,
        1,
        2,
        *range(pieces, pieces + 5),
    ]
    ids = tok.encode([SENTENCES[0]])[0]
    assert tok.decode([*ids, tok.vocab_size - 1, tok.eos_id, tok.pad_id]) == SENTENCES[0]

    transformers = pytest.importorskip("transformers", reason="transformers is the reference")
    theirs = transformers.T5Tokenizer.from_pretrained(directory)
    assert len(theirs) == tok.vocab_size
    for text in SENTENCES:
        assert theirs(text)["input_ids"] == [*tok.encode([text])[0], tok.eos_id]  # HF appends </s>
    assert theirs.convert_tokens_to_ids(["<extra_id_0>", "<extra_id_4>"]) == [tok.vocab_size - 1, pieces]

    restored = Tokenizer.from_state_dict(tok.state_dict())
    assert restored.fingerprint == tok.fingerprint and restored.encode(SENTENCES) == tok.encode(SENTENCES)
    assert restored.fingerprint != SentencePieceTokenizer(proto, special=T5_SPECIALS).fingerprint
    with pytest.raises(UserError, match="not a polyhead tokenizer"):
        SentencePieceTokenizer(proto)  # without its special map, T5's layout is not polyhead's
    with pytest.raises(UserError, match=r"no piece '\[CLS\]' for its cls token"):
        SentencePieceTokenizer(proto, special=T5_SPECIALS | {"cls": "[CLS]"})


def test_a_task_needing_a_token_the_vocabulary_lacks_stops_when_the_model_is_built(t5_model):
    tok = SentencePieceTokenizer(t5_model[0], special=T5_SPECIALS, extra_ids=5)
    tiny = BackboneConfig(d_model=16, n_heads=2, d_ff=32, encoder_layers=1, decoder_layers=1, max_len=32)
    with pytest.raises(UserError, match=r"model.tasks.sst2 \(Classify\) needs a \[CLS\] token \(cls_id\)"):
        MultiTaskModel({"sst2": Classify()}, tiny, tokenizer=tok)
    with pytest.raises(UserError, match=r"model.tasks.mlm \(MaskedLMNextSentence\) needs a \[CLS\] token"):
        MultiTaskModel({"mlm": MaskedLMNextSentence()}, tiny, tokenizer=tok)
    model = MultiTaskModel(
        {"summarize": Seq2Seq(max_source_length=32, max_target_length=16)}, tiny, tokenizer=tok
    )  # T5's decoder starts from pad
    assert model.tasks["summarize"].start_id == 0 and model.tasks["summarize"].decoding.eos_id == 1
