"""The output projection and cross-entropy in sequence chunks, so the full logits never exist.

At a 32k vocabulary the logits of one 512-token sequence, upcast to fp32 for the softmax and then
given a gradient of the same size, outweigh every other activation of a small checkpointed model.
Here one autograd function computes the loss chunk by chunk (`chunk_len` positions of every
sequence at a time) and keeps only its inputs; its backward recomputes each chunk's logits, turns
them into their gradient in place and adds that chunk's share to one output-matrix gradient (no
per-chunk copy of it is ever summed in). Same value and gradients as
`cross_entropy_sum(hidden @ weight.T, labels)`, at the cost of computing the logits twice. Under
autocast the matmuls run in the autocast dtype, the softmax in fp32, as `cross_entropy_sum` does.
"""

import torch
import torch.nn.functional as F
from torch import nn

from dtcollie.loss import IGNORE_INDEX


class _ChunkedLinearCrossEntropySum(torch.autograd.Function):
    """hidden [tokens, dim], weight [vocab, dim], labels [tokens] -> summed cross-entropy (fp32)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_len: int, compute_dtype: torch.dtype):
        ctx.save_for_backward(hidden, weight, labels)
        ctx.chunk_len, ctx.compute_dtype = chunk_len, compute_dtype
        matrix = weight.to(compute_dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, labels.numel(), chunk_len):
            logits = F.linear(hidden[start:start + chunk_len].to(compute_dtype), matrix).float()
            total += F.cross_entropy(logits, labels[start:start + chunk_len], ignore_index=IGNORE_INDEX,
                                     reduction="sum")
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, weight, labels = ctx.saved_tensors
        chunk_len, compute_dtype = ctx.chunk_len, ctx.compute_dtype
        matrix = weight.to(compute_dtype)
        # A frozen head (LoRA without it among the targets) gets no gradient, and costs none.
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        for start in range(0, labels.numel(), chunk_len):
            rows = slice(start, start + chunk_len)
            inputs, targets = hidden[rows].to(compute_dtype), labels[rows]
            grad_logits = F.linear(inputs, matrix).float().softmax(dim=-1)  # d(sum CE)/d(logits) = softmax - onehot
            counted = targets != IGNORE_INDEX
            grad_logits[counted.nonzero().squeeze(-1), targets[counted]] -= 1.0
            grad_logits[~counted] = 0.0
            grad_logits = grad_logits.mul_(grad_total).to(compute_dtype)
            grad_hidden[rows] = grad_logits @ matrix
            if grad_weight is None:
                continue
            if grad_weight.dtype == compute_dtype:
                grad_weight.addmm_(grad_logits.t(), inputs)
            else:
                grad_weight += (grad_logits.t() @ inputs).to(grad_weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def chunked_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                              chunk_len: int) -> torch.Tensor:
    """Summed cross-entropy of the logits `hidden @ weight.T`, `chunk_len` positions of every
    sequence at a time. hidden [batch, seq, dim], weight [vocab, dim], labels [batch, seq]
    (IGNORE_INDEX carries no loss)."""
    device_type = hidden.device.type
    autocast = torch.is_autocast_enabled(device_type)
    compute_dtype = torch.get_autocast_dtype(device_type) if autocast else weight.dtype
    # Position-major, so each chunk holds `chunk_len` positions of every sequence.
    flat_hidden = hidden.transpose(0, 1).reshape(-1, hidden.shape[-1])
    flat_labels = labels.transpose(0, 1).reshape(-1)
    with torch.autocast(device_type, enabled=False):
        return _ChunkedLinearCrossEntropySum.apply(flat_hidden, weight, flat_labels,
                                                   chunk_len * labels.shape[0], compute_dtype)


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
