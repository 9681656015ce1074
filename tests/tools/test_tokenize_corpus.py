"""tokenize_corpus and its tool: the shards hold the encoded documents, the same bytes whatever the worker
count or an interruption, and bad input is one line with exit code 2."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow
import pyarrow.parquet
import pytest

import dtcollie
from dtcollie.data import load_tokenizer
from dtcollie.data.shards import open_corpus
from dtcollie.data.tokenize_corpus import tokenize_corpus
from dtcollie.errors import DataError

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = str(Path(dtcollie.__file__).parent / "assets" / "tokenizer")


def documents(n: int, tag: str) -> list[str]:
    return [f"{tag} document {i}:" + " the quick brown fox" * (i % 7 + 1) for i in range(n)]


@pytest.fixture
def inputs(tmp_path) -> tuple[list[str], list[str]]:
    """Three files (.txt, .jsonl, .parquet) and all their documents in order."""
    txt, jsonl, parquet = documents(30, "txt"), documents(25, "jsonl"), documents(20, "parquet")
    (tmp_path / "a.txt").write_text("\n\n\n".join(txt) + "\n")
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in jsonl))
    pyarrow.parquet.write_table(pyarrow.table({"body": parquet}), tmp_path / "c.parquet", row_group_size=7)
    return [str(tmp_path / name) for name in ("a.txt", "b.jsonl", "c.parquet")], txt + jsonl + parquet


def run(inputs, out, workers=1, **options):
    return tokenize_corpus(inputs, str(out), TOKENIZER, text_field="body", workers=workers, tokens_per_shard=300,
                           progress=False, **options)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_shards_hold_each_document_encoded_and_followed_by_eos(tmp_path, inputs):
    files, docs = inputs
    report = run(files, tmp_path / "out")
    tok = load_tokenizer(TOKENIZER)
    corpus = open_corpus(str(tmp_path / "out"), tok)
    encoded = [tok.encode(doc) + [tok.eos_id] for doc in docs]
    stream = [corpus.read(i, 0, shard.tokens).tolist() for i, shard in enumerate(corpus.shards)]
    assert sum(stream, []) == sum(encoded, [])
    starts = [corpus.document_starts(i).tolist() for i in range(len(corpus.shards))]
    split = [shard[start:end] for shard, s in zip(stream, starts) for start, end in zip(s, s[1:] + [len(shard)])]
    assert split == encoded
    assert len(corpus.shards) > 6 and all(shard.tokens >= 300 for shard in corpus.shards[:2])
    assert (report.documents, report.tokens, report.shards) == (75, corpus.tokens, len(corpus.shards))
    assert report.text_bytes == sum(len(doc.encode()) for doc in docs)


def test_same_bytes_with_two_workers_and_after_an_interruption(tmp_path, inputs):
    files, _ = inputs
    run(files, tmp_path / "one", workers=1)
    run(files, tmp_path / "two", workers=2)
    expected = folder_bytes(tmp_path / "one")
    assert folder_bytes(tmp_path / "two") == expected

    # A crash: the manifest not yet written, the jsonl file's third shard half-written (its data renamed,
    # its metadata not), its fourth begun under the temporary name, the parquet file's shards not started.
    crashed = tmp_path / "crashed"
    shutil.copytree(tmp_path / "one", crashed)
    (crashed / "corpus.json").unlink()
    (crashed / "00001-00002.json").unlink()
    (crashed / "00001-00002.bin").write_bytes(b"\x07" * 11)
    (crashed / "00001-00003.bin.tmp").write_bytes(b"\x01\x02")
    for path in crashed.glob("00001-0000[3-9].*"):
        if not path.name.endswith(".tmp"):
            path.unlink()
    for path in crashed.glob("00002-*"):
        path.unlink()
    report = run(files, crashed, workers=2)
    assert folder_bytes(crashed) == expected
    kept = sum(1 for name in expected if name.endswith(".json") and name < "00001-00002")
    assert report.shards_reused == kept and report.shards == len([n for n in expected if n.endswith(".bin")])
    assert run(files, crashed).tokens == 0  # everything finished: nothing is tokenized again


def test_shards_from_other_settings_are_refused(tmp_path, inputs):
    files, _ = inputs
    run(files, tmp_path / "out")
    with pytest.raises(DataError, match=r"00000-00000.json was made from .*'tokens_per_shard': 300.* not .*"
                                        r"'tokens_per_shard': 500.*; write to a new --out folder"):
        tokenize_corpus(files, str(tmp_path / "out"), TOKENIZER, "body", 1, 500, progress=False)


def test_bad_rows_name_file_and_row(tmp_path, inputs):
    files, _ = inputs
    with pytest.raises(DataError, match=r"b.jsonl line 1: has no field 'text' \(--text-field\); fix it or pass "
                                        r"--skip-bad-lines"):
        tokenize_corpus(files[1:2], str(tmp_path / "o"), TOKENIZER, "text", progress=False)
    pyarrow.parquet.write_table(pyarrow.table({"body": ["x", None]}), tmp_path / "n.parquet")
    with pytest.raises(DataError, match=r"n.parquet row 2: field 'body' must be a string, got NoneType; .* "
                                        r"--skip-bad-lines"):
        run([str(tmp_path / "n.parquet")], tmp_path / "o")
    with pytest.raises(DataError, match=r"c.parquet row 1: has no field 'text' \(--text-field\)"):
        tokenize_corpus(files[2:], str(tmp_path / "o"), TOKENIZER, "text", progress=False)


def run_tool(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "tokenize_corpus.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_tool_prints_throughput_and_reports_bad_input_in_one_line(tmp_path, inputs):
    files, _ = inputs
    done = run_tool(*files, "--tokenizer", TOKENIZER, "--out", tmp_path / "out", "--text-field", "body",
                    "--workers", "2")
    assert done.returncode == 0, done.stderr
    corpus = open_corpus(str(tmp_path / "out"))
    assert f"tokenized 75 documents, {corpus.tokens:,} tokens" in done.stdout and " tokens/s, " in done.stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "broken"\n')
    done = run_tool(bad, "--tokenizer", TOKENIZER, "--out", tmp_path / "bad_out")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"error: {bad} line 2: not valid JSON")
