"""From a source's columns to the batches of `SentenceEmbedding` (tasks/triplet.py).

Tokenized columns become training groups (`GroupChunks`: P x K chunks with hard negatives),
evaluation rows or predict rows (`EvalRows`), and those become padded `[CLS] text [SEP]` batches.
Apart from the task so that it keeps the model side (head, loss, metrics, mining) and this module
only how the data are read; the structures it fills are in tasks/groups.py.
"""

from __future__ import annotations

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from datamodules.tokenizer import Tokenizer
from modules.errors import UserError
from tasks.generative import pad_rows
from tasks.groups import (
    EvalRows,
    GroupChunks,
    TextTable,
    connected_components,
    flatten_units,
    members_by_group,
)
from tasks.sentences import split_sentences

INPUT_FIELDS = {
    "pairs": ("sentence1", "sentence2"),
    "labelled": ("text",),
    "triplets": ("anchor", "positive", "negative"),
}
"""Text fields of each input layout, in the order of an evaluation row's columns."""


def split_units(text: str, unit: str) -> list[str]:
    """One labelled text -> the units embedded apart (unit "sentence" or "line"), all carrying its label."""
    if unit == "sentence":
        return split_sentences(text)
    return [line.strip() for line in text.splitlines() if line.strip()]


def tokenize_columns(batch: dict[str, list], tokenizer: Tokenizer, unit: str) -> dict[str, list]:
    """Raw columns -> token ids per text (a list of id lists per row for `text` split into units);
    scores become floats and labels strings (a label only names a group)."""
    out: dict[str, list] = {}
    for name in batch:
        if name in ("score", "label"):
            out[name] = [str(v) if name == "label" else float(v) for v in batch[name]]
        elif name == "text" and unit != "row":
            units = [split_units(text, unit) for text in batch[name]]
            flat = tokenizer.encode([u for text in units for u in text])  # one call for the whole batch
            out[name], k = [], 0
            for text in units:
                out[name].append(flat[k : k + len(text)])
                k += len(text)
        else:
            out[name] = tokenizer.encode(list(batch[name]))
    return out


def check_scores(scores: list[float], score_range: tuple[float, float] | None, split: str) -> None:
    """Stop the run at the first score outside `score_range`, naming its row: a score on another
    scale would silently turn the threshold's positives into negatives."""
    if score_range is None:
        return
    low, high = score_range
    for row, score in enumerate(scores):
        if not low <= score <= high:
            raise UserError(
                f"the {split} data of task SentenceEmbedding, row {row + 1}: score {score} is outside "
                f"score_range [{low}, {high}]; fix the row or the task's score_range"
            )


def predict_rows(columns: dict[str, list], fields: tuple[str, ...]) -> EvalRows:
    """Predict data -> one row per distinct text (unit) of `fields`, each embedded on its own."""
    texts = TextTable()
    units = [u for name in fields if name in columns for u in columns[name]]
    indices = [texts.add(u) for u in flatten_units(units)]
    return EvalRows(texts, np.asarray(indices, dtype=np.int64)[:, None], np.zeros(len(indices)))


