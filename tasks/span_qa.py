"""Extractive question answering (BERT on SQuAD): the answer is a span of the context.

The input is `[CLS] question [SEP] context [SEP]`, segment 0 up to the first [SEP] and 1 after it.
A context too long for `max_length` is read in overlapping windows whose starts lie `stride`
context tokens apart, each with the whole question. A head scores every token as the answer's
start and as its end.

Training: one example per window. Its target is the gold span when the window holds all of it,
else [CLS] (position 0): BERT's way of saying "not in this window", so an answer that crosses a
window's edge is learned from the window that holds it whole.

Evaluation and predict: all windows of a question go into one batch; the answer is the span with
the highest start + end logit over every window, end >= start, at most `max_answer_length` tokens,
inside the context, starting at a token read in its window of most context (BERT's rule: a token
near a window's edge is judged from the window where it sits most centrally, see `max_context`). Its characters are cut from the original context through the tokenizer's
offsets, so the answer is the context's own text. Scored with SQuAD v1.1 exact match and F1
against every gold answer, next to the lead-1 baseline: the context's first sentence as the answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import zip_longest

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torchmetrics import MeanMetric, MetricCollection

from datamodules.padding import padding_mask
from datamodules.tokenizer import Tokenizer
from modules.backbone import Backbone
from modules.config import BackboneConfig
from modules.errors import UserError
from modules.heads import SpanHead
from tasks.base import Task, check_fits_positions
from tasks.metrics import SquadScore
from tasks.sentences import split_sentences

NOT_HERE = 0  # the [CLS] position: the target of a window that does not hold the whole answer


@dataclass
class Question:
    """One question with its tokenized context: all that training targets, answer extraction and
    scoring need."""

    id: str
    context: str
    question_ids: np.ndarray  # (Q,) int32, cut to max_question_length
    context_ids: np.ndarray  # (C,) int32
    spans: np.ndarray  # (C, 2) int32: the context characters [start, end) each piece stands for
    references: list[str]  # every gold answer text (scoring); empty for predict inputs
    lead: str  # the baseline's answer
    answer: tuple[int, int] | None  # the trained answer as context pieces (first, last); None: none usable


@dataclass
class Report:
    """What building one split's examples found, reported once."""

    questions: int = 0
    windows: int = 0
    answers: int = 0
    bad_answers: int = 0
    first_bad: str | None = None  # id of the first question with an answer not found in its context
    left_out: int = 0
    cut_questions: int = 0


def token_span(spans: np.ndarray, start: int, end: int) -> tuple[int, int]:
    """Context characters [start, end) -> (first, last) piece holding part of them. The spans are in
    order and never overlap (whitespace between them may belong to no piece), so both are binary
    searches."""
    first = int(np.searchsorted(spans[:, 1], start, side="right"))  # first piece ending after start
    last = int(np.searchsorted(spans[:, 0], end, side="left")) - 1  # last piece starting before end
    return first, last


def answer_text(question: Question, first: int, last: int) -> str:
    """Context pieces first..last -> their characters of the original context. Pieces carry the space
    before a word ("▁word"), so the text is stripped."""
    return question.context[question.spans[first, 0] : question.spans[last, 1]].strip()


def max_context(starts: list[int], lengths: list[int]) -> list[list[bool]]:
    """For windows of one context (window w holds tokens starts[w] .. starts[w] + lengths[w] - 1):
    per window and token of it, whether this window gives that token its most context, i.e. the
    largest min(tokens left of it, tokens right of it) + 0.01 x window length, the first window
    winning ties (BERT's `_check_is_max_context`). Each token has exactly one such window."""
    best: dict[int, tuple[float, int]] = {}  # token -> (score, window)
    for w, (start, length) in enumerate(zip(starts, lengths, strict=True)):
        for token in range(start, start + length):
            score = min(token - start, start + length - 1 - token) + 0.01 * length
            if token not in best or score > best[token][0]:
                best[token] = (score, w)
    return [
        [best[token][1] == w for token in range(start, start + length)]
        for w, (start, length) in enumerate(zip(starts, lengths, strict=True))
    ]


