"""Data sources: document grouping, column mapping, aligned line files, SQuAD JSON, held-out validation
(by row or by key) that the tokenizer never sees."""

from __future__ import annotations

import gzip
import json

import pytest
from jsonargparse import ArgumentParser

from datamodules.datamodule import MultiTaskDataModule, source_identity
from datamodules.sources import DataSource, load_split, read_text_lines
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


def write_gz_lines(path, lines: list[str]) -> str:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
    return str(path)


def test_aligned_gz_files_round_trip_with_column_mapping(tmp_path):
    english = [f"A dog runs {i} times." for i in range(6)] + [
        "Page\x0cbreak and\u2028separator stay one line."
    ]
    german = [f"Ein Hund läuft {i} Mal." for i in range(6)] + ["Seitenumbruch bleibt eine Zeile."]
    files = {
        "en": write_gz_lines(tmp_path / "train.en.gz", english),
        "de": write_gz_lines(tmp_path / "train.de.gz", german),
    }
    source = DataSource(path=files, columns={"source": "en", "target": "de"}, holdout_every=7)
    train = load_split(source, ("source", "target"), "train", "data.sources.t")
    validation = load_split(source, ("source", "target"), "validation", "data.sources.t")
    assert train.column_names == ["source", "target"]
    assert train["source"] == english[:6] and train["target"] == german[:6]
    assert validation[:] == {"source": english[6:], "target": german[6:]}


def test_aligned_files_of_different_length_or_missing_name_the_file(tmp_path):
    en = write_gz_lines(tmp_path / "train.en.gz", ["one", "two", "three"])
    de = write_gz_lines(tmp_path / "train.de.gz", ["eins", "zwei"])
    with pytest.raises(UserError, match=r"train\.en\.gz' has 3 lines, .*train\.de\.gz' has 2"):
        load_split(
            DataSource(path={"source": en, "target": de}, holdout_every=2), ("source", "target"), "train", "t"
        )
    missing = DataSource(path={"source": en, "target": str(tmp_path / "nope.de.gz")}, holdout_every=2)
    with pytest.raises(UserError, match=r"data\.sources\.t\.path\.target: file not found: .*nope\.de\.gz"):
        load_split(missing, ("source", "target"), "train", "data.sources.t")


def test_config_accepts_a_file_or_a_mapping_of_files():
    parser = ArgumentParser()
    parser.add_argument("--source", type=DataSource)
    aligned = parser.parse_string("source:\n  path: {source: a.en.gz, target: a.de.gz}\n").source
    assert aligned.path == {"source": "a.en.gz", "target": "a.de.gz"}
    assert parser.parse_string("source:\n  path: a.jsonl\n").source.path == "a.jsonl"


def test_source_identity_fingerprints_every_aligned_file(tmp_path):
    en = write_gz_lines(tmp_path / "a.en.gz", ["one"])
    de = write_gz_lines(tmp_path / "a.de.gz", ["eins"])
    before = source_identity(DataSource(path={"source": en, "target": de}))
    write_gz_lines(tmp_path / "a.de.gz", ["eins", "zwei", "drei"])
    after = source_identity(DataSource(path={"source": en, "target": de}))
    assert (
        before["path"]["source"] == after["path"]["source"]
        and before["path"]["target"] != after["path"]["target"]
    )


def squad_file(tmp_path, data: list) -> str:
    path = tmp_path / "squad.json"
    path.write_text(json.dumps({"version": "1.1", "data": data}))
    return str(path)


def qa(qid: str, question: str, *answers: tuple[str, int]) -> dict:
    return {"id": qid, "question": question, "answers": [{"text": t, "answer_start": s} for t, s in answers]}


SQUAD = [
    {
        "title": "Owls",
        "paragraphs": [
            {
                "context": "Owls hunt at night.",
                "qas": [qa("q1", "When do owls hunt?", ("at night", 10), ("night", 13))],
            },
            {
                "context": "Barn owls eat mice.",
                "qas": [qa("q2", "What do barn owls eat?", ("mice", 14), ("mice", 14))],
            },
        ],
    },
    {
        "title": "Moles",
        "paragraphs": [
            {
                "context": "Moles dig.",
                "qas": [qa("q3", "What do moles do?", ("dig", 6)), qa("q4", "Who digs?", ("Moles", 0))],
            }
        ],
    },
]
SQUAD_FIELDS = ("id", "title", "context", "question", "answers")


def test_squad_is_flattened_to_one_row_per_question(tmp_path):
    path = squad_file(tmp_path, SQUAD)
    source = DataSource(path=path, test_path=path, format="squad")
    rows = load_split(source, SQUAD_FIELDS, "test", "t", ("answer_starts",), list_fields=("answers",))
    assert rows["id"] == ["q1", "q2", "q3", "q4"]
    assert rows["title"] == ["Owls", "Owls", "Moles", "Moles"]
    assert rows["context"][1] == "Barn owls eat mice." and rows["question"][3] == "Who digs?"
    assert rows["answers"] == [["at night", "night"], ["mice", "mice"], ["dig"], ["Moles"]]
    assert rows["answer_starts"] == [[10, 13], [14, 14], [6], [0]]


