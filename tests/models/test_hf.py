"""HF <-> dtcollie conversion, checked against transformers' own LlamaForCausalLM."""

import dataclasses
import json
import os
import pickle
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from dtcollie.dcp_weights import (MANIFEST_FILE, load_model_weights, model_state_dict, read_checkpoint_metadata,
                                  save_model_weights)
from dtcollie.errors import CheckpointError, ConfigError
from dtcollie.models.hf import (args_from_hf_config, convert_dcp_to_hf, convert_hf_to_dcp, from_hf,
                                hf_config_from_args, load_model_args, parse_size, save_model_args)
from dtcollie.models.llama import FLAVORS, ModelArgs, Transformer

VOCAB = 96
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 4.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def tiny_config(**overrides) -> LlamaConfig:
    """Two layers, dim 32: a forward pass in milliseconds."""
    settings = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, rms_norm_eps=1e-5)
    settings.update(overrides)
    return LlamaConfig(**settings)


def save_hf_model(folder: Path, config: LlamaConfig, dtype=torch.float32, seed: int = 0, **save_kwargs) -> Path:
    """Save a randomly initialised HF model; norms are randomised too, so a swapped norm would show."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    model.to(dtype).save_pretrained(folder, **save_kwargs)
    return folder


def hf_logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    # transformers 5 loads in the stored dtype by default ("auto"); compare in fp32.
    model, info = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        return model.eval()(tokens).logits


def our_logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return from_hf(folder)(tokens)


def random_tokens(seq: int = 40) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, seq), generator=torch.Generator().manual_seed(1))


def rewrite_config(folder: Path, change) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


CASES = {
    "gqa": (dict(num_key_value_heads=2), torch.float32, {}),
    "llama3_rope": (dict(num_key_value_heads=2, rope_parameters=dict(LLAMA3_ROPE)), torch.float32, {}),
    "tied": (dict(tie_word_embeddings=True), torch.float32, {}),
    "head_dim": (dict(head_dim=16), torch.float32, {}),
    "sharded": (dict(num_key_value_heads=2), torch.float32, {"max_shard_size": "20KB"}),
    "bf16": (dict(num_key_value_heads=2, rope_parameters=dict(LLAMA3_ROPE)), torch.bfloat16, {}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_from_hf_matches_transformers(tmp_path, case):
    overrides, dtype, save_kwargs = CASES[case]
    folder = save_hf_model(tmp_path / "hf", tiny_config(**overrides), dtype, **save_kwargs)
    if case == "sharded":
        assert (folder / "model.safetensors.index.json").is_file() and not (folder / "model.safetensors").exists()
    if case == "tied":
        assert "lm_head.weight" not in load_file(folder / "model.safetensors")
    tokens = random_tokens()
    ours = our_logits(folder, tokens)
    assert ours.shape == (2, 40, VOCAB)
    assert (ours - hf_logits(folder, tokens)).abs().max().item() <= 1e-4


def test_llama3_scaling_changes_logits(tmp_path):
    """Guards the llama3 case above: with sequences past original_max_position_embeddings the
    scaling must matter, or matching transformers would prove nothing about it."""
    folder = save_hf_model(tmp_path / "hf", tiny_config(rope_parameters=dict(LLAMA3_ROPE)))
    scaled = our_logits(folder, random_tokens())
    rewrite_config(folder, lambda c: c.update(rope_parameters={"rope_type": "default", "rope_theta": 500000.0}))
    assert (scaled - our_logits(folder, random_tokens())).abs().max().item() > 1e-3


@pytest.mark.parametrize("type_key", ["rope_type", "type"])
def test_old_config_layout(tmp_path, type_key):
    """Pre-transformers-5 config.json: top-level rope_theta, rope_scaling, no num_key_value_heads."""
    folder = save_hf_model(tmp_path / "hf", tiny_config(rope_parameters=dict(LLAMA3_ROPE)))

    def to_old_layout(config):
        del config["rope_parameters"], config["num_key_value_heads"]
        config["rope_theta"] = 500000.0
        config["rope_scaling"] = {type_key: "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

    rewrite_config(folder, to_old_layout)
    args = load_model_args(folder / "config.json")
    assert args.rope_theta == 500000.0 and args.n_kv_heads == 4
    assert args.rope_scaling == {"factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 16}
    hf_rope = LlamaConfig.from_pretrained(folder).rope_parameters
    assert hf_rope["rope_type"] == "llama3" and hf_rope["rope_theta"] == 500000.0
    assert {k: hf_rope[k] for k in args.rope_scaling} == args.rope_scaling
    tokens = random_tokens()
    assert (our_logits(folder, tokens) - hf_logits(folder, tokens)).abs().max().item() <= 1e-4


def test_old_layout_defaults_follow_transformers():
    """No rope_scaling and no theta: plain RoPE at 10000; llama3 without original length: max positions."""
    base = tiny_config().to_dict()
    del base["rope_parameters"]
    args = args_from_hf_config(base)
    assert args.rope_theta == 10000.0 and args.rope_scaling == {}
    base["rope_scaling"] = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    assert args_from_hf_config(base).rope_scaling["original_max_position_embeddings"] == 64


@pytest.mark.parametrize("key, value", [("model_type", "gpt2"), ("model_type", "qwen3_moe"), ("attention_bias", True), ("mlp_bias", True),
                                        ("hidden_act", "gelu"), ("rope_type", "linear"), ("rope_type", "yarn"),
                                        ("partial_rotary_factor", 0.5)])
def test_unsupported_config_is_refused(key, value):
    config = tiny_config().to_dict()
    if key in ("rope_type", "partial_rotary_factor"):
        config["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "factor": 2.0, key: value}
    else:
        config[key] = value
    with pytest.raises(ConfigError, match=key):
        args_from_hf_config(config)


@pytest.mark.parametrize("flavor", ["debug", "llama3_8b", "llama2_70b"])
def test_hf_config_round_trip(flavor):
    args = FLAVORS[flavor]
    args = ModelArgs(**{**args.__dict__, "vocab_size": args.vocab_size or 1000})
    config = hf_config_from_args(args, torch.bfloat16)
    assert config["dtype"] == "bfloat16" and config["model_type"] == "llama"
    assert args_from_hf_config(config) == args
    assert args_from_hf_config(LlamaConfig(**config).to_dict()) == args  # transformers accepts it


def test_model_args_files(tmp_path):
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, hidden_dim=48,
                     rope_scaling={"factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 16}, tie_embeddings=True)
    save_model_args(args, tmp_path / "model_args.json")
    assert load_model_args(tmp_path / "model_args.json") == args
    assert load_model_args(tmp_path) == args  # a folder holding it
    (tmp_path / "config.json").write_text(json.dumps(hf_config_from_args(args)))
    assert load_model_args(tmp_path / "config.json") == args
    (tmp_path / "bad.json").write_text(json.dumps({"dim": 32, "n_layer": 2}))
    with pytest.raises(ConfigError, match="n_layer"):
        load_model_args(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text(json.dumps({"dim": "32"}))
    with pytest.raises(ConfigError, match="dim must be int"):
        load_model_args(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="missing.json"):
        load_model_args(tmp_path / "missing.json")


def test_bad_hf_folders(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        from_hf(tmp_path / "nowhere")
    folder = save_hf_model(tmp_path / "hf", tiny_config())
    weights = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        from_hf(folder)

    extra = dict(weights, **{"model.layers.0.self_attn.q_proj.bias": torch.zeros(32)})
    del extra["model.norm.weight"]
    save_file(extra, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing: norm\.weight.*unexpected: layers\.0\.attention\.wq\.bias"):
        from_hf(folder)

    save_file(weights, folder / "model.safetensors")
    rewrite_config(folder, lambda c: c.update(intermediate_size=40))
    with pytest.raises(CheckpointError, match=r"feed_forward\.w1\.weight \(checkpoint \[48, 32\], model \[40, 32\]\)"):
        from_hf(folder)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        from_hf(folder)


# Shapes no model can have, from a model_args.json and from an HF config.json. Before, each ended in
# a ZeroDivisionError, a math domain error, a KeyError or a model built silently wrong.
IMPOSSIBLE_SHAPES = [
    ("model_args.json", {"n_heads": 0}, "n_heads = 0 is not a size a model can have"),
    ("config.json", {"num_attention_heads": 0}, "n_heads = 0 is not a size a model can have"),
    ("model_args.json", {"n_layers": -1}, "n_layers = -1 is not a size a model can have"),
    ("config.json", {"num_hidden_layers": -1}, "n_layers = -1 is not a size a model can have"),
    ("model_args.json", {"dim": 34}, "dim = 34 is not a multiple of n_heads = 4"),
    ("config.json", {"hidden_size": 34, "head_dim": None}, "dim = 34 is not a multiple of n_heads = 4"),
    ("model_args.json", {"n_kv_heads": 3}, "n_heads = 4 is not a multiple of n_kv_heads = 3"),
    ("model_args.json", {"rope_scaling": {"factor": 8.0}},
     "rope_scaling has keys ['factor']; Llama 3.1 scaling needs exactly factor, low_freq_factor"),
    ("model_args.json", {"norm_eps": -1.0}, "norm_eps = -1.0 must be a positive finite number"),
    ("config.json", {"rms_norm_eps": -1.0}, "norm_eps = -1.0 must be a positive finite number"),
    ("model_args.json", {"rope_theta": 0.0}, "rope_theta = 0.0 must be a positive finite number"),
    ("config.json", {"num_attention_heads": "4"}, "HF config num_attention_heads must be an integer, got '4'"),
    ("config.json", {"hidden_size": 32.5}, "HF config hidden_size must be an integer, got 32.5"),
]


@pytest.mark.parametrize("name, patch, message", IMPOSSIBLE_SHAPES)
def test_impossible_shapes_are_refused_from_either_file(tmp_path, name, patch, message):
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, hidden_dim=48)
    content = dataclasses.asdict(args) if name == "model_args.json" else hf_config_from_args(args)
    (tmp_path / name).write_text(json.dumps({**content, **patch}))
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        load_model_args(tmp_path / name)
    assert str(tmp_path / name) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "bad header", "bad index"])
def test_damaged_safetensors_are_one_line(tmp_path, damage):
    folder = save_hf_model(tmp_path / "hf", tiny_config())
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    if damage == "truncated":
        weights.write_bytes(data[:len(data) // 2])
    elif damage == "garbage":
        weights.write_bytes(bytes(range(256)) * 20)
    elif damage == "bad header":
        weights.write_bytes(data[:8] + b"{" * (len(data) - 8))
    else:
        weights.rename(folder / "model-00001-of-00001.safetensors")
        (folder / "model.safetensors.index.json").write_text('{"weight_map": ["model-00001-of-00001.safetensors"]}')
    expected = ("is not a valid safetensors index" if damage == "bad index"
                else "model.safetensors is not a readable safetensors file")
    with pytest.raises(CheckpointError, match=expected) as err:
        from_hf(folder)
    assert "\n" not in str(err.value)


def test_missing_shard_is_named(tmp_path):
    folder = save_hf_model(tmp_path / "hf", tiny_config(), max_shard_size="20KB")
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        from_hf(folder)


def assert_same_bits(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        int_type = {2: torch.int16, 4: torch.int32}[a[name].element_size()]
        assert torch.equal(a[name].view(int_type), b[name].view(int_type)), name


def read_hf_tensors(folder: Path) -> dict:
    tensors = {}
    for path in folder.glob("*.safetensors"):
        tensors.update(load_file(path))
    return tensors


@pytest.mark.parametrize("dtype, tied, shard", [(torch.bfloat16, False, None), (torch.float32, True, "20KB")])
def test_hf_dcp_hf_round_trip_is_bit_exact(tmp_path, dtype, tied, shard):
    config = tiny_config(num_key_value_heads=2, tie_word_embeddings=tied, rope_parameters=dict(LLAMA3_ROPE))
    source = save_hf_model(tmp_path / "hf", config, dtype)
    args = convert_hf_to_dcp(source, tmp_path / "dcp")
    keys = read_checkpoint_metadata(tmp_path / "dcp").state_dict_metadata.keys()
    assert ("output.weight" in keys) != tied and "tok_embeddings.weight" in keys
    assert load_model_args(tmp_path / "dcp" / "model_args.json") == args
    convert_dcp_to_hf(tmp_path / "dcp", tmp_path / "out", **({"max_shard_size": shard} if shard else {}))
    assert_same_bits(read_hf_tensors(source), read_hf_tensors(tmp_path / "out"))
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file() == bool(shard)
    tokens = random_tokens()
    assert torch.equal(hf_logits(source, tokens), hf_logits(tmp_path / "out", tokens))


def test_export_casts_and_refuses_non_empty_output(tmp_path):
    source = save_hf_model(tmp_path / "hf", tiny_config())
    convert_hf_to_dcp(source, tmp_path / "dcp")
    with pytest.raises(CheckpointError, match="not empty"):
        convert_hf_to_dcp(source, tmp_path / "dcp")
    convert_dcp_to_hf(tmp_path / "dcp", tmp_path / "out", dtype=torch.bfloat16)
    # Overwriting a single-file export with a sharded one must not leave the old model.safetensors,
    # which transformers would prefer over the new index.
    convert_dcp_to_hf(tmp_path / "dcp", tmp_path / "out", max_shard_size=20_000, force=True)
    assert not (tmp_path / "out" / "model.safetensors").exists()
    exported = read_hf_tensors(tmp_path / "out")
    original = read_hf_tensors(source)
    assert all(t.dtype == torch.float32 for t in exported.values())
    assert_same_bits(original, exported)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float32"


def test_dcp_without_model_args_is_refused(tmp_path):
    save_model_weights(tiny_model(), tmp_path / "dcp")
    with pytest.raises(CheckpointError, match="model_args.json"):
        convert_dcp_to_hf(tmp_path / "dcp", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30
    assert parse_size(" 10kb ") == 10_000 and parse_size(123) == 123 and parse_size("1.5MB") == 1_500_000
    for bad in ("five", "5XB", "0", -1):
        with pytest.raises(ConfigError):
            parse_size(bad)


# --------------------------------------------------------------------------------------------
# DCP model weights (dtcollie.dcp_weights)


def tiny_model(tied: bool = False, hidden_dim: int = 48, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB,
                                  hidden_dim=hidden_dim, max_seq_len=64, tie_embeddings=tied))
    model.init_weights()
    return model


@pytest.mark.parametrize("tied", [False, True])
def test_model_weights_round_trip(tmp_path, tied):
    save_model_weights(tiny_model(tied, seed=0), tmp_path / "ckpt")
    keys = set(read_checkpoint_metadata(tmp_path / "ckpt").state_dict_metadata)
    assert keys == set(model_state_dict(tiny_model(tied)))
    assert ("output.weight" in keys) != tied
    model = tiny_model(tied, seed=1)
    load_model_weights(model, tmp_path / "ckpt")
    expected = tiny_model(tied, seed=0).state_dict()
    assert all(torch.equal(model.state_dict()[k], expected[k]) for k in expected)
    if tied:
        assert model.output.weight is model.tok_embeddings.weight


def test_bf16_checkpoint_loads_into_fp32_model(tmp_path):
    source = tiny_model(seed=0)
    save_model_weights({k: v.to(torch.bfloat16) for k, v in model_state_dict(source).items()}, tmp_path / "ckpt")
    model = tiny_model(seed=1)
    load_model_weights(model, tmp_path / "ckpt")
    for name, tensor in model_state_dict(model).items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, source.state_dict()[name].to(torch.bfloat16).float()), name


def test_load_model_weights_refuses_shape_mismatch(tmp_path):
    save_model_weights(tiny_model(hidden_dim=48), tmp_path / "ckpt")
    model = tiny_model(hidden_dim=40, seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"layers\.0\.feed_forward\.w1\.weight \(checkpoint \[48, 32\], "
                                              r"model \[40, 32\]\)") as err:
        load_model_weights(model, tmp_path / "ckpt")
    assert "and 1 more" in str(err.value)  # 6 mismatched FFN weights, 5 named
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)  # nothing half-loaded


def test_load_model_weights_refuses_missing_and_untied_keys(tmp_path):
    save_model_weights(tiny_model(tied=True), tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match=r"missing: output\.weight"):
        load_model_weights(tiny_model(tied=False), tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model_weights(tiny_model(), tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"has no \.metadata"):
        load_model_weights(tiny_model(), tmp_path / "empty")


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_metadata_is_not_unpickled_blindly(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_model_weights(tiny_model(), tmp_path / "ckpt")
    (tmp_path / "ckpt" / ".metadata").write_bytes(pickle.dumps(_RunsCode()))
    (tmp_path / "ckpt" / MANIFEST_FILE).unlink()  # a crafted folder comes without a files.json
    with pytest.raises(CheckpointError, match="posix.system|os.system"):
        load_model_weights(tiny_model(), tmp_path / "ckpt")
    assert not (tmp_path / "pwned").exists()
