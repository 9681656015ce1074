"""`tokenize_corpus`: text files -> a token-shard corpus (see `shards.py`), in parallel and resumable.

Inputs are `.txt` (documents separated by two or more blank lines, as in `files.py`), `.jsonl` (a
string field per line, `text` by default) and `.parquet` (a string column, read in record batches).
A document is stored as pre-training uses it (`Tokenizer.encode_documents`): the tokenizer's prefix
(BOS for Llama), the text, its suffix and EOS. Each input file is one task for a pool of worker
processes, each single-threaded, so `workers` is the number of cores used; a single huge file is
tokenized by one worker, so split it to spread it.

Shard names are `FFFFF-PPPPP` (input file number, part number). A file's documents are cut into
parts at the first document boundary at or past `tokens_per_shard` tokens; the cut depends only on
the documents, so the shards are the same bytes whatever the worker count.

Resuming: each finished shard records which documents of which file it holds. A rerun of the same
command keeps, per file, the leading run of finished shards made with the same settings, skips those
documents and rewrites everything after them (an interrupted shard is simply written again). The
manifest is written when every file is done. Shards made with other settings (the special tokens
among them) are an error, not silently mixed in.
"""

import dataclasses
import itertools
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from tqdm import tqdm

from dtcollie.data.files import records_of, resolve_files
from dtcollie.data.records import convert_records, string_fields
from dtcollie.data.shards import ShardWriter, finished_shard, write_manifest
from dtcollie.data.tokenizer import load_tokenizer
from dtcollie.errors import DataError

DEFAULT_TOKENS_PER_SHARD = 2**27  # 256 MiB of uint16: few files for a large corpus, quick to rewrite one
ENCODE_BATCH = 256  # documents per encode_batch call
SKIP_FIX = "pass --skip-bad-lines to skip such lines"



@dataclasses.dataclass
class TokenizeReport:
    """What one run did; tokens, documents and text_bytes count only what it tokenized itself."""
    files: int
    shards: int
    shards_reused: int
    documents: int
    tokens: int
    text_bytes: int
    seconds: float

    def summary(self) -> str:
        seconds = max(self.seconds, 1e-9)
        return (f"{self.shards} shards from {self.files} files ({self.shards_reused} kept from an earlier run); "
                f"tokenized {self.documents:,} documents, {self.tokens:,} tokens, {self.text_bytes / 1e6:,.1f} MB of "
                f"text in {self.seconds:.1f} s: {self.tokens / seconds:,.0f} tokens/s, "
                f"{self.text_bytes / 1e6 / seconds:,.2f} MB/s")


def tokenize_corpus(inputs: list[str], out_dir: str, tokenizer_folder: str, text_field: str = "text",
                    workers: int = 1, tokens_per_shard: int = DEFAULT_TOKENS_PER_SHARD,
                    skip_bad_lines: bool = False, progress: bool = True) -> TokenizeReport:
    """Tokenize `inputs` (paths or globs) into the corpus folder `out_dir`, resuming what a previous run
    of the same command finished. The progress bar shows on a terminal only."""
    if workers < 1 or tokens_per_shard < 1:
        raise DataError(f"workers ({workers}) and tokens_per_shard ({tokens_per_shard}) must be at least 1")
    files = resolve_files(inputs, "inputs")
    tokenizer = load_tokenizer(tokenizer_folder)  # once, failing before any worker starts; sent to them
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    settings = {"text_field": text_field, "tokens_per_shard": tokens_per_shard, "vocab_size": tokenizer.vocab_size,
                "eos_id": tokenizer.eos_id, "prefix_ids": tokenizer.prefix_ids, "suffix_ids": tokenizer.suffix_ids}
    start = time.perf_counter()
    results = [None] * len(files)
    with ProcessPoolExecutor(workers, mp_context=_worker_context(), initializer=_single_threaded) as pool:
        futures = {pool.submit(_tokenize_file, index, os.path.abspath(path), out_dir, tokenizer, settings,
                               skip_bad_lines): index for index, path in enumerate(files)}
        with tqdm(total=len(files), unit="file", desc="tokenizing", disable=None if progress else True) as bar:
            for future in as_completed(futures):
                try:
                    results[futures[future]] = future.result()
                except BaseException:
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise
                bar.update()
    shards = [meta for file_shards, _ in results for meta in file_shards]
    if not shards:
        raise DataError(f"inputs {', '.join(files)} hold no documents; check the files and --text-field")
    write_manifest(out_dir, shards, tokenizer.vocab_size, tokenizer.eos_id,
                   {"inputs": [os.path.abspath(f) for f in files], **settings})
    documents, tokens, text_bytes, reused = (sum(column) for column in zip(*(stats for _, stats in results)))
    return TokenizeReport(len(files), len(shards), reused, documents, tokens, text_bytes, time.perf_counter() - start)


