"""Text generation: KV-cached incremental decoding of a batch of prompts, greedy or sampled.

The cache is state held outside the model's math: `KVCache` is passed to `Transformer.forward`,
each attention layer appends its new keys and values to its own `LayerCache` and attends over all
of them, and the cache supplies the attention mask. Prompts of different lengths are left-padded;
each token's RoPE position counts only its row's real tokens (as transformers' `generate`
derives position ids from the attention mask), and no query attends to padding.

Sampling follows transformers' logits processors, in their order: temperature, then top-k (keep
the k largest logits), then top-p (keep the smallest set of most likely tokens whose probability
reaches p); temperature 0 is greedy (argmax). Draws come from one seeded generator, so a run is
reproducible, and under tensor parallelism every rank draws the same token from the same logits.
"""

from dataclasses import dataclass

import torch

from dtcollie.errors import UserError


class LayerCache:
    """One attention layer's keys and values, [batch, max_len, kv heads, head_dim], filled up to the
    cache's length."""

    def __init__(self, cache: "KVCache"):
        self.cache, self.keys, self.values = cache, None, None

    def extend(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys/values after the cached ones; return all of them."""
        if self.keys is None:  # allocated on first use: under tensor parallelism a rank holds its own heads
            shape = (keys.shape[0], self.cache.max_len, *keys.shape[2:])
            self.keys, self.values = keys.new_zeros(shape), values.new_zeros(shape)
        start, end = self.cache.length, self.cache.length + keys.shape[1]
        self.keys[:, start:end], self.values[:, start:end] = keys, values
        return self.keys[:, :end], self.values[:, :end]


class KVCache:
    """Every layer's cache for a batch, which slots hold real tokens, and the attention mask of the
    step being run. A step is `begin(real)`, the model's forward with `cache=`, then `advance()`."""

    def __init__(self, n_layers: int, batch: int, max_len: int, sliding_window: int, device):
        self.max_len, self.sliding_window, self.length = max_len, sliding_window, 0
        self.layers = [LayerCache(self) for _ in range(n_layers)]
        self.real = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.mask = None

    def begin(self, real: torch.Tensor) -> None:
        """Record the `real` flags [batch, new] of the slots this step fills, and make its SDPA mask
        [batch, 1, new, length + new]: a query sees the real keys at or before its own slot (within
        the sliding window), and a padding query itself, so its softmax has something to normalise."""
        new = real.shape[1]
        end = self.length + new
        self.real[:, self.length:end] = real
        queries = torch.arange(self.length, end, device=real.device)[:, None]
        keys = torch.arange(end, device=real.device)[None, :]
        visible = keys <= queries
        if self.sliding_window > 0:
            visible &= queries - keys < self.sliding_window
        self.mask = ((visible & self.real[:, None, :end]) | (queries == keys))[:, None]

    def advance(self) -> None:
        self.length += self.mask.shape[2]


@dataclass
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int = 0

    def check(self) -> None:
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise UserError(f"sampling needs temperature >= 0, top_k >= 0 and 0 < top_p <= 1; got temperature "
                            f"{self.temperature}, top_k {self.top_k}, top_p {self.top_p}")


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Logits [batch, vocab] with the tokens top-k and top-p exclude set to -inf."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p < 1:
        ascending, order = torch.sort(logits, dim=-1)
        # Drop the least likely tokens while what they hold together stays within 1 - top_p; the
        # most likely token is always kept.
        drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
        drop[:, -1] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), -torch.inf)
    return logits


def next_tokens(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> torch.Tensor:
    """One token per row from the last position's logits [batch, vocab]."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / sampling.temperature, sampling.top_k, sampling.top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling = Sampling(),
             eos_id: int | None = None, pad_id: int = 0, on_tokens=None, use_cache: bool = True,
             stop_early: bool = True) -> list[list[int]]:
    """The new tokens of each prompt (up to its EOS, included, or `max_new_tokens`).

    `on_tokens(step, tokens)` is called with each step's new token per row, for streaming.
    `stop_early=False` runs all `max_new_tokens` steps even when every row has ended (ranks that
    must make the same forward calls).
    `use_cache=False` recomputes the whole sequence at every step (the reference the cache is
    measured against): the prompts' left padding is then kept apart by document positions."""
    args = model.args
    longest = max(len(prompt) for prompt in prompts)
    if longest + max_new_tokens > args.max_seq_len:
        raise UserError(f"the longest prompt ({longest} tokens) plus {max_new_tokens} new tokens exceeds the "
                        f"model's max_seq_len ({args.max_seq_len}); shorten the prompt or lower max_new_tokens")
    device = model.rope_cos.device
    tokens = torch.tensor([[pad_id] * (longest - len(p)) + p for p in prompts], device=device)
    real = torch.tensor([[False] * (longest - len(p)) + [True] * len(p) for p in prompts], device=device)
    positions = (real.cumsum(dim=-1) - 1).clamp(min=0)
    cache = KVCache(args.n_layers, len(prompts), longest + max_new_tokens, args.sliding_window, device) \
        if use_cache else None
    generator = torch.Generator(device=device).manual_seed(sampling.seed)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    # The step's new slots (the cache holds the rest), and every slot so far (for recomputation).
    step_tokens, step_positions, step_real = tokens, positions, real
    all_tokens, all_positions = tokens, positions
    for step in range(max_new_tokens):
        if cache is not None:
            cache.begin(step_real)
            logits = model(step_tokens, step_positions, cache=cache)
            cache.advance()
        else:
            logits = model(all_tokens, all_positions)
        chosen = next_tokens(logits[:, -1], sampling, generator)
        if on_tokens is not None:
            on_tokens(step, chosen)
        step_tokens, step_real = chosen[:, None], torch.ones_like(chosen[:, None], dtype=torch.bool)
        step_positions = positions[:, -1:] + 1 + step
        all_tokens = torch.cat([all_tokens, step_tokens], dim=1)
        all_positions = torch.cat([all_positions, step_positions], dim=1)
        if eos_id is not None:
            finished |= chosen == eos_id
            if stop_early and bool(finished.all()):
                break
    return [cut_at_eos(row, eos_id) for row in all_tokens[:, longest:].tolist()]


def cut_at_eos(tokens: list[int], eos_id: int | None) -> list[int]:
    return tokens[: tokens.index(eos_id) + 1] if eos_id is not None and eos_id in tokens else tokens
