"""Classification: scores against a brute-force confusion matrix, `LABEL text` files and their errors,
Latin-1, label sets (given, learned, carried by the weights), bad labels, pair inputs and cutting,
a batch the model can overfit, and SST-2 / TREC read as the local overlays read them."""

from __future__ import annotations

import json
import logging

import datasets
import numpy as np
import pytest
import torch
import yaml

from datamodules import sources
from datamodules.datamodule import TaskCollator
from datamodules.padding import padding_mask
from datamodules.sources import DataSource, load_split
from datamodules.tokenizer import Tokenizer, TokenizerConfig
from modules.config import BackboneConfig
from modules.errors import UserError
from modules.model import MultiTaskModel
from tasks.base import batch_stack_sizes, batch_tokens
from tasks.classify import Classify, fit_pair, sorted_labels
from tasks.metrics import ClassificationScores

from .conftest import ROOT, SEED_CORPUS, SHARED_DATA

SST2, TREC = SHARED_DATA / "sst2", SHARED_DATA / "trec"
CONFIGS = ROOT / "experiments" / "configs"
LOCAL = CONFIGS / "local"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    lines = [
        line for doc in SEED_CORPUS.read_text().splitlines() for line in json.loads(doc)["text"].splitlines()
    ]
    return Tokenizer.train(lines, TokenizerConfig(vocab_size=1200), "seed corpus")


def build(task: Classify, columns: dict, tokenizer: Tokenizer, split: str = "train") -> list:
    raw = datasets.Dataset.from_dict(columns)  # tokenized as the data module does, raw columns replaced
    tokenized = raw.map(lambda b: task.tokenize(b, tokenizer), batched=True, remove_columns=raw.column_names)
    return task.build_examples(tokenized, tokenizer, split, seed=0)


def tiny_model(task: Classify, tokenizer: Tokenizer) -> MultiTaskModel:
    torch.manual_seed(0)
    backbone = BackboneConfig(
        d_model=32, n_heads=2, d_ff=64, encoder_layers=1, max_len=128, dropout=0.0, attention_dropout=0.0
    )
    return MultiTaskModel({"c": task}, backbone, tokenizer=tokenizer)


def test_the_collator_says_which_masks_hide_nothing(tokenizer):
    """Rows of equal length need no padding: the batch says so before it leaves the host, and the
    backbone then gets no mask (datamodules/padding.py); rows of unequal length keep theirs."""
    task = Classify(text_fields=["text"], labels=["no", "yes"], max_length=16)
    collate = TaskCollator({"c": task}, tokenizer)
    examples = build(
        task, {"text": ["the river", "the town", "a very long river ran on"], "label": ["yes"] * 3}, tokenizer
    )
    lengths = [len(a) for a, *_ in examples]
    same = [i for i in range(3) if lengths[i] == lengths[0]]
    assert len(same) >= 2 and len(set(lengths)) > 1, "the texts must give two equal lengths and one other"
    full = collate([("c", examples[i], 0) for i in same])
    assert full["unpadded"] == ("attention_mask",) and full["task"] == "c"
    assert padding_mask(full) is None
    padded = collate([("c", e, 0) for e in examples])
    assert padded["unpadded"] == () and padding_mask(padded) is padded["attention_mask"]
    # the real tokens are counted there too: throughput and MFU never read a (GPU) mask for them
    real = sum(lengths) + 2 * len(lengths)  # [CLS] text [SEP]
    assert (
        padded["real_tokens"]
        == {"attention_mask": real}
        == {"attention_mask": int(padded["attention_mask"].sum())}
    )
    unreadable = padded | {"attention_mask": torch.ones_like(padded["attention_mask"], device="meta")}
    width = padded["attention_mask"].size(1)
    assert batch_tokens(unreadable) == real and batch_stack_sizes(unreadable) == (real, width, 0, 0)


# ----- scores -----


