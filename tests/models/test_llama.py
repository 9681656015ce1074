import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from dtcollie.errors import ConfigError
from dtcollie.models.llama import FLAVORS, ModelArgs, Transformer, check_attention, count_parameters, rope_frequencies


def tiny_args(**overrides) -> ModelArgs:
    fields = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, hidden_dim=96, max_seq_len=64)
    return ModelArgs(**{**fields, **overrides})


def build(args: ModelArgs) -> Transformer:
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    model.init_weights()
    return model


# Published parameter counts of the released checkpoints.
@pytest.mark.parametrize("flavor,expected", [
    ("llama2_7b", 6_738_415_616), ("llama2_13b", 13_015_864_320), ("llama2_70b", 68_976_648_192),
    ("llama3_8b", 8_030_261_248), ("llama3_70b", 70_553_706_496),
    ("llama3_2_1b", 1_235_814_400), ("llama3_2_3b", 3_212_749_824), ("qwen2_5_0_5b", 494_032_768),
    ("qwen2_5_7b", 7_615_616_512), ("qwen3_0_6b", 596_049_920), ("qwen3_8b", 8_190_735_360),
    ("mistral_7b", 7_241_732_096), ("mistral_7b_v0_3", 7_248_023_552),
])
def test_flavor_parameter_counts(flavor, expected):
    with torch.device("meta"):
        model = Transformer(FLAVORS[flavor])
    assert count_parameters(model) == expected


def test_llama3_rope_scaling_matches_transformers():
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    args = tiny_args(dim=512, n_heads=4, rope_theta=500000.0, rope_scaling=scaling)
    hf_config = LlamaConfig(hidden_size=512, num_attention_heads=4, max_position_embeddings=1024,
                            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, **scaling})
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    ours = rope_frequencies(args)
    # The band between low and high wavelengths must be exercised, not only the two ends.
    assert (ours != rope_frequencies(tiny_args(dim=512, n_heads=4, rope_theta=500000.0))).any()
    torch.testing.assert_close(ours, expected.float(), rtol=1e-6, atol=0)


def test_meta_build_keeps_tied_embeddings_and_rope_tables():
    model = build(tiny_args(tie_embeddings=True))
    assert model.output.weight is model.tok_embeddings.weight
    assert model.rope_cos.device.type == "cpu"
    torch.testing.assert_close(model.rope_cos[3, 0], torch.cos(torch.tensor(3.0)))


def test_causal_and_batch_independent():
    torch.manual_seed(0)
    model = build(tiny_args())
    tokens = torch.randint(0, 97, (2, 16))
    changed = tokens.clone()
    changed[0, 10] = (changed[0, 10] + 1) % 97
    with torch.no_grad():
        base, after = model(tokens), model(changed)
    assert base.shape == (2, 16, 97)
    torch.testing.assert_close(after[0, :10], base[0, :10])
    assert (after[0, 10:] - base[0, 10:]).abs().max() > 1e-4
    torch.testing.assert_close(after[1], base[1])


def test_grouped_query_attention_equals_repeated_heads():
    """A GQA model computes the same as one whose kv heads are duplicated into full heads."""
    torch.manual_seed(0)
    gqa = build(tiny_args(n_kv_heads=2))
    full = build(tiny_args(n_kv_heads=4))
    state = gqa.state_dict()
    head_dim = 16
    for i in range(2):
        for name in ("wk", "wv"):
            key = f"layers.{i}.attention.{name}.weight"
            state[key] = state[key].view(2, head_dim, 64).repeat_interleave(2, dim=0).reshape(64, 64)
    full.load_state_dict(state)
    tokens = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(full(tokens), gqa(tokens), rtol=1e-5, atol=1e-5)


def test_pipeline_stage_drops_parts_but_keeps_names():
    model = build(tiny_args())
    names = set(model.state_dict())
    del model.layers["0"]
    model.norm = model.output = None
    hidden = torch.randn(1, 8, 64)
    assert model.layers["1"](hidden, model.rope_cos, model.rope_sin).shape == (1, 8, 64)
    assert set(model.state_dict()) < names
    assert "layers.1.attention.wq.weight" in model.state_dict()


def test_flash_attention_refused_where_it_cannot_run():
    with pytest.raises(ConfigError, match="flash"):
        check_attention(tiny_args(attention="flash"), torch.device("cpu"), "bf16")
    check_attention(tiny_args(), torch.device("cpu"), "fp32")
