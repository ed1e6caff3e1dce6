"""Data sources: a hub dataset or local files (read by datamodules/readers.py) -> `datasets.Dataset`.

A source names where a task's data live and how its columns map onto the task's fields; it is
split (explicit files or splits, or a by-document holdout), grouped into documents where the task
reads documents, renamed to the task's field names and checked. Anything wrong stops with one
message naming the file and the fix.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Literal

import datasets
import pyarrow as pa
import pyarrow.compute as pc

from datamodules.readers import check_label_text, load_local
from modules.errors import UserError
from modules.network import hub_offline

TEXT_DTYPES = ("string", "large_string")


@dataclass
class DataSource:
    path: str | dict[str, str] | None = None
    """Local training file (or glob). Format from the extension unless `format` is set.
    Or aligned line files (a parallel corpus) as a mapping column -> file, e.g.
    `{source: data/train.en.gz, target: data/train.de.gz}`: line i of every file is example i; the
    files are read as text lines (gunzipped when the name ends in .gz) and must have equal line counts."""
    validation_path: str | dict[str, str] | None = None
    """Local validation file (or aligned files, as for `path`); without it, `holdout_every` splits
    validation off the training data."""
    test_path: str | dict[str, str] | None = None
    """Local test file (or aligned files, as for `path`), for `polyhead test` (and `polyhead predict`
    without a predict_path)."""
    predict_path: str | dict[str, str] | None = None
    """Local file of inputs for `polyhead predict` (or aligned files, as for `path`), read by its own
    extension and holding the task's predict fields (for sentence embeddings: a text file, one text
    per line)."""
    hub: str | None = None
    """A dataset name on the HuggingFace hub, used when `path` is not set (needs the network)."""
    hub_config: str | None = None
    """The hub dataset's configuration name, e.g. wikitext-2-raw-v1."""
    train_split: str = "train"
    """Hub split for training."""
    validation_split: str | None = "validation"
    """Hub split for validation (None: use holdout_every)."""
    test_split: str | None = None
    """Hub split for `polyhead test` and `polyhead predict`, e.g. test."""
    format: Literal["text", "json", "csv", "tsv", "squad", "label_text"] | None = None
    """File format; default from the file extension (.txt/.raw text, .json/.jsonl json, .csv, .tsv).
    squad (never from the extension): SQuAD v1.1 JSON, one row per question with columns id, title,
    context, question, answers (the answer texts, in order) and answer_starts (their offsets).
    label_text (never from the extension): one example per line, `LABEL text`: the first
    whitespace-separated token is column `label`, the rest column `text` (SST-2's, TREC's files)."""
    label_pattern: str | None = None
    """format label_text: a regex searched in the line's first token; its first group (or, without
    groups, its match) is the label, e.g. `^[^:]+` takes TREC's coarse class DESC from DESC:manner."""
    encoding: str = "utf-8"
    """Text encoding of every local file (e.g. latin-1)."""
    column_names: list[str] | None = None
    """Names of the fields of a CSV/TSV file that has no header row; fields after these are ignored."""
    quoting: bool = True
    """False: quote characters in CSV/TSV are ordinary text (files like STS-B that never quote)."""
    columns: dict[str, str] = field(default_factory=dict)
    """Task field -> source column, for columns whose names differ from the task's fields; a
    nested field is `parent.child` (e.g. target: answers.text)."""
    documents: Literal["row", "blank_line", "heading"] = "row"
    """How text becomes examples: each row/line (row), blank-line separated blocks, or sections that
    start at a line matching `heading_pattern` (WikiText articles)."""
    heading_pattern: str = r"^ = [^=].* = $"
    """Regex of a line that starts a new document when documents is "heading"."""
    skip_lines: str | None = None
    """Regex of text lines to drop (e.g. sub-headings) when documents is "heading"."""
    holdout_every: int | None = None
    """Without a validation file or split: example i goes to validation when i % n == n - 1 (with
    `holdout_key`: group i)."""
    holdout_key: str | None = None
    """A source column that keeps rows together when `holdout_every` holds out validation: rows with
    the same value form a group (groups numbered in order of first appearance) and group i goes to
    validation when i % n == n - 1, e.g. `title` keeps every question of a SQuAD article on one side.
    The column need not be one the task uses. Only with documents: row."""
    max_examples: int | None = None
    """Use only the first n examples of each split (quick experiments)."""
    max_text_chars: int | None = 1_000_000
    """A text longer than this stops the run, naming its line: a row of a million characters is
    nearly always a file read with the wrong format or line breaks. Raise it (None: no limit) for
    corpora whose examples are whole books."""


