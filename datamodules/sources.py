"""Data sources: a hub dataset or local text / JSON(L) / CSV / TSV files -> `datasets.Dataset`.

Every source is read through `datasets.load_dataset`, renamed to the task's field names by the
column mapping, and checked; anything wrong stops with one message naming the file and the fix.
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import datasets

from modules.errors import UserError

TEXT_DTYPES = ("string", "large_string")
FORMATS = {".txt": "text", ".raw": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "tsv"}


@dataclass
class DataSource:
    path: str | None = None
    """Local training file (or glob). Format from the extension unless `format` is set."""
    validation_path: str | None = None
    """Local validation file; without it, `holdout_every` splits validation off the training data."""
    test_path: str | None = None
    """Local test file, for `polyhead test` (and `polyhead predict` without a predict_path)."""
    predict_path: str | None = None
    """Local file of inputs for `polyhead predict`, read by its own extension and holding the task's
    predict fields (for sentence embeddings: a text file, one text per line)."""
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
    format: Literal["text", "json", "csv", "tsv"] | None = None
    """File format; default from the file extension (.txt/.raw text, .json/.jsonl json, .csv, .tsv)."""
    encoding: str = "utf-8"
    """Text encoding of local files (e.g. latin-1)."""
    column_names: list[str] | None = None
    """Names of the fields of a CSV/TSV file that has no header row; fields after these are ignored."""
    quoting: bool = True
    """False: quote characters in CSV/TSV are ordinary text (files like STS-B that never quote)."""
    columns: dict[str, str] = field(default_factory=dict)
    """Task field -> source column, for columns whose names differ from the task's fields."""
    documents: Literal["row", "blank_line", "heading"] = "row"
    """How text becomes examples: each row/line (row), blank-line separated blocks, or sections that
    start at a line matching `heading_pattern` (WikiText articles)."""
    heading_pattern: str = r"^ = [^=].* = $"
    """Regex of a line that starts a new document when documents is "heading"."""
    skip_lines: str | None = None
    """Regex of text lines to drop (e.g. sub-headings) when documents is "heading"."""
    holdout_every: int | None = None
    """Without a validation file or split: example i goes to validation when i % n == n - 1."""
    max_examples: int | None = None
    """Use only the first n examples of each split (quick experiments)."""


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


def _files_format(source: DataSource, where: str, path: str) -> str:
    if source.format:
        return source.format
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise UserError(
            f"{where}.format: cannot tell the format of {path!r} from its extension; set it to one of text, json, csv, tsv"
        )
    return FORMATS[suffix]


def _diagnose(path: str, fmt: str, encoding: str) -> str | None:
    """Find the first line of a local file that cannot be read, for a precise error message."""
    raw = Path(path).read_bytes()
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        return f"{path}, line {line}: not valid {encoding} (byte 0x{raw[error.start]:02x}); set the source's encoding (e.g. latin-1)"
    if fmt == "json" and not text.lstrip().startswith("["):
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as error:
                    return f"{path}, line {number}: malformed JSON ({error.msg}); fix or remove the line"
                if not isinstance(value, dict):
                    return (
                        f"{path}, line {number}: expected a JSON object per line, got {type(value).__name__}"
                    )
    return None


def _load_local(path: str, source: DataSource, where: str) -> datasets.Dataset:
    if not any(ch in path for ch in "*?[") and not os.path.isfile(path):
        raise UserError(
            f"{where}: file not found: {path!r}; fix the path (relative paths start at {os.getcwd()})"
        )
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise UserError(f"{where}: {path!r} is empty; point it at a file with data")
    fmt = _files_format(source, where, path)
    kwargs: dict = {"data_files": path, "split": "train"}
    if fmt == "text":
        kwargs.update(
            encoding=source.encoding, sample_by="paragraph" if source.documents == "blank_line" else "line"
        )
    elif fmt == "json":
        kwargs.update(encoding=source.encoding)
    else:
        kwargs.update(encoding=source.encoding, sep="\t" if fmt == "tsv" else ",")
        if source.column_names:
            kwargs.update(
                header=None, names=source.column_names, usecols=list(range(len(source.column_names)))
            )
        if not source.quoting:
            kwargs.update(quoting=csv.QUOTE_NONE)
    try:
        return datasets.load_dataset(
            "text" if fmt == "text" else "json" if fmt == "json" else "csv", **kwargs
        )
    except Exception as error:  # datasets wraps parser errors; find the line ourselves
        problem = _diagnose(path, fmt, source.encoding) if os.path.isfile(path) else None
        detail = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise UserError(problem or f"{where}: could not read {path!r} as {fmt}: {detail}") from None


def _load_hub(source: DataSource, split: str, where: str) -> datasets.Dataset:
    try:
        return datasets.load_dataset(source.hub, source.hub_config, split=split)
    except Exception as error:
        offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = "the hub is unreachable offline; " if offline else ""
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
    dataset: datasets.Dataset, source: DataSource, columns: list[str], name: str, where: str
) -> datasets.Dataset:
    """Keep `columns`, group lines into documents when asked, and keep the first max_examples."""
    missing = [col for col in columns if col not in dataset.column_names]
    if missing:
        raise UserError(
            f"{name}: missing column(s) {missing}; its columns are {dataset.column_names}. "
            f"Map them with {where}.columns (task field: source column)"
        )
    dataset = dataset.select_columns(columns)
    if source.documents == "heading":
        dataset = _group_by_heading(dataset, source, columns[0])
    if source.max_examples is not None:
        dataset = dataset.select(range(min(source.max_examples, len(dataset))))
    if not any(has_text(v) for column in columns for v in dataset[column]):
        raise UserError(f"{name}: no non-empty text in column(s) {columns}; the data is empty")
    return dataset


