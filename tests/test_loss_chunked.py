"""The chunked output projection + cross-entropy gives the full loss's value and gradients."""

import torch

from dtcollie.loss import IGNORE_INDEX, cross_entropy_sum
from dtcollie.loss_chunked import chunked_lm_loss_sum
from dtcollie.models.llama import ModelArgs, Transformer


def test_chunked_loss_matches_full_logits_loss_and_grads():
    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, hidden_dim=48, max_seq_len=16)
    model = Transformer(args)
    model.init_weights()
    tokens = torch.randint(0, args.vocab_size, (3, 11))
    labels = torch.randint(0, args.vocab_size, (3, 11))
    labels[0, :4] = IGNORE_INDEX

    full = cross_entropy_sum(model(tokens), labels)
    full.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    chunked = chunked_lm_loss_sum(model, tokens, labels, chunk_len=4)  # 11 positions: chunks of 4, 4, 3
    chunked.backward()

    torch.testing.assert_close(chunked, full)
    assert model.output is not None  # the head is back after the trunk-only forward
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], msg=name)
