"""Generate text from a checkpoint: `python -m dtcollie.generate --checkpoint DIR --prompt TEXT`.

    python -m dtcollie.generate --checkpoint outputs/debug/checkpoints/step-200 --prompt "It is a truth"
    python -m dtcollie.generate --checkpoint DIR --prompts prompts.txt --max-new-tokens 64 --temperature 0.8
    python -m dtcollie.generate --checkpoint DIR --chat                  # an interactive chat
    torchrun --nproc_per_node=2 -m dtcollie.generate --checkpoint DIR --prompt "..."   # tensor parallel

The checkpoint is an HF folder, a dtcollie weights folder or a training checkpoint (LoRA ones are
merged into their base weights; see dtcollie.inference). The tokenizer is --tokenizer, else the HF
folder's own, else the training run's data.tokenizer. One prompt streams its text as it is
decoded; a batch (--prompts: a text file with one prompt per line) prints each completion. A
prompt is encoded as transformers' tokenizer encodes it, with the special tokens the model expects
before a text (BOS for Llama). `--chat` renders the conversation with the tokenizer's chat template
(which places its own BOS) and stops at its EOS.
"""

import argparse
import os
import sys

import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from dtcollie.cli import run_main
from dtcollie.data.chat import load_chat_tokenizer
from dtcollie.data.tokenizer import load_tokenizer
from dtcollie.errors import UserError
from dtcollie.generation import Sampling, generate
from dtcollie.inference import DTYPES, build_inference_model, load_weights, pick_device, tokenizer_folder
from dtcollie.rank_warnings import filter_rank_warnings

def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="HF folder, dtcollie weights folder or training checkpoint")
    parser.add_argument("--base", help="a LoRA checkpoint's base weights (default: its run's initial_load_path)")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the HF folder or the run's data.tokenizer)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompt", help="one prompt")
    source.add_argument("--prompts", help="a text file with one prompt per line, generated as one batch")
    parser.add_argument("--chat", action="store_true", help="chat: --prompt as one user turn, or interactive")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0: off")
    parser.add_argument("--top-p", type=float, default=1.0, help="1: off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    return parser.parse_args(argv)


def read_prompts(options: argparse.Namespace) -> list[str]:
    if options.prompts is None:
        return [] if options.prompt is None else [options.prompt]
    try:
        with open(options.prompts, encoding="utf-8") as lines:
            prompts = [line.rstrip("\n") for line in lines if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"--prompts {options.prompts} cannot be read ({err})") from None
    if not prompts:
        raise UserError(f"--prompts {options.prompts} holds no prompt (one per line)")
    return prompts


class Generator:
    """The loaded model and tokenizer, and what this run prints (rank 0 only)."""

    def __init__(self, options: argparse.Namespace):
        self.options = options
        self.sampling = Sampling(options.temperature, options.top_k, options.top_p, options.seed)
        self.sampling.check()
        if options.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be at least 1, got {options.max_new_tokens}")
        args, state = load_weights(options.checkpoint, options.base)
        folder = tokenizer_folder(options.checkpoint, options.tokenizer)
        self.tokenizer = load_tokenizer(folder)
        self.chat_tokenizer = load_chat_tokenizer(folder) if options.chat else None
        world = int(os.environ.get("WORLD_SIZE", "1"))
        self.device = pick_device(options.device)
        self.printing = int(os.environ.get("RANK", "0")) == 0
        mesh = None
        if world > 1:
            mesh = init_device_mesh(self.device.type, (world,), mesh_dim_names=("tp",))
        self.model = build_inference_model(args, state, self.device, DTYPES[options.dtype], mesh)

    def complete(self, prompts: list[list[int]], stream: bool) -> list[list[int]]:
        shown = []

        def show(step, tokens):  # print the text decoded so far beyond what is already shown
            shown.append(int(tokens[0]))
            text = self.tokenizer.decode(shown, skip_special_tokens=True)
            previous = self.tokenizer.decode(shown[:-1], skip_special_tokens=True)
            print(text[len(previous):], end="", flush=True)

        eos = self.tokenizer.eos_id
        return generate(self.model, prompts, self.options.max_new_tokens, self.sampling, eos_id=eos,
                        pad_id=self.tokenizer.pad_id, on_tokens=show if stream and self.printing else None)

    def run_prompts(self, prompts: list[str]) -> None:
        token_prompts = [self.tokenizer.encode_prompt(prompt) for prompt in prompts]
        completions = self.complete(token_prompts, stream=len(prompts) == 1)
        if not self.printing:
            return
        if len(prompts) == 1:
            print()
            return
        for prompt, completion in zip(prompts, completions):
            print(f"--- {prompt}\n{self.tokenizer.decode(completion, skip_special_tokens=True)}")

    def chat_turn(self, messages: list[dict]) -> str:
        text = self.chat_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        reply = self.complete([self.tokenizer.encode(text)], stream=True)[0]  # the template placed any BOS
        if self.printing:
            print()
        return self.tokenizer.decode(reply, skip_special_tokens=True)

    def chat(self, first: str | None) -> None:
        messages = []
        while True:
            user = first if first is not None else read_turn(self.printing)
            if user is None:
                return
            messages.append({"role": "user", "content": user})
            messages.append({"role": "assistant", "content": self.chat_turn(messages)})
            if first is not None:
                return


def read_turn(printing: bool) -> str | None:
    """The next user line of an interactive chat (None at end of input); every rank reads rank 0's."""
    line = [None]
    if printing:
        try:
            line[0] = input("you> ")
        except EOFError:
            line[0] = None
    if dist.is_initialized():
        dist.broadcast_object_list(line, src=0)
    return line[0]


def main(argv: list[str]) -> None:
    options = parse_args(argv)
    prompts = read_prompts(options)
    if not prompts and not options.chat:
        raise UserError("nothing to generate from: give --prompt, --prompts or --chat")
    if options.chat and options.prompts:
        raise UserError("--chat takes one --prompt (a single turn) or none (interactive), not --prompts")
    filter_rank_warnings()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if pick_device(options.device).type == "cuda" else "gloo")
    try:
        generator = Generator(options)
        if options.chat:
            generator.chat(options.prompt)
        else:
            generator.run_prompts(prompts)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
