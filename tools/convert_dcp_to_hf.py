"""Convert a dtcollie DCP checkpoint folder into a Hugging Face model folder.

Reads DCP_DIR/model_args.json (written by convert_hf_to_dcp.py and by training) for the model shape
and writes config.json (with the model's context length and special-token ids), safetensors, the
tokenizer's files and generation_config.json, so that transformers' AutoTokenizer and
AutoModelForCausalLM load the folder alone. The tokenizer is the one in DCP_DIR (every run's
weights and checkpoint folders carry theirs), or --tokenizer.
Usage: python tools/convert_dcp_to_hf.py --dcp DCP_DIR --out HF_DIR [--tokenizer FOLDER]
[--dtype bfloat16] [--max-shard-size 5GB] [--force]
"""

import argparse

import torch

from dtcollie.cli import run_main
from dtcollie.models.hf import DEFAULT_MAX_SHARD_SIZE, convert_dcp_to_hf

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dcp", required=True, help="DCP folder holding model_args.json")
    parser.add_argument("--out", required=True, help="HF folder to write; must be empty or absent")
    parser.add_argument("--tokenizer", help="tokenizer folder to ship with the model (default: the one in --dcp)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="cast the weights; default: keep the stored dtype")
    parser.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE,
                        help="bytes, or e.g. 5GB (10^9) / 4GiB (2^30); bigger models are split into shards "
                             "with model.safetensors.index.json (default: %(default)s)")
    parser.add_argument("--force", action="store_true",
                        help="write into a non-empty --out, deleting its old config.json and safetensors first")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    opts = parse_args(argv)
    args, tokenizer = convert_dcp_to_hf(opts.dcp, opts.out, dtype=DTYPES.get(opts.dtype),
                                        max_shard_size=opts.max_shard_size, force=opts.force, tokenizer=opts.tokenizer)
    shipped = f"tokenizer from {tokenizer}" if tokenizer else "no tokenizer (none in --dcp; give --tokenizer FOLDER)"
    print(f"wrote {opts.out}: {args.n_layers} layers, dim {args.dim}, vocab {args.vocab_size}, context "
          f"{args.max_seq_len}, {shipped}")


if __name__ == "__main__":
    run_main(main)
