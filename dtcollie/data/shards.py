"""Token shards: a tokenized corpus on disk, written atomically and read a slice at a time.

A corpus folder holds:

    corpus.json        the manifest, written last: format, dtype, vocab_size, eos_id, totals and the
                       finished shards in corpus order, [{"name", "tokens", "documents"}, ...]
    NAME.bin           the shard's tokens, little-endian uint16 (vocab_size <= 65536) or uint32
    NAME.idx.npy       int64 start offset of every document within the shard's tokens
    NAME.json          the shard's metadata: dtype, tokens, documents, vocab_size, eos_id and what the
                       shard was made from ("source"); its presence marks the shard finished

Every document ends with EOS, as in `pretrain.py` (BOS and the like are part of it), so the stream of a corpus is the
concatenation of its shards and a reader finds document boundaries without the index.

A shard's .bin and .idx.npy are written under `.tmp` names and renamed once complete, and its .json
is renamed into place after them: a shard without its .json is the remains of an interrupted write,
never a finished shard. corpus.json is replaced atomically too (temporary file, then os.replace), so
a reader sees either no manifest or a whole one.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dtcollie.errors import DataError

FORMAT = "dtcollie-tokens-v1"
MANIFEST = "corpus.json"
MAKE_ONE = "python tools/tokenize_corpus.py FILES --tokenizer DIR --out"


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest little-endian unsigned type that holds every id below `vocab_size`."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def write_json_atomic(path: Path, value: dict) -> None:
    """Write JSON to a temporary file, flush it to disk, then rename: readers see all or nothing."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as out:
        out.write(json.dumps(value, indent=1) + "\n")
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


