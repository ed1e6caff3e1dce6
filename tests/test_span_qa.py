"""Extractive QA: tokenizer offsets round-trip any text; windows and offsets map gold spans back to
the exact answer text (answers near and across window edges included); the span search obeys its
constraints; bad answers are counted, not fatal; a tiny model overfits a few questions to EM 1.0."""

from __future__ import annotations

import json
import random
import re

import datasets
import pytest
import torch

from datamodules.sources import DataSource, load_split
from datamodules.tokenizer import Tokenizer, TokenizerConfig
from modules.config import BackboneConfig
from modules.errors import UserError
from modules.model import MultiTaskModel
from modules.optim import OptimizerConfig
from tasks.metrics import SquadScore
from tasks.span_qa import NOT_HERE, SpanQA, answer_text, best_spans, max_context

from .conftest import SHARED_DATA

SQUAD = SHARED_DATA / "squad" / "dev-v1.1.json"
TINY = dict(d_model=64, n_heads=4, d_ff=128, encoder_layers=2, max_len=64, dropout=0.0, attention_dropout=0.0)


@pytest.fixture(scope="module")
def tokenizer(documents) -> Tokenizer:
    lines = [line for doc in documents for line in doc["text"].splitlines()]
    return Tokenizer.train(lines, TokenizerConfig(vocab_size=1000), "seed corpus")


def questions(task: SpanQA, columns: dict, tokenizer: Tokenizer, split: str) -> list:
    tokenized = datasets.Dataset.from_dict(columns).map(lambda b: task.tokenize(b, tokenizer), batched=True)
    return task.build_examples(tokenized, tokenizer, split, seed=0)


def gold_logits(batch: dict) -> dict:
    """Start / end logits that are one-hot on each window's training target (what a perfect model
    outputs), padding at -inf as the task's forward leaves it."""
    shape, padding = batch["input_ids"].shape, batch["attention_mask"] == 0
    rows = torch.arange(shape[0])
    outputs = {}
    for name, target in (("start_logits", "start_positions"), ("end_logits", "end_positions")):
        logits = torch.full(shape, -10.0)
        logits[rows, batch[target]] = 10.0
        outputs[name] = logits.masked_fill(padding, float("-inf"))
    return outputs


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_offsets_tile_arbitrary_text(documents, model_type):
    lines = [line for doc in documents for line in doc["text"].splitlines()]
    tok = Tokenizer.train(lines, TokenizerConfig(vocab_size=800, model_type=model_type), "seed corpus")
    rng = random.Random(0)
    alphabet = "ab cdé日本🐝\t\n  ,.ßΣ\u0301xyz"
    texts = ["  Two  spaces, tabs\tand ünïcödé — plus 日本語 and an emoji 🐝 at 12:30!  ", "", " "]
    texts += lines[:20] + [
        "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))) for _ in range(300)
    ]
    for text, (ids, spans) in zip(texts, tok.encode_with_offsets(texts), strict=True):
        assert ids == tok.encode([text])[0]
        assert len(spans) == len(ids)
        assert "".join(text[s:e] for s, e in spans) == text  # in order, no gap, no overlap
        assert all(s <= e for s, e in spans)


def test_lowercase_offsets_point_into_the_original_text(documents):
    lines = [line for doc in documents for line in doc["text"].splitlines()]
    tok = Tokenizer.train(lines, TokenizerConfig(vocab_size=800, lowercase=True), "seed corpus")
    text = "We visit  İSTANBUL and Marrowby, TWICE."  # İ lower-cases to two characters
    ids, spans = tok.encode_with_offsets([text])[0]
    assert ids == tok.encode([text])[0]
    assert spans[0][0] == 0 and spans[-1][1] == len(text) and all(0 <= s <= e <= len(text) for s, e in spans)
    task = SpanQA(max_length=48, stride=16, max_question_length=8)
    for answer in ("İSTANBUL", "Marrowby", "TWICE"):
        start = text.index(answer)
        columns = {"id": ["q"], "question": ["Where?"], "context": [text], "answers": [[answer]]}
        ((question, starts),) = questions(task, columns | {"answer_starts": [[start]]}, tok, "validation")
        batch = task.collate([(question, starts)], [0], tok)
        assert task.answers(gold_logits(batch), batch)[0][0] == answer


def word_answers(context: str) -> list[tuple[str, int]]:
    """Every run of one to three words of the context, as (text, answer_start)."""
    found = []
    for words in (1, 2, 3):
        pattern = re.compile(r"(?=\b(\w+" + r"[ ,]+\w+" * (words - 1) + r")\b)")
        found += [(m.group(1), m.start(1)) for m in pattern.finditer(context)]
    return found


