"""LoRALinear math, apply / init / merge on the dtcollie Llama, and the [peft] config section."""

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dtcollie import config as config_module
from dtcollie.errors import ConfigError, UserError
from dtcollie.models.llama import ModelArgs, Transformer
from dtcollie.peft import (LoRAConfig, LoRALinear, apply_lora, init_lora, lora_config, merge_lora,
                           merge_lora_state_dict)
from lora_models import ALL_TARGETS, base_logits, lora_model, random_tokens, tiny_args


def linear_with_adapter(use_rslora: bool, dropout: float = 0.0) -> LoRALinear:
    torch.manual_seed(0)
    module = LoRALinear(nn.Parameter(torch.randn(6, 10)), rank=4, alpha=3.0, dropout=dropout, use_rslora=use_rslora)
    with torch.no_grad():
        module.lora_b.normal_()
    return module


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_linear_is_the_formula(use_rslora):
    module = linear_with_adapter(use_rslora)
    x = torch.randn(2, 5, 10)
    scale = 3.0 / math.sqrt(4) if use_rslora else 3.0 / 4
    expected = x @ module.weight.T + scale * (x @ module.lora_a.T @ module.lora_b.T)
    assert module.scale == scale
    assert torch.allclose(module(x), expected, atol=1e-6)


def test_lora_linear_init_and_trainable_parameters():
    module = LoRALinear(nn.Parameter(torch.randn(6, 10)), rank=4, alpha=8.0)
    assert torch.count_nonzero(module.lora_b) == 0  # the update starts at zero...
    bound = 1 / math.sqrt(10)  # ...and A is drawn like nn.Linear's weight: U(-1/sqrt(in), 1/sqrt(in))
    assert module.lora_a.abs().max() <= bound and module.lora_a.abs().max() > bound / 2
    x = torch.randn(3, 10)
    assert torch.equal(module(x), F.linear(x, module.weight))
    assert [name for name, p in module.named_parameters() if p.requires_grad] == ["lora_a", "lora_b"]


def test_dropout_applies_to_the_adapter_input_only():
    module = linear_with_adapter(use_rslora=False, dropout=0.5)
    x = torch.randn(4, 10)
    torch.manual_seed(7)
    out = module(x)
    torch.manual_seed(7)
    dropped = F.dropout(x, 0.5, training=True)
    expected = x @ module.weight.T + module.scale * (dropped @ module.lora_a.T @ module.lora_b.T)
    assert torch.allclose(out, expected, atol=1e-6)
    module.eval()
    assert torch.allclose(module(x), x @ module.weight.T + module.scale * (x @ module.lora_a.T @ module.lora_b.T),
                          atol=1e-6)


def test_apply_lora_keeps_base_names_and_freezes_them():
    torch.manual_seed(0)
    model = Transformer(tiny_args())
    model.init_weights()
    base = {name: t.clone() for name, t in model.state_dict().items()}
    apply_lora(model, 4, 8.0, ["wq", "w2", "output"])
    state = model.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in base.items())
    added = sorted(set(state) - set(base))
    assert added == sorted(f"{prefix}.{ab}" for prefix in ("layers.0.attention.wq", "layers.1.attention.wq",
                                                           "layers.0.feed_forward.w2", "layers.1.feed_forward.w2",
                                                           "output") for ab in ("lora_a", "lora_b"))
    assert sorted(name for name, p in model.named_parameters() if p.requires_grad) == added
    # A base checkpoint loads unchanged: only the adapters are missing from it.
    fresh = lora_model(["wq", "w2", "output"], seed=3)
    result = fresh.load_state_dict(base, strict=False)
    assert sorted(result.missing_keys) == added and not result.unexpected_keys
    assert lora_config(model) == LoRAConfig(4, 8.0, ["wq", "w2", "output"], 0.0, False)


