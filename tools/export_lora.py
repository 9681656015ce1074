"""Export the LoRA adapters of a dtcollie DCP checkpoint as a Hugging Face PEFT folder.

Reads DCP_DIR (a training checkpoint <dump_folder>/checkpoints/step-N of a LoRA run, or a weights
folder including the *.lora_a / *.lora_b adapters), DCP_DIR/model_args.json and DCP_DIR/lora.json
(both written by the trainer into every checkpoint), and writes adapter_config.json plus
adapter_model.safetensors that peft.PeftModel.from_pretrained loads. With --merge-into it also
writes the merged model (W + scale * B A) as a full HF Llama folder; a training checkpoint holds only
the adapters, so merging it needs --base, the base weights' DCP folder the run started from.
Usage: python tools/export_lora.py --checkpoint DCP_DIR --out PEFT_DIR [--merge-into HF_DIR
--base BASE_DCP_DIR] [--base-model NAME] [--tokenizer FOLDER] [--force]
"""

import argparse

from dtcollie.cli import run_main
from dtcollie.peft import export_lora


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="DCP folder with LoRA weights, model_args.json, lora.json")
    parser.add_argument("--out", required=True, help="PEFT adapter folder to write; must be empty or absent")
    parser.add_argument("--merge-into", help="also write the merged model as an HF folder here")
    parser.add_argument("--base", help="base weights' DCP folder (convert_hf_to_dcp output), to merge a training "
                        "checkpoint that holds only the adapters")
    parser.add_argument("--tokenizer", help="tokenizer folder to ship with both folders (default: the checkpoint's own)")
    parser.add_argument("--base-model", default="",
                        help="base_model_name_or_path recorded in adapter_config.json (default: empty)")
    parser.add_argument("--force", action="store_true",
                        help="write into non-empty output folders, deleting the files this tool writes first")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    opts = parse_args(argv)
    args, config = export_lora(opts.checkpoint, opts.out, opts.merge_into, opts.base_model, opts.force, opts.base,
                               opts.tokenizer)
    merged = f"; merged model in {opts.merge_into}" if opts.merge_into else ""
    print(f"wrote {opts.out}: LoRA rank {config.rank} on {', '.join(config.target_modules)} of a "
          f"{args.n_layers}-layer model{merged}")


if __name__ == "__main__":
    run_main(main)