def best_spans(
    start_logits: Tensor, end_logits: Tensor, start_ok: Tensor, end_ok: Tensor, max_answer_length: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The best span of each row: (score (R,), first (R,), last (R,)) positions, where score =
    start + end logit, the first position allowed by start_ok and the last by end_ok (both (R, T)
    bool) and 0 <= last - first < max_answer_length. Every pair is scored at once: (R, T, T) floats."""
    length = start_logits.size(1)
    position = torch.arange(length, device=start_logits.device)
    width = position[None, :] - position[:, None]  # (T, T): last - first
    allowed = (width >= 0) & (width < max_answer_length)  # (T, T)
    allowed = allowed[None] & start_ok[:, :, None] & end_ok[:, None, :]  # (R, T, T)
    scores = (start_logits[:, :, None] + end_logits[:, None, :]).masked_fill(~allowed, float("-inf"))
    best = scores.flatten(1).max(dim=1)  # over all (first, last) pairs of a row
    return best.values, best.indices // length, best.indices % length


class SpanQA(Task):
    """Extractive QA on SQuAD-style data (see the module docstring). Fields: `id`, `question`,
    `context`, and for training and scoring `answers` (texts) with `answer_starts` (their first
    characters in the context), as the `format: squad` source gives them."""

    stacks = "encoder"
    special_tokens = ("pad", "cls", "sep")
    fields = ("id", "question", "context")
    value_fields = ("answers", "answer_starts")  # may be empty: counted and left out, not an error

    def __init__(
        self,
        max_length: int = 384,
        stride: int = 128,
        max_question_length: int = 64,
        max_answer_length: int = 30,
        loss_weight: float = 1.0,
    ) -> None:
        """
        max_length: tokens per window, [CLS], question, both [SEP] and context together.
        stride: context tokens between the starts of consecutive windows of a long context (BERT's
            doc_stride); at most the context room max_length - max_question_length - 3, so windows
            overlap (or touch) and together cover the whole context.
        max_question_length: question tokens kept; longer questions are cut and counted.
        max_answer_length: most tokens of a predicted answer.
        """
        super().__init__(loss_weight)
        room = max_length - max_question_length - 3
        if max_question_length < 1 or room < 1:
            raise UserError(
                f"SpanQA needs max_question_length >= 1 and max_length ({max_length}) > "
                f"max_question_length ({max_question_length}) + 3, leaving room for context tokens"
            )
        if not 1 <= stride <= room:
            raise UserError(
                f"SpanQA stride must be in [1, max_length - max_question_length - 3 = {room}] so the "
                f"windows cover the whole context, got {stride}"
            )
        if max_answer_length < 1:
            raise UserError(f"SpanQA max_answer_length must be at least 1, got {max_answer_length}")
        self.max_length, self.stride = max_length, stride
        self.max_question_length, self.max_answer_length = max_question_length, max_answer_length

    def init_args(self) -> dict:
        return {
            "max_length": self.max_length,
            "stride": self.stride,
            "max_question_length": self.max_question_length,
            "max_answer_length": self.max_answer_length,
            "loss_weight": self.loss_weight,
        }

    @property
    def monitor(self) -> tuple[str, str]:
        return "f1", "max"

    def build_head(self, config: BackboneConfig) -> nn.Module:
        check_fits_positions(config, self.max_length, "SpanQA.max_length")
        if config.type_vocab_size == 1:
            raise UserError(
                "SpanQA marks question and context as segments 0 and 1: set model.backbone.type_vocab_size "
                "to 2 (or 0 for no segments)"
            )
        return SpanHead(config)

    # ----- data -----

    def tokenize(self, batch: dict[str, list], tokenizer: Tokenizer) -> dict[str, list]:
        contexts = tokenizer.encode_with_offsets(batch["context"])
        out = {
            "id": batch["id"],
            "context": batch["context"],
            "question_ids": tokenizer.encode(batch["question"]),
            "context_ids": [ids for ids, _ in contexts],
            "context_spans": [spans for _, spans in contexts],
        }
        if "answers" in batch:
            out["answers"], out["answer_starts"] = batch["answers"], batch["answer_starts"]
        return out

    def room(self, question: Question) -> int:
        """Context tokens per window of this question."""
        return self.max_length - len(question.question_ids) - 3

    def window_starts(self, question: Question) -> list[int]:
        """First context token of every window: 0, stride, 2 stride, ... until one reaches the end."""
        return list(
            range(0, max(len(question.context_ids) - self.room(question), 0) + self.stride, self.stride)
        )

    def question(self, row: dict, report: Report) -> Question:
        """A tokenized row -> its Question, trained on its first answer found at its answer_start;
        the others that are not found are counted."""
        spans = np.asarray(row["context_spans"], dtype=np.int32).reshape(-1, 2)
        context, answer = row["context"], None
        answers, starts = row.get("answers") or [], row.get("answer_starts") or []
        for text, start in zip_longest(answers, starts[: len(answers)]):
            if start is None or not text.strip() or context[start : start + len(text)] != text:
                report.bad_answers += 1
                report.first_bad = report.first_bad or row["id"]
            elif answer is None:
                answer = token_span(spans, start, start + len(text))
        report.answers += len(answers)
        report.cut_questions += len(row["question_ids"]) > self.max_question_length
        return Question(
            id=row["id"],
            context=context,
            question_ids=np.asarray(row["question_ids"][: self.max_question_length], dtype=np.int32),
            context_ids=np.asarray(row["context_ids"], dtype=np.int32),
            spans=spans,
            references=[t for t in answers if t.strip()],
            lead=next(iter(split_sentences(context)), ""),
            answer=answer,
        )

    def build_examples(self, tokenized, tokenizer: Tokenizer, split: str, seed: int) -> list:
        """Training: (question, [window start]) per window of every question with a usable answer.
        Evaluation and predict: (question, all its window starts) per question; evaluation leaves out
        questions without gold answers (nothing to score against). What was left out is reported once."""
        report, examples = Report(), []
        for row in tokenized:
            question = self.question(row, report)
            starts = self.window_starts(question)
            unusable = question.answer is None if split == "train" else not question.references
            if unusable and split != "predict":
                report.left_out += 1
                continue
            examples.extend([(question, [s]) for s in starts] if split == "train" else [(question, starts)])
            report.questions += 1
            report.windows += len(starts)
        name = type(self).__name__
        rank_zero_info(
            f"{name} {split}: {report.questions} questions in {report.windows} windows of "
            f"max_length={self.max_length} (stride={self.stride}); {report.cut_questions} questions cut "
            f"to max_question_length={self.max_question_length}"
        )
        if report.bad_answers or report.left_out:
            rank_zero_warn(
                f"{name} {split}: {report.bad_answers} of {report.answers} answers not found at their "
                f"answer_start in the context (the first in question {report.first_bad!r}); "
                f"{report.left_out} questions without a usable answer left out of "
                f"{'training' if split == 'train' else 'scoring'}"
            )
        return examples

    def collate(self, examples: list, seeds: list[int], tokenizer: Tokenizer) -> dict:
        """Every window of every example becomes a row; rows of one question are adjacent and carry
        its index in the batch (question_index) so evaluation can pick the best window."""
        rows = [(q, i, start) for i, (q, starts) in enumerate(examples) for start in starts]
        windows = [q.context_ids[start : start + self.room(q)] for q, _, start in rows]
        length = max(len(q.question_ids) + len(w) + 3 for (q, _, _), w in zip(rows, windows, strict=True))
        input_ids = torch.full((len(rows), length), tokenizer.pad_id, dtype=torch.long)
        token_type_ids = torch.zeros((len(rows), length), dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        token_index = torch.full((len(rows), length), -1, dtype=torch.long)  # context piece at each position
        most_context = torch.zeros((len(rows), length), dtype=torch.bool)
        targets = torch.full((len(rows), 2), NOT_HERE, dtype=torch.long)  # (start, end) positions
        r = 0  # rows of one question are adjacent, in the order of its window starts
        for q, starts in examples:
            first = len(q.question_ids) + 2  # first context position
            flags = max_context(starts, [len(windows[r + k]) for k in range(len(starts))])
            for start, window_flags in zip(starts, flags, strict=True):
                window = windows[r]
                ids = np.concatenate(
                    [[tokenizer.cls_id], q.question_ids, [tokenizer.sep_id], window, [tokenizer.sep_id]]
                )
                n = len(ids)  # real length
                input_ids[r, :n], attention_mask[r, :n] = torch.from_numpy(ids).long(), 1
                token_type_ids[r, first:n] = 1
                token_index[r, first : n - 1] = torch.arange(start, start + len(window))
                most_context[r, first : first + len(window_flags)] = torch.tensor(window_flags)
                if q.answer is not None and start <= q.answer[0] and q.answer[1] < start + len(window):
                    targets[r] = torch.tensor(q.answer) - start + first
                r += 1
        return {
            "input_ids": input_ids,  # (R, T)
            "token_type_ids": token_type_ids,
            "attention_mask": attention_mask,
            "token_index": token_index,  # (R, T), -1 outside the context
            "max_context": most_context,  # (R, T): this window is the token's window of most context
            "start_positions": targets[:, 0],  # (R,)
            "end_positions": targets[:, 1],
            "question_index": torch.tensor([i for _, i, _ in rows]),  # (R,)
            "questions": [q for q, _ in examples],
        }

    # ----- model -----

    def forward(self, backbone: Backbone, head: nn.Module, batch: dict) -> dict[str, Tensor]:
        hidden = backbone.encode(
            batch["input_ids"], padding_mask(batch), batch["token_type_ids"]
        )  # (R, T, D)
        start, end = head(hidden)  # (R, T) each
        padding = batch["attention_mask"] == 0
        return {
            "start_logits": start.float().masked_fill(padding, float("-inf")),
            "end_logits": end.float().masked_fill(padding, float("-inf")),
        }

    def loss(self, outputs: dict[str, Tensor], batch: dict) -> dict[str, Tensor]:
        """The mean of the start and end cross-entropies over the positions of each window (BERT)."""
        start = F.cross_entropy(outputs["start_logits"], batch["start_positions"])
        end = F.cross_entropy(outputs["end_logits"], batch["end_positions"])
        return {"loss": (start + end) / 2}

    def answers(self, outputs: dict[str, Tensor], batch: dict) -> list[tuple[str, float]]:
        """(answer text, score) per question of the batch: its best span over all its windows."""
        context = batch["token_index"] >= 0
        scores, firsts, lasts = best_spans(
            outputs["start_logits"],
            outputs["end_logits"],
            context & batch["max_context"],
            context,
            self.max_answer_length,
        )
        rows = torch.arange(len(scores), device=scores.device)
        firsts, lasts = (
            batch["token_index"][rows, firsts].tolist(),
            batch["token_index"][rows, lasts].tolist(),
        )
        scores, best = scores.tolist(), {}  # question -> its best row
        for row, i in enumerate(batch["question_index"].tolist()):
            if i not in best or scores[row] > scores[best[i]]:
                best[i] = row
        return [
            (answer_text(q, firsts[best[i]], lasts[best[i]]), scores[best[i]])
            for i, q in enumerate(batch["questions"])
        ]

    # ----- evaluation -----

    def metrics(self, vocab_size: int) -> MetricCollection:
        return MetricCollection(
            {"loss": MeanMetric(), "squad": SquadScore(), "baseline_squad": SquadScore(prefix="baseline_")}
        )

    def update_metrics(
        self, metrics: MetricCollection, outputs: dict[str, Tensor], batch: dict, tokenizer: Tokenizer
    ) -> None:
        metrics["loss"].update(self.loss(outputs, batch)["loss"], weight=len(batch["question_index"]))
        questions = batch["questions"]
        references = [q.references for q in questions]
        metrics["squad"].update([text for text, _ in self.answers(outputs, batch)], references)
        metrics["baseline_squad"].update([q.lead for q in questions], references)

    def predict(self, outputs: dict[str, Tensor], batch: dict, tokenizer: Tokenizer) -> list[dict]:
        """One record per question: its id, the answer (the context's own characters) and the score
        of its span (start + end logit)."""
        return [
            {"id": q.id, "answer": text, "score": round(score, 4)}
            for q, (text, score) in zip(batch["questions"], self.answers(outputs, batch), strict=True)
        ]
