"""The output projection and cross-entropy in sequence chunks, so the full logits never exist.

At a 32k vocabulary the logits of one 512-token sequence, upcast to fp32 for the softmax and then
given a gradient of the same size, outweigh every other activation of a small checkpointed model.
Here each chunk of sequence positions is its own checkpointed function: a chunk's logits exist
only while that chunk's forward or backward runs. Same value and gradients as
`cross_entropy_sum(model(tokens), labels)`, at the cost of computing the logits twice."""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dtcollie.loss import cross_entropy_sum


def _projected_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return cross_entropy_sum(F.linear(hidden, weight), labels)


def chunked_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                              chunk_len: int) -> torch.Tensor:
    """Summed cross-entropy of the logits `hidden @ weight.T`, `chunk_len` positions of every
    sequence at a time. hidden [batch, seq, dim], weight [vocab, dim], labels [batch, seq]
    (IGNORE_INDEX carries no loss)."""
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, labels.shape[1], chunk_len):
        end = start + chunk_len
        total = total + checkpoint(_projected_cross_entropy_sum, hidden[:, start:end], weight, labels[:, start:end],
                                   use_reentrant=False)
    return total


def final_hidden(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The Transformer's output before its output projection (the norm applied).

    The projection is skipped by leaving `model.output` unset for this one call, the way a pipeline
    stage without the head runs; so this is for a plain module, not one whose head FSDP wraps."""
    output, model.output = model.output, None
    try:
        return model(tokens)
    finally:
        model.output = output


def chunked_lm_loss_sum(model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor,
                        chunk_len: int) -> torch.Tensor:
    """`cross_entropy_sum(model(tokens), labels)` without the full logits (see the module doc)."""
    return chunked_cross_entropy_sum(final_hidden(model, tokens), model.output.weight, labels, chunk_len)