def is_text_feature(feature) -> bool:
    """A column of text, or of lists of texts (SciTLDR's abstract sentences, several references)."""
    inner = getattr(feature, "feature", feature)  # datasets' List / Sequence keep the item type here
    return getattr(inner, "dtype", None) in TEXT_DTYPES


def has_text(value) -> bool:
    """A non-empty text, or a list holding at least one."""
    if isinstance(value, list):
        return any(has_text(item) for item in value)
    return isinstance(value, str) and bool(value.strip())


def texts_of(value) -> list[str]:
    """A text field's value as a list of texts (one for a plain text field)."""
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else [value] if value else []


def _load_hub(source: DataSource, split: str, where: str) -> datasets.Dataset:
    """A hub split: downloaded, or from the HF cache when offline (set, or no network: hub_offline)."""
    offline = hub_offline()
    try:
        return datasets.load_dataset(source.hub, source.hub_config, split=split)
    except Exception as error:
        hint = "offline, only datasets in the local HF cache load; " if offline else ""
        raise UserError(
            f"{where}.hub: could not load {source.hub!r} (config {source.hub_config!r}, split {split!r}): "
            f"{type(error).__name__}; {hint}set {where}.path to a local file instead"
        ) from None


def _group_by_heading(dataset: datasets.Dataset, source: DataSource, column: str) -> datasets.Dataset:
    """Lines -> documents: a line matching heading_pattern starts a document (and becomes its title)."""
    heading, skip = (
        re.compile(source.heading_pattern),
        re.compile(source.skip_lines) if source.skip_lines else None,
    )
    titles, bodies = [], []
    for line in dataset[column]:
        stripped = line.rstrip("\r\n")
        if heading.match(stripped):
            titles.append(stripped.strip(" ="))
            bodies.append([])
        elif bodies and stripped.strip() and not (skip and skip.match(stripped)):
            bodies[-1].append(stripped.strip())
    return datasets.Dataset.from_dict({"title": titles, column: ["\n".join(b) for b in bodies]})


def _documents(
    dataset: datasets.Dataset, source: DataSource, columns: list[str], name: str, where: str, fmt: str | None
) -> datasets.Dataset:
    """Keep `columns`, group lines into documents when asked, keep the first max_examples, and stop
    at a text longer than max_text_chars. A column named `parent.child` reaches into a nested record
    (the hub's SQuAD `answers.text`)."""
    if any("." in col and col not in dataset.column_names for col in columns):
        dataset = dataset.flatten()  # {"answers": {"text": ...}} -> column "answers.text"
    missing = [col for col in columns if col not in dataset.column_names]
    if missing:
        fix = (  # a predict file is read without the source's column mapping
            f"{where} is read without the source's columns mapping: rename its columns to the task's fields"
            if where.endswith(".predict_path")
            else f"Map them with {where}.columns (task field: source column)"
        )
        raise UserError(f"{name}: missing column(s) {missing}; its columns are {dataset.column_names}. {fix}")
    dataset = dataset.select_columns(columns)
    if source.documents == "heading":
        dataset = _group_by_heading(dataset, source, columns[0])
    if source.max_examples is not None:
        dataset = dataset.select(range(min(source.max_examples, len(dataset))))
    for column in columns:
        if source.max_text_chars is not None and is_text_feature(dataset.features[column]):
            _check_length(dataset, column, source, fmt, name, where)
    if not any(has_text(v) for column in columns for v in dataset[column]):
        raise UserError(f"{name}: no non-empty text in column(s) {columns}; the data is empty")
    return dataset


def _class_names(dataset: datasets.Dataset) -> datasets.Dataset:
    """Class-label columns (hub datasets store classes as ints, their names in the features) read as
    the names, so tasks and predictions see `positive`, not `1`. -1 (GLUE's unlabelled test rows)
    becomes None, which the field checks report as an empty field."""
    for column, feature in dataset.features.items():
        if isinstance(feature, datasets.ClassLabel):
            names = [feature.int2str(v) if v is not None and v >= 0 else None for v in dataset[column]]
            dataset = dataset.remove_columns(column).add_column(column, names)
    return dataset


def _line_of(source: DataSource, fmt: str | None, row: int) -> str:
    """Where data row `row` (0-based) sits in its file(s) of format `fmt`, for messages."""
    if fmt in ("csv", "tsv"):
        return f"line {row + 1 + (0 if source.column_names else 1)}"
    if fmt == "squad":
        return f"question {row + 1}"
    return f"line {row + 1}" if fmt in ("json", "text") else f"row {row + 1}"


def _position(source: DataSource, fmt: str | None, row: int) -> str:
    """Where example `row` (0-based) comes from: a line (or row) of a file, or a grouped document."""
    return _line_of(source, fmt, row) if source.documents == "row" else f"document {row + 1}"