def brute_force_scores(preds: list[int], target: list[int]) -> dict[str, float]:
    """Accuracy, per-class F1 (2 tp / (2 tp + fp + fn)) from a confusion matrix counted pair by pair,
    and macro-F1 over the classes that occur among targets or predictions (scikit-learn's default)."""
    classes = sorted(set(preds) | set(target))
    confusion = {(t, p): 0 for t in classes for p in classes}
    for p, t in zip(preds, target, strict=True):
        confusion[t, p] += 1
    scores = {"accuracy": sum(confusion[c, c] for c in classes) / len(target)}
    for c in classes:
        tp = confusion[c, c]
        fp = sum(confusion[t, c] for t in classes if t != c)
        fn = sum(confusion[c, p] for p in classes if p != c)
        scores[f"f1_{c}"] = 2 * tp / (2 * tp + fp + fn)
    scores["f1"] = sum(scores[f"f1_{c}"] for c in classes) / len(classes)
    return scores


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scores_equal_a_brute_force_confusion_matrix(seed):
    rng = np.random.default_rng(seed)
    labels = ["a", "b", "c", "d", "e"]
    target = rng.choice(4, size=120, p=[0.5, 0.3, 0.15, 0.05]).tolist()  # "e" never occurs
    preds = [t if rng.random() < 0.6 else int(rng.integers(4)) for t in target]
    preds[:3] = [3, 3, 3]  # "d" predicted more often than it occurs
    metric = ClassificationScores(labels)
    for start in range(0, 120, 50):  # several batches, as validation feeds them
        metric.update(torch.tensor(preds[start : start + 50]), torch.tensor(target[start : start + 50]))
    scores = {k: v.item() for k, v in metric.compute().items()}
    expected = brute_force_scores(preds, target)
    assert set(scores) == {"accuracy", "f1"} | {f"f1_{labels[c]}" for c in set(preds) | set(target)}
    assert scores["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-6)
    assert scores["f1"] == pytest.approx(expected["f1"], abs=1e-6)
    for c in set(preds) | set(target):
        assert scores[f"f1_{labels[c]}"] == pytest.approx(expected[f"f1_{c}"], abs=1e-6)


def test_task_scores_argmax_and_the_majority_baseline(tokenizer):
    task = Classify(labels=["x", "y", "z"])
    build(task, {"text": ["one", "two", "three", "four"], "label": ["y", "y", "x", "z"]}, tokenizer)
    metrics = task.metrics(tokenizer.vocab_size)
    torch.manual_seed(0)
    logits = torch.randn(40, 3)
    target = torch.randint(0, 3, (40,))
    for rows in (slice(0, 25), slice(25, 40)):
        task.update_metrics(metrics, {"logits": logits[rows]}, {"labels": target[rows]}, tokenizer)
    scores = {}
    for metric in metrics.values():
        value = metric.compute()
        scores.update(value if isinstance(value, dict) else {"loss": value})
    model = brute_force_scores(logits.argmax(-1).tolist(), target.tolist())
    assert scores["f1"].item() == pytest.approx(model["f1"], abs=1e-6)
    assert scores["accuracy"].item() == pytest.approx(model["accuracy"], abs=1e-6)
    baseline = brute_force_scores([1] * 40, target.tolist())  # "y" is the most frequent training label
    assert scores["baseline_accuracy"].item() == pytest.approx(baseline["accuracy"], abs=1e-6)
    assert scores["baseline_f1"].item() == pytest.approx(baseline["f1"], abs=1e-6)
    loss = torch.nn.functional.cross_entropy(logits, target)
    assert scores["loss"].item() == pytest.approx(loss.item(), abs=1e-5)


# ----- reading `LABEL text` files -----


def test_label_text_lines_with_and_without_a_label_pattern(tmp_path):
    data = tmp_path / "q.train"
    data.write_text("DESC:manner How did it  develop ?\n\nHUM:ind Who wrote it ?\r\nNUM:date When ?\n")
    fine = DataSource(path=str(data), format="label_text", holdout_every=3)
    rows = load_split(fine, ("text",), "train", "data.sources.c", ("label",))
    assert rows["label"] == ["DESC:manner", "HUM:ind"] and rows["text"] == [
        "How did it  develop ?",
        "Who wrote it ?",
    ]
    for pattern in ("^[^:]+", r"^(\w+):"):  # the match, or the first group when there is one
        coarse = DataSource(path=str(data), format="label_text", label_pattern=pattern, holdout_every=3)
        assert load_split(coarse, ("text",), "validation", "data.sources.c", ("label",))["label"] == ["NUM"]


@pytest.mark.parametrize(
    ("content", "settings", "message"),
    [
        ("1 fine text\n0\n", {}, r"bad.txt, line 2: expected `LABEL text`.*got '0'"),
        ("A:b first\nnocolon second\n", {"label_pattern": ":"}, r"bad.txt, line 2: label_pattern ':' finds no label in 'nocolon'"),
        ("1 text\n", {"label_pattern": "(["}, r"data.sources.c.label_pattern: '\(\[' is not a valid regex"),
        ("1 text\n", {"label_pattern": ".", "format": "text"}, r"data.sources.c.label_pattern applies to format: label_text only"),
        ("1 text\n", {"documents": "blank_line"}, r"data.sources.c: format label_text reads one example per line"),
    ],
)  # fmt: skip
def test_malformed_label_text_stops_naming_file_and_line(tmp_path, content, settings, message):
    data = tmp_path / "bad.txt"
    data.write_text(content)
    source = DataSource(path=str(data), validation_path=str(data), **({"format": "label_text"} | settings))
    with pytest.raises(UserError, match=message):
        load_split(source, ("text",), "train", "data.sources.c", ("label",))


def test_latin_1_files_decode_and_utf_8_names_the_line(tmp_path):
    data = tmp_path / "latin.txt"
    data.write_bytes("LOC:city A sister city ?\nHUM:ind Who is Gödel's café owner ?\n".encode("latin-1"))
    latin = DataSource(path=str(data), validation_path=str(data), format="label_text", encoding="latin-1")
    assert (
        load_split(latin, ("text",), "train", "data.sources.c", ("label",))["text"][1]
        == "Who is Gödel's café owner ?"
    )
    utf8 = DataSource(path=str(data), validation_path=str(data), format="label_text")
    with pytest.raises(
        UserError, match=r"latin.txt, line 2: not valid utf-8 \(byte 0xf6\); set the source's encoding"
    ):
        load_split(utf8, ("text",), "train", "data.sources.c", ("label",))


def test_hub_class_labels_arrive_as_their_names(monkeypatch):
    features = datasets.Features(
        {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["negative", "positive"])}
    )
    table = datasets.Dataset.from_dict(
        {"sentence": ["bad", "good", "fine"], "label": [0, 1, 1]}, features=features
    )
    monkeypatch.setattr(sources.datasets, "load_dataset", lambda *args, **kwargs: table)
    source = DataSource(hub="glue", hub_config="sst2", columns={"text": "sentence"})
    rows = load_split(source, ("text",), "train", "data.sources.c", ("label",))
    assert rows["label"] == ["negative", "positive", "positive"] and rows["text"] == ["bad", "good", "fine"]
    unlabelled = datasets.Dataset.from_dict({"sentence": ["a", "b"], "label": [-1, -1]}, features=features)
    monkeypatch.setattr(sources.datasets, "load_dataset", lambda *args, **kwargs: unlabelled)
    with pytest.raises(UserError, match="row 1: field 'label' is empty"):
        load_split(source, ("text",), "validation", "data.sources.c", ("label",))


