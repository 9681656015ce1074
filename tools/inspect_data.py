"""Look before you train: the first rows of a config's data decoded, with the trained tokens marked.

    python tools/inspect_data.py --config train_configs/debug_chat.toml [--n 3] [--split train|val]
        [--section.key value ...]

Builds the split exactly as the trainer does (same tokenizer, seq_len, packing, masks) and prints
its first N rows with every trained run inside «...» and ¦ where a packed row's next document
starts, then counts over the split (rows, documents, tokens, trained share, padding share).
Examples dropped while building are reported as warnings. For token-shard corpora (data.kind =
"tokens") it prints the first rows of the stream and each corpus's counts.
"""

import argparse
import logging
import sys

from dtcollie import config as config_module
from dtcollie.cli import run_main
from dtcollie.data import build_dataloader, build_dataset, load_tokenizer
from dtcollie.data.inspect import describe_rows, describe_stream


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3, help="rows to show")
    parser.add_argument("--split", choices=("train", "val"), default="train")
    options, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    cfg = config_module.load(*config_module.parse_overrides(rest))
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if cfg.data.kind == "tokens":
        loader = build_dataloader(cfg.data, tokenizer, cfg.training.seq_len, 1, 0, 1, options.split, cfg.job.seed)
        print(describe_stream(loader.stream, tokenizer, options.n))
    else:
        dataset = build_dataset(cfg.data, tokenizer, cfg.training.seq_len, options.split)
        print(describe_rows(dataset, tokenizer, options.n))


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