def _check_length(
    dataset: datasets.Dataset, column: str, source: DataSource, fmt: str | None, name: str, where: str
) -> None:
    """Stop at the first text of `column` longer than max_text_chars (counted by Arrow, without
    turning the column into Python strings)."""
    values = dataset.with_format("arrow")[column]
    rows = None
    if pa.types.is_list(values.type) or pa.types.is_large_list(values.type):
        rows, values = pc.list_parent_indices(values), pc.list_flatten(values)
    lengths = pc.utf8_length(values)
    first = pc.index(pc.greater(lengths, source.max_text_chars), True).as_py()
    if first >= 0:
        row = rows[first].as_py() if rows is not None else first
        raise UserError(
            f"{name}, {_position(source, fmt, row)}: column {column!r} holds a text of {lengths[first].as_py():,} "
            f"characters, more than {where}.max_text_chars ({source.max_text_chars:,}); is the file read "
            f"with the right format and line breaks? Split the text, or raise {where}.max_text_chars"
        )


def _is_text(value, lists: bool) -> bool:
    return isinstance(value, str) or (
        lists and isinstance(value, list) and all(isinstance(v, str) for v in value)
    )


def _check_fields(
    dataset: datasets.Dataset,
    source: DataSource,
    fmt: str | None,
    fields: tuple[str, ...],
    value_fields: tuple[str, ...],
    name: str,
    list_fields: tuple[str, ...] = (),
    number_fields: tuple[str, ...] = (),
) -> None:
    """Text fields must hold text (`list_fields` may hold lists of texts), value fields (scores,
    labels) must be present in every example, `number_fields` must read as numbers, and a number
    among them must be finite.

    Rows of a structured file (JSON, CSV, TSV, SQuAD) are examples, so an empty text there is a mistake in
    the data and stops the run, naming the line; empty lines of plain text are just skipped later.
    """
    for task_field in fields:
        feature = dataset.features[task_field]
        if task_field in list_fields and is_text_feature(feature):
            continue
        if getattr(feature, "dtype", None) not in TEXT_DTYPES:
            lists = task_field in list_fields
            allowed = "text or a list of texts" if lists else "text"
            values = dataset[task_field]
            row = next((r for r, v in enumerate(values) if v is not None and not _is_text(v, lists)), None)
            if row is None:
                raise UserError(f"{name}: field {task_field!r} must hold {allowed}, found {feature}")
            raise UserError(
                f"{name}: field {task_field!r} must hold {allowed}, found {feature}: "
                f"{json.dumps(values[row])[:60]} at {_position(source, fmt, row)}; fix or remove that line"
            )
    structured = source.documents == "row" and fmt in ("json", "csv", "tsv", "squad")
    for task_field in value_fields + (fields if structured else ()):
        for row, value in enumerate(dataset[task_field]):
            if value is None or (task_field in fields and not has_text(value)):
                blank = "is empty" if task_field in fields else "is empty (no value, null or NaN)"
                raise UserError(
                    f"{name}, {_line_of(source, fmt, row)}: field {task_field!r} {blank}; fill it in or remove the line"
                )
            if task_field in number_fields and isinstance(value, str):
                value = _as_number(value, task_field, f"{name}, {_line_of(source, fmt, row)}")
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(
                    f"{name}, {_line_of(source, fmt, row)}: field {task_field!r} is {value}, not a finite "
                    "number; fix or remove the line"
                )


