"""Masked-LM on windows of documents: every token in exactly one window, windows that fit, BERT's
masking rule shared with MLM + NSP, a batch that can be learned, and a run through the CLI."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch
import yaml

from datamodules.sources import DataSource, load_split
from datamodules.tokenizer import Tokenizer, TokenizerConfig
from modules.backbone import Backbone
from modules.config import BackboneConfig
from modules.model import MultiTaskModel
from tasks.masking import IGNORE, mask_tokens
from tasks.mlm import MaskedLM

from .conftest import ROOT, SEED_CORPUS, SHARED_DATA
from .test_cli import polyhead

pytestmark = pytest.mark.usefixtures("one_thread")

LONG_MLM = ROOT / "experiments" / "configs" / "long_mlm.yaml"
WIKITEXT = SHARED_DATA / "wikitext2" / "wiki.test.raw"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    lines = [
        line for row in SEED_CORPUS.read_text().splitlines() for line in json.loads(row)["text"].splitlines()
    ]
    return Tokenizer.train(lines, TokenizerConfig(vocab_size=1500), "seed corpus")


def text_ids(tokenizer: Tokenizer, length: int, seed: int) -> list[int]:
    """`length` random ids of text pieces (never special)."""
    generator = torch.Generator().manual_seed(seed)
    return tokenizer.replacement_ids[
        torch.randint(len(tokenizer.replacement_ids), (length,), generator=generator)
    ].tolist()


def windows_of(task: MaskedLM, documents: list[list[int]], tokenizer: Tokenizer, split: str = "train"):
    return task.build_examples(datasets.Dataset.from_dict({"ids": documents}), tokenizer, split, seed=0)


def check_windows(task: MaskedLM, windows, documents: list[list[int]]) -> None:
    """The invariants of MaskedLM's windows over `documents` (token ids, each with some text)."""
    pieces = [piece for w in range(len(windows)) for piece in windows[w]]
    assert np.array_equal(np.concatenate(pieces), np.concatenate(documents)), (
        "the windows, read in order, must hold every token of every document exactly once"
    )
    lengths = [task.example_length(windows[w]) for w in range(len(windows))]
    assert max(lengths) <= task.max_length, "a window is longer than max_length"
    piece_length = task.max_length - 2
    starts = np.cumsum([0] + [len(piece) for piece in pieces])[:-1]  # of each piece in the documents' tokens
    piece_bounds = {
        (int(start), int(start) + len(piece)) for piece, start in zip(pieces, starts, strict=True)
    }
    doc_start = 0
    for doc in documents:
        n_pieces = -(-len(doc) // piece_length)
        expected = {
            (doc_start + k * piece_length, min(doc_start + (k + 1) * piece_length, doc_start + len(doc)))
            for k in range(n_pieces)
        }
        assert expected <= piece_bounds, (
            "a document that fits must be one piece; a longer one cut into full pieces"
        )
        doc_start += len(doc)
    if not task.concatenate:
        assert all(len(windows[w]) == 1 for w in range(len(windows)))
    else:  # greedy in order: the next window's first piece would not have fitted in this one
        for w in range(len(windows) - 1):
            assert lengths[w] + len(windows[w + 1][0]) + 1 > task.max_length, (
                f"window {w} could have held more"
            )


@pytest.mark.parametrize("concatenate", [True, False])
def test_windows_cover_every_token_once_and_fit(tokenizer, concatenate):
    """Documents shorter than, exactly as long as, and several times longer than a window's text."""
    task = MaskedLM(max_length=64, concatenate=concatenate)
    lengths = [5, 62, 1, 63, 200, 30, 31, 124, 7, 12, 20, 3, 61, 2]
    documents = [text_ids(tokenizer, n, seed) for seed, n in enumerate(lengths)]
    windows = windows_of(task, documents, tokenizer)
    check_windows(task, windows, documents)
    # 19 pieces of at most 62 tokens (63 -> 62 + 1, 200 -> 3 x 62 + 14, 124 -> 2 x 62); concatenated,
    # the last piece of the 200 shares a window with the 30, and 7 + 12 + 20 + 3 share one
    assert len(windows) == (15 if concatenate else 19)


def test_pieces_the_vocabulary_cannot_spell_are_left_out(tokenizer):
    """An empty document or a piece of [UNK]s only has nothing to mask: it makes no window (pieces of
    10 tokens here)."""
    unk = tokenizer.unk_id
    text = text_ids(tokenizer, 10, 0)
    task = MaskedLM(max_length=12, concatenate=False)
    windows = windows_of(task, [[], [unk] * 3, text + [unk] * 10, [unk] * 25 + text], tokenizer)
    assert (
        [[piece.tolist() for piece in windows[w]] for w in range(len(windows))]
        == [
            [text],
            [[unk] * 5 + text[:5]],  # the third piece of the last document: its first two are [UNK] only
            [text[5:]],
        ]
    )


def test_collate_masks_by_the_shared_rule(tokenizer):
    """Each window is `[CLS] doc [SEP] doc [SEP]`, masked exactly as tasks.masking.mask_tokens masks it
    (MaskedLMNextSentence's rule) with the example's seed."""
    task = MaskedLM(max_length=64)
    documents = [text_ids(tokenizer, n, seed) for seed, n in enumerate([20, 25, 62, 3, 50])]
    windows = windows_of(task, documents, tokenizer)
    assert [len(windows[w]) for w in range(len(windows))] == [2, 1, 2]  # 20 + 25 | 62 | 3 + 50
    examples, seeds = [windows[w] for w in range(len(windows))], [11, 12, 13]
    batch = task.collate(examples, seeds, tokenizer)
    assert set(batch) == {"input_ids", "attention_mask", "mlm_labels", "mlm_positions"}
    for row, (pieces, seed) in enumerate(zip(examples, seeds, strict=True)):
        ids = torch.tensor(
            [tokenizer.cls_id] + [t for piece in pieces for t in [*piece.tolist(), tokenizer.sep_id]]
        )
        expected, labels = mask_tokens(ids, torch.Generator().manual_seed(seed), tokenizer, 0.15, 0.8, 0.1)
        n = len(ids)
        assert batch["attention_mask"][row].sum() == n
        assert torch.equal(batch["input_ids"][row, :n], expected)
        assert torch.equal(batch["mlm_labels"][row, :n], labels)
        assert (batch["input_ids"][row, n:] == tokenizer.pad_id).all() and (
            batch["mlm_labels"][row, n:] == IGNORE
        ).all()
    flat = (batch["mlm_labels"] != IGNORE).flatten().nonzero().flatten()
    assert torch.equal(batch["mlm_positions"], flat)


def test_masking_statistics_of_long_windows(tokenizer):
    """15% of the text tokens of 2048-token windows selected; 80% [MASK], 10% random, 10% kept."""
    task = MaskedLM(max_length=2048)
    windows = windows_of(task, [text_ids(tokenizer, 2046, seed) for seed in range(20)], tokenizer)
    batch = task.collate([windows[w] for w in range(len(windows))], list(range(len(windows))), tokenizer)
    original = torch.tensor(np.stack([np.concatenate(windows[w]) for w in range(len(windows))]))  # (20, 2046)
    inputs, labels = batch["input_ids"][:, 1:-1], batch["mlm_labels"][:, 1:-1]
    chosen = labels != IGNORE
    assert torch.equal(labels[chosen], original[chosen])
    assert (batch["mlm_labels"][:, [0, -1]] == IGNORE).all(), "[CLS] and [SEP] are never selected"
    selected = chosen.sum().item()
    assert abs(selected / original.numel() - 0.15) < 0.01
    assert abs((inputs[chosen] == tokenizer.mask_id).sum().item() / selected - 0.8) < 0.02
    # a random replacement can draw the original token (1 / vocab): count it with "kept"
    assert abs((inputs[chosen] == original[chosen]).sum().item() / selected - 0.1) < 0.02


def _model(task: MaskedLM, tokenizer: Tokenizer) -> tuple[Backbone, torch.nn.Module]:
    config = BackboneConfig(
        vocab_size=tokenizer.vocab_size, d_model=64, n_heads=4, d_ff=128, encoder_layers=2,
        max_len=task.max_length, type_vocab_size=0, pooler=False, dropout=0.0, attention_dropout=0.0,
    )  # fmt: skip
    return Backbone(config), task.build_head(config)


def test_overfits_one_batch(tokenizer):
    task = MaskedLM(max_length=64)
    windows = windows_of(
        task, [text_ids(tokenizer, n, seed) for seed, n in enumerate([60, 40, 62, 55])], tokenizer
    )
    batch = task.collate([windows[w] for w in range(len(windows))], list(range(len(windows))), tokenizer)
    torch.manual_seed(0)
    backbone, head = _model(task, tokenizer)
    optimizer = torch.optim.AdamW([*backbone.parameters(), *head.parameters()], lr=2e-3)
    losses = []
    for _ in range(100):
        loss = task.loss(task.forward(backbone, head, batch), batch)["loss"]
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 0.05:
            break
    assert losses[0] > 5.0
    assert losses[-1] < 0.05, f"MLM loss only fell from {losses[0]:.3f} to {losses[-1]:.3f}"


def test_predict_shows_each_window_and_its_masked_guesses(tokenizer):
    task = MaskedLM(max_length=64)
    documents = tokenizer.encode(["The bees returned to the hive.", "A river ran through the town."])
    windows = windows_of(task, documents, tokenizer, split="predict")
    batch = task.collate([windows[0]], [3], tokenizer)
    torch.manual_seed(0)
    backbone, head = _model(task, tokenizer)
    with torch.no_grad():
        (record,) = task.predict(task.forward(backbone, head, batch), batch, tokenizer)
    assert record["text"] == "The bees returned to the hive. A river ran through the town."
    assert len(record["masked"]) == (batch["mlm_labels"] != IGNORE).sum()
    assert all({"position", "target", "predicted", "correct"} == set(m) for m in record["masked"])


def test_trains_end_to_end_through_the_cli(tmp_path):
    """A tiny encoder through `polyhead fit` on the seed corpus: the final table shows the unigram
    baseline, and the checkpoint alone rebuilds the task."""
    config = {
        "model": {
            "tasks": {"mlm": {"class_path": "MaskedLM", "init_args": {"max_length": 256}}},
            "backbone": {"d_model": 32, "n_heads": 2, "d_ff": 64, "encoder_layers": 1, "max_len": 256,
                         "type_vocab_size": 0, "pooler": False},
        },
        "data": {"sources": {"mlm": {"path": str(SEED_CORPUS), "holdout_every": 8}},
                 "tokenizer": {"vocab_size": 1000}, "batch_size": 4},
        "trainer": {"max_steps": 6, "val_check_interval": 6, "check_val_every_n_epoch": None,
                    "accelerator": "cpu", "logger": False},
    }  # fmt: skip
    (tmp_path / "tiny_mlm.yaml").write_text(yaml.safe_dump(config))
    result = polyhead(
        ["fit", "--config", str(tmp_path / "tiny_mlm.yaml"), "--checkpoint.dirpath", str(tmp_path / "ckpt")],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = (result.stdout + result.stderr).split("Final validation metrics")[1]
    rows = {line.split()[1]: line.split()[2:] for line in table.splitlines() if line.startswith("mlm ")}
    assert set(rows) == {"loss", "accuracy", "perplexity"}
    assert len(rows["loss"]) == 2 and len(rows["accuracy"]) == 2, (
        "loss and accuracy show the unigram baseline"
    )
    model = MultiTaskModel.from_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    assert isinstance(model.tasks["mlm"], MaskedLM) and model.tasks["mlm"].max_length == 256


@pytest.mark.skipif(not WIKITEXT.exists(), reason=f"needs {WIKITEXT} (WikiText-2 test file, ../shared/data)")
def test_wikitext_articles_give_the_expected_windows():
    """long_mlm.yaml's source settings on wiki.test.raw: the 60 articles (by the peer's heading
    pattern), each covered exactly once by windows of at most 8192 tokens, whole when it fits."""
    config = yaml.safe_load(LONG_MLM.read_text())
    source = DataSource(**config["data"]["sources"]["mlm"], path=str(WIKITEXT), test_path=str(WIKITEXT))
    articles = load_split(source, ("text",), "test", "data.sources.mlm", list_fields=("text",))
    assert len(articles) == 60
    tokenizer = Tokenizer.train(
        [line for text in articles["text"] for line in text.splitlines()],
        TokenizerConfig(vocab_size=8000),
        "wiki",
    )
    task = MaskedLM(**config["model"]["tasks"]["mlm"]["init_args"])
    tokenized = articles.map(
        lambda b: task.tokenize(b, tokenizer), batched=True, remove_columns=["title", "text"]
    )
    documents = tokenized["ids"]
    assert min(len(d) for d in documents) > 0 and max(len(d) for d in documents) > task.max_length, (
        "some articles must be cut into several windows"
    )
    for concatenate in (True, False):
        windows_task = MaskedLM(max_length=task.max_length, concatenate=concatenate)
        check_windows(windows_task, windows_of(windows_task, documents, tokenizer), documents)
