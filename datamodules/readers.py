"""Local file readers, one per format: plain text / JSON(L) / CSV / TSV through
`datasets.load_dataset`, and the formats whose rows are not one file's rows (aligned line files,
SQuAD JSON, `LABEL text` lines) built here. Every error names the file, the line where there is one,
and the fix; `load_local` is the entry point sources.py uses.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import datasets

from modules.errors import UserError

if TYPE_CHECKING:
    from datamodules.sources import DataSource

FORMATS = {".txt": "text", ".raw": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "tsv"}
SQUAD_FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "title": datasets.Value("string"),
        "context": datasets.Value("string"),
        "question": datasets.Value("string"),
        "answers": datasets.Sequence(datasets.Value("string")),
        "answer_starts": datasets.Sequence(datasets.Value("int64")),
    }
)
JSON_TYPES = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number"}

# datasets counts every load of its json / csv / text readers with a request to Amazon S3 (the hub's
# download statistics): a network call for each local file, which without a network waits on a
# name lookup, or on a timeout where packets are dropped. Local files need no network at all.
datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False


def _files_format(source: DataSource, where: str, path: str) -> str:
    """The format of `path`, the file of config key `where` (a source's path or *_path)."""
    if source.format:
        return source.format
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise UserError(
            f"{where.rsplit('.', 1)[0]}.format: cannot tell the format of {path!r} from its extension; set it to one of "
            "text, json, csv, tsv, squad, label_text"
        )
    return FORMATS[suffix]


def _decode_error(path: str, raw: bytes, error: UnicodeDecodeError, encoding: str) -> str:
    """The message for bytes of `path` that are not valid `encoding`, naming their line."""
    line = raw[: error.start].count(b"\n") + 1
    return f"{path}, line {line}: not valid {encoding} (byte 0x{raw[error.start]:02x}); set the source's encoding (e.g. latin-1)"


def _diagnose(path: str, fmt: str, encoding: str, header: bool) -> str | None:
    """Find the first line of a local file that cannot be read, for a precise error message
    (`header`: a CSV/TSV file's first line names its columns)."""
    raw = Path(path).read_bytes()
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as error:
        return _decode_error(path, raw, error, encoding)
    if fmt in ("csv", "tsv") and header and len([line for line in text.splitlines() if line.strip()]) < 2:
        return f"{path}: a header line and no rows; point it at a file with data"
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


def _check_file(path: str, where: str, globs: bool) -> None:
    """Stop on a missing or empty file, naming its config key (a glob is left to `datasets`)."""
    if os.path.isdir(path):
        raise UserError(
            f"{where}: {path!r} is a directory; point it at a file (or a glob such as {path}/*.jsonl)"
        )
    if not (globs and any(ch in path for ch in "*?[")) and not os.path.isfile(path):
        raise UserError(
            f"{where}: file not found: {path!r}; fix the path (relative paths start at {os.getcwd()})"
        )
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise UserError(f"{where}: {path!r} is empty; point it at a file with data")


def _read_text(path: str, encoding: str, where: str) -> str:
    """A whole local file as text, gunzipped when its name ends in .gz."""
    raw = Path(path).read_bytes()
    if path.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as error:
            raise UserError(
                f"{where}: {path!r} is not a readable gzip file ({error}); re-create it"
            ) from None
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as error:
        raise UserError(_decode_error(path, raw, error, encoding)) from None


def _read_lines(path: str, encoding: str, where: str) -> list[str]:
    """The lines of a text file, split on newlines only: str.splitlines also breaks at characters
    such as \\x0c or \\u2028 inside a sentence, which would shift one side of an aligned corpus."""
    lines = _read_text(path, encoding, where).split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def _load_aligned(files: dict[str, str], source: DataSource, where: str) -> datasets.Dataset:
    """Aligned line files (a parallel corpus) -> one example per line, one column per file."""
    if not files:
        raise UserError(
            f"{where}: no files; map each column to a file, e.g. {{source: train.en, target: train.de}}"
        )
    for setting, allowed in (("format", (None, "text")), ("documents", ("row",))):
        if getattr(source, setting) not in allowed:
            raise UserError(
                f"{where}: aligned files are read as text lines, one example per line; remove "
                f"{setting}: {getattr(source, setting)} from this source, or give a single file"
            )
    columns = {}
    for column, path in files.items():
        _check_file(path, f"{where}.{column}", globs=False)
        columns[column] = _read_lines(path, source.encoding, f"{where}.{column}")
    (first, first_lines), *others = zip(files.values(), columns.values(), strict=True)
    for path, lines in others:
        if len(lines) != len(first_lines):
            raise UserError(
                f"{where}: aligned files differ in length: {first!r} has {len(first_lines)} lines, "
                f"{path!r} has {len(lines)}; every file needs one line per example"
            )
    return datasets.Dataset.from_dict(columns)


def _member(obj, key: str, kind: type, file: str, at: str):
    """`obj[key]` of parsed SQuAD JSON, checked to be a `kind`; a malformed file stops naming the
    path inside it (data[3].paragraphs[0].qas[5]), so the user can find the entry."""
    fix = "the file must be SQuAD v1.1 JSON (data[].paragraphs[].qas[].answers[])"
    if type(obj) is not dict:
        found = JSON_TYPES.get(type(obj), json.dumps(obj))
        raise UserError(f"{file}: {at or 'top level'}: expected an object, found {found}; {fix}")
    if key not in obj:
        raise UserError(f"{file}: {at + ': ' if at else ''}missing {key!r}; {fix}")
    value = obj[key]
    if type(value) is not kind:
        found = JSON_TYPES.get(type(value), json.dumps(value))
        raise UserError(
            f"{file}: {at + '.' if at else ''}{key}: expected {JSON_TYPES[kind]}, found {found}; {fix}"
        )
    return value


def _squad_question(qa, title: str, context: str, file: str, at: str) -> tuple:
    """One SQuAD question as a row of SQUAD_FEATURES (all answers kept, duplicates too)."""
    answers = [
        (
            _member(a, "text", str, file, f"{at}.answers[{i}]"),
            _member(a, "answer_start", int, file, f"{at}.answers[{i}]"),
        )
        for i, a in enumerate(_member(qa, "answers", list, file, at))
    ]
    return (
        _member(qa, "id", str, file, at),
        title,
        context,
        _member(qa, "question", str, file, at),
        [t for t, _ in answers],
        [s for _, s in answers],
    )


def _squad_rows(data, file: str) -> Iterator[tuple]:
    """Flatten data[].paragraphs[].qas[] into one row per question, in file order."""
    for a, article in enumerate(_member(data, "data", list, file, "")):
        title = _member(article, "title", str, file, f"data[{a}]")
        for p, paragraph in enumerate(_member(article, "paragraphs", list, file, f"data[{a}]")):
            at = f"data[{a}].paragraphs[{p}]"
            context = _member(paragraph, "context", str, file, at)
            for q, qa in enumerate(_member(paragraph, "qas", list, file, at)):
                yield _squad_question(qa, title, context, file, f"{at}.qas[{q}]")


def _load_squad(path: str, source: DataSource, where: str) -> datasets.Dataset:
    """SQuAD v1.1 JSON -> one row per question. Built here in one pass (datasets' json loader would
    give one row per file), then handed to Dataset.from_dict with fixed features."""
    try:
        data = json.loads(_read_text(path, source.encoding, where))
    except json.JSONDecodeError as error:
        raise UserError(f"{path}, line {error.lineno}: malformed JSON ({error.msg}); fix the file") from None
    rows = list(_squad_rows(data, path))
    columns = {name: [row[i] for row in rows] for i, name in enumerate(SQUAD_FEATURES)}
    return datasets.Dataset.from_dict(columns, features=SQUAD_FEATURES)


def check_label_text(source: DataSource, where: str) -> None:
    """label_text settings: label_pattern only with that format and a valid regex; rows only."""
    if source.label_pattern is not None:
        if source.format != "label_text":
            raise UserError(
                f"{where}.label_pattern applies to format: label_text only; remove it or set the format"
            )
        try:
            re.compile(source.label_pattern)
        except re.error as error:
            raise UserError(
                f"{where}.label_pattern: {source.label_pattern!r} is not a valid regex ({error})"
            ) from None
    if source.format == "label_text" and source.documents != "row":
        raise UserError(
            f"{where}: format label_text reads one example per line; remove documents: {source.documents}"
        )


def _load_label_text(path: str, source: DataSource, where: str) -> datasets.Dataset:
    """`LABEL text` lines -> columns label and text; blank lines are skipped, a line without text or
    whose label the pattern cannot find stops the run naming file and line."""
    pattern = re.compile(source.label_pattern) if source.label_pattern is not None else None
    labels, texts = [], []
    for number, line in enumerate(_read_lines(path, source.encoding, where), 1):
        if not line.strip():
            continue
        parts = line.split(None, 1)
        if len(parts) < 2:
            raise UserError(
                f"{path}, line {number}: expected `LABEL text` (a label, a space, the text), got {line.strip()!r}; "
                "fix or remove the line"
            )
        label = parts[0]
        if pattern is not None:
            match = pattern.search(label)
            if match is None:
                raise UserError(
                    f"{path}, line {number}: label_pattern {pattern.pattern!r} finds no label in {label!r}; "
                    "fix the line or the pattern"
                )
            label = match.group(1) if pattern.groups else match.group(0)
        labels.append(label)
        texts.append(parts[1].strip())
    return datasets.Dataset.from_dict({"label": labels, "text": texts})


def load_local(path: str | dict[str, str], source: DataSource, where: str) -> tuple[datasets.Dataset, str]:
    """One local split and the format it was read in."""
    if isinstance(path, dict):
        return _load_aligned(path, source, where), "text"
    _check_file(path, where, globs=source.format not in ("squad", "label_text"))
    fmt = _files_format(source, where, path)
    if fmt == "squad":
        return _load_squad(path, source, where), fmt
    if fmt == "label_text":
        return _load_label_text(path, source, where), fmt
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
        dataset = datasets.load_dataset(
            "text" if fmt == "text" else "json" if fmt == "json" else "csv", **kwargs
        )
        if fmt == "json":
            # pyarrow's JSON reader keeps bytes that are not UTF-8 in text columns unchecked (to fail
            # far later, or be miscounted as rows): a full validation finds them now
            dataset.with_format("arrow")[:].validate(full=True)
        return dataset, fmt
    except Exception as error:  # datasets wraps parser errors; find the line ourselves
        header = not source.column_names
        problem = _diagnose(path, fmt, source.encoding, header) if os.path.isfile(path) else None
        detail = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise UserError(problem or f"{where}: could not read {path!r} as {fmt}: {detail}") from None