def _as_number(text: str, field: str, at: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UserError(
            f"{at}: field {field!r} is {text[:40]!r}, not a number; fix or remove the line"
        ) from None


def _drop_empty(dataset: datasets.Dataset, fields: tuple[str, ...], name: str) -> datasets.Dataset:
    """Skip examples with an empty text (blank lines of plain text); refuse a split with none left."""
    dataset = dataset.filter(lambda ex: all(has_text(ex[f]) for f in fields))
    if len(dataset) == 0:
        raise UserError(f"{name}: no non-empty examples (field(s) {list(fields)}); the data is empty")
    return dataset


def _uses_holdout(source: DataSource) -> bool:
    return (source.validation_path if source.path is not None else source.validation_split) is None


def _holdout_groups(raw: datasets.Dataset, source: DataSource, name: str, where: str) -> list[int] | None:
    """The group of every raw row by the holdout_key column, numbered in order of first appearance,
    so that held-out validation takes whole groups (articles, not their questions); None without a key.

    Read from the raw rows, before the task's columns are selected, so the key may be any column."""
    key = source.holdout_key
    if key is None:
        return None
    if key not in raw.column_names:
        raise UserError(
            f"{where}.holdout_key: {key!r} is not a column of {name}; its columns are {raw.column_names}"
        )
    if source.documents != "row":
        raise UserError(
            f"{where}.holdout_key: documents: {source.documents} holds out whole documents already; remove holdout_key"
        )
    numbers: dict = {}
    return [numbers.setdefault(v if isinstance(v, Hashable) else repr(v), len(numbers)) for v in raw[key]]


def _holdout(
    dataset: datasets.Dataset, every: int | None, where: str, groups: list[int] | None = None
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Example i (with `groups`: every example of group i) goes to validation when i % every == every - 1,
    the rest to training."""
    if not every or every < 2:
        raise UserError(
            f"{where}: no validation data; set validation_path (or validation_split) or holdout_every >= 2"
        )
    group = groups or range(len(dataset))
    held = [group[i] % every == every - 1 for i in range(len(dataset))]
    validation = dataset.select([i for i, h in enumerate(held) if h])
    if len(validation) == 0:
        among = f"{len(set(group[: len(dataset)]))} groups of holdout_key" if groups else len(dataset)
        raise UserError(
            f"{where}.holdout_every={every} leaves no validation examples among {among}; lower it"
        )
    return dataset.select([i for i, h in enumerate(held) if not h]), validation


def _load_split(
    source: DataSource, split: str, where: str
) -> tuple[datasets.Dataset, str, str | None] | None:
    """Raw rows of one split (None if the source has none), a name for messages and the format read."""
    if source.path is None and source.hub is None:
        raise UserError(f"{where}: set `path` (a local file) or `hub` (a hub dataset name)")
    check_label_text(source, where)
    if source.holdout_key is not None and not _uses_holdout(source):
        raise UserError(
            f"{where}.holdout_key: validation comes from validation_path / validation_split, so nothing "
            "is held out; remove holdout_key"
        )
    if source.path is not None:
        path = {"train": source.path, "validation": source.validation_path, "test": source.test_path}[split]
        if path is None:
            return None
        key = "path" if split == "train" else f"{split}_path"
        name = path if isinstance(path, str) else "{" + ", ".join(f"{c}: {p}" for c, p in path.items()) + "}"
        dataset, fmt = load_local(path, source, f"{where}.{key}")
        return dataset, name, fmt
    hub_split = {
        "train": source.train_split,
        "validation": source.validation_split,
        "test": source.test_split,
    }[split]
    if hub_split is None:
        return None
    return _load_hub(source, hub_split, where), f"hub dataset {source.hub} ({hub_split})", source.format


def load_split(
    source: DataSource,
    fields: tuple[str, ...],
    split: str,
    where: str,
    value_fields: tuple[str, ...] = (),
    list_fields: tuple[str, ...] = (),
    number_fields: tuple[str, ...] = (),
) -> datasets.Dataset | None:
    """One split ("train", "validation" or "test") with the task's field names, or None
    when the source has no such split. `fields` hold text (those in `list_fields` may hold lists
    of texts); `value_fields` hold scores or labels, those in `number_fields` numbers. `where` is the source's config key, for messages."""
    all_fields = fields + value_fields
    unknown_fields = sorted(set(source.columns) - set(all_fields))
    if unknown_fields:
        raise UserError(
            f"{where}.columns: {unknown_fields} are not fields of this task; its fields are {list(all_fields)}"
        )
    mapping = {task_field: source.columns.get(task_field, task_field) for task_field in all_fields}
    held_out = split != "test" and _uses_holdout(source)
    loaded = _load_split(source, "train" if held_out else split, where)
    if loaded is None:
        return None
    raw, name, fmt = loaded
    groups = _holdout_groups(raw, source, name, where) if held_out else None
    documents = _class_names(_documents(raw, source, list(mapping.values()), name, where, fmt))
    documents = documents.rename_columns({col: f for f, col in mapping.items() if col != f})
    _check_fields(documents, source, fmt, fields, value_fields, name, list_fields, number_fields)
    if held_out:
        train, validation = _holdout(documents, source.holdout_every, where, groups)
        documents, name = (train, name) if split == "train" else (validation, f"{name} (held out)")
    return _drop_empty(documents, fields, name)


def read_text_lines(source: DataSource, where: str) -> list[str]:
    """Every line of text in the training split, for training the tokenizer.

    Reads every text column of the source (titles and other metadata text too), so it works before
    the tasks, and hence their field names, are known. Held-out validation documents are left
    out, exactly as load_source leaves them out, so the vocabulary never sees validation text.
    """
    raw, name, fmt = _load_split(source, "train", where)
    columns = [c for c, feature in raw.features.items() if is_text_feature(feature)]
    documents = _documents(raw, source, columns, name, where, fmt)
    if _uses_holdout(source):
        groups = _holdout_groups(raw, source, name, where)
        documents, _ = _holdout(documents, source.holdout_every, where, groups)
    return [
        line
        for column in columns
        for value in documents[column]
        for text in texts_of(value)
        for line in text.splitlines()
    ]
