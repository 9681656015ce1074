"""Decode speed: dtcollie's KV-cached generation against full recomputation and transformers' generate.

The debug model (random init, same weights in both libraries), greedy, every run making exactly
--new-tokens tokens per prompt; printed as new tokens/s over the batch, with the speed-up of the
cache and whether each method produced the cached run's tokens.

    python tools/bench_generate.py --new-tokens 256 [--batch 1] [--prompt-len 32] [--threads 1]
"""

import argparse
import sys

import torch

from dtcollie.bench.generate import bench_generate
from dtcollie.cli import run_main


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's default")
    options = parser.parse_args(argv)
    if options.threads:
        torch.set_num_threads(options.threads)
    rows = bench_generate(options.batch, options.prompt_len, options.new_tokens)
    cached = rows[0]["tokens_per_s"]
    print(f"debug model, batch {options.batch}, prompt {options.prompt_len} tokens, {options.new_tokens} new tokens, "
          f"{torch.get_num_threads()} threads")
    for row in rows:
        print(f"{row['method']:40s} {row['seconds']:8.2f} s {row['tokens_per_s']:10.1f} tokens/s "
              f"(cache {cached / row['tokens_per_s']:.2f}x)  same tokens: {row['same_tokens']}")


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
