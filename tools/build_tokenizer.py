"""Train the byte-level BPE tokenizer that dtcollie ships (or one for your own text).

    python tools/build_tokenizer.py --files 'dtcollie/assets/text/*.txt' --vocab-size 2048 \
        --out dtcollie/assets/tokenizer

Documents are read as the pre-training dataset reads them (.txt blocks separated by two blank lines,
.jsonl `--text-field`). The logic is dtcollie.data.tokenizer.train_tokenizer.
"""

import argparse
import sys

from dtcollie.cli import run_main
from dtcollie.data.files import read_documents, resolve_files
from dtcollie.data.tokenizer import train_tokenizer


def main(argv) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", nargs="+", required=True, help=".txt/.jsonl files or globs")
    parser.add_argument("--vocab-size", type=int, default=2048, help="tokens including the 2 special ones")
    parser.add_argument("--out", required=True, help="folder for tokenizer.json and tokenizer_config.json")
    parser.add_argument("--text-field", default="text", help="jsonl field with the text")
    parser.add_argument("--min-frequency", type=int, default=2, help="least count for a merge")
    args = parser.parse_args(argv)
    docs = read_documents(resolve_files(args.files, "--files"), args.text_field, skip_bad_lines=False)
    tok = train_tokenizer(docs, args.vocab_size, args.out, args.min_frequency)
    total = sum(len(ids) for ids in tok.encode_batch(docs))
    print(f"wrote {args.out}: vocab {tok.vocab_size}, {len(docs)} documents, {total} tokens")


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
