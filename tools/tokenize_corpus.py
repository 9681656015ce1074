"""Tokenize text files into a token-shard corpus for large-scale pre-training (data.kind = "tokens").

    python tools/tokenize_corpus.py data/*.jsonl books/*.txt web/*.parquet --tokenizer DIR --out CORPUS
        [--text-field text] [--workers 8] [--tokens-per-shard 134217728] [--skip-bad-lines]

Rerunning the same command after an interruption keeps the finished shards and redoes the rest.
Prints the shard count and the tokenizer throughput (tokens/s, MB/s of text) at the end.
"""

import argparse
import os
import sys

from dtcollie.cli import run_main
from dtcollie.data.tokenize_corpus import DEFAULT_TOKENS_PER_SHARD, tokenize_corpus


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", help=".txt, .jsonl or .parquet files or globs")
    parser.add_argument("--tokenizer", required=True, help="folder with tokenizer.json")
    parser.add_argument("--out", required=True, help="corpus folder (created; resumed if it holds shards)")
    parser.add_argument("--text-field", default="text", help="jsonl field / parquet column holding the text")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="processes, one core each")
    parser.add_argument("--tokens-per-shard", type=int, default=DEFAULT_TOKENS_PER_SHARD)
    parser.add_argument("--skip-bad-lines", action="store_true", help="skip malformed lines instead of stopping")
    args = parser.parse_args(argv)
    report = tokenize_corpus(args.inputs, args.out, args.tokenizer, args.text_field, args.workers,
                             args.tokens_per_shard, args.skip_bad_lines)
    print(report.summary())


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
