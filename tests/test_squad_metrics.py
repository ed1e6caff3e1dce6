"""SQuAD v1.1 exact match and F1 equal the official evaluation script: hand-made cases worked out
by hand, and a set of predictions scored by an independent implementation of the script's algorithm
(written here from its published description: normalise, compare, best gold, mean x 100)."""

from __future__ import annotations

import math
import random
import re
import string

import pytest

from tasks.metrics import SquadScore, exact_match, normalize_answer, token_f1


def score(prediction: str, golds: list[str]) -> tuple[float, float]:
    metric = SquadScore()
    metric.update([prediction], [golds])
    result = metric.compute()
    return float(result["exact_match"]), float(result["f1"])


@pytest.mark.parametrize(
    ("prediction", "golds", "em", "f1"),
    [
        ("The Eiffel Tower", ["eiffel tower"], 1.0, 1.0),  # case and the article
        ("Denver Broncos!", ["Denver Broncos"], 1.0, 1.0),  # punctuation
        ("a banana, the theatre", ["banana theatre"], 1.0, 1.0),  # articles only as whole words
        ("an  apple\tpie ", ["apple pie"], 1.0, 1.0),  # whitespace collapsed
        ("Saint-Denis", ["SaintDenis"], 1.0, 1.0),  # punctuation is dropped, not made a space
        ("“quoted”", ["quoted"], 0.0, 0.0),  # only ASCII punctuation is stripped, as the script does
        ("the cat sat on the mat", ["a cat on a mat"], 0.0, 2 * 0.75 * 1.0 / 1.75),  # P 3/4, R 3/3
        ("1990 and 1991", ["in 1990", "1990 and 1991", "1991"], 1.0, 1.0),  # best of several golds
        ("New York", ["York", "New York City"], 0.0, 0.8),  # F1 from York: 2/3, New York City: 4/5
        ("", ["Denver"], 0.0, 0.0),  # empty prediction
        ("", ["the"], 1.0, 0.0),  # both normalise to nothing: equal, but no word in common
        ("the the", ["a"], 1.0, 0.0),
        ("red red red", ["red"], 0.0, 0.5),  # a word counts as often as both have it: P 1/3, R 1
    ],
)
def test_hand_made_cases(prediction, golds, em, f1):
    ours = score(prediction, golds)
    assert ours == pytest.approx((em, f1), abs=1e-6)


def test_normalisation_order_is_the_scripts():
    # punctuation goes before articles are matched: "the," still loses "the"; "a.b" becomes "ab"
    assert normalize_answer("The, end") == "end"
    assert normalize_answer("a.b") == "ab"
    assert exact_match("A", "an") == 1.0 and token_f1("A", "an") == 0.0


# ----- an independent implementation of the official v1.1 evaluation -----


def reference_normalize(text: str) -> str:
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def reference_f1(prediction: str, gold: str) -> float:
    predicted, remaining = reference_normalize(prediction).split(), reference_normalize(gold).split()
    gold_count, common = len(remaining), 0
    for word in predicted:  # each gold word can be matched once
        if word in remaining:
            remaining.remove(word)
            common += 1
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / gold_count
    return 2 * precision * recall / (precision + recall)


def reference_evaluate(dataset: list[dict], predictions: dict[str, str]) -> dict[str, float]:
    """The official script's shape: articles -> paragraphs -> qas, predictions by question id,
    percentages."""
    em = f1 = total = 0.0
    for article in dataset:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                total += 1
                golds = [a["text"] for a in qa["answers"]]
                prediction = predictions[qa["id"]]
                em += max(float(reference_normalize(prediction) == reference_normalize(g)) for g in golds)
                f1 += max(reference_f1(prediction, g) for g in golds)
    return {"exact_match": 100 * em / total, "f1": 100 * f1 / total}


WORDS = "The the a an A Denver Broncos 1990 Paris theatre banana Super Bowl 50 golden anniversary".split()
MARKS = ["", "", ",", ".", "!", "'s", " -", "(", ")", "“", "…"]


def phrase(rng: random.Random, most: int = 5) -> str:
    return " ".join(rng.choice(WORDS) + rng.choice(MARKS) for _ in range(rng.randint(0, most)))


def test_equals_an_independent_implementation_of_the_official_script():
    rng = random.Random(0)
    dataset, predictions, ours = [], {}, SquadScore()
    for a in range(6):
        paragraphs = []
        for p in range(4):
            qas = []
            for q in range(rng.randint(1, 6)):
                qid = f"{a}-{p}-{q}"
                golds = [phrase(rng, 4) or "Denver" for _ in range(rng.randint(1, 3))]
                # some predictions are a gold answer re-cased or re-punctuated, the rest random
                prediction = rng.choice(golds).upper() + "." if rng.random() < 0.3 else phrase(rng)
                qas.append({"id": qid, "answers": [{"text": g} for g in golds]})
                predictions[qid] = prediction
            paragraphs.append({"qas": qas})
        dataset.append({"paragraphs": paragraphs})
        ours.update(  # one update per article, as validation batches come
            [predictions[qa["id"]] for p in paragraphs for qa in p["qas"]],
            [[a["text"] for a in qa["answers"]] for p in paragraphs for qa in p["qas"]],
        )
    expected = reference_evaluate(dataset, predictions)
    result = {name: 100 * float(value) for name, value in ours.compute().items()}
    assert result == pytest.approx(expected, abs=1e-4)
    assert 5 < expected["exact_match"] < 95 and expected["f1"] > expected["exact_match"]  # not degenerate


def test_prefix_bad_input_and_nothing_scored():
    metric = SquadScore(prefix="baseline_")
    metric.update(["Paris"], [["paris", "Paris, France"]])
    assert {k: float(v) for k, v in metric.compute().items()} == {
        "baseline_exact_match": 1.0,
        "baseline_f1": 1.0,
    }
    with pytest.raises(ValueError, match="at least one gold answer"):
        metric.update(["Paris"], [[]])
    with pytest.raises(ValueError, match="2 predictions for 1"):
        metric.update(["a", "b"], [["a"]])
    with pytest.warns(UserWarning, match="before the ``update`` method"):
        assert all(math.isnan(float(v)) for v in SquadScore().compute().values())
