"""Every model family against transformers' own classes: logits, conversion both ways, config
keys, published parameter counts, and the one-line refusal of what dtcollie cannot compute."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from dtcollie.dcp_weights import load_weights_as_stored
from dtcollie.errors import ConfigError
from dtcollie.models.hf import (args_from_hf_config, convert_dcp_to_hf, convert_hf_to_dcp, expected_shapes, from_hf,
                                hf_config_from_args, save_random_hf_model)
from dtcollie.models.llama import FLAVORS, Transformer, count_parameters

VOCAB = 96
SHAPE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
CONFIGS = {  # name: (config, dtcollie options the conversion must set)
    "llama3_2_tied": (LlamaConfig(**SHAPE, tie_word_embeddings=True), dict(tie_embeddings=True)),
    "qwen2": (Qwen2Config(**SHAPE, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
              dict(qkv_bias=True, family="qwen2")),
    "qwen2_tied": (Qwen2Config(**SHAPE, tie_word_embeddings=True), dict(qkv_bias=True, tie_embeddings=True,
                                                                        family="qwen2")),
    "qwen3": (Qwen3Config(**SHAPE, head_dim=16), dict(qk_norm=True, head_dim=16, family="qwen3")),
    "mistral": (MistralConfig(**SHAPE, sliding_window=None), dict(family="mistral")),
    "mistral_window": (MistralConfig(**SHAPE, sliding_window=7), dict(sliding_window=7, family="mistral")),
}


def save_hf_model(folder: Path, config) -> Path:
    """A random HF model whose norms and biases are random too (a swapped or dropped one shows)."""
    save_random_hf_model(folder, config)
    return folder


def hf_model(folder: Path):
    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    return model.eval()


def tokens(seq: int = 24) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, seq), generator=torch.Generator().manual_seed(1))


@pytest.fixture(params=sorted(CONFIGS))
def family_case(request, tmp_path):
    config, options = CONFIGS[request.param]
    return request.param, save_hf_model(tmp_path / "hf", config), options


def test_logits_match_transformers(family_case):
    name, folder, options = family_case
    model = from_hf(folder)
    assert all(getattr(model.args, key) == value for key, value in options.items())
    with torch.no_grad():
        ours, theirs = model(tokens()), hf_model(folder)(tokens()).logits
    assert (ours - theirs).abs().max().item() <= 1e-4


def packed_positions() -> torch.Tensor:
    """Two packed rows of 24 tokens: documents of 5, 9 (longer than mistral_window's 7) and 10; 24."""
    documents = ((5, 9, 10), (24,))
    return torch.stack([torch.cat([torch.arange(n) for n in lengths]) for lengths in documents])


def test_packed_rows_match_transformers_packed_and_each_document_alone(family_case):
    """Document-masked attention and restarted RoPE against transformers' own packed-sequence
    handling (position_ids without an attention mask), and against each document run alone."""
    name, folder, _ = family_case
    model, positions, ids = from_hf(folder), packed_positions(), tokens()
    with torch.no_grad():
        packed = model(ids, positions)
        # Without a KV cache transformers reads packed documents from position_ids.
        theirs = hf_model(folder)(ids, position_ids=positions, use_cache=False).logits
        starts = [0, 5, 14]
        alone = torch.cat([model(ids[:1, start:end]) for start, end in zip(starts, starts[1:] + [24])], dim=1)
    assert (packed - theirs).abs().max().item() <= 1e-4
    assert (packed[:1] - alone).abs().max().item() <= 1e-5
    assert torch.equal(packed[1:], model(ids[1:]))  # one document: the causal path exactly


def test_hf_to_dcp_to_hf_is_bit_exact_and_loads_alone(family_case, tmp_path):
    name, folder, _ = family_case
    args = convert_hf_to_dcp(folder, tmp_path / "dcp")
    convert_dcp_to_hf(tmp_path / "dcp", tmp_path / "back")
    original, back = load_file(folder / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert original.keys() == back.keys()
    assert all(torch.equal(original[key], back[key]) for key in original)
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["model_type"] == args.family and args_from_hf_config(config) == args
    with torch.no_grad():
        assert torch.equal(hf_model(tmp_path / "back")(tokens()).logits, hf_model(folder)(tokens()).logits)
    assert set(load_weights_as_stored(tmp_path / "dcp")) == set(expected_shapes(args))


def test_sliding_window_changes_logits_past_the_window(tmp_path):
    """Guards the mistral_window case: with sequences longer than the window it must matter."""
    windowed = from_hf(save_hf_model(tmp_path / "w", CONFIGS["mistral_window"][0]))
    full = from_hf(save_hf_model(tmp_path / "f", CONFIGS["mistral"][0]))
    with torch.no_grad():
        short, long = tokens(7), tokens(24)
        assert torch.equal(windowed(short), full(short))  # within the window: the same model
        assert (windowed(long) - full(long))[:, 7:].abs().max().item() > 1e-3


def test_a_missing_key_takes_the_familys_default():
    """Qwen3 without head_dim uses 128 (transformers' default), Llama derives it; Mistral without
    sliding_window uses 4096, with null none."""
    qwen3 = Qwen3Config(**SHAPE).to_dict()
    del qwen3["head_dim"]
    assert args_from_hf_config(qwen3).attention_head_dim == 128
    llama = LlamaConfig(**SHAPE).to_dict()
    del llama["head_dim"]
    assert args_from_hf_config(llama).attention_head_dim == 8
    mistral = MistralConfig(**SHAPE).to_dict()
    del mistral["sliding_window"]
    assert args_from_hf_config(mistral).sliding_window == 4096
    assert args_from_hf_config({**mistral, "sliding_window": None}).sliding_window == 0


@pytest.mark.parametrize("config, message", [
    ({**Qwen2Config(**SHAPE).to_dict(), "use_sliding_window": True}, "use_sliding_window"),
    ({**Qwen3Config(**SHAPE).to_dict(), "attention_bias": True}, "attention_bias"),
    ({**LlamaConfig(**SHAPE).to_dict(), "architectures": ["LlamaForSequenceClassification"]}, "architectures"),
    ({**LlamaConfig(**SHAPE).to_dict(), "model_type": "gpt2"}, "supported: llama, qwen2, qwen3, mistral"),
])
def test_unsupported_variants_are_one_line(config, message):
    with pytest.raises(ConfigError, match=message) as error:
        args_from_hf_config(config)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("flavor", ["llama3_2_1b", "qwen2_5_7b", "qwen3_8b", "mistral_7b"])
def test_flavor_hf_config_round_trip(flavor):
    """The flavor's config.json reads back as the flavor, and transformers builds the same parameter count."""
    config = hf_config_from_args(FLAVORS[flavor])
    assert args_from_hf_config(config) == FLAVORS[flavor]
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
        ours = Transformer(FLAVORS[flavor])
    assert sum(p.numel() for p in hf.parameters()) == count_parameters(ours)
