"""Data benchmark: streaming a large token corpus in flat memory, and the tokenizer's throughput.

`synthetic_corpus` writes random tokens (documents of random lengths, each ended by EOS) straight
through the shard writer, so a multi-gigabyte corpus takes seconds, not a tokenizer run.
`stream_corpus` reads it with `TokenStream` on one core and samples the process's resident size
(VmRSS, which counts mapped file pages too) after every batch: the peak minus the resident size
before streaming is what the loader holds, and must not grow with the corpus.
`tokenizer_throughput` times `tokenize_corpus` on generated text (the shipped novels' paragraphs,
shuffled into several files so the workers have one each).
"""

import dataclasses
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import dtcollie
from dtcollie.data.files import split_txt_documents
from dtcollie.data.shards import ShardWriter, write_manifest
from dtcollie.data.stream import TokenStream
from dtcollie.data.tokenize_corpus import TokenizeReport, tokenize_corpus

ASSETS = Path(dtcollie.__file__).parent / "assets"
CHUNK_TOKENS = 2**22  # written per call: keeps the builder's own memory small next to the corpus


def resident_bytes() -> int:
    with open("/proc/self/status") as status:
        return int(re.search(r"^VmRSS:\s+(\d+) kB", status.read(), re.MULTILINE).group(1)) * 1024


def synthetic_corpus(folder: str, tokens: int, vocab_size: int = 32_000, tokens_per_shard: int = 2**27,
                     mean_document: int = 1_000, seed: int = 0) -> None:
    """About `tokens` random tokens in whole documents (lengths uniform in 1..2 * mean_document)."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    metas, written = [], 0
    while written < tokens:
        writer = ShardWriter(folder, f"{len(metas):05d}", vocab_size, 0, {"synthetic": seed})
        while writer.tokens < tokens_per_shard and written + writer.tokens < tokens:
            lengths = rng.integers(1, 2 * mean_document, CHUNK_TOKENS // mean_document)
            packed = rng.integers(1, vocab_size, int(lengths.sum()), dtype=np.uint16)
            packed[np.cumsum(lengths) - 1] = 0
            writer.add_packed(packed, lengths)
        written += writer.tokens
        metas.append(writer.finish())
    write_manifest(folder, metas, vocab_size, 0, {"synthetic": seed})


@dataclasses.dataclass
class StreamResult:
    tokens: int
    seconds: float
    rss_baseline: int
    rss_peak: int


def stream_corpus(folder: str, seq_len: int = 2048, batch_size: int = 8, max_tokens: int | None = None) -> StreamResult:
    """One shuffled pass (or `max_tokens`) over `folder` on one core, timing it and watching VmRSS."""
    torch.set_num_threads(1)
    stream = TokenStream([(folder, 1.0)], seq_len, batch_size, seed=0, document_mask=True)
    batches = stream.batches_per_pass
    if max_tokens is not None:
        batches = min(batches, max(1, max_tokens // (batch_size * seq_len)))
    baseline = peak = resident_bytes()
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(stream)
        peak = max(peak, resident_bytes())
    del batch
    return StreamResult(batches * batch_size * seq_len, time.perf_counter() - start, baseline, peak)


def text_sample(folder: str, megabytes: float, files: int = 8, seed: int = 0) -> list[str]:
    """`files` .txt files of about `megabytes` in all: the shipped novels' paragraphs, shuffled, as documents."""
    paragraphs = [p for path in sorted((ASSETS / "text").glob("*.txt"))
                  for doc in split_txt_documents(path.read_text(encoding="utf-8")) for p in doc.split("\n\n")]
    rng = np.random.default_rng(seed)
    per_file = megabytes * 1e6 / files
    paths = []
    for number in range(files):
        docs, size = [], 0
        while size < per_file:
            doc = "\n\n".join(paragraphs[i] for i in rng.integers(0, len(paragraphs), 8))
            docs.append(doc)
            size += len(doc.encode("utf-8")) + 3
        path = Path(folder) / f"sample-{number}.txt"
        path.write_text("\n\n\n".join(docs) + "\n", encoding="utf-8")
        paths.append(str(path))
    return paths


def tokenizer_throughput(megabytes: float, workers: int) -> TokenizeReport:
    with tempfile.TemporaryDirectory() as scratch:
        files = text_sample(scratch, megabytes)
        return tokenize_corpus(files, f"{scratch}/corpus", str(ASSETS / "tokenizer"), workers=workers, progress=False)
