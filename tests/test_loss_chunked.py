"""The chunked output projection + cross-entropy gives the full loss's value and gradients."""

import pytest
import torch

from dtcollie.loss import IGNORE_INDEX, cross_entropy_sum
from dtcollie.loss_chunked import chunked_cross_entropy_sum, chunked_lm_loss_sum
from dtcollie.models.llama import ModelArgs, Transformer


def loss_and_grads(model, loss_of_model, autocast: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = loss_of_model()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
def test_chunked_loss_matches_full_logits_loss_and_grads(autocast):
    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, hidden_dim=48, max_seq_len=16)
    model = Transformer(args)
    model.init_weights()
    tokens = torch.randint(0, args.vocab_size, (3, 11))
    labels = torch.randint(0, args.vocab_size, (3, 11))
    labels[0, :4] = IGNORE_INDEX
    labels[2, 7] = IGNORE_INDEX

    full, expected = loss_and_grads(model, lambda: cross_entropy_sum(model(tokens), labels), autocast)
    # 11 positions: chunks of 4, 4, 3 positions of all 3 sequences
    chunked, found = loss_and_grads(model, lambda: chunked_lm_loss_sum(model, tokens, labels, chunk_len=4), autocast)

    assert chunked.dtype == torch.float32
    assert model.output is not None  # the head is back after the trunk-only forward
    if not autocast:
        torch.testing.assert_close(chunked, full)
        for name, grad in found.items():
            torch.testing.assert_close(grad, expected[name], msg=name)
        return
    # bf16 matmuls round differently in chunks: each gradient within 1% (both are ~0.3% off fp32)
    torch.testing.assert_close(chunked, full, rtol=1e-3, atol=0.0)
    for name, grad in found.items():
        assert (grad - expected[name]).norm() <= 1e-2 * expected[name].norm(), name


def test_a_frozen_head_gets_no_gradient():
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    weight = torch.randn(11, 8)  # requires no grad, as a LoRA run's frozen output matrix
    labels = torch.randint(0, 11, (2, 5))
    chunked_cross_entropy_sum(hidden, weight, labels, chunk_len=2).backward()
    expected = hidden.grad.clone()
    hidden.grad = None
    cross_entropy_sum(hidden @ weight.T, labels).backward()
    torch.testing.assert_close(expected, hidden.grad)
    assert weight.grad is None