def test_meta_build_then_init_gives_the_base_model():
    tokens = random_tokens()
    plain = Transformer(tiny_args())
    torch.manual_seed(5)
    plain.init_weights()
    with torch.device("meta"):
        model = Transformer(tiny_args())
    apply_lora(model, 4, 8.0, ALL_TARGETS)
    assert model.layers["0"].attention.wq.lora_a.is_meta
    model.to_empty(device="cpu")
    torch.manual_seed(5)
    model.init_weights()
    init_lora(model)
    assert torch.count_nonzero(model.output.lora_a) > 0 and torch.count_nonzero(model.output.lora_b) == 0
    with torch.no_grad():
        assert torch.equal(model(tokens), plain(tokens))


def test_apply_lora_skips_parts_a_pipeline_stage_lacks():
    model = Transformer(tiny_args())
    del model.layers["0"]
    model.output = None
    apply_lora(model, 2, 4.0, ALL_TARGETS)
    assert [name for name, m in model.named_modules() if isinstance(m, LoRALinear)] == [
        f"layers.1.{path}" for path in ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                                        "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")]


def test_merge_lora_equals_the_adapted_model():
    model = lora_model(use_rslora=True)
    tokens = random_tokens()
    with torch.no_grad():
        adapted = model(tokens)
    assert (adapted - base_logits(model, tokens)).abs().max() > 1e-2
    merged_state = merge_lora_state_dict(model.state_dict(), lora_config(model))
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert type(model.layers["1"].feed_forward.w2) is nn.Linear and type(model.output) is nn.Linear
    assert set(model.state_dict()) == set(Transformer(tiny_args()).state_dict())
    with torch.no_grad():
        assert (model(tokens) - adapted).abs().max() <= 1e-4  # fp32 rounding of a different sum order
    assert all(torch.allclose(merged_state[name], t, atol=1e-6) for name, t in model.state_dict().items())


@pytest.mark.parametrize("kwargs,message", [
    (dict(target_modules=["wq", "q_proj"]), "unknown name 'q_proj'; choose from wq, wk, wv, wo, w1, w2, w3, output"),
    (dict(target_modules=[]), "peft.target_modules is empty"),
    (dict(target_modules=["wq", "wq"]), "names a projection twice"),
    (dict(rank=0), "peft.rank = 0 must be at least 1"),
    (dict(dropout=1.0), "peft.dropout = 1.0 must be in [0, 1)"),
])
def test_bad_lora_settings_are_config_errors(kwargs, message):
    settings = dict(rank=4, alpha=8.0, target_modules=["wq"]) | kwargs
    with pytest.raises(ConfigError, match=re.escape(message)):
        apply_lora(Transformer(tiny_args()), **settings)


def test_refused_models():
    tied = ModelArgs(**{**tiny_args().__dict__, "tie_embeddings": True})
    with pytest.raises(ConfigError, match="tied embeddings"):
        apply_lora(Transformer(tied), 4, 8.0, ["output"])
    model = lora_model(["wq"])
    with pytest.raises(UserError, match="already has LoRA adapters"):
        apply_lora(model, 4, 8.0, ["wq"])
    with pytest.raises(UserError, match="no LoRA adapters"):
        lora_config(Transformer(tiny_args()))


def test_peft_config_section(tmp_path):
    assert config_module.load(None).peft.method == "none"
    path = tmp_path / "job.toml"
    path.write_text('[peft]\nmethod = "lora"\nrank = 16\nalpha = 32\ntarget_modules = ["wq", "wv", "output"]\n')
    peft = config_module.load(str(path), [("peft.use_rslora", "true"), ("peft.dropout", "0.05")]).peft
    assert (peft.method, peft.rank, peft.alpha, peft.dropout, peft.use_rslora, peft.target_modules) == (
        "lora", 16, 32.0, 0.05, True, ["wq", "wv", "output"])
    # Field names equal LoRAConfig's, so the trainer can pass the section straight through.
    assert LoRAConfig(**{k: getattr(peft, k) for k in LoRAConfig.__dataclass_fields__}).scale == 32.0 / 4
    with pytest.raises(ConfigError, match="peft.method = 'qlora' is not allowed"):
        config_module.load(None, [("peft.method", "qlora")])
    with pytest.raises(ConfigError, match="peft.rank = 0 is too small"):
        config_module.load(None, [("peft.rank", "0")])