def test_gold_spans_come_back_exactly_from_every_window(documents, tokenizer):
    """Every 1-3 word answer of a context read in many windows: one-hot logits on the window targets
    give back the exact text, including answers at window edges and across them (those are learned
    and found in the window that holds them whole; the windows they cross point at [CLS])."""
    context = " ".join(documents[0]["text"].split("\n")[:2])
    task = SpanQA(max_length=40, stride=12, max_question_length=8, max_answer_length=30)
    answers = word_answers(context)
    columns = {
        "id": [f"q{i}" for i in range(len(answers))],
        "question": ["Which words are these?"] * len(answers),
        "context": [context] * len(answers),
        "answers": [[text] for text, _ in answers],
        "answer_starts": [[start] for _, start in answers],
    }
    examples = questions(task, columns, tokenizer, "validation")
    assert len(examples[0][1]) > 5  # the context spans many windows
    batch = task.collate(examples, [0] * len(examples), tokenizer)
    predicted = [text for text, _ in task.answers(gold_logits(batch), batch)]
    assert predicted == [text for text, _ in answers]
    # where each answer lies relative to the windows of its question
    crossing = at_edge = 0
    for (question, starts), _ in zip(examples, answers, strict=True):
        first, last = question.answer
        room = task.room(question)
        holding = [s for s in starts if s <= first and last < s + room]
        assert holding, "some window holds every short answer whole"
        crossing += any(s <= first < s + room <= last for s in starts)
        at_edge += any(first == s or last == s + room - 1 for s in holding)
    assert crossing > 20 and at_edge > 20
    # rows of windows that cross the answer are trained to point at [CLS]
    train = questions(task, columns, tokenizer, "train")
    rows = task.collate(train, [0] * len(train), tokenizer)
    held = rows["start_positions"] != NOT_HERE
    assert held.any() and (~held).any() and torch.equal(held, rows["end_positions"] != NOT_HERE)
    assert (rows["end_positions"] >= rows["start_positions"]).all()
    inside = rows["token_index"][torch.arange(len(held)), rows["start_positions"]][held]
    assert (inside >= 0).all()  # targets point into the context, never at the question


def test_window_layout(tokenizer):
    task = SpanQA(max_length=24, stride=5, max_question_length=6)
    context = (
        "The barge crews were known for their long poles and their habit of singing the names of each bend."
    )
    ((question, starts),) = questions(
        task, {"id": ["q"], "question": ["Who sang?"], "context": [context]}, tokenizer, "predict"
    )
    n, room = len(question.context_ids), task.room(question)
    assert starts == list(range(0, n - room + 5, 5)) and starts[-1] + room >= n > starts[-2] + room
    batch = task.collate([(question, starts)], [0], tokenizer)
    q = len(question.question_ids)
    for row in range(len(starts)):
        ids, types = batch["input_ids"][row], batch["token_type_ids"][row]
        real = int(batch["attention_mask"][row].sum())
        assert (
            ids[0] == tokenizer.cls_id
            and ids[q + 1] == tokenizer.sep_id
            and ids[real - 1] == tokenizer.sep_id
        )
        assert (types[: q + 2] == 0).all() and (types[q + 2 : real] == 1).all()
        context_positions = (batch["token_index"][row] >= 0).nonzero().flatten()
        assert context_positions.tolist() == list(range(q + 2, real - 1))  # not the question, nor [SEP]
    assert (batch["question_index"] == 0).all()


def test_best_span_search_equals_brute_force():
    torch.manual_seed(0)
    rows, length, longest = 6, 12, 4
    start, end = torch.randn(rows, length), torch.randn(rows, length)
    context = torch.zeros(rows, length, dtype=torch.bool)
    for r in range(rows):
        context[r, 3 + r % 3 : length - 1 - r % 2] = True
    start_ok = context & (torch.rand(rows, length) < 0.7)
    start_ok[:, 5] = True  # every row keeps an allowed start inside its context
    scores, firsts, lasts = best_spans(start, end, start_ok, context, longest)
    for r in range(rows):
        candidates = [
            (float(start[r, i] + end[r, j]), i, j)
            for i in range(length)
            for j in range(i, min(i + longest, length))
            if start_ok[r, i] and context[r, j]
        ]
        best = max(candidates)
        assert (float(scores[r]), int(firsts[r]), int(lasts[r])) == pytest.approx(best)


