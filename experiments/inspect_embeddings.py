"""`polyhead inspect embeddings`: a map of the sentence embeddings of your texts, and their neighbours.

Texts come from a local file (one per line of a .txt, or a column of a .jsonl / .csv / .tsv) and are
embedded by the checkpoint's SentenceEmbedding task; a text is split into units (sentences, lines)
as that task was trained (its `unit`), so each point is something the model learned to embed.
The vectors are projected to 2-D (PCA, or t-SNE / UMAP where installed) and coloured by
--label-column, or by k-means cluster without one. A few texts, spread over the file, are queries:
marked q1, q2, ... on the map, with their nearest neighbours by cosine similarity printed beside.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from datamodules.sources import DataSource, load_split
from experiments.embedding_maps import clusters, embed, nearest, project
from experiments.plots import scatter_map
from modules.errors import UserError
from modules.model import MultiTaskModel
from tasks.groups import TextTable, flatten_units
from tasks.triplet import SentenceEmbedding

SHOWN_CHARS = 70  # of a text in the neighbour table


@dataclass
class Texts:
    """The distinct texts to draw, as token ids, with the label each was first seen with."""

    table: TextTable
    labels: list[str]  # one per text; empty without --label-column
    notes: list[str] = field(default_factory=list)  # what the user should know: texts cut or left out


def embedding_task(model: MultiTaskModel, checkpoint: str, name: str | None) -> str:
    """--task, or the checkpoint's only / first SentenceEmbedding task; a clear refusal without one."""
    found = [n for n, task in model.tasks.items() if isinstance(task, SentenceEmbedding)]
    if not found:
        tasks = ", ".join(f"{n} ({type(t).__name__})" for n, t in model.tasks.items())
        raise UserError(
            f"{checkpoint}: has no sentence-embedding head (its tasks: {tasks}); inspect embeddings needs "
            "a checkpoint trained with a SentenceEmbedding task, as the quickstart's triplet task"
        )
    if name is not None and name not in found:
        raise UserError(f"--task {name!r}: the checkpoint's sentence-embedding tasks are {found}")
    return name or found[0]


def read_texts(
    data: str,
    text_column: str,
    label_column: str | None,
    task: SentenceEmbedding,
    model: MultiTaskModel,
    limit: int,
) -> Texts:
    """The file's texts, split into the task's units and tokenized; the first `limit` distinct ones."""
    columns = {"text": text_column} | ({"label": label_column} if label_column else {})
    source = DataSource(path=data, test_path=data, columns={f: c for f, c in columns.items() if f != c})
    rows = load_split(source, ("text",), "test", "--data", value_fields=("label",) if label_column else ())
    tokenized = task.tokenize({"text": rows["text"]}, model.tokenizer)["text"]
    labels = rows["label"] if label_column else [None] * len(rows)
    table, first_label, units = TextTable(), [], 0
    for value, label in zip(tokenized, labels, strict=True):
        for ids in flatten_units([value]):
            units += 1
            if len(table) == limit:
                continue
            before = len(table)
            table.add(ids)
            if len(table) > before and label_column:
                first_label.append(str(label))
    notes = []
    if units > len(table) and len(table) == limit:
        notes.append(
            f"--data holds more than {limit} distinct texts; the first {limit} are drawn (--max-texts)"
        )
    longest = task.max_length - 2  # room beside [CLS] and [SEP]
    long = sum(len(table[i]) > longest for i in range(len(table)))
    if long:
        notes.append(
            f"{long} of {len(table)} texts are longer than the {longest} tokens the model reads "
            f"(task max_length {task.max_length} with [CLS] and [SEP]); each was cut to its first {longest}"
        )
    return Texts(table, first_label, notes)


def neighbour_table(
    texts: list[str], labels: list[str], neighbours: list[list[tuple[int, float]]], queries: list[int]
) -> str:
    """Each query (q1, q2, ... as marked on the map) and its nearest texts, with similarity and label."""

    def shown(i: int) -> str:
        text = texts[i] if len(texts[i]) <= SHOWN_CHARS else texts[i][: SHOWN_CHARS - 1] + "…"
        return f"[{labels[i]}] {text}" if labels else text

    lines = ["nearest neighbours by cosine similarity"]
    for number, (query, found) in enumerate(zip(queries, neighbours, strict=True), 1):
        lines.append(f"q{number}  {shown(query)}")
        lines.extend(f"      {similarity:.3f}  {shown(j)}" for j, similarity in found)
    return "\n".join(lines)


def inspect_embeddings(
    checkpoint: str,
    data: str,
    out: Path,
    text_column: str = "text",
    label_column: str | None = None,
    task_name: str | None = None,
    method: str = "pca",
    n_clusters: int = 8,
    n_queries: int = 5,
    n_neighbours: int = 3,
    max_texts: int = 2000,
) -> str:
    """Draw the embedding map of `data` into `out` (PNG) and print the neighbour table; -> the table."""
    model = MultiTaskModel.from_checkpoint(checkpoint)
    name = embedding_task(model, checkpoint, task_name)
    task = model.tasks[name]
    texts = read_texts(data, text_column, label_column, task, model, max_texts)
    for message in texts.notes:
        print(f"polyhead inspect: note: {message}", file=sys.stderr)
    with torch.no_grad():
        vectors = embed(
            task, model.backbone, model.heads[name], model.tokenizer, texts.table
        ).numpy()  # (N, E)
    points, (xlabel, ylabel) = project(vectors, method)
    groups = texts.labels or [f"cluster {c}" for c in clusters(vectors, n_clusters)]
    queries = sorted(
        set(np.linspace(0, len(vectors) - 1, min(n_queries, len(vectors))).round().astype(int).tolist())
    )
    coloured = (
        f"by {label_column}" if label_column else f"by k-means cluster (k={min(n_clusters, len(vectors))})"
    )
    title = f"{Path(checkpoint).name}, task {name}: {len(vectors)} texts of {Path(data).name}, {coloured}"
    scatter_map(out, points, groups, title, xlabel, ylabel, {q: f"q{i}" for i, q in enumerate(queries, 1)})
    strings = [model.tokenizer.decode(texts.table[i].tolist()) for i in range(len(texts.table))]
    table = neighbour_table(strings, texts.labels, nearest(vectors, queries, n_neighbours), queries)
    print(f"polyhead inspect: wrote {out} ({title})\n{table}")
    return table
