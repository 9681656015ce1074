import json
import subprocess
import sys

import pytest

from dtcollie.data import load_tokenizer, train_tokenizer
from dtcollie.errors import DataError


def test_shipped_tokenizer_ids_and_round_trip(tok):
    assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (2048, 0, 1)
    text = "It is a truth universally acknowledged,\n  that 17 + 25 = 42 (naïve café, 😀)."
    ids = tok.encode(text)
    assert tok.eos_id not in ids and max(ids) < tok.vocab_size
    assert tok.decode(ids) == text
    english = "It is a truth universally acknowledged, that a single man in possession of a good fortune"
    assert len(tok.encode(english)) < len(english) / 3  # the merges were learned on English prose
    assert tok.encode_batch([text, "x"]) == [ids, tok.encode("x")]


def test_transformers_loads_the_shipped_folder(tok, assets):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(assets / "tokenizer"))
    text = "Mr. Darcy walked 3 miles."
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
    assert (hf.eos_token_id, hf.pad_token_id, len(hf)) == (tok.eos_id, tok.pad_id, tok.vocab_size)


def test_training_is_deterministic_and_loadable(tmp_path):
    texts = ["the quick brown fox jumps over the lazy dog " * 20, "pack my box with five dozen liquor jugs " * 20]
    train_tokenizer(texts, 300, str(tmp_path / "a"))
    train_tokenizer(texts, 300, str(tmp_path / "b"))
    assert (tmp_path / "a/tokenizer.json").read_bytes() == (tmp_path / "b/tokenizer.json").read_bytes()
    loaded = load_tokenizer(str(tmp_path / "a"))
    assert loaded.vocab_size == 300 and (loaded.eos_id, loaded.pad_id) == (0, 1)
    assert json.loads((tmp_path / "a/tokenizer_config.json").read_text())["eos_token"] == "<|endoftext|>"
    assert loaded.decode(loaded.encode("lazy fox")) == "lazy fox"


def test_build_tokenizer_tool(tmp_path, write, assets):
    tool = [sys.executable, str(assets.parents[1] / "tools/build_tokenizer.py")]
    path = write("a.txt", ["one two three " * 30, "four five six " * 30])
    built = subprocess.run(tool + ["--files", path, "--vocab-size", "280", "--out", str(tmp_path / "tok")],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    assert 258 < load_tokenizer(str(tmp_path / "tok")).vocab_size <= 280  # tiny text runs out of merges
    missing = subprocess.run(tool + ["--files", str(tmp_path / "nope*.txt"), "--out", str(tmp_path / "x")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr.startswith("error: ") and missing.stderr.count("\n") == 1


def test_missing_tokenizer_folder_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match=r"tokenizer folder .*nope does not exist.*build_tokenizer"):
        load_tokenizer(str(tmp_path / "nope"))
    with pytest.raises(DataError, match="has no tokenizer.json"):
        load_tokenizer(str(tmp_path))


def test_pad_falls_back_to_eos_for_hf_folders_without_pad(tmp_path, tok):
    tok.backend.save(str(tmp_path / "tokenizer.json"))
    eos = {"__type": "AddedToken", "content": "<|endoftext|>", "lstrip": False, "rstrip": False, "normalized": False}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": eos}))  # as Llama 2's config has it
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.pad_id == loaded.eos_id == 0
