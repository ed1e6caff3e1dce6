"""Evaluation metrics that torchmetrics does not have in the form our tasks need.

`RougeScore` is ROUGE through Google's `rouge-score` package, the reference implementation
(torchmetrics' copy fetches an NLTK model for ROUGE-Lsum at run time, which fails offline).

`EmbeddingRetrieval` ranks a corpus of embedded texts for every query and reports recall@k and
MRR@k. It follows the usual protocol of sentence-embedding benchmarks: the corpus is deduplicated
by text, the rank of a query is 1 + the number of irrelevant corpus items scored strictly higher
than its best relevant item, and a query's own text is never a candidate for itself.

`SquadScore` is SQuAD v1.1's exact match and token F1, computed as its official evaluation script
does, for extractive QA and for closed-book QA scored the same way.

`ClassificationScores` is accuracy, macro-F1 and per-class F1 over a whole split, through
torchmetrics' functional forms, for a label set that may only be known once training data are read.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from rouge_score import rouge_scorer
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score
from torchmetrics.utilities import dim_zero_cat

from tasks.sentences import split_sentences

RECALL_AT = (1, 5, 10)
MRR_AT = 10
QUERY_BLOCK = 1024  # queries scored at once: a (QUERY_BLOCK, corpus) similarity block in memory
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
ARTICLES = re.compile(r"\b(a|an|the)\b")
PUNCTUATION = frozenset(string.punctuation)


class EmbeddingRetrieval(Metric):
    """Recall@1/5/10 and MRR@10 of cosine-similarity retrieval.

    Every update adds queries and corpus items, each with a `key` and an `id` (integers unique
    across the split, so updates from different batches and processes fit together). A corpus item
    is relevant to a query when their keys are equal and their ids differ; items sharing an id are
    one text, kept once. Queries with no relevant item are left out.

    Example, each query's own paraphrase as gold: key = id of the paraphrase, query id = -1 (no
    text to exclude); labelled sentences: key = label, id = the sentence's own id.
    """

    full_state_update = False

    def __init__(self, prefix: str = "", **kwargs) -> None:
        """prefix: put before every result name (e.g. "baseline_")."""
        super().__init__(**kwargs)
        self.prefix = prefix
        for name in ("query", "query_key", "query_id", "corpus", "corpus_key", "corpus_id"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(
        self,
        query: Tensor,
        query_key: Tensor,
        query_id: Tensor,
        corpus: Tensor,
        corpus_key: Tensor,
        corpus_id: Tensor,
    ) -> None:
        """query (Q, D), query_key (Q,), query_id (Q,); corpus (C, D), corpus_key (C,), corpus_id (C,)."""
        self.query.append(F.normalize(query.detach().float(), dim=-1))
        self.corpus.append(F.normalize(corpus.detach().float(), dim=-1))
        self.query_key.append(query_key)
        self.query_id.append(query_id)
        self.corpus_key.append(corpus_key)
        self.corpus_id.append(corpus_id)

    def compute(self) -> dict[str, Tensor]:
        query, query_key, query_id = (dim_zero_cat(s) for s in (self.query, self.query_key, self.query_id))
        corpus, corpus_key, corpus_id = (
            dim_zero_cat(s) for s in (self.corpus, self.corpus_key, self.corpus_id)
        )
        order = torch.argsort(corpus_id, stable=True)
        first = torch.ones_like(order, dtype=torch.bool)
        first[1:] = corpus_id[order][1:] != corpus_id[order][:-1]
        keep = order[first]  # one corpus entry per distinct id
        corpus, corpus_key, corpus_id = corpus[keep], corpus_key[keep], corpus_id[keep]
        ranks = []
        for start in range(0, len(query), QUERY_BLOCK):
            stop = start + QUERY_BLOCK
            scores = query[start:stop] @ corpus.T  # (q, C)
            excluded = query_id[start:stop, None] == corpus_id[None, :]  # (q, C)
            relevant = (query_key[start:stop, None] == corpus_key[None, :]) & ~excluded
            best = scores.masked_fill(~relevant, float("-inf")).max(dim=1).values  # (q,)
            beaten = (scores > best[:, None]) & ~relevant & ~excluded
            answerable = relevant.any(dim=1)
            ranks.append((1 + beaten.sum(dim=1))[answerable])
        rank = torch.cat(ranks).float() if ranks else torch.zeros(0, device=self.device)
        scores = {f"recall@{k}": (rank <= k).float().mean() for k in RECALL_AT}
        scores[f"mrr@{MRR_AT}"] = torch.where(rank <= MRR_AT, 1 / rank, torch.zeros_like(rank)).mean()
        if rank.numel() == 0:  # no answerable query: the mean of nothing is NaN, say so
            scores = {name: torch.tensor(float("nan"), device=self.device) for name in scores}
        return {self.prefix + name: value for name, value in scores.items()}


class RougeScore(Metric):
    """ROUGE-1, ROUGE-2, ROUGE-L and ROUGE-Lsum F-measures with Porter stemming, averaged over
    examples, each example scored against its best reference (per ROUGE type, as rouge-score's
    `score_multi` does: summarization sets such as SciTLDR have several references).

    ROUGE-Lsum is the summary-level LCS over sentences, which rouge-score reads from newlines:
    predictions and references are split with `split_sentences` and joined by newlines first.
    Per-example scores are the states, so processes under DDP combine to the exact mean.
    """

    full_state_update = False

    def __init__(self, prefix: str = "", **kwargs) -> None:
        """prefix: put before every result name (e.g. "baseline_")."""
        super().__init__(**kwargs)
        self.prefix = prefix
        self.scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
        for name in ROUGE_TYPES:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
        """predictions: one text per example; references: one or more texts per example."""
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions for {len(references)} reference sets")
        for prediction, options in zip(predictions, references, strict=True):
            if not options:
                raise ValueError("every example needs at least one reference")
            best = self.scorer.score_multi([_lines(r) for r in options], _lines(prediction))
            for name in ROUGE_TYPES:
                getattr(self, name).append(torch.tensor([float(best[name].fmeasure)], device=self.device))

    def compute(self) -> dict[str, Tensor]:
        if isinstance(self.rouge1, list) and not self.rouge1:  # nothing scored (states synced
            # across processes are one tensor, never empty): the mean of nothing is NaN, say so
            return {
                self.prefix + name: torch.tensor(float("nan"), device=self.device) for name in ROUGE_TYPES
            }
        return {self.prefix + name: dim_zero_cat(getattr(self, name)).mean() for name in ROUGE_TYPES}


def _lines(text: str) -> str:
    """One sentence per line, the form rouge-score needs for ROUGE-Lsum."""
    return "\n".join(split_sentences(text))


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's normalisation, in the official script's order: lower-case, drop ASCII
    punctuation, replace the articles a / an / the by spaces, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in PUNCTUATION)
    return " ".join(ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, truth: str) -> float:
    """1.0 when the two normalised answers are equal (two answers that normalise to nothing are)."""
    return float(normalize_answer(prediction) == normalize_answer(truth))


def token_f1(prediction: str, truth: str) -> float:
    """Harmonic mean of precision and recall of the normalised words, each word counted as often as
    both share it; 0.0 when they share none (also when either is empty), as the official script."""
    predicted, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    shared = sum((Counter(predicted) & Counter(gold)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(predicted), shared / len(gold)
    return 2 * precision * recall / (precision + recall)


class SquadScore(Metric):
    """SQuAD v1.1 exact match and F1 ("exact_match", "f1"): each prediction scored against its best
    gold answer, averaged over questions; fractions in [0, 1] where the official script prints
    percentages. Sums and a count are the states, so processes under DDP add up to the exact mean."""

    full_state_update = False

    def __init__(self, prefix: str = "", **kwargs) -> None:
        """prefix: put before every result name (e.g. "baseline_")."""
        super().__init__(**kwargs)
        self.prefix = prefix
        for name in ("exact_match", "f1", "total"):
            self.add_state(name, default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
        """predictions: one answer per question; references: its gold answers (one or more)."""
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions for {len(references)} reference sets")
        if not all(references):
            raise ValueError("every question needs at least one gold answer")
        pairs = list(zip(predictions, references, strict=True))
        self.exact_match += sum(max(exact_match(p, gold) for gold in golds) for p, golds in pairs)
        self.f1 += sum(max(token_f1(p, gold) for gold in golds) for p, golds in pairs)
        self.total += len(pairs)

    def compute(self) -> dict[str, Tensor]:
        # no question scored: 0 / 0 is NaN, which says so
        return {
            self.prefix + "exact_match": self.exact_match / self.total,
            self.prefix + "f1": self.f1 / self.total,
        }


def metric_key(label: str) -> str:
    """A label as part of a metric name: runs of characters other than letters, digits, `.` and `-`
    become `_` (a `/` would open a new section in W&B)."""
    return re.sub(r"[^\w.-]+", "_", label)


class ClassificationScores(Metric):
    """Accuracy, macro-F1 and per-class F1 of a whole split (torchmetrics' functional forms).

    Predictions and targets are kept and scored at the end, when the label set is surely known (it
    may be learned from the training data after the model and its metrics are built); torchmetrics
    concatenates them across processes. Macro-F1 averages over the classes that occur among the
    targets or the predictions; per-class F1 is reported for those classes as `f1_<label>`.
    """

    full_state_update = False

    def __init__(self, labels: list[str], prefix: str = "", per_class: bool = True) -> None:
        super().__init__()
        self.labels, self.prefix, self.per_class = labels, prefix, per_class
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """preds, target: (B,) label ids"""
        self.preds.append(preds.long())
        self.target.append(target.long())

    def compute(self) -> dict[str, Tensor]:
        preds, target, n = dim_zero_cat(self.preds), dim_zero_cat(self.target), len(self.labels)
        scores = {
            f"{self.prefix}accuracy": multiclass_accuracy(preds, target, n, average="micro"),
            f"{self.prefix}f1": multiclass_f1_score(preds, target, n, average="macro"),
        }
        if self.per_class:
            per_class = multiclass_f1_score(preds, target, n, average="none")  # (n,)
            seen = torch.bincount(torch.cat([preds, target]), minlength=n) > 0
            for label, f1, occurs in zip(self.labels, per_class, seen.tolist(), strict=True):
                if occurs:
                    scores[f"{self.prefix}f1_{metric_key(label)}"] = f1
        return scores