def _line_of(source: DataSource, row: int) -> str:
    """Where data row `row` (0-based) sits in its file, for messages."""
    fmt = source.format or FORMATS.get(Path(source.path or "").suffix.lower())
    if fmt in ("csv", "tsv"):
        return f"line {row + 1 + (0 if source.column_names else 1)}"
    return f"line {row + 1}" if fmt in ("json", "text") else f"row {row + 1}"


def _check_fields(
    dataset: datasets.Dataset,
    source: DataSource,
    fields: tuple[str, ...],
    value_fields: tuple[str, ...],
    name: str,
    list_fields: tuple[str, ...] = (),
) -> None:
    """Text fields must hold text (`list_fields` may hold lists of texts), value fields (scores,
    labels) must be present in every example.

    Rows of a structured file (JSON, CSV, TSV) are examples, so an empty text there is a mistake in
    the data and stops the run, naming the line; empty lines of plain text are just skipped later.
    """
    for task_field in fields:
        feature = dataset.features[task_field]
        if task_field in list_fields and is_text_feature(feature):
            continue
        if getattr(feature, "dtype", None) not in TEXT_DTYPES:
            allowed = "text or a list of texts" if task_field in list_fields else "text"
            raise UserError(f"{name}: field {task_field!r} must hold {allowed}, found {feature}")
    structured = source.documents == "row" and (
        source.format or FORMATS.get(Path(source.path or "").suffix.lower())
    ) in (
        "json",
        "csv",
        "tsv",
    )
    for task_field in value_fields + (fields if structured else ()):
        for row, value in enumerate(dataset[task_field]):
            if value is None or (task_field in fields and not has_text(value)):
                raise UserError(
                    f"{name}, {_line_of(source, row)}: field {task_field!r} is empty; fill it in or remove the line"
                )


def _drop_empty(dataset: datasets.Dataset, fields: tuple[str, ...], name: str) -> datasets.Dataset:
    """Skip examples with an empty text (blank lines of plain text); refuse a split with none left."""
    dataset = dataset.filter(lambda ex: all(has_text(ex[f]) for f in fields))
    if len(dataset) == 0:
        raise UserError(f"{name}: no non-empty examples (field(s) {list(fields)}); the data is empty")
    return dataset


def _uses_holdout(source: DataSource) -> bool:
    return (source.validation_path if source.path is not None else source.validation_split) is None


def _holdout(
    dataset: datasets.Dataset, every: int | None, where: str
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Example i goes to validation when i % every == every - 1, the rest to training."""
    if not every or every < 2:
        raise UserError(
            f"{where}: no validation data; set validation_path (or validation_split) or holdout_every >= 2"
        )
    indices = range(len(dataset))
    validation = dataset.select([i for i in indices if i % every == every - 1])
    if len(validation) == 0:
        raise UserError(
            f"{where}.holdout_every={every} leaves no validation examples among {len(indices)}; lower it"
        )
    return dataset.select([i for i in indices if i % every != every - 1]), validation


def _load_split(source: DataSource, split: str, where: str) -> tuple[datasets.Dataset, str] | None:
    """Raw rows of one split (None if the source has none) and a name for messages."""
    if source.path is None and source.hub is None:
        raise UserError(f"{where}: set `path` (a local file) or `hub` (a hub dataset name)")
    if source.path is not None:
        path = {"train": source.path, "validation": source.validation_path, "test": source.test_path}[split]
        key = "path" if split == "train" else f"{split}_path"
        return None if path is None else (_load_local(path, source, f"{where}.{key}"), path)
    hub_split = {
        "train": source.train_split,
        "validation": source.validation_split,
        "test": source.test_split,
    }[split]
    return (
        None
        if hub_split is None
        else (_load_hub(source, hub_split, where), f"hub dataset {source.hub} ({hub_split})")
    )


def load_split(
    source: DataSource,
    fields: tuple[str, ...],
    split: str,
    where: str,
    value_fields: tuple[str, ...] = (),
    list_fields: tuple[str, ...] = (),
) -> datasets.Dataset | None:
    """One split ("train", "validation" or "test") with the task's field names, or None
    when the source has no such split. `fields` hold text (those in `list_fields` may hold lists
    of texts); `value_fields` hold scores or labels. `where` is the source's config key, for messages."""
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
    raw, name = loaded
    documents = _documents(raw, source, list(mapping.values()), name, where)
    documents = documents.rename_columns({col: f for f, col in mapping.items() if col != f})
    _check_fields(documents, source, fields, value_fields, name, list_fields)
    if held_out:
        train, validation = _holdout(documents, source.holdout_every, where)
        documents, name = (train, name) if split == "train" else (validation, f"{name} (held out)")
    return _drop_empty(documents, fields, name)


def read_text_lines(source: DataSource, where: str) -> list[str]:
    """Every line of text in the training split, for training the tokenizer.

    Reads every text column of the source (titles and other metadata text too), so it works before
    the tasks, and hence their field names, are known. Held-out validation documents are left
    out, exactly as load_source leaves them out, so the vocabulary never sees validation text.
    """
    raw, name = _load_split(source, "train", where)
    columns = [c for c, feature in raw.features.items() if is_text_feature(feature)]
    documents = _documents(raw, source, columns, name, where)
    if _uses_holdout(source):
        documents, _ = _holdout(documents, source.holdout_every, where)
    return [
        line
        for column in columns
        for value in documents[column]
        for text in texts_of(value)
        for line in text.splitlines()
    ]
