"""Find data files and read them into documents (pretrain) or input/output examples (sft).

Formats:
- `.txt`: documents are separated by two or more blank lines (a single blank line separates
  paragraphs inside a document). A file without such a gap is one document.
- `.jsonl`: one JSON object per line; blank lines are ignored.
- `.parquet`: one record per row, its columns as fields.
Pretrain reads `data.text_field`, sft reads `data.input_field` and `data.output_field` of each
record; each must be a string. The same records can come from a local Hugging Face dataset
(`data.hf_dataset`, see records.py).

A malformed record is a `DataError` naming file and line (or row), unless `skip_bad_lines` is set,
in which case it is skipped and the count is logged.
"""

import glob
import os
import re
from pathlib import Path

from dtcollie.data.records import convert_records, file_records, string_fields
from dtcollie.errors import DataError

SUFFIXES = (".txt", ".jsonl", ".parquet")
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


def records_of(files: list[str], text_field: str):
    """(where, record) of every file in order; a .txt document is a record with just `text_field`."""
    for path in files:
        if path.endswith(".txt"):
            for number, document in enumerate(split_txt_documents(_read_text(path)), start=1):
                yield f"{path} document {number}", {text_field: document}
        else:
            yield from file_records(path)


def documents_of(records, text_field: str, skip_bad_lines: bool) -> list[str]:
    """Pretrain documents: the `text_field` of each record."""
    convert = string_fields({"data.text_field": text_field})
    return [text for _, (text,) in convert_records(records, convert, skip_bad_lines)]


def examples_of(records, input_field: str, output_field: str, skip_bad_lines: bool) -> list[tuple[str, str]]:
    """SFT (input, output) pairs of the records."""
    convert = string_fields({"data.input_field": input_field, "data.output_field": output_field})
    return [pair for _, pair in convert_records(records, convert, skip_bad_lines)]


def require_records(files: list[str], kind: str) -> None:
    """sft and chat data are records: .txt files have only text."""
    for path in files:
        if path.endswith(".txt"):
            raise DataError(f"{path}: {kind} data must be .jsonl or .parquet records; convert it or set "
                            f"data.kind = \"pretrain\"")


def read_documents(files: list[str], text_field: str, skip_bad_lines: bool) -> list[str]:
    """Pretrain documents from .txt, .jsonl and .parquet files, in file order."""
    return documents_of(records_of(files, text_field), text_field, skip_bad_lines)


def read_examples(files: list[str], input_field: str, output_field: str,
                  skip_bad_lines: bool) -> list[tuple[str, str]]:
    """SFT (input, output) pairs from .jsonl and .parquet files, in file order."""
    require_records(files, "sft")
    return examples_of(records_of(files, ""), input_field, output_field, skip_bad_lines)
