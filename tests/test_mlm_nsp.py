"""MLM + NSP: masking statistics, pairing, the summed loss, and that a batch can be learned."""

from __future__ import annotations

import json

import datasets
import pytest
import torch

from datamodules.tokenizer import SPECIAL_TOKENS, Tokenizer, TokenizerConfig
from modules.backbone import Backbone
from modules.config import BackboneConfig
from tasks.masking import mask_tokens
from tasks.mlm_nsp import IGNORE, IS_NEXT, RANDOM_NEXT, MaskedLMNextSentence
from tasks.sentences import split_sentences

from .conftest import SEED_CORPUS


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return [json.loads(line)["text"] for line in SEED_CORPUS.read_text().splitlines()]


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory) -> Tokenizer:
    lines = [line for doc in corpus for line in doc.splitlines()]
    return Tokenizer.train(lines, TokenizerConfig(vocab_size=1500), "seed corpus")


@pytest.fixture(scope="module")
def examples(corpus, tokenizer):
    task = MaskedLMNextSentence(max_length=64, dupe_factor=2)
    tokenized = datasets.Dataset.from_dict({"text": corpus}).map(
        lambda b: task.tokenize(b, tokenizer), batched=True
    )
    return task, task.build_examples(tokenized, tokenizer, "train", seed=0)


def test_sentences_split_at_end_punctuation_and_lines():
    assert split_sentences("One. Two? Three!\nFour five") == ["One.", "Two?", "Three!", "Four five"]


def test_a_document_given_as_a_list_of_sentences_keeps_its_sentences(tokenizer):
    task = MaskedLMNextSentence()
    out = task.tokenize({"text": [["First one. Still first.", " ", "Second one"], "A. B."]}, tokenizer)
    first, second = out["sentences"]
    assert first == tokenizer.encode(["First one. Still first.", "Second one"])
    assert second == tokenizer.encode(["A.", "B."])


def test_masking_statistics_over_many_draws(tokenizer):
    """BERT's rule as every masked-LM task applies it (tasks/masking.py, MaskedLMNextSentence's defaults)."""
    task = MaskedLMNextSentence(max_length=128)
    rates = task.mlm_probability, task.mask_fraction, task.random_fraction
    specials = torch.tensor([tokenizer.cls_id, tokenizer.sep_id])
    ids = torch.cat(
        [
            torch.tensor([tokenizer.cls_id]),
            torch.randint(len(SPECIAL_TOKENS), tokenizer.vocab_size, (60,)),
            torch.tensor([tokenizer.sep_id]),
            torch.randint(len(SPECIAL_TOKENS), tokenizer.vocab_size, (60,)),
            torch.tensor([tokenizer.sep_id]),
        ]
    )
    candidates = (~torch.isin(ids, specials)).sum().item()
    selected = masked = randomised = kept = 0
    for seed in range(2000):
        out, labels = mask_tokens(ids, torch.Generator().manual_seed(seed), tokenizer, *rates)
        chosen = labels != IGNORE
        assert not torch.isin(ids[chosen], specials).any(), "a special token was selected"
        assert (out[~chosen] == ids[~chosen]).all(), "an unselected token was changed"
        selected += chosen.sum().item()
        masked += (out[chosen] == tokenizer.mask_id).sum().item()
        kept += (out[chosen] == ids[chosen]).sum().item()
        randomised += ((out[chosen] != ids[chosen]) & (out[chosen] != tokenizer.mask_id)).sum().item()
    assert abs(selected / (2000 * candidates) - 0.15) < 0.01
    assert abs(masked / selected - 0.8) < 0.02
    # a random replacement can draw the original token (1 / vocab): count it with "kept"
    assert abs(randomised / selected - 0.1) < 0.02
    assert abs(kept / selected - 0.1) < 0.02


def test_pairs_are_half_next_half_random_and_fit(examples, tokenizer):
    task, pairs = examples
    labels = [pairs[i][2] for i in range(len(pairs))]
    assert abs(labels.count(RANDOM_NEXT) / len(labels) - 0.5) < 0.08
    for i in range(0, len(pairs), 7):
        a, b, _ = pairs[i]
        assert len(a) >= 1 and len(b) >= 1 and len(a) + len(b) <= task.max_length - 3
    table, spans = pairs.table, pairs.spans
    doc_of = torch.bucketize(
        torch.tensor(spans[:, [0, 2]]).contiguous(), torch.tensor(table.doc_starts[1:]), right=True
    )
    is_next = torch.tensor(spans[:, 4]) == IS_NEXT
    assert (doc_of[is_next, 0] == doc_of[is_next, 1]).all(), "a true next segment came from another document"
    assert (torch.tensor(spans[is_next][:, 1]) == torch.tensor(spans[is_next][:, 2])).all(), (
        "B must start where A ends"
    )
    assert (doc_of[~is_next, 0] != doc_of[~is_next, 1]).all(), (
        "a random next segment came from the same document"
    )


