"""The training loss, kept apart from the model so it can be compiled (and later vocab-parallel)."""

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over label tokens (labels == IGNORE_INDEX carry none).

    Summed, not averaged: the trainer divides by the label-token count of the whole global batch so
    that gradient accumulation and data parallelism give the loss of one big batch. The softmax
    runs in fp32 even under bf16 autocast."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")
