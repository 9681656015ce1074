"""Data benchmark: stream a >= 2 GB token corpus in flat memory, and time the tokenizer.

    python tools/bench_data.py [--gigabytes 2] [--corpus DIR] [--max-tokens N] [--text-mb 20] [--workers 1,2]

Builds a synthetic corpus of random tokens (in a temporary folder, deleted afterwards, or in/from
--corpus DIR, kept), streams it with seq_len 2048 and batch 8 on one core, and prints the corpus
size, the loader's tokens/s and the resident memory before and during streaming (targets: at most
200 MB above the baseline, at least 1M tokens/s). Then tokenizes --text-mb of generated text with
each worker count and prints its throughput.
"""

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from dtcollie.bench.data import stream_corpus, synthetic_corpus, tokenizer_throughput
from dtcollie.cli import run_main
from dtcollie.data.shards import MANIFEST, open_corpus

MB = 1e6


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gigabytes", type=float, default=2.0, help="corpus size to build (uint16 tokens)")
    parser.add_argument("--corpus", help="build the corpus here and keep it, or reuse the one already here")
    parser.add_argument("--max-tokens", type=int, help="stop streaming after this many tokens")
    parser.add_argument("--text-mb", type=float, default=20.0, help="text for the tokenizer timing; 0 skips it")
    parser.add_argument("--workers", default="1,2", help="worker counts for the tokenizer timing")
    args = parser.parse_args(argv)
    scratch = None if args.corpus else tempfile.mkdtemp(prefix="dtcollie-bench-data-")
    folder = args.corpus or scratch
    try:
        if not (Path(folder) / MANIFEST).is_file():
            synthetic_corpus(folder, int(args.gigabytes * 1e9 / 2))
        corpus = open_corpus(folder)
        size = sum(shard.path.stat().st_size for shard in corpus.shards)
        print(f"corpus: {size / 1e9:.2f} GB, {corpus.tokens:,} tokens in {len(corpus.shards)} shards ({folder})")
        result = stream_corpus(folder, max_tokens=args.max_tokens)
        print(f"loader: {result.tokens:,} tokens in {result.seconds:.1f} s = {result.tokens / result.seconds:,.0f} "
              f"tokens/s (seq_len 2048, batch 8, document masks, one core)")
        print(f"RSS: baseline {result.rss_baseline / MB:.1f} MB, peak {result.rss_peak / MB:.1f} MB, "
              f"delta {(result.rss_peak - result.rss_baseline) / MB:.1f} MB")
    finally:
        if scratch:
            shutil.rmtree(scratch)
    if args.text_mb > 0:
        tokenizer_throughput(0.01, 1)  # starts the worker server once, so no timing below pays for it
        for workers in (int(w) for w in args.workers.split(",")):
            report = tokenizer_throughput(args.text_mb, workers)
            print(f"tokenizer, {workers} worker{'s' if workers > 1 else ''}: {report.summary()}")


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