@pytest.mark.parametrize(
    "starts, lengths", [([0, 4, 8], [10, 10, 5]), ([0, 3, 6, 9], [8, 8, 8, 3]), ([0], [7])]
)
def test_max_context_gives_each_token_its_most_central_window(starts, lengths):
    flags = max_context(starts, lengths)
    for token in range(max(s + n for s, n in zip(starts, lengths, strict=True))):
        holding = [w for w, (s, n) in enumerate(zip(starts, lengths, strict=True)) if s <= token < s + n]
        score = {
            w: min(token - starts[w], starts[w] + lengths[w] - 1 - token) + 0.01 * lengths[w] for w in holding
        }
        chosen = [w for w in holding if flags[w][token - starts[w]]]
        assert chosen == [min(w for w in holding if score[w] == max(score.values()))]


def test_evaluation_starts_answers_only_where_the_window_gives_most_context(tokenizer):
    """A start token seen at a window's edge is not trusted there: its high logit in that window loses
    to the span read in the window where the token sits centrally."""
    task = SpanQA(max_length=32, stride=8, max_question_length=8)
    context = " ".join(f"word{i}" for i in range(60))
    columns = {
        "id": ["q"],
        "question": ["Which word?"],
        "context": [context],
        "answers": [[]],
        "answer_starts": [[]],
    }
    ((question, starts),) = questions(task, columns, tokenizer, "predict")
    assert len(starts) > 2
    batch = task.collate([(question, starts)], [0], tokenizer)
    assert (batch["max_context"] <= (batch["token_index"] >= 0)).all()
    covered = batch["token_index"][batch["max_context"]]
    assert sorted(covered.tolist()) == list(range(len(question.context_ids)))  # each token once
    start_logits = torch.zeros(batch["input_ids"].shape)
    end_logits = torch.zeros(batch["input_ids"].shape)
    edge_row = 1
    edge = (batch["token_index"][edge_row] >= 0).nonzero().flatten()[-1]  # last context token of window 1
    assert not batch["max_context"][edge_row, edge]
    start_logits[edge_row, edge] = 10.0  # a loud start, but at the window's edge
    token = int(batch["token_index"][edge_row, edge])
    home = next(
        r for r in range(len(starts)) if ((batch["token_index"][r] == token) & batch["max_context"][r]).any()
    )
    position = (batch["token_index"][home] == token).nonzero().flatten()[0]
    start_logits[home, position] = end_logits[home, position] = 1.0
    ((answer, score),) = task.answers({"start_logits": start_logits, "end_logits": end_logits}, batch)
    assert score == pytest.approx(2.0)
    assert answer == answer_text(question, token, token)


def test_bad_answers_are_counted_and_left_out_of_training(tokenizer):
    task = SpanQA(max_length=48, stride=16, max_question_length=8)
    context = "Marrowby is a market town on the River Tallow."
    columns = {
        "id": ["good", "moved", "absent"],
        "question": ["What is it?", "Which river?", "Why?"],
        "context": [context] * 3,
        "answers": [["market town", "a market town"], ["River Tallow"], []],
        "answer_starts": [[14, 12], [3], []],  # "River Tallow" is at 30, not 3
    }
    with pytest.warns(
        UserWarning, match=r"train: 1 of 3 answers not found .* question 'moved'\); 2 questions"
    ):
        train = questions(task, columns, tokenizer, "train")
    assert {q.id for q, _ in train} == {"good"}
    with pytest.warns(UserWarning, match="1 questions without a usable answer left out of scoring"):
        scored = questions(task, columns, tokenizer, "validation")
    assert [q.id for q, _ in scored] == ["good", "moved"]  # a misplaced answer is still a gold text
    assert scored[0][0].references == ["market town", "a market town"]


def test_missing_question_or_context_is_a_clear_error(tmp_path):
    task = SpanQA()
    squad = {
        "data": [
            {"title": "T", "paragraphs": [{"context": "Some text.", "qas": [{"id": "1", "answers": []}]}]}
        ]
    }
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(squad), encoding="utf-8")
    source = DataSource(path=str(path), format="squad")
    with pytest.raises(UserError, match=r"qas\[0\].*question"):
        load_split(source, task.fields, "train", "data.sources.qa", task.value_fields)
    rows = tmp_path / "qa.jsonl"
    rows.write_text(
        '{"id": "1", "question": "Why?", "context": "Because.", "answers": [], "answer_starts": []}\n'
        '{"id": "2", "question": "How?", "context": "", "answers": [], "answer_starts": []}\n',
        encoding="utf-8",
    )
    with pytest.raises(UserError, match=r"qa.jsonl, line 2: field 'context' is empty"):
        load_split(DataSource(path=str(rows)), task.fields, "train", "data.sources.qa", task.value_fields)


