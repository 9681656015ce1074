"""The token-shard format: what the writer puts on disk, and the reader's one-line errors."""

import json

import numpy as np
import pytest

from dtcollie.data.shards import ShardWriter, finished_shard, open_corpus
from dtcollie.errors import DataError

from shard_corpus import write_corpus

DOCS = [[[5, 6, 7], [8], [9, 10]], [[11, 12, 13, 14]]]


def test_shards_hold_documents_each_followed_by_eos_with_their_starts(tmp_path):
    corpus = open_corpus(str(write_corpus(tmp_path / "c", DOCS, eos_id=1)))
    assert [(s.tokens, s.documents) for s in corpus.shards] == [(9, 3), (5, 1)]
    assert corpus.read(0, 0, 9).tolist() == [5, 6, 7, 1, 8, 1, 9, 10, 1]
    assert corpus.read(0, 4, 3).tolist() == [8, 1, 9]
    assert corpus.document_starts(0).tolist() == [0, 4, 6]
    assert corpus.read(1, 0, 5).tolist() == [11, 12, 13, 14, 1]
    raw = (tmp_path / "c" / "00000.bin").read_bytes()
    assert raw[:4] == bytes([5, 0, 6, 0])  # uint16, little-endian
    assert corpus.tokens == 14 and corpus.dtype == np.uint16


def test_a_vocabulary_over_65536_ids_is_stored_as_uint32(tmp_path):
    corpus = open_corpus(str(write_corpus(tmp_path / "c", [[[70_000, 3]]], vocab_size=70_001)))
    assert (tmp_path / "c" / "00000.bin").stat().st_size == 3 * 4
    assert corpus.read(0, 0, 3).tolist() == [70_000, 3, 0]


def test_a_shard_is_finished_only_once_its_metadata_is_in_place(tmp_path):
    writer = ShardWriter(str(tmp_path), "00000", 100, 0, {})
    writer.add_documents([[4, 5, 0]])
    assert finished_shard(str(tmp_path), "00000") is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.bin.tmp"]
    with pytest.raises(DataError, match=r"has shards but no corpus.json: its tokenization did not finish; rerun"):
        open_corpus(str(tmp_path))
    meta = writer.finish()
    assert finished_shard(str(tmp_path), "00000") == meta and meta["tokens"] == 3 and meta["documents"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.bin", "00000.idx.npy", "00000.json"]


def _truncate(folder):
    path = folder / "00001.bin"
    path.write_bytes(path.read_bytes()[:-2])


def _empty(folder):
    manifest = json.loads((folder / "corpus.json").read_text())
    manifest["shards"][1]["tokens"] = 0
    (folder / "corpus.json").write_text(json.dumps(manifest))
    (folder / "00001.bin").write_bytes(b"")


@pytest.mark.parametrize("damage, message", [
    (_truncate, r"c/00001.bin has 8 bytes, but corpus.json says 5 tokens of uint16 \(10 bytes\): truncated"),
    (_empty, r"c/00001.bin is an empty shard \(0 tokens\) in corpus .*c; "),
    (lambda folder: (folder / "00001.idx.npy").unlink(), r"c/00001.idx.npy is missing \(shard 00001 of corpus"),
    (lambda folder: (folder / "corpus.json").write_text("{"), r"c/corpus.json is not valid JSON"),
    (lambda folder: (folder / "corpus.json").write_text('{"format": "other"}'),
     r"c/corpus.json is not a dtcollie-tokens-v1 manifest \(format 'other'\)"),
])
def test_damaged_corpus_names_the_file(tmp_path, damage, message):
    folder = write_corpus(tmp_path / "c", DOCS)
    damage(folder)
    with pytest.raises(DataError, match=message):
        open_corpus(str(folder))


def test_a_folder_that_is_not_a_corpus(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=rf"{tmp_path} is not a token corpus \(no corpus.json\); make one with"):
        open_corpus(str(tmp_path))
    with pytest.raises(DataError, match=r"token corpus .*/nowhere does not exist"):
        open_corpus(str(tmp_path / "nowhere"))


def test_a_corpus_from_another_tokenizer_is_refused(tmp_path, tok):
    folder = write_corpus(tmp_path / "c", DOCS, vocab_size=100, eos_id=0)
    with pytest.raises(DataError, match=r"tokenized with vocab_size 100 and eos_id 0, but tokenizer .* has "
                                        rf"vocab_size {tok.vocab_size} and eos_id {tok.eos_id}"):
        open_corpus(str(folder), tok)
    assert open_corpus(str(write_corpus(tmp_path / "d", DOCS, tok.vocab_size, tok.eos_id)), tok).tokens == 14
