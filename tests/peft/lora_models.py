"""Tiny LoRA models shared by the tests in this folder (and importable by spawned ranks)."""

import torch

from dtcollie.models.llama import ModelArgs, Transformer
from dtcollie.peft import apply_lora

ALL_TARGETS = ["wq", "wk", "wv", "wo", "w1", "w2", "w3", "output"]
VOCAB = 128


def tiny_args(**family_options) -> ModelArgs:
    """dim 64, 2 layers, GQA; every size divisible by 2 so tp = 2 splits it. `family_options`: the
    ModelArgs options of a family (qkv_bias, qk_norm, sliding_window, tie_embeddings, family)."""
    return ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, hidden_dim=96, max_seq_len=32,
                     **family_options)


def lora_model(targets=ALL_TARGETS, rank: int = 4, alpha: float = 8.0, use_rslora: bool = False,
               dropout: float = 0.0, seed: int = 0, **family_options) -> Transformer:
    """A randomly initialised tiny model with random, non-zero adapters (B is zero only at init,
    which would make every adapter test pass trivially), and random biases (zero at init)."""
    torch.manual_seed(seed)
    model = Transformer(tiny_args(**family_options))
    model.init_weights()
    apply_lora(model, rank, alpha, targets, dropout=dropout, use_rslora=use_rslora)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(std=0.1)
            elif name.endswith("bias"):
                param.normal_(std=0.5)
    return model


def random_tokens(batch: int = 2, seq: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def base_logits(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of the model without its adapters: the tests check the adapters move them well past
    the tolerance, so a lost adapter cannot pass."""
    plain = Transformer(model.args)
    plain.load_state_dict({name: t for name, t in model.state_dict().items() if "lora_" not in name})
    with torch.no_grad():
        return plain(tokens)
