"""Peak training memory per parameter of each optimizer, as in the CoLLiE paper's table.

Each row runs in a fresh process: the model is built and trained for a few steps, and the peak
memory of those steps (CUDA: max_memory_allocated; CPU: torch's own allocations, from the
profiler's memory records) above a baseline taken before the model exists (after imports and a
warm-up step on a tiny model) is divided by the parameter count; so it counts weights, optimizer
state, gradients and activations. On CPU a second fresh process per row also reports the resident
high-water mark, which depends on the operating system's page accounting (pages of kernels and
libraries loaded on first use, memory the C allocator keeps) and so differs between machines.
See dtcollie.bench.memory for how, and dtcollie.bench.memory_rows for what each row runs.

With --dtype bf16 (the default) the forward-only reference and the LOMO/AdaLomo rows hold bf16
weights and nothing else, so 2.00 bytes/parameter is the floor (the LoRA row: a frozen bf16 base
plus fp32 rank-8 adapters trained with AdamW); AdamW, Lion, Adan and SophiaG
train as mixed precision does (fp32 master weights, gradients and states, bf16 autocast). The
dtcollie rows checkpoint every block and chunk the output projection and loss; the
`(pytorch-optimizer)` rows run that package's LOMO/AdaLOMO as it documents them (plain model, full
logits), for comparison. The default shape is a 166,216,704-parameter Llama.

    python tools/bench_memory.py
    python tools/bench_memory.py --optimizers 'adamw,lomo,lomo(pytorch-optimizer)' --json memory.json
    python tools/bench_memory.py --dim 64 --n-layers 2 --vocab-size 256 --seq-len 32 --steps 1
"""

import argparse
import dataclasses
import importlib.util
import json
import sys

import torch

from dtcollie.bench.memory import format_table, measure_in_fresh_process
from dtcollie.bench.memory_rows import REFERENCE_PACKAGE, REFERENCE_ROWS, ROWS, BenchSpec
from dtcollie.bench.model_shape import bench_model_args
from dtcollie.cli import run_main
from dtcollie.errors import ConfigError
from dtcollie.models.llama import FLAVORS, Transformer, count_parameters

PRECISION_NOTES = {
    "bf16": "bf16: forward-only and LOMO/AdaLomo hold bf16 weights only (floor 2.00), LoRA a frozen bf16 base plus "
            "fp32 adapters; AdamW/Lion/Adan/SophiaG keep fp32 master weights, grads and states under bf16 autocast "
            "(mixed precision).",
    "fp32": "fp32: every row holds fp32 weights (floor 4.00), gradients and states; no autocast.",
}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavor", default="debug", choices=sorted(FLAVORS))
    parser.add_argument("--dim", type=int, default=1024, help="override the flavor's width (FFN: 3 x dim)")
    parser.add_argument("--n-layers", type=int, default=8, help="override the flavor's depth")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                        help="bf16: bf16 weights for forward-only and LOMO/AdaLomo, mixed precision for the rest")
    parser.add_argument("--loss-chunk", type=int, default=32,
                        help="sequence positions per chunk of the output projection + cross-entropy (dtcollie rows)")
    parser.add_argument("--optimizers", default=",".join(ROWS), help=f"comma-separated rows from: {', '.join(ROWS)}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", metavar="OUT", help="also write the results to this JSON file")
    return parser.parse_args(argv)


def chosen_rows(options) -> list[str]:
    rows = [name.strip() for name in options.optimizers.split(",") if name.strip()]
    unknown = [name for name in rows if name not in ROWS]
    if unknown or not rows:
        raise ConfigError(f"unknown optimizer {', '.join(unknown) or '(none given)'} in --optimizers; "
                          f"choose from {', '.join(ROWS)}")
    if any(row in REFERENCE_ROWS for row in rows) and importlib.util.find_spec("pytorch_optimizer") is None:
        raise ConfigError(f"the ({REFERENCE_PACKAGE}) rows need that package: pip install {REFERENCE_PACKAGE}")
    return rows


def check_options(options) -> None:
    for name in ("dim", "n_layers", "vocab_size", "seq_len", "batch", "steps", "loss_chunk"):
        if getattr(options, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(options, name)}")
    if torch.device(options.device).type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda, but no CUDA device is available; use --device cpu")


def main(argv):
    options = parse_args(argv)
    check_options(options)
    rows = chosen_rows(options)
    args = bench_model_args(options.flavor, options.dim, options.n_layers, options.vocab_size, options.seq_len)
    with torch.device("meta"):
        n_params = count_parameters(Transformer(args))
    results = []
    for row in rows:
        spec = BenchSpec(row=row, model_args=dataclasses.asdict(args), dtype=options.dtype, batch=options.batch,
                         seq_len=options.seq_len, steps=options.steps, loss_chunk=options.loss_chunk,
                         device=options.device)
        results.append(measure_in_fresh_process(spec))
        print(f"{row}: {results[-1]['peak_bytes'] / n_params:.2f} bytes/param", file=sys.stderr, flush=True)
    header = (f"{n_params:,} parameters (dim {args.dim}, {args.n_layers} layers, {args.n_heads} heads / "
              f"{args.n_kv_heads} kv, FFN {args.hidden_dim}, vocab {args.vocab_size}) | batch {options.batch} x "
              f"{options.seq_len} tokens | {options.steps} steps | {options.dtype} | {options.device} | "
              f"torch {torch.__version__}")
    footer = [
        "bytes/param = (peak of the steps - baseline before the model is built) / parameters, each row in a fresh "
        f"process, baseline after imports and a tiny warm-up step; measured by {results[0]['method']}. "
        "resident: the same from the process's resident high-water mark (another fresh process; OS page "
        "accounting, not comparable between machines).",
        PRECISION_NOTES[options.dtype] + " No gradient clipping.",
        f"dtcollie rows: every block checkpointed, output projection + cross-entropy in {options.loss_chunk}-position "
        f"chunks; ({REFERENCE_PACKAGE}) rows: plain model, full fp32 logits, as that package documents.",
    ]
    print(format_table(results, n_params, header, footer))
    if options.json:
        with open(options.json, "w") as out:
            json.dump({"parameters": n_params, "settings": vars(options), "rows": results}, out, indent=2)


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
