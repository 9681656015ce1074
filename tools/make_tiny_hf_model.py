"""Write a tiny randomly initialised Hugging Face model of one family, as transformers saves it.

A stand-in for a downloaded checkpoint (Qwen2.5, Qwen3, Mistral, Llama 3.2) where no model hub can
be reached: the README's walk-throughs start from it. Like a download, the folder holds a tokenizer
(by default the shipped debug tokenizer, whose 2048 tokens fit the default vocabulary) and a
generation config with its special-token ids.
Usage: python tools/make_tiny_hf_model.py --family qwen2 --out HF_DIR [--tied] [--context 2048]
[--tokenizer FOLDER]
"""

import argparse
from pathlib import Path

from dtcollie.cli import run_main
from dtcollie.config import resolve_path
from dtcollie.models.hf import HF_FAMILIES, hf_config_class, save_random_hf_model
from dtcollie.models.hf_files import copy_tokenizer_files, special_token_ids


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", required=True, choices=sorted(HF_FAMILIES))
    parser.add_argument("--out", required=True, help="HF folder to write; must be empty or absent")
    parser.add_argument("--tied", action="store_true", help="tie the output projection to the embedding")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--intermediate-size", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--context", type=int, default=2048, help="max_position_embeddings (default: %(default)s)")
    parser.add_argument("--tokenizer", default="dtcollie/assets/tokenizer",
                        help="tokenizer folder to ship with the model (default: the package's debug tokenizer)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    opts = parse_args(argv)
    family = HF_FAMILIES[opts.family]
    tokenizer = resolve_path(opts.tokenizer, Path.cwd())
    config = hf_config_class(opts.family)(
        hidden_size=opts.hidden_size, num_hidden_layers=opts.layers, num_attention_heads=opts.heads,
        num_key_value_heads=opts.kv_heads, intermediate_size=opts.intermediate_size, vocab_size=opts.vocab_size,
        head_dim=opts.hidden_size // opts.heads, max_position_embeddings=opts.context,
        tie_word_embeddings=opts.tied, architectures=[family[1]], **special_token_ids(tokenizer))
    args = save_random_hf_model(opts.out, config, opts.seed)
    copy_tokenizer_files(tokenizer, opts.out)
    print(f"wrote {opts.out}: {family[1]}, {args.n_layers} layers, dim {args.dim}, vocab {args.vocab_size}"
          f"{', tied embeddings' if args.tie_embeddings else ''}")


if __name__ == "__main__":
    run_main(main)
