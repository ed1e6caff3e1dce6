"""Data sources: document grouping, column mapping, held-out validation that the tokenizer never sees."""

from __future__ import annotations

import json

import pytest

from datamodules.datamodule import MultiTaskDataModule
from datamodules.sources import DataSource, load_split
from datamodules.tokenizer import TokenizerConfig
from modules.errors import UserError

from .conftest import SHARED_DATA


def test_heading_documents_skip_lines_and_holdout(tmp_path):
    corpus = tmp_path / "wiki.txt"
    lines = []
    for k in range(10):
        lines += [
            f" = Article {k} = ",
            "",
            f" Text of article {k} . More text {k} .",
            " = = Section = = ",
            f" Second paragraph {k} .",
        ]
    corpus.write_text("\n".join(lines) + "\n")
    source = DataSource(path=str(corpus), documents="heading", skip_lines="^ = = ", holdout_every=5)
    splits = {
        split: load_split(source, ("text",), split, "data.sources.t")
        for split in ("train", "validation", "test")
    }
    assert splits.pop("test") is None
    assert len(splits["train"]) == 8 and len(splits["validation"]) == 2
    assert splits["validation"][0]["text"] == "Text of article 4 . More text 4 .\nSecond paragraph 4 ."
    assert all("Section" not in t for t in splits["train"]["text"])


def test_column_mapping_and_errors(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"body": f"doc {i}. It goes on."}) + "\n" for i in range(6)))
    mapped = DataSource(path=str(data), columns={"text": "body"}, holdout_every=3)
    train = load_split(mapped, ("text",), "train", "data.sources.t")
    assert train.column_names == ["text"] and len(train) == 4
    assert len(load_split(mapped, ("text",), "validation", "data.sources.t")) == 2
    with pytest.raises(UserError, match=r"missing column\(s\) \['text'\].*'body'"):
        load_split(DataSource(path=str(data), holdout_every=3), ("text",), "train", "data.sources.t")
    with pytest.raises(UserError, match="not fields of this task"):
        load_split(
            DataSource(path=str(data), columns={"txt": "body"}, holdout_every=3), ("text",), "train", "t"
        )
    with pytest.raises(UserError, match="no validation data"):
        load_split(
            DataSource(path=str(data), columns={"text": "body"}), ("text",), "validation", "data.sources.t"
        )


def test_tokenizer_never_sees_held_out_documents(tmp_path):
    data = tmp_path / "d.jsonl"
    rows = []
    for i in range(20):
        word = "quokkaberry" if i % 4 == 3 else "marmalade"  # every 4th document is held out
        filler = f"Plain words follow here in line {i}, with the river, the hill, the town and {i * 7} boats."
        rows.append({"text": " ".join([word] * 50) + ". " + filler * 3})
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    module = MultiTaskDataModule(
        {"t": DataSource(path=str(data), holdout_every=4)}, TokenizerConfig(vocab_size=305)
    )
    pieces = module.tokenizer.id_to_piece
    assert len(module.tokenizer.encode(["marmalade"])[0]) == 1, "a frequent training word becomes one piece"
    split = module.tokenizer.encode(["quokkaberry"])[0]
    assert len(split) > 2, f"a word only in validation documents was learned as {pieces(split)}"


@pytest.mark.skipif(
    not (SHARED_DATA / "wikitext2").exists(), reason="needs ../shared/data/wikitext2 (real data)"
)
def test_wikitext_articles_split_like_the_peer():
    source = DataSource(
        path=str(SHARED_DATA / "wikitext2" / "wiki.test.raw"),
        documents="heading",
        heading_pattern=r"^ = (?!1 (rad|henry) )[^=].* = $",
        skip_lines="^ = = ",
        holdout_every=10,
    )
    splits = {
        split: load_split(source, ("text",), split, "data.sources.mlm_nsp")
        for split in ("train", "validation")
    }
    assert (len(splits["train"]), len(splits["validation"])) == (54, 6)
    words = sum(len(t.split()) for t in splits["validation"]["text"])
    assert 14_000 < words < 16_000  # the peer reports 14,923 validation words
