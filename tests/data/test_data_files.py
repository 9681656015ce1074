import logging

import pytest

from dtcollie.data.files import read_documents, read_examples, resolve_files, split_txt_documents
from dtcollie.errors import DataError


def test_txt_documents_are_separated_by_two_blank_lines():
    text = "Title\n\n\nPara one\nwrapped.\n\nPara two.\n\n \n\n\nLast\r\n\r\n\r\nCRLF doc\n"
    assert split_txt_documents(text) == ["Title", "Para one\nwrapped.\n\nPara two.", "Last", "CRLF doc"]


def test_pattern_matching_nothing_names_the_pattern(tmp_path):
    with pytest.raises(DataError, match=r"data.train_files entry '.*missing\*\.txt' matches no file"):
        resolve_files([str(tmp_path / "missing*.txt")], "data.train_files")
    with pytest.raises(DataError, match=r"data.val_files entry '.*gone.jsonl' matches no file"):
        resolve_files([str(tmp_path / "gone.jsonl")], "data.val_files")
    with pytest.raises(DataError, match="data.train_files is empty"):
        resolve_files([], "data.train_files")


def test_unsupported_extension(tmp_path):
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(DataError, match=r"a.csv \(data.train_files\) has unsupported extension '.csv'"):
        resolve_files([str(tmp_path / "*")], "data.train_files")


def test_globs_expand_sorted_without_duplicates(write):
    b, a = write("b.txt", ["x"]), write("a.txt", ["y"])
    assert resolve_files([b.replace("b.txt", "*.txt"), a], "k") == [a, b]


BAD_ROWS = ['{"text": "fine"}', '{"text": "broken",', "", '{"other": "x"}', '{"text": 5}', "[1]", '{"text": "ok"}']


@pytest.mark.parametrize("bad, message", [
    ('{"text": "broken",',
     r"not valid JSON \(Expecting .* at column \d+\); fix it or set data.skip_bad_lines = true"),
    ('{"other": "x"}', r"has no field 'text' \(data.text_field\)"),
    ('{"text": 5}', r"field 'text' must be a string, got int"),
    ("[1]", r"expected a JSON object, got list"),
])
def test_malformed_jsonl_names_file_and_line(write, bad, message):
    path = write("x.jsonl", ['{"text": "fine"}'] * 15 + ["", bad, '{"text": "after"}'])
    with pytest.raises(DataError, match=r"x.jsonl line 17: " + message):
        read_documents([path], "text", skip_bad_lines=False)


def test_skip_bad_lines_keeps_good_rows_and_logs(write, caplog):
    path = write("x.jsonl", BAD_ROWS)
    with caplog.at_level(logging.WARNING, logger="dtcollie.data"):
        docs = read_documents([path], "text", skip_bad_lines=True)
    assert docs == ["fine", "ok"]
    assert f"skipped 4 bad records in {path}" in caplog.text


def test_sft_reads_pairs_and_rejects_txt(write):
    path = write("s.jsonl", [{"q": "a", "a": "b"}, {"q": "c", "a": "d"}])
    assert read_examples([path], "q", "a", False) == [("a", "b"), ("c", "d")]
    with pytest.raises(DataError, match=r"line 1: has no field 'input' \(data.input_field\)"):
        read_examples([path], "input", "a", False)
    with pytest.raises(DataError, match="sft data must be .jsonl or .parquet records"):
        read_examples([write("t.txt", ["x"])], "q", "a", False)
