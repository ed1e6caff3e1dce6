"""The data structures of sentence-embedding training: distinct texts, groups of texts that mean
the same thing (connected components of positive pairs), P x K training chunks with their hard
negatives, and evaluation rows. tasks/sentence_data.py builds them from a source's columns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor


class TextTable:
    """The distinct texts of a split (equal token sequences are one text), as token-id arrays."""

    def __init__(self) -> None:
        self.texts: list[np.ndarray] = []
        self._index: dict[bytes, int] = {}

    def add(self, ids: list[int]) -> int:
        """-> the text's index, adding it if new."""
        array = np.asarray(ids, dtype=np.int32)
        key = array.tobytes()
        if key not in self._index:
            self._index[key] = len(self.texts)
            self.texts.append(array)
        return self._index[key]

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.texts[index]


def connected_components(n: int, edges: list[tuple[int, int]]) -> np.ndarray:
    """Union-find over n nodes -> (n,) component id per node, numbered by first appearance."""
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[ra] = rb
    ids: dict[int, int] = {}
    return np.array([ids.setdefault(find(x), len(ids)) for x in range(n)], dtype=np.int64)


@dataclass
class GroupChunks(Sequence):
    """Training examples: chunks of K texts from one group, plus each text's hard negatives.

    texts: every distinct text of the split (also those in no group, as negatives).
    group: (n_texts,) group id, -1 for texts in no group.
    chunks: (n_chunks, K) text indices.
    given_negatives: text -> negatives given by the data (triplets input).
    mined: (n_texts, m) shared-memory tensor of mined negatives (-1: none), rewritten in place between
        epochs so that dataloader worker processes see the new negatives too.
    """

    texts: TextTable
    group: np.ndarray
    chunks: np.ndarray
    given_negatives: dict[int, list[int]]
    mined: Tensor = field(default_factory=lambda: torch.empty(0, 0, dtype=torch.long))

    def __len__(self) -> int:
        return len(self.chunks)

    @property
    def n_groups(self) -> int:
        return int(self.group.max()) + 1

    def label(self, text: int) -> int:
        """Group id; a text in no group is its own label (n_groups + index), a negative of everything."""
        return int(self.group[text]) if self.group[text] >= 0 else self.n_groups + text

    def negatives(self, text: int) -> list[int]:
        mined = self.mined[text].tolist() if len(self.mined) else []
        return self.given_negatives.get(text, []) + [n for n in mined if n >= 0]

    def __getitem__(self, index: int) -> tuple[list[tuple[np.ndarray, int]], list[tuple[np.ndarray, int]]]:
        """-> (members as (tokens, label), candidate hard negatives as (tokens, label))."""
        members = [int(t) for t in self.chunks[index]]
        candidates = sorted({n for t in members for n in self.negatives(t)})
        return (
            [(self.texts[t], self.label(t)) for t in members],
            [(self.texts[n], self.label(n)) for n in candidates],
        )


@dataclass
class EvalRows(Sequence):
    """Validation / test / predict examples: rows of text indices in the task's input layout, plus
    pair scores or labels. Texts are indexed into one table, so their ids are global."""

    texts: TextTable
    rows: np.ndarray  # (N, fields) text indices
    values: np.ndarray  # (N,) scores (pairs), label ids (labelled), or zeros

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[np.ndarray, list[np.ndarray], float]:
        row = self.rows[index]
        return row, [self.texts[t] for t in row], float(self.values[index])


def flatten_units(values: list) -> list[list[int]]:
    """A column of tokenized texts, each either one id list or (unit != row) a list of id lists."""
    out = []
    for value in values:
        if value and isinstance(value[0], list):
            out.extend(u for u in value if u)
        elif value:
            out.append(value)
    return out


def members_by_group(group: np.ndarray, n_groups: int) -> list[np.ndarray]:
    order = np.argsort(group, kind="stable")
    starts = np.searchsorted(group[order], np.arange(n_groups + 1))  # texts in no group (-1) sort first
    return [order[starts[g] : starts[g + 1]] for g in range(n_groups)]
