"""Training-step throughput of dtcollie's Llama against transformers' LlamaForCausalLM.

Both models get the same weights and shapes and run the same step (forward, fp32 cross-entropy,
backward, fused AdamW). They alternate in rounds within one process so machine noise hits both alike;
the median tokens/s of each is printed with the ratio.

    python tools/bench_throughput.py --flavor debug --batch 8 --seq-len 128
    python tools/bench_throughput.py --dim 512 --n-layers 8 --compile
"""

import argparse
import copy
import statistics
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dtcollie.bench.model_shape import bench_model_args
from dtcollie.cli import run_main
from dtcollie.loss import cross_entropy_sum
from dtcollie.models.hf import hf_config_from_args, to_hf_state_dict
from dtcollie.models.llama import FLAVORS, Transformer, count_parameters


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavor", default="debug", choices=sorted(FLAVORS))
    parser.add_argument("--dim", type=int, help="override the flavor's width")
    parser.add_argument("--n-layers", type=int, help="override the flavor's depth")
    parser.add_argument("--vocab-size", type=int, default=None, help="default: the flavor's, 2048 for debug")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round per model")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast on both")
    parser.add_argument("--compile", action="store_true", help="also time dtcollie with per-block torch.compile")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def build_models(args, device, compile_blocks) -> dict:
    """name -> (forward returning logits, module holding the parameters, loss), all from one set of
    weights. The compiled variant compiles each block and the loss, as `compile.enable` does."""
    torch.manual_seed(0)
    ours = Transformer(args).to(device)
    ours.init_weights()
    hf = LlamaForCausalLM(LlamaConfig(**hf_config_from_args(args))).to(device)
    hf.load_state_dict(to_hf_state_dict(ours.state_dict(), args))
    models = {"transformers": (lambda tokens: hf(input_ids=tokens).logits, hf, cross_entropy_sum),
              "dtcollie": (ours, ours, cross_entropy_sum)}
    if compile_blocks:
        compiled = copy.deepcopy(ours)
        for block in compiled.layers.values():
            block.compile()
        models["dtcollie+compile"] = (compiled, compiled, torch.compile(cross_entropy_sum))
    return models


def make_step(forward, module, loss_fn, device, dtype):
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4, fused=True)

    def step(tokens):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            logits = forward(tokens[:, :-1])
        loss = loss_fn(logits, tokens[:, 1:]) / tokens[:, 1:].numel()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def time_steps(step, tokens, count, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(count):
        loss = step(tokens)
    loss.item()
    return time.perf_counter() - start


def main(argv):
    options = parse_args(argv)
    device = torch.device(options.device)
    args = bench_model_args(options.flavor, options.dim, options.n_layers, options.vocab_size, options.seq_len)
    models = build_models(args, device, options.compile)
    steps = {name: make_step(*model, device, options.dtype) for name, model in models.items()}
    tokens = torch.randint(0, args.vocab_size, (options.batch, options.seq_len + 1), device=device)
    for step in steps.values():  # warm-up: allocator, kernels, and compilation
        time_steps(step, tokens, 2, device)
    rates = {name: [] for name in steps}
    for _ in range(options.rounds):
        for name, step in steps.items():
            seconds = time_steps(step, tokens, options.steps, device)
            rates[name].append(options.batch * options.seq_len * options.steps / seconds)
    print(f"{count_parameters(models['dtcollie'][1]):,} parameters | batch {options.batch} x {options.seq_len} | "
          f"{options.dtype} | {device} | torch {torch.__version__} | {torch.get_num_threads()} threads")
    baseline = statistics.median(rates["transformers"])
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"{name:>18}: {median:10,.0f} tokens/s (rounds {min(values):,.0f}-{max(values):,.0f})  "
              f"{median / baseline:.2f}x transformers")


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