def test_collated_batch_layout(examples, tokenizer):
    task, pairs = examples
    batch = task.collate([pairs[i] for i in range(8)], list(range(8)), tokenizer)
    for row in range(8):
        a, b, label = pairs[row]
        n = len(a) + len(b) + 3
        assert batch["attention_mask"][row].sum() == n
        sep = (batch["input_ids"][row] == tokenizer.sep_id).nonzero().flatten().tolist()
        assert sep[-1] == n - 1 and batch["input_ids"][row, 0] == tokenizer.cls_id
        assert batch["token_type_ids"][row, : len(a) + 2].sum() == 0
        assert batch["token_type_ids"][row, len(a) + 2 : n].eq(1).all()
        assert batch["nsp_labels"][row] == label
    again = task.collate([pairs[i] for i in range(8)], list(range(8)), tokenizer)
    assert torch.equal(again["input_ids"], batch["input_ids"]), "same seeds must give the same masks"


def _model(task, tokenizer, **overrides):
    values = dict(
        vocab_size=tokenizer.vocab_size, d_model=64, n_heads=4, d_ff=128, encoder_layers=2, max_len=64
    )
    values.update(overrides)
    config = BackboneConfig(**values)
    return Backbone(config), task.build_head(config)


def test_loss_is_mlm_plus_nsp_on_a_real_batch(examples, tokenizer):
    task, pairs = examples
    torch.manual_seed(0)
    backbone, head = _model(task, tokenizer)
    batch = task.collate([pairs[i] for i in range(16)], list(range(16)), tokenizer)
    outputs = task.forward(backbone, head, batch)
    losses = task.loss(outputs, batch)
    assert losses["mlm_loss"] > 0 and losses["nsp_loss"] > 0
    torch.testing.assert_close(losses["loss"], losses["mlm_loss"] + losses["nsp_loss"])
    # and each part is the plain cross-entropy over its own targets
    targets = batch["mlm_labels"][batch["mlm_labels"] != IGNORE]
    torch.testing.assert_close(
        losses["mlm_loss"], torch.nn.functional.cross_entropy(outputs["mlm_logits"], targets)
    )
    assert outputs["mlm_logits"].shape == (targets.numel(), tokenizer.vocab_size)


def test_overfits_one_batch(examples, tokenizer):
    task, pairs = examples
    torch.manual_seed(0)
    backbone, head = _model(task, tokenizer, dropout=0.0, attention_dropout=0.0)
    batch = task.collate([pairs[i] for i in range(8)], list(range(8)), tokenizer)
    params = list(backbone.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=2e-3)
    first = None
    for _ in range(150):
        loss = task.loss(task.forward(backbone, head, batch), batch)["loss"]
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 0.05:
            break
    assert first > 5.0
    assert loss.item() < 0.05, f"MLM+NSP loss only fell to {loss.item():.3f} in 150 steps"


def test_sentences_the_vocabulary_cannot_spell_are_left_out(tokenizer):
    """A sentence of [UNK]s only (emoji lines under an imported vocabulary) has nothing MLM may mask:
    it never enters a pair, so every pair has a masked target."""
    unk, text = tokenizer.unk_id, tokenizer.encode(["A short sentence.", "Another one here."])
    documents = [
        [[unk] * 3, text[0], [unk], text[1]] if d % 2 else [[unk, unk], text[d % 2]] for d in range(40)
    ]
    task = MaskedLMNextSentence(max_length=32)
    pairs = task.build_examples(
        datasets.Dataset.from_dict({"sentences": documents}), tokenizer, "train", seed=0
    )
    assert unk not in pairs.table.tokens.tolist()
    assert len(pairs.table.sentence_starts) - 1 == sum(2 if d % 2 else 1 for d in range(40))
    batch = task.collate([pairs[i] for i in range(len(pairs))], list(range(len(pairs))), tokenizer)
    assert ((batch["mlm_labels"] != IGNORE).sum(dim=1) >= 1).all()


@pytest.mark.parametrize(
    "layout, nsp_head",
    [
        ({}, "pooled"),  # BERT: learned absolute positions, post-norm
        (
            {"position": "relative", "norm": "pre", "norm_type": "rmsnorm", "type_vocab_size": 0},
            "pooled",
        ),  # T5-style
        ({}, "match"),  # NSP from each segment's matches in the other, within each input of a row
    ],
)
def test_packed_rows_give_each_input_its_unpacked_outputs(examples, tokenizer, layout, nsp_head):
    """Several inputs in one row attend only to themselves, with positions from 0: the MLM and NSP
    logits and the loss equal those of one input per row, while the batch has fewer rows."""
    _, pairs = examples
    task = MaskedLMNextSentence(max_length=64, nsp_head=nsp_head)
    packing = MaskedLMNextSentence(max_length=2 * task.max_length, pack=True, nsp_head=nsp_head)
    short = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))[:12]
    chosen, seeds = [pairs[i] for i in short], list(range(12))
    torch.manual_seed(0)
    backbone, head = _model(task, tokenizer, max_len=packing.max_length, **layout)
    for parameter in head["nsp"].parameters():  # the match head starts at zero: give it weights to test
        torch.nn.init.normal_(parameter)
    backbone.eval(), head.eval()
    alone, packed = task.collate(chosen, seeds, tokenizer), packing.collate(chosen, seeds, tokenizer)
    assert len(packed["input_ids"]) < len(alone["input_ids"]) == 12, "some inputs must share a row"
    assert packed["attention_mask"].sum() == alone["attention_mask"].sum()
    with torch.no_grad():
        expected, got = task.forward(backbone, head, alone), packing.forward(backbone, head, packed)
    torch.testing.assert_close(got["mlm_logits"], expected["mlm_logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["nsp_logits"], expected["nsp_logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packing.loss(got, packed)["loss"], task.loss(expected, alone)["loss"])
