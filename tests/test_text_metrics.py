"""Text-generation metrics equal their reference implementations on the same strings: ROUGE
(every variant) Google's rouge-score, BLEU the sacrebleu package."""

from __future__ import annotations

import math
import random

import pytest
import sacrebleu
from rouge_score import rouge_scorer
from torchmetrics.text import SacreBLEUScore

from tasks.metrics import ROUGE_TYPES, RougeScore

WORDS = "the cat sat on a mat while dogs were running and barking at birds in trees".split()


def sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))).capitalize() + "."


def reference_scores(predictions: list[list[str]], references: list[list[list[str]]]) -> dict[str, float]:
    """The mean over examples of rouge-score's F-measure, best reference per type, with the
    sentences of each text joined by newlines (ROUGE-Lsum's sentence boundaries)."""
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, options in zip(predictions, references, strict=True):
        scores = [scorer.score("\n".join(ref), "\n".join(prediction)) for ref in options]
        for name in ROUGE_TYPES:
            totals[name] += max(s[name].fmeasure for s in scores)
    return {name: total / len(predictions) for name, total in totals.items()}


def test_rouge_equals_rouge_score_for_every_variant():
    rng = random.Random(0)
    predictions = [[sentence(rng) for _ in range(rng.randint(1, 3))] for _ in range(40)]
    references = [
        [[sentence(rng) for _ in range(rng.randint(1, 3))] for _ in range(rng.randint(1, 3))]
        for _ in range(40)
    ]
    metric = RougeScore()
    for start in range(0, 40, 16):  # several updates, as in validation batches
        metric.update(
            [" ".join(p) for p in predictions[start : start + 16]],
            [[" ".join(r) for r in refs] for refs in references[start : start + 16]],
        )
    ours = {name: float(value) for name, value in metric.compute().items()}
    expected = reference_scores(predictions, references)
    for name in ROUGE_TYPES:
        assert ours[name] == pytest.approx(expected[name], abs=1e-6), name
    assert ours["rougeLsum"] != pytest.approx(ours["rougeL"], abs=1e-4)  # sentences were split


def test_rouge_stems_and_prefixes():
    metric = RougeScore(prefix="baseline_")
    metric.update(["The dogs were running."], [["A dog runs."]])
    scores = metric.compute()
    assert set(scores) == {f"baseline_{name}" for name in ROUGE_TYPES}
    assert float(scores["baseline_rouge1"]) == pytest.approx(
        rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
        .score("A dog runs.", "The dogs were running.")["rouge1"]
        .fmeasure
    )
    assert float(scores["baseline_rouge1"]) > 0.5  # dogs/dog and running/runs match after stemming


def test_rouge_rejects_missing_references_and_reports_nothing_as_nan():
    metric = RougeScore()
    with pytest.raises(ValueError, match="at least one reference"):
        metric.update(["a summary"], [[]])
    with pytest.raises(ValueError, match="2 predictions for 1"):
        metric.update(["a", "b"], [["a"]])
    assert all(math.isnan(float(v)) for v in RougeScore().compute().values())


def test_bleu_equals_sacrebleu_on_single_reference_translations():
    """The BLEU that seq2seq validation logs (torchmetrics' SacreBLEUScore, 13a tokenisation, DDP-
    summable n-gram counts) is sacrebleu's corpus BLEU for one reference per sentence."""
    rng = random.Random(1)
    references = [sentence(rng) + " " + sentence(rng) for _ in range(60)]
    outputs = []
    for reference in references:
        words = reference.split()
        for _ in range(2):
            words[rng.randrange(len(words))] = rng.choice(WORDS)
        outputs.append(" ".join(words[: len(words) - rng.randint(0, 2)]))
    metric = SacreBLEUScore()
    metric.update(outputs[:30], [[r] for r in references[:30]])
    metric.update(outputs[30:], [[r] for r in references[30:]])
    expected = sacrebleu.corpus_bleu(outputs, [references]).score
    assert 20 < expected < 90  # a regime where every n-gram order matches
    assert 100 * float(metric.compute()) == pytest.approx(expected, abs=1e-3)