# ----- label sets and bad labels -----


def test_learned_labels_are_sorted_and_ints_read_as_names(tokenizer):
    assert sorted_labels(["10", "2", "-1"]) == ["-1", "2", "10"]
    assert sorted_labels(["b", "10", "a"]) == ["10", "a", "b"]
    task = Classify()
    build(task, {"text": ["a", "b", "c", "d"], "label": [10, 2, 2, 0]}, tokenizer)
    assert task.labels == ["0", "2", "10"] and task.majority == "2"
    assert task.init_args()["labels"] == ["0", "2", "10"]
    assert Classify(labels=[0, 1]).labels == ["0", "1"]


def test_unknown_label_is_one_clear_error(tokenizer):
    task = Classify(labels=["neg", "pos"])
    build(task, {"text": ["good", "bad"], "label": ["pos", "neg"]}, tokenizer)
    with pytest.raises(
        UserError,
        match=r"validation data.*'meh' \(2x\), 'ok' \(1x\) outside the known labels \['neg', 'pos'\]",
    ):
        build(
            task,
            {"text": ["a", "b", "c", "d"], "label": ["meh", "pos", "ok", "meh"]},
            tokenizer,
            "validation",
        )
    learned = Classify()
    build(learned, {"text": ["good", "bad"], "label": ["pos", "neg"]}, tokenizer)
    with pytest.raises(
        UserError, match=r"test data.*'neutral' \(1x\).*list every label in the task's `labels`"
    ):
        build(learned, {"text": ["so so"], "label": ["neutral"]}, tokenizer, "test")
    with pytest.raises(UserError, match=r"train data of task Classify has a single label \['pos'\]"):
        build(Classify(), {"text": ["a", "b"], "label": ["pos", "pos"]}, tokenizer)


