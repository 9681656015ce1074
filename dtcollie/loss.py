"""The training loss, kept apart from the model so it can be compiled (and later vocab-parallel)."""

import torch
import torch.nn.functional as F

from dtcollie.precision import accumulation_dtype

IGNORE_INDEX = -100


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over label tokens (labels == IGNORE_INDEX carry none).

    Summed, not averaged: the trainer divides by the label-token count of the whole global batch so
    that gradient accumulation and data parallelism give the loss of one big batch. The softmax
    runs in fp32 even under bf16 autocast (fp64 in the fp64 mode)."""
    return F.cross_entropy(logits.flatten(0, 1).to(accumulation_dtype(logits.dtype)), labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def sample_labels(logits: torch.Tensor, labels: torch.Tensor, key: tuple) -> torch.Tensor:
    """Labels drawn from softmax(logits) (batch, seq, vocab) where `labels` has one; IGNORE_INDEX
    positions stay ignored. Gumbel-max: argmax(logits + Gumbel noise) is a softmax sample.

    Each sequence's noise comes from a generator seeded by `key` and the sequence's own labels
    (Python hashes int tuples the same in every process), so a sequence gets the same draw in
    whichever rank, micro-batch or pipeline chunk it lands."""
    logits = logits.detach().to(accumulation_dtype(logits.dtype))
    sampled = torch.empty_like(labels)
    for row, (row_logits, row_labels) in enumerate(zip(logits, labels)):
        generator = torch.Generator(logits.device).manual_seed(hash((key, *row_labels.tolist())) % 2**63)
        uniform = torch.rand(row_logits.shape, generator=generator, device=logits.device)
        gumbel = -torch.log(-torch.log(uniform.clamp(min=1e-20)))
        sampled[row] = torch.argmax(row_logits + gumbel, dim=-1)
    return torch.where(labels == IGNORE_INDEX, IGNORE_INDEX, sampled)