def test_bad_settings_name_the_setting():
    with pytest.raises(
        UserError, match=r"stride must be in \[1, max_length - max_question_length - 3 = 61\]"
    ):
        SpanQA(max_length=128, max_question_length=64, stride=100)
    with pytest.raises(UserError, match="max_answer_length"):
        SpanQA(max_answer_length=0)
    with pytest.raises(UserError, match="exceeds model.backbone.max_len=64"):
        SpanQA(max_length=128, stride=32).build_head(BackboneConfig(vocab_size=50, max_len=64))


def test_overfits_a_few_questions_to_exact_match(documents, tokenizer):
    """Four questions over contexts longer than one window: a tiny model trained on their windows
    answers all four exactly, and predict names them by id."""
    task = SpanQA(max_length=40, stride=12, max_question_length=8, max_answer_length=8)
    contexts = [" ".join(doc["text"].split()[:45]) for doc in documents[:4]]
    picks = [answers[len(answers) // (2 + i)] for i, answers in enumerate(map(word_answers, contexts))]
    columns = {
        "id": [f"q{i}" for i in range(4)],
        "question": ["What is the answer?"] * 4,
        "context": contexts,
        "answers": [[text] for text, _ in picks],
        "answer_starts": [[start] for _, start in picks],
    }
    train = questions(task, columns, tokenizer, "train")
    evaluation = questions(task, columns, tokenizer, "validation")
    assert len(train) > 8  # several windows per question
    torch.manual_seed(0)
    model = MultiTaskModel(
        {"qa": task}, BackboneConfig(**TINY), OptimizerConfig(lr=3e-3, warmup=0.0), tokenizer
    )
    batch = task.collate(train, [0] * len(train), tokenizer) | {"task": "qa"}
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(200):
        optimizer.zero_grad()
        task.loss(model(batch), batch)["loss"].backward()
        optimizer.step()
    model.eval()
    eval_batch = task.collate(evaluation, [0] * 4, tokenizer) | {"task": "qa"}
    metrics = task.metrics(tokenizer.vocab_size)
    with torch.no_grad():
        outputs = model(eval_batch)
        task.update_metrics(metrics, outputs, eval_batch, tokenizer)
        records = task.predict(outputs, eval_batch, tokenizer)
    scores = metrics.compute()
    assert float(scores["exact_match"]) == 1.0, records
    assert float(scores["baseline_exact_match"]) == 0.0 and float(scores["loss"]) < 0.1
    assert [(r["id"], r["answer"]) for r in records] == [(f"q{i}", t) for i, (t, _) in enumerate(picks)]
    assert all(set(r) == {"id", "answer", "score"} and isinstance(r["score"], float) for r in records)


@pytest.mark.skipif(not SQUAD.exists(), reason=f"needs {SQUAD} (SQuAD v1.1 dev, real data)")
def test_gold_spans_of_real_squad_come_back(tmp_path):
    """On SQuAD's own contexts (held-out articles, by title), gold spans mapped to windows and back
    reproduce the gold answers: exact match is 1 but for answers that are part of a piece."""
    source = DataSource(
        path=str(SQUAD), format="squad", holdout_every=2, holdout_key="title", max_examples=1100
    )
    task = SpanQA(max_length=128, stride=48)
    train = load_split(source, task.fields, "train", "qa", task.value_fields)
    tok = Tokenizer.train(
        [*dict.fromkeys(train["context"]), *train["question"]], TokenizerConfig(vocab_size=2000), "squad"
    )
    held_out = load_split(source, task.fields, "validation", "qa", task.value_fields)
    assert set(held_out["context"]).isdisjoint(set(train["context"]))
    tokenized = held_out.map(
        lambda b: task.tokenize(b, tok), batched=True, remove_columns=held_out.column_names
    )
    examples = task.build_examples(tokenized, tok, "validation", seed=0)
    assert len(examples) > 100 and max(len(starts) for _, starts in examples) > 1
    metric = SquadScore()
    for i in range(0, len(examples), 64):
        batch = task.collate(examples[i : i + 64], [0] * 64, tok)
        metric.update(
            [text for text, _ in task.answers(gold_logits(batch), batch)],
            [[q.references[0]] for q in batch["questions"]],
        )
    assert float(metric.compute()["exact_match"]) > 0.98