def test_a_class_missing_from_training_is_reported_not_fatal(tokenizer):
    task = Classify(labels=["neg", "neutral", "pos"])
    with pytest.warns(UserWarning, match=r"label\(s\) \['neutral'\] have no training example"):
        build(task, {"text": ["good", "bad", "fine"], "label": ["pos", "neg", "pos"]}, tokenizer)
    examples = build(task, {"text": ["so so"], "label": ["neutral"]}, tokenizer, "validation")
    assert task.collate(examples, [0], tokenizer)["labels"].tolist() == [1]


def test_bad_settings_are_refused():
    with pytest.raises(UserError, match="text_fields must be one or two distinct field names"):
        Classify(text_fields=["a", "b", "c"])
    with pytest.raises(UserError, match="labels must name at least 2 distinct labels"):
        Classify(labels=["x", "x"])
    with pytest.raises(UserError, match="label_smoothing must be in"):
        Classify(label_smoothing=1.0)


# ----- inputs -----


def test_pairs_get_segment_ids_and_cut_the_longer_text(tokenizer, caplog):
    task = Classify(text_fields=["text", "text_pair"], labels=["no", "yes"], max_length=12)
    columns = {
        "text": ["the river", "a very long first sentence that goes on and on for many words"],
        "text_pair": ["a town", "short"],
        "label": ["yes", "no"],
    }
    with caplog.at_level(logging.INFO):
        examples = build(task, columns, tokenizer)
    assert "Classify train: cut 1 of 2 inputs to max_length=12 tokens" in caplog.text
    batch = task.collate(examples, [0, 0], tokenizer)
    for row, (a, b, _) in enumerate(examples):
        expected_ids = [tokenizer.cls_id, *a, tokenizer.sep_id, *b, tokenizer.sep_id]
        n = len(expected_ids)
        assert batch["input_ids"][row, :n].tolist() == expected_ids
        assert batch["token_type_ids"][row].tolist() == [0] * (len(a) + 2) + [1] * (len(b) + 1) + [0] * (
            batch["input_ids"].shape[1] - n
        )
        assert batch["attention_mask"][row].sum() == n
    short = tokenizer.encode(["short"])[0]
    assert examples[1][1].tolist() == short and len(examples[1][0]) == 12 - 3 - len(short)
    assert batch["labels"].tolist() == [1, 0]


def bert_truncate(len_a: int, len_b: int, budget: int) -> tuple[int, int]:
    """BERT's truncate_seq_pair, one token at a time from the longer text."""
    while len_a + len_b > budget:
        if len_a > len_b:
            len_a -= 1
        else:
            len_b -= 1
    return len_a, len_b


def test_fit_pair_equals_berts_token_by_token_rule():
    for len_a in range(0, 14):
        for len_b in range(0, 14):
            for budget in range(1, 20):
                assert fit_pair(len_a, len_b, budget) == bert_truncate(len_a, len_b, budget), (
                    len_a,
                    len_b,
                    budget,
                )


# ----- the model -----


def test_a_small_batch_is_overfit(tokenizer):
    texts = ["the market town", "barges carried grain", "wool went downstream", "a bend of the river",
             "the port of kell", "old bridges stand", "rain on the hills", "bells at noon"]  # fmt: skip
    task = Classify(labels=["a", "b", "c", "d"], dropout=0.0)
    examples = build(task, {"text": texts, "label": list("abcdabcd")}, tokenizer)
    model = tiny_model(task, tokenizer)
    batch = task.collate(examples, [0] * len(examples), tokenizer) | {"task": "c"}
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        optimizer.zero_grad()
        task.loss(model(batch), batch)["loss"].backward()
        optimizer.step()
    metrics = task.metrics(tokenizer.vocab_size)
    model.eval()
    with torch.no_grad():
        task.update_metrics(metrics, model(batch), batch, tokenizer)
    assert metrics["scores"].compute()["accuracy"].item() == 1.0
    assert metrics["scores"].compute()["f1"].item() == 1.0