@pytest.mark.parametrize(
    "break_it, message",
    [
        (
            lambda d: d[1]["paragraphs"][0]["qas"][1].pop("question"),
            r"data\[1\]\.paragraphs\[0\]\.qas\[1\]: missing 'question'",
        ),
        (
            lambda d: d[0]["paragraphs"][1]["qas"][0]["answers"][1].update(answer_start="14"),
            r"data\[0\]\.paragraphs\[1\]\.qas\[0\]\.answers\[1\]\.answer_start: expected an integer, found a string",
        ),
        (lambda d: d[1].update(paragraphs={}), r"data\[1\]\.paragraphs: expected a list, found an object"),
    ],
)
def test_malformed_squad_names_the_file_and_the_path_inside_it(tmp_path, break_it, message):
    data = json.loads(json.dumps(SQUAD))
    break_it(data)
    path = squad_file(tmp_path, data)
    source = DataSource(path=path, test_path=path, format="squad")
    with pytest.raises(UserError, match=r"squad\.json: " + message):
        load_split(source, ("question", "context"), "test", "t")


def test_holdout_key_holds_out_whole_groups_numbered_by_first_appearance(tmp_path):
    topics = ["a", "a", "b", "c", "b", "d", "c", "e", "f", "f", "a", "f"]  # groups a0 b1 c2 d3 e4 f5
    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(json.dumps({"text": f"{t}{i} text", "topic": t}) + "\n" for i, t in enumerate(topics))
    )
    source = DataSource(path=str(data), holdout_every=3, holdout_key="topic")  # the task never reads topic
    train = load_split(source, ("text",), "train", "t")
    validation = load_split(source, ("text",), "validation", "t")
    assert validation["text"] == [f"{t}{i} text" for i, t in enumerate(topics) if t in "cf"]
    assert train["text"] == [f"{t}{i} text" for i, t in enumerate(topics) if t not in "cf"]
    assert not any(line.startswith(("c", "f")) for line in read_text_lines(source, "t"))
    with pytest.raises(
        UserError, match=r"t\.holdout_key: 'topik' is not a column of .*columns are \['text', 'topic'\]"
    ):
        load_split(DataSource(path=str(data), holdout_every=3, holdout_key="topik"), ("text",), "train", "t")


@pytest.mark.skipif(not (SHARED_DATA / "squad").exists(), reason="needs ../shared/data/squad (real data)")
def test_squad_dev_holds_out_whole_articles():
    path = SHARED_DATA / "squad" / "dev-v1.1.json"
    articles = json.loads(path.read_text())["data"]  # read independently, in file order
    source = DataSource(path=str(path), format="squad", holdout_key="title", holdout_every=10)
    train, validation = (
        load_split(source, SQUAD_FIELDS, split, "data.sources.qa", ("answer_starts",), ("answers",))
        for split in ("train", "validation")
    )
    questions = {a["title"]: sum(len(p["qas"]) for p in a["paragraphs"]) for a in articles}
    assert len(questions) == 48 and len(train) + len(validation) == sum(questions.values()) == 9_380
    held = [a["title"] for i, a in enumerate(articles) if i % 10 == 9]  # 4 whole articles
    assert list(dict.fromkeys(validation["title"])) == held
    assert len(validation) == sum(questions[t] for t in held)
    assert not set(train["title"]) & set(held)
    for split in (train, validation):
        for context, answers, starts in zip(
            split["context"], split["answers"], split["answer_starts"], strict=True
        ):
            assert len(answers) == len(starts) > 0
            assert all(context[s : s + len(t)] == t for t, s in zip(answers, starts, strict=True))


@pytest.mark.skipif(
    not (SHARED_DATA / "multi30k").exists(), reason="needs ../shared/data/multi30k (real data)"
)
def test_multi30k_aligned_train_and_validation_files():
    def files(split: str) -> dict[str, str]:
        return {lang: str(SHARED_DATA / "multi30k" / f"{split}.{lang}.gz") for lang in ("en", "de")}

    source = DataSource(
        path=files("train"), validation_path=files("val"), columns={"source": "en", "target": "de"}
    )
    train = load_split(source, ("source", "target"), "train", "data.sources.translate")
    assert len(train) == 29_000
    assert len(load_split(source, ("source", "target"), "validation", "data.sources.translate")) == 1_014


def test_a_column_can_reach_into_a_nested_record(tmp_path):
    data = tmp_path / "qa.jsonl"
    rows = [
        {"question": "Who?", "answers": {"text": ["Ann", "Ann B."], "start": [0, 0]}},
        {"question": "Where?", "answers": {"text": ["here"], "start": [3]}},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    source = DataSource(path=str(data), test_path=str(data), columns={"target": "answers.text"})
    loaded = load_split(source, ("question", "target"), "test", "data.sources.q", list_fields=("target",))
    assert loaded["target"] == [["Ann", "Ann B."], ["here"]] and loaded["question"] == ["Who?", "Where?"]
