"""Find data files and read them into documents (pretrain) or input/output examples (sft).

Formats:
- `.txt`: documents are separated by two or more blank lines (a single blank line separates
  paragraphs inside a document). A file without such a gap is one document.
- `.jsonl`: one JSON object per line; blank lines are ignored. Pretrain reads `data.text_field`,
  sft reads `data.input_field` and `data.output_field`; each must be a string.

A malformed jsonl line is a `DataError` naming file and line, unless `skip_bad_lines` is set, in
which case it is skipped and the count is logged: silently dropping data hides broken exports.
"""

import glob
import json
import logging
import os
import re
from pathlib import Path

from dtcollie.errors import DataError

log = logging.getLogger("dtcollie.data")

SUFFIXES = (".txt", ".jsonl")
_DOC_GAP = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)+")


def resolve_files(patterns: list[str], key: str, suffixes: tuple[str, ...] = SUFFIXES) -> list[str]:
    """Expand paths and globs (relative to the working directory) in order, without duplicates."""
    kinds = " or ".join(suffixes)
    if not patterns:
        raise DataError(f"{key} is empty; list {kinds} files or globs there")
    files = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
        else:
            matches = [pattern] if os.path.exists(pattern) else []
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise DataError(f"{key} entry {pattern!r} matches no file (working directory {os.getcwd()}); "
                            f"fix the path or glob in {key}")
        for path in matches:
            if Path(path).suffix not in suffixes:
                raise DataError(f"{path} ({key}) has unsupported extension {Path(path).suffix!r}; "
                                f"use {kinds} files")
            if path not in files:
                files.append(path)
    return files


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); convert it to UTF-8") from None


def split_txt_documents(text: str) -> list[str]:
    """Documents of a .txt file: blocks separated by two or more blank lines, stripped, non-empty."""
    text = text.replace("\r\n", "\n")
    return [doc.strip() for doc in _DOC_GAP.split(text) if doc.strip()]


def read_jsonl(path: str, fields: dict[str, str], skip_bad_lines: bool) -> list[dict[str, str]]:
    """Rows of `path` with the requested string fields; `fields` maps config key -> field name."""
    def row(record):
        problem = _field_problem(record, fields)
        return (None, problem) if problem else ({name: record[name] for name in fields.values()}, None)
    return read_jsonl_records(path, row, skip_bad_lines)


def read_jsonl_records(path: str, convert, skip_bad_lines: bool) -> list:
    """`convert(record)` -> (value, None) or (None, problem) for each JSON line of `path`, blank lines
    ignored; a line that is not JSON or has a problem is a DataError naming file and line, or is
    skipped and counted with `skip_bad_lines`."""
    return list(iter_jsonl_records(path, convert, skip_bad_lines, "set data.skip_bad_lines = true"))


def iter_jsonl_records(path: str, convert, skip_bad_lines: bool, skip_fix: str):
    """`read_jsonl_records`, one line at a time so a file larger than memory can be read; `skip_fix`
    says how the caller's user turns on skipping (a config key or a command-line flag)."""
    bad, offset = 0, 0
    with open(path, "rb") as lines:
        for number, raw in enumerate(lines, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{path} is not UTF-8 text ({err.reason} at byte {offset + err.start}); "
                                f"convert it to UTF-8") from None
            offset += len(raw)
            if not line.strip():
                continue
            try:
                value, problem = convert(json.loads(line))
            except json.JSONDecodeError as err:
                value, problem = None, f"not valid JSON ({err.msg} at column {err.colno})"
            except RecursionError:
                value, problem = None, "nested too deeply to read"
            if problem is None:
                yield value
            elif skip_bad_lines:
                bad += 1
            else:
                raise DataError(f"{path} line {number}: {problem}; fix the line or {skip_fix}")
    if bad:
        log.warning("skipped %d malformed lines in %s", bad, path)


def _field_problem(record, fields: dict[str, str]) -> str | None:
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    for key, name in fields.items():
        if name not in record:
            return f"has no field {name!r} (data.{key})"
        if not isinstance(record[name], str):
            return f"field {name!r} must be a string, got {type(record[name]).__name__}"
    return None


def read_documents(files: list[str], text_field: str, skip_bad_lines: bool) -> list[str]:
    """Pretrain documents from .txt and .jsonl files, in file order."""
    docs = []
    for path in files:
        if path.endswith(".txt"):
            docs += split_txt_documents(_read_text(path))
        else:
            docs += [row[text_field] for row in read_jsonl(path, {"text_field": text_field}, skip_bad_lines)]
    return docs


def read_examples(files: list[str], input_field: str, output_field: str,
                  skip_bad_lines: bool) -> list[tuple[str, str]]:
    """SFT (input, output) pairs from .jsonl files, in file order."""
    examples = []
    fields = {"input_field": input_field, "output_field": output_field}
    for path in files:
        if not path.endswith(".jsonl"):
            raise DataError(f"{path}: sft data must be .jsonl with {input_field!r}/{output_field!r} fields; "
                            f"convert it or set data.kind = \"pretrain\"")
        examples += [(row[input_field], row[output_field]) for row in read_jsonl(path, fields, skip_bad_lines)]
    return examples