def _worker_context():
    """Workers forked from a clean server process that has imported this module once: a plain fork
    would inherit the caller's threads (torch, tokenizers) mid-state, and spawn would pay the import
    (torch, via dtcollie.data) once per worker."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def _single_threaded() -> None:
    """One core per worker: tokenizers' own thread pool would make `workers` meaningless."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _tokenize_file(index: int, path: str, out_dir: str, tokenizer, settings: dict,
                   skip_bad_lines: bool) -> tuple[list[dict], tuple[int, int, int, int]]:
    """Shards of input file number `index`: those a previous run finished, then the rest, written now.
    Returns (shard metadata in order, (documents, tokens, text bytes tokenized now, shards reused)).
    The tokenizer comes pickled from the parent, so a worker never loads transformers to find its
    special tokens."""
    source = {"file": path, **settings}
    shards = _reusable_shards(index, out_dir, source)
    reused = len(shards)
    first = number = shards[-1]["source"]["end_document"] if shards else 0
    documents = itertools.islice(read_file_documents(path, settings["text_field"], skip_bad_lines), first, None)
    writer, pending, pending_tokens, text_bytes = None, [], 0, 0
    while batch := list(itertools.islice(documents, ENCODE_BATCH)):
        text_bytes += sum(len(doc.encode("utf-8")) for doc in batch)
        for tokens in tokenizer.encode_documents(batch):
            if writer is None:
                writer = ShardWriter(out_dir, f"{index:05d}-{len(shards):05d}", settings["vocab_size"],
                                     settings["eos_id"], {**source, "first_document": number})
            pending.append(tokens)
            pending_tokens += len(tokens)
            number += 1
            if writer.tokens + pending_tokens >= settings["tokens_per_shard"]:
                shards.append(_finish(writer, pending, number))
                writer, pending, pending_tokens = None, [], 0
        if writer is not None:  # the shard stays open; its documents so far go to disk
            writer.add_documents(pending)
            pending, pending_tokens = [], 0
    if writer is not None:
        shards.append(_finish(writer, pending, number))
    tokens = sum(meta["tokens"] for meta in shards[reused:])
    return shards, (number - first, tokens, text_bytes, reused)


def _finish(writer: ShardWriter, pending: list[list[int]], end_document: int) -> dict:
    writer.add_documents(pending)
    writer.source["end_document"] = end_document
    return writer.finish()


def _reusable_shards(index: int, out_dir: str, source: dict) -> list[dict]:
    """The leading run of finished shards of file `index`; a finished one from other settings is an error."""
    shards = []
    while (meta := finished_shard(out_dir, f"{index:05d}-{len(shards):05d}")) is not None:
        made_from = {key: meta["source"].get(key) for key in source}
        if made_from != source:
            raise DataError(f"{Path(out_dir) / meta['name']}.json was made from {made_from}, not {source}; "
                            f"write to a new --out folder or delete this one")
        shards.append(meta)
    return shards


def read_file_documents(path: str, text_field: str, skip_bad_lines: bool):
    """The documents of one input file, in order, as an iterator (jsonl and parquet are streamed)."""
    convert = string_fields({"--text-field": text_field})
    records = records_of([path], text_field)
    return (text for _, (text,) in convert_records(records, convert, skip_bad_lines, SKIP_FIX))
