"""The overall score for sweeps (model.score): which task metrics it averages, with what weights,
and one clear message for a name that no task reports."""

from __future__ import annotations

import pytest
import torch

from datamodules.tokenizer import Tokenizer, TokenizerConfig
from modules.config import BackboneConfig
from modules.errors import UserError
from modules.model import MultiTaskModel
from tasks.mlm_nsp import MaskedLMNextSentence
from tasks.seq2seq import Seq2Seq

TINY = dict(d_model=32, n_heads=2, d_ff=64, encoder_layers=1, decoder_layers=1)


@pytest.fixture(scope="module")
def tokenizer(documents) -> Tokenizer:
    lines = [line for doc in documents for line in doc["text"].splitlines()]
    return Tokenizer.train(lines, TokenizerConfig(vocab_size=600), "seed corpus")


def model_with(tokenizer, score=None) -> MultiTaskModel:
    tasks = {
        "mlm": MaskedLMNextSentence(),  # judged by its loss: not in the default score
        "summarize": Seq2Seq(),  # ROUGE-L
        "qa": Seq2Seq(prefix="question with context", metrics=["squad"]),  # F1
    }
    return MultiTaskModel(tasks, BackboneConfig(**TINY), tokenizer=tokenizer, score=score)


def logged_score(model: MultiTaskModel, values: dict[tuple[str, str], float]) -> float | None:
    seen = {}
    model.log = lambda key, value, **_: seen.__setitem__(key, float(value))
    model._log_score("val", {key: torch.tensor(v) for key, v in values.items()})
    return seen.get("val/score")


VALUES = {
    ("mlm", "loss"): 6.0,
    ("mlm", "nsp_accuracy"): 0.6,
    ("summarize", "rougeL"): 0.2,
    ("summarize", "rouge1"): 0.3,
    ("qa", "f1"): 0.5,
    ("qa", "exact_match"): 0.4,
}


def test_default_score_is_the_mean_of_the_rising_main_metrics(tokenizer):
    model = model_with(tokenizer)
    assert set(model.score_weights) == {("summarize", "rougeL"), ("qa", "f1")}
    assert logged_score(model, VALUES) == pytest.approx((0.2 + 0.5) / 2)


def test_weighted_score_and_left_out_when_a_task_was_not_evaluated(tokenizer):
    model = model_with(tokenizer, {"summarize/rouge1": 1, "qa/exact_match": 3, "mlm/nsp_accuracy": 0})
    assert logged_score(model, VALUES) == pytest.approx((0.3 + 3 * 0.4) / 4)
    without_qa = {k: v for k, v in VALUES.items() if k[0] != "qa"}
    assert logged_score(model, without_qa) is None


@pytest.mark.parametrize(
    ("score", "message"),
    [
        ({"nope/f1": 1}, r"'nope/f1' is not '<task>/<metric>'"),
        ({"qa": 1}, r"'qa' is not '<task>/<metric>'"),
        ({"qa/f1": -1}, "must be >= 0"),
        ({"qa/f1": 0}, "at least one positive weight"),
    ],
)
def test_bad_score_settings_are_named(tokenizer, score, message):
    with pytest.raises(UserError, match=message):
        model_with(tokenizer, score)


def test_a_metric_no_task_reports_is_named_with_what_is_reported(tokenizer):
    model = model_with(tokenizer, {"qa/F1": 1})
    with pytest.raises(UserError, match=r"\['qa/F1'\], which no task reports; reported: .*'qa/f1'"):
        logged_score(model, VALUES)
