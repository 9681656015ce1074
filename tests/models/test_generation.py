"""KV-cached generation against transformers' `generate`, for every family, and the sampling filters
against transformers' logits processors.

Both models run in float64, so a greedy choice between two nearly equal logits cannot flip on
rounding: the comparison is of the algorithms, on any CPU.
"""

import pytest
import torch
from test_families import CONFIGS, save_hf_model
from transformers import AutoModelForCausalLM
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from dtcollie.generation import Sampling, filter_logits, generate
from dtcollie.models.hf import from_hf

NEW_TOKENS = 32
PAD = 0


def prompts() -> list[list[int]]:
    """Three prompts of different lengths (one longer than mistral_window's 7)."""
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(1, 96, (length,), generator=generator).tolist() for length in (3, 12, 7)]


def transformers_generate(folder, batch: list[list[int]]) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    longest = max(len(p) for p in batch)
    input_ids = torch.tensor([[PAD] * (longest - len(p)) + p for p in batch])
    attention_mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in batch])
    out = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                         pad_token_id=PAD, eos_token_id=None)
    return out[:, longest:].tolist()


@pytest.fixture(params=sorted(CONFIGS))
def family_folder(request, tmp_path):
    return save_hf_model(tmp_path / "hf", CONFIGS[request.param][0])


def test_greedy_equals_transformers_generate_token_for_token(family_folder):
    model = from_hf(family_folder, dtype=torch.float64)
    ours = generate(model, prompts(), NEW_TOKENS, pad_id=PAD)
    assert all(len(row) == NEW_TOKENS for row in ours)
    assert ours == transformers_generate(family_folder, prompts())
    assert generate(model, prompts(), NEW_TOKENS, pad_id=PAD, use_cache=False) == ours  # full recomputation


def test_a_prompt_alone_generates_what_it_does_in_a_batch(family_folder):
    model = from_hf(family_folder, dtype=torch.float64)
    batch = generate(model, prompts(), 8, pad_id=PAD)
    assert [generate(model, [prompt], 8)[0] for prompt in prompts()] == batch


def test_seeded_sampling_is_reproducible_and_the_seed_matters(family_folder):
    model = from_hf(family_folder, dtype=torch.float64)
    sampling = Sampling(temperature=1.5, top_k=40, top_p=0.95, seed=7)
    first = generate(model, prompts(), 16, sampling)
    assert generate(model, prompts(), 16, sampling) == first
    assert generate(model, prompts(), 16, Sampling(temperature=1.5, top_k=40, top_p=0.95, seed=8)) != first


@pytest.mark.parametrize("top_k, top_p", [(5, 1.0), (0, 0.9), (0, 0.3), (10, 0.8), (1, 1.0)])
def test_filters_keep_what_transformers_keeps(top_k, top_p):
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 3
    expected = logits.clone()
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1:
        expected = TopPLogitsWarper(top_p)(None, expected)
    ours = filter_logits(logits, top_k, top_p)
    assert torch.equal(torch.isinf(ours), torch.isinf(expected))
    assert torch.equal(ours[~torch.isinf(ours)], logits[~torch.isinf(ours)])
    assert int((~torch.isinf(ours)).sum(dim=-1).min()) >= 1
