"""KV-cached generation against transformers' `generate`, for every family, the sampling filters
against transformers' logits processors, and LoRA checkpoints generating with their adapters.

Both models run in float64, so a greedy choice between two nearly equal logits cannot flip on
rounding: the comparison is of the algorithms, on any CPU.
"""

import dataclasses

import pytest
import torch
from test_families import CONFIGS, save_hf_model
from transformers import AutoModelForCausalLM
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from dtcollie import config
from dtcollie.dcp_weights import load_weights_as_stored, save_model_weights
from dtcollie.generation import Sampling, filter_logits, generate
from dtcollie.inference import build_inference_model, load_weights
from dtcollie.models.hf import from_hf, save_model_args
from dtcollie.models.llama import FLAVORS, Transformer
from dtcollie.peft import apply_lora
from dtcollie.peft.export import load_lora_config
from dtcollie.train import Trainer

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


def test_a_lora_training_checkpoint_generates_with_its_adapters(tmp_path):
    """The adapters of a LoRA run (its checkpoint holds only them) merged into the base weights the
    run names give the logits of the unmerged LoRA model, and change what is generated."""
    args = dataclasses.replace(FLAVORS["debug"], vocab_size=2048, max_seq_len=48)
    torch.manual_seed(0)
    base = Transformer(args)
    base.init_weights()
    save_model_weights(base, tmp_path / "base")
    save_model_args(args, tmp_path / "base" / "model_args.json")
    cfg = config.load("train_configs/debug_lora.toml", [
        ("training.steps", "3"), ("checkpoint.interval", "3"), ("training.eval_interval", "0"),
        ("checkpoint.initial_load_path", str(tmp_path / "base")), ("job.dump_folder", str(tmp_path / "run")),
        ("metrics.enable_tensorboard", "false")])
    Trainer(cfg).train()
    checkpoint = tmp_path / "run" / "checkpoints" / "step-3"
    merged = build_inference_model(*load_weights(checkpoint), torch.device("cpu"))
    unmerged = Transformer(args)
    apply_lora(unmerged, **dataclasses.asdict(load_lora_config(checkpoint)))
    unmerged.load_state_dict({**base.state_dict(), **load_weights_as_stored(checkpoint)}, strict=False)
    tokens = torch.randint(0, 2048, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (merged(tokens) - unmerged(tokens)).abs().max().item() <= 1e-5
        assert (merged(tokens) - base(tokens)).abs().max().item() > 1e-3
    assert generate(merged, tokens.tolist(), 8) == generate(unmerged.eval(), tokens.tolist(), 8)