class ShardWriter:
    """Writes one shard: add documents (in order), then `finish()` publishes it.

    Tokens go to disk as they are added, so a shard never needs to fit in memory; only the document
    start offsets (8 bytes per document) are held until `finish`.
    """

    def __init__(self, folder: str, name: str, vocab_size: int, eos_id: int, source: dict):
        self.folder, self.name = Path(folder), name
        self.vocab_size, self.eos_id, self.source = vocab_size, eos_id, source
        self.dtype = token_dtype(vocab_size)
        self.tokens, self.starts = 0, []
        self._bin = open(self.folder / f"{name}.bin.tmp", "wb")

    def add_documents(self, documents: list[list[int]]) -> None:
        """Documents as token id lists, each ending with EOS (`Tokenizer.encode_documents`)."""
        lengths = np.fromiter((len(tokens) for tokens in documents), dtype=np.int64, count=len(documents))
        packed = np.fromiter((t for tokens in documents for t in tokens), dtype=np.int64, count=int(lengths.sum()))
        self.add_packed(packed, lengths)

    def add_packed(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Documents already followed by EOS: their tokens concatenated, and each one's length with its EOS."""
        ends = np.cumsum(lengths)
        if len(lengths) == 0:
            return
        # Programming errors, not user errors: a shard that broke the format would mislead every reader.
        if ends[-1] != len(tokens) or lengths.min() < 1 or (tokens[ends - 1] != self.eos_id).any():
            raise ValueError("packed documents must each end with EOS and their lengths must sum to the tokens")
        if int(tokens.max()) >= self.vocab_size:
            raise ValueError(f"token id {int(tokens.max())} is outside the vocabulary of {self.vocab_size}")
        self.starts.append(self.tokens + ends - lengths)
        tokens.astype(self.dtype, copy=False).tofile(self._bin)
        self.tokens += len(tokens)

    def finish(self) -> dict:
        """Rename the data files into place, then the metadata: from here on the shard is finished."""
        if self.tokens == 0:
            raise ValueError(f"shard {self.name} has no documents; do not write empty shards")
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        starts = np.concatenate(self.starts).astype(np.int64)
        with open(self.folder / f"{self.name}.idx.npy.tmp", "wb") as idx:
            np.save(idx, starts)
        os.replace(self.folder / f"{self.name}.bin.tmp", self.folder / f"{self.name}.bin")
        os.replace(self.folder / f"{self.name}.idx.npy.tmp", self.folder / f"{self.name}.idx.npy")
        meta = {"format": FORMAT, "name": self.name, "dtype": self.dtype.name, "tokens": self.tokens,
                "documents": len(starts), "vocab_size": self.vocab_size, "eos_id": self.eos_id,
                "source": self.source}
        write_json_atomic(self.folder / f"{self.name}.json", meta)
        return meta


def finished_shard(folder: str, name: str) -> dict | None:
    """The metadata of shard `name` if it was finished, else None (absent or interrupted)."""
    path = Path(folder) / f"{name}.json"
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # renamed into place only when whole, so this is damage: rewrite the shard
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def write_manifest(folder: str, shards: list[dict], vocab_size: int, eos_id: int, job: dict) -> None:
    """corpus.json for `shards` (finished shard metadata, in corpus order) and the settings that made them."""
    write_json_atomic(Path(folder) / MANIFEST, {
        "format": FORMAT, "dtype": token_dtype(vocab_size).name, "vocab_size": vocab_size, "eos_id": eos_id,
        "tokens": sum(s["tokens"] for s in shards), "documents": sum(s["documents"] for s in shards),
        "shards": [{"name": s["name"], "tokens": s["tokens"], "documents": s["documents"]} for s in shards],
        "job": job})


@dataclass(frozen=True)
class Shard:
    path: Path  # the .bin file
    tokens: int
    documents: int


class Corpus:
    """A validated corpus folder: its shards and a way to read any slice of one without loading it."""

    def __init__(self, folder: str, manifest: dict, shards: list[Shard]):
        self.folder = folder
        self.vocab_size, self.eos_id = manifest["vocab_size"], manifest["eos_id"]
        self.dtype = token_dtype(self.vocab_size)
        self.shards = shards
        self.tokens = sum(s.tokens for s in shards)

    def read(self, shard: int, start: int, count: int) -> np.ndarray:
        """Tokens [start, start + count) of shard `shard`, read from disk into a new array.

        A plain read, not a memory map: mapped pages would count as this process's resident memory
        and grow with the corpus, where a read's pages stay in the OS page cache.
        """
        path = self.shards[shard].path
        tokens = np.fromfile(path, dtype=self.dtype, count=count, offset=start * self.dtype.itemsize)
        if len(tokens) != count:
            raise DataError(f"{path} ended at token {start + len(tokens)} while reading {count} tokens from {start} "
                            f"(it changed after the corpus was opened); rebuild the corpus")
        return tokens

    def document_starts(self, shard: int) -> np.ndarray:
        """The start offset of every document in shard `shard` (loaded from its .idx.npy)."""
        return np.load(_idx_path(self.shards[shard].path))


def _idx_path(bin_path: Path) -> Path:
    return bin_path.with_name(bin_path.name[: -len(".bin")] + ".idx.npy")


def open_corpus(folder: str, tokenizer=None) -> Corpus:
    """Read and check `folder/corpus.json` and every shard it lists; with `tokenizer`, check that the
    corpus was made with its vocabulary size and EOS id."""
    root = Path(folder)
    manifest = _read_manifest(root)
    itemsize = token_dtype(manifest["vocab_size"]).itemsize
    shards = []
    for entry in manifest["shards"]:
        path = root / f"{entry['name']}.bin"
        for needed in (path, _idx_path(path), root / f"{entry['name']}.json"):
            if not needed.is_file():
                raise DataError(f"{needed} is missing (shard {entry['name']} of corpus {folder}); rerun the "
                                f"tools/tokenize_corpus.py command that made the corpus to rewrite it")
        if entry["tokens"] == 0:
            raise DataError(f"{path} is an empty shard (0 tokens) in corpus {folder}; remove it from corpus.json "
                            f"or rebuild the corpus")
        size = path.stat().st_size
        if size != entry["tokens"] * itemsize:
            raise DataError(f"{path} has {size:,} bytes, but corpus.json says {entry['tokens']:,} tokens of "
                            f"{manifest['dtype']} ({entry['tokens'] * itemsize:,} bytes): truncated or overwritten; "
                            f"rerun the tools/tokenize_corpus.py command that made the corpus")
        shards.append(Shard(path, entry["tokens"], entry["documents"]))
    if tokenizer is not None and (tokenizer.vocab_size, tokenizer.eos_id) != (manifest["vocab_size"],
                                                                              manifest["eos_id"]):
        raise DataError(f"corpus {folder} was tokenized with vocab_size {manifest['vocab_size']} and eos_id "
                        f"{manifest['eos_id']}, but tokenizer {tokenizer.folder or '(in memory)'} has vocab_size "
                        f"{tokenizer.vocab_size} and eos_id {tokenizer.eos_id}; use the tokenizer the corpus "
                        f"was made with or re-tokenize it")
    return Corpus(folder, manifest, shards)


def _read_manifest(root: Path) -> dict:
    path = root / MANIFEST
    if not root.is_dir():
        raise DataError(f"token corpus {root} does not exist; make one with {MAKE_ONE} {root}")
    if not path.is_file():
        if any(root.glob("*.bin")) or any(root.glob("*.tmp")):
            raise DataError(f"{root} has shards but no {MANIFEST}: its tokenization did not finish; rerun the "
                            f"same tools/tokenize_corpus.py command to complete it")
        raise DataError(f"{root} is not a token corpus (no {MANIFEST}); make one with {MAKE_ONE} {root}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path} is not valid JSON ({err}); rerun tools/tokenize_corpus.py to rewrite it") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise DataError(f"{path} is not a {FORMAT} manifest (format {found!r}); re-tokenize the corpus with "
                        f"tools/tokenize_corpus.py")
    if manifest["dtype"] != token_dtype(manifest["vocab_size"]).name:
        raise DataError(f"{path} says dtype {manifest['dtype']}, but vocab_size {manifest['vocab_size']} needs "
                        f"{token_dtype(manifest['vocab_size']).name}; re-tokenize the corpus")
    if not manifest["shards"]:
        raise DataError(f"{path} lists no shards (its inputs held no documents); tokenize non-empty files")
    return manifest
