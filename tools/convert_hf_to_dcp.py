"""Convert a Hugging Face Llama folder into a dtcollie DCP checkpoint folder.

Writes the weights under their dtcollie names in the dtype they were stored in (so converting back
with convert_dcp_to_hf.py is bit-exact), plus DCP_DIR/model_args.json, the ModelArgs the HF
config.json implies. Usage: python tools/convert_hf_to_dcp.py --hf HF_DIR --out DCP_DIR [--force]
"""

import argparse

from dtcollie.cli import run_main
from dtcollie.models.hf import convert_hf_to_dcp


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf", required=True, help="HF folder: config.json + model.safetensors (or shards + index)")
    parser.add_argument("--out", required=True, help="DCP folder to write; must be empty or absent")
    parser.add_argument("--force", action="store_true",
                        help="write into a non-empty --out, deleting its old DCP files and model_args.json first")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    opts = parse_args(argv)
    args = convert_hf_to_dcp(opts.hf, opts.out, force=opts.force)
    print(f"wrote {opts.out}: {args.n_layers} layers, dim {args.dim}, vocab {args.vocab_size}")


if __name__ == "__main__":
    run_main(main)