def group_chunks(
    columns: dict[str, list],
    input: str,
    threshold: float | None,
    samples_per_group: int,
    mined_negatives: int,
    rng: np.random.Generator,
) -> GroupChunks:
    """Training data -> the groups of texts that mean the same thing (the connected components of
    positive pairs, or the texts of one label), cut into chunks of `samples_per_group` so that a
    P x K batch gives every anchor a positive; triplets' negatives are kept as given hard negatives."""
    texts, edges, given_negatives = TextTable(), [], {}
    labelled: dict[str, list[int]] = {}
    if input == "labelled":
        for units, label in zip(columns["text"], columns["label"], strict=True):
            for u in flatten_units([units]):
                labelled.setdefault(label, []).append(texts.add(u))
        for label, members in labelled.items():
            if len(set(members)) < 2:
                raise UserError(
                    f"the training data of task SentenceEmbedding: label {label!r} has a single distinct text, "
                    "so it has no positive; give every label at least 2 texts or remove it"
                )
            edges.extend((members[0], m) for m in members[1:])
    else:
        first, second = INPUT_FIELDS[input][:2]
        scores = columns.get("score", [None] * len(columns[first]))
        self_pairs = 0
        for row in range(len(columns[first])):
            a, b = texts.add(columns[first][row]), texts.add(columns[second][row])
            if input == "triplets":
                given_negatives.setdefault(a, []).append(texts.add(columns["negative"][row]))
            if scores[row] is None or scores[row] >= threshold:
                if a == b:
                    self_pairs += 1
                else:
                    edges.append((a, b))
        if self_pairs:
            rank_zero_info(
                f"SentenceEmbedding: {self_pairs} positive pair(s) join a text to itself and teach nothing; skipped"
            )
    component = connected_components(len(texts), edges)  # (n_texts,)
    grouped = np.zeros(len(texts), dtype=bool)
    for a, b in edges:
        grouped[a] = grouped[b] = True
    group = np.full(len(texts), -1, dtype=np.int64)  # (n_texts,) group id, -1: in no group
    roots = {c: i for i, c in enumerate(dict.fromkeys(component[grouped].tolist()))}
    group[grouped] = [roots[c] for c in component[grouped].tolist()]
    if not roots:
        raise UserError(
            "the training data of task SentenceEmbedding has no positive pair; "
            + ("lower the task's threshold" if input == "pairs" else "check the data")
        )
    chunks = []
    for members in members_by_group(group, len(roots)):
        members = rng.permutation(members)
        n_chunks = -(-len(members) // samples_per_group)
        cycle = np.resize(members, n_chunks * samples_per_group)  # wraps around: small groups repeat
        chunks.extend(cycle.reshape(n_chunks, samples_per_group))
    pool = GroupChunks(texts, group, np.stack(chunks), given_negatives)  # chunks: (n_chunks, K)
    if mined_negatives:
        pool.mined = torch.full((len(texts), mined_negatives), -1, dtype=torch.long).share_memory_()
    return pool


def eval_rows(columns: dict[str, list], input: str) -> EvalRows:
    """Validation / test data -> rows of text indices in the input's field order, with the pair's
    score (pairs), the label's id (labelled, one row per unit) or 0 (triplets)."""
    texts = TextTable()
    if input == "labelled":
        label_ids: dict[str, int] = {}
        rows, values = [], []
        for units, label in zip(columns["text"], columns["label"], strict=True):
            for u in flatten_units([units]):
                rows.append([texts.add(u)])
                values.append(label_ids.setdefault(label, len(label_ids)))
        return EvalRows(texts, np.asarray(rows, dtype=np.int64), np.asarray(values, dtype=np.float64))
    fields = INPUT_FIELDS[input]
    n = len(columns[fields[0]])
    rows = [[texts.add(columns[f][r]) for f in fields] for r in range(n)]  # (N, F)
    values = columns.get("score", [0.0] * n)
    return EvalRows(texts, np.asarray(rows, dtype=np.int64), np.asarray(values, dtype=np.float64))


def pad_texts(token_lists: list[np.ndarray], tokenizer: Tokenizer, max_length: int) -> tuple[Tensor, Tensor]:
    """Texts -> input_ids, attention_mask (R, T) as [CLS] text [SEP], cut to max_length: the one way
    every tower, evaluation and mining reads a text."""
    body = max_length - 2
    rows = [[tokenizer.cls_id, *tokens[:body].tolist(), tokenizer.sep_id] for tokens in token_lists]
    return pad_rows(rows, tokenizer.pad_id)  # (R, T) each


def collate_chunks(
    chunks: list, seeds: list[int], tokenizer: Tokenizer, max_length: int
) -> dict[str, Tensor]:
    """P training chunks -> input_ids, attention_mask (R, T) and labels (R,): each chunk's K members,
    then one of its hard negatives (drawn by the chunk's seed) when it has any."""
    tokens, labels = [], []
    for (members, negatives), seed in zip(chunks, seeds, strict=True):
        for text, label in members:
            tokens.append(text)
            labels.append(label)
        if negatives:
            text, label = negatives[np.random.default_rng(seed).integers(len(negatives))]
            tokens.append(text)
            labels.append(label)
    input_ids, attention_mask = pad_texts(tokens, tokenizer, max_length)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": torch.tensor(labels)}


def collate_rows(examples: list, tokenizer: Tokenizer, max_length: int) -> dict[str, Tensor]:
    """Rows of F fields -> F blocks of B texts: input (F * B, T), field f of row i at f * B + i."""
    ids = torch.tensor(np.stack([row for row, _, _ in examples]))  # (B, F)
    tokens = [texts[f] for f in range(ids.shape[1]) for _, texts, _ in examples]
    input_ids, attention_mask = pad_texts(tokens, tokenizer, max_length)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "text_ids": ids,
        "values": torch.tensor([v for _, _, v in examples], dtype=torch.float64),
    }