def test_learned_labels_travel_in_the_weights(tokenizer):
    task = Classify()
    examples = build(task, {"text": ["a b", "c d", "e f"], "label": ["z", "y", "y"]}, tokenizer)
    trained = tiny_model(task, tokenizer)
    batch = task.collate(examples, [0, 0, 0], tokenizer) | {"task": "c"}
    trained.eval()
    fresh_task = Classify()
    restored = tiny_model(fresh_task, tokenizer).eval()
    restored.load_state_dict(trained.state_dict())
    assert fresh_task.labels == ["y", "z"]
    torch.testing.assert_close(restored(batch)["logits"], trained(batch)["logits"])
    records = fresh_task.predict(restored(batch), batch, tokenizer)
    assert records[0]["text"] == "a b" and set(records[0]["probabilities"]) == {"y", "z"}
    assert records[0]["label"] == max(records[0]["probabilities"], key=records[0]["probabilities"].get)
    with pytest.raises(
        UserError, match=r"trained on labels \['y', 'z'\], but the task's labels are \['n', 'p'\]"
    ):
        tiny_model(Classify(labels=["n", "p"]), tokenizer).load_state_dict(trained.state_dict())


def test_learned_labels_reach_a_model_built_first(tokenizer):
    task = Classify()
    model = tiny_model(task, tokenizer)
    assert model.heads["c"].classify is None
    examples = build(task, {"text": ["a b", "c d", "e f"], "label": ["q", "p", "r"]}, tokenizer)
    batch = task.collate(examples, [0, 0, 0], tokenizer) | {"task": "c"}
    assert model(batch)["logits"].shape == (3, 3) and batch["labels"].tolist() == [1, 0, 2]


# ----- real data, read as the local overlays read it -----


def overlay_source(config: str, task: str, **paths) -> DataSource:
    """The task's source as `--config configs/<config> --config configs/local/<overlay>` resolves it."""
    base, overlay = (
        yaml.safe_load(path.read_text())["data"]["sources"][task]
        for path in (CONFIGS / config, LOCAL / f"{task}.yaml")
    )
    return DataSource(**(base | overlay | paths))


@pytest.mark.skipif(not SST2.exists(), reason="needs ../shared/data/sst2 (real data)")
def test_sst2_files_read_as_label_text():
    source = overlay_source(
        "classify_sst2.yaml",
        "sst2",
        path=str(SST2 / "stsa.binary.train"),
        validation_path=str(SST2 / "stsa.binary.dev"),
        test_path=str(SST2 / "stsa.binary.test"),
    )
    sizes = {}
    for split in ("train", "validation", "test"):
        rows = load_split(source, ("text",), split, "data.sources.sst2", ("label",))
        assert set(rows["label"]) == {"0", "1"}
        sizes[split] = len(rows)
    assert sizes == {"train": 6920, "validation": 872, "test": 1821}


@pytest.mark.skipif(not TREC.exists(), reason="needs ../shared/data/trec (real data)")
def test_trec_files_read_as_coarse_labels_in_latin_1():
    source = overlay_source(
        "classify_trec.yaml", "trec", path=str(TREC / "TREC.train"), test_path=str(TREC / "TREC.test")
    )
    train = load_split(source, ("text",), "train", "data.sources.trec", ("label",))
    validation = load_split(source, ("text",), "validation", "data.sources.trec", ("label",))
    assert set(train["label"]) == {"ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"}
    assert len(train) + len(validation) == 5452 and len(validation) == 545
    assert any("sister\u00f0city" in text for text in [*train["text"], *validation["text"]])
    as_utf8 = DataSource(**(vars(source) | {"encoding": "utf-8"}))
    with pytest.raises(UserError, match=r"TREC.train, line 66: not valid utf-8"):
        load_split(as_utf8, ("text",), "train", "data.sources.trec", ("label",))
