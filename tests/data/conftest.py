"""Shared fixtures for the data tests: the shipped tokenizer and a writer for small data files."""

import json
from pathlib import Path

import pytest

import dtcollie
from dtcollie.data import load_tokenizer

ASSETS = Path(dtcollie.__file__).parent / "assets"


@pytest.fixture(scope="session")
def assets() -> Path:
    return ASSETS


@pytest.fixture(scope="session")
def tok():
    return load_tokenizer(str(ASSETS / "tokenizer"))


@pytest.fixture
def write(tmp_path):
    """write(name, docs_or_rows) -> path; .txt joins documents by two blank lines, .jsonl dumps rows."""
    def _write(name: str, items) -> str:
        path = tmp_path / name
        if name.endswith(".jsonl"):
            path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in items))
        else:
            path.write_text("\n\n\n".join(items) + "\n")
        return str(path)
    return _write
