"""What tools/bench_generate.py measures: decode tokens/s with the KV cache, with full recomputation
at every step, and of transformers' `generate` on the same weights (greedy, no EOS, so every run
makes exactly the tokens asked for)."""

import time
from dataclasses import replace

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dtcollie.generation import generate
from dtcollie.models.hf import hf_config_from_args, to_hf_state_dict
from dtcollie.models.llama import FLAVORS, Transformer


def debug_models(vocab_size: int, max_seq_len: int) -> tuple[Transformer, LlamaForCausalLM]:
    """The debug flavor at random init (seed 0), and transformers' Llama with the same weights."""
    args = replace(FLAVORS["debug"], vocab_size=vocab_size, max_seq_len=max_seq_len)
    torch.manual_seed(0)
    ours = Transformer(args)
    ours.init_weights()
    hf = LlamaForCausalLM(LlamaConfig(**hf_config_from_args(args)))
    hf.load_state_dict(to_hf_state_dict(ours.state_dict(), args))
    return ours.eval(), hf.eval()


def timed(run) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    tokens = run()
    return time.perf_counter() - start, tokens


def bench_generate(batch: int, prompt_len: int, new_tokens: int, vocab_size: int = 2048) -> list[dict]:
    """One row per method: seconds, new tokens/s over the batch, and whether its tokens equal the
    cached run's."""
    ours, hf = debug_models(vocab_size, prompt_len + new_tokens)
    prompts = torch.randint(0, vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(1))
    as_lists = prompts.tolist()
    methods = {
        "dtcollie, KV cache": lambda: generate(ours, as_lists, new_tokens),
        "dtcollie, full recomputation": lambda: generate(ours, as_lists, new_tokens, use_cache=False),
        "transformers generate (its KV cache)": lambda: hf.generate(
            prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens, do_sample=False,
            eos_token_id=None, pad_token_id=0)[:, prompt_len:].tolist(),
    }
    with torch.no_grad():  # warm up: first calls allocate and pick kernels
        generate(ours, as_lists, 4)
        hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=4, do_sample=False,
                    eos_token_id=None, pad_token_id=0)
        results = {name: timed(run) for name, run in methods.items()}
    reference = results["dtcollie, KV cache"][1]
    return [{"method": name, "seconds": seconds, "tokens_per_s": batch * new_tokens / seconds,
             "same_tokens": tokens == reference} for name, (seconds, tokens) in results.items()]
