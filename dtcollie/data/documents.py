"""Document boundaries inside packed rows: the `positions` the model reads them from.

A packed row holds several documents one after another. Its `positions` give each token's
position within its own document (0 where a document starts); the model restarts RoPE there and
keeps attention inside each document, so every document is computed as if it were alone. A label
whose target starts the next document is ignored: nothing in a document predicts another's first
token, exactly as when each document has a row of its own.

These work on the unshifted token slots of a row (seq_len + 1 of them): the row's inputs are
slots[:-1] and its labels slots[1:], so the input positions are positions[..., :-1].
"""

import torch

from dtcollie.loss import IGNORE_INDEX


def positions_from_starts(starts: torch.Tensor) -> torch.Tensor:
    """[..., n] boolean, True where a document starts (the first slot always starts one) -> each
    slot's position within its document."""
    starts = starts.clone()
    starts[..., 0] = True
    index = torch.arange(starts.shape[-1]).expand_as(starts)
    last_start = torch.where(starts, index, 0).cummax(dim=-1).values
    return index - last_start


def positions_after_eos(slots: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Positions of pre-training slots [..., n], where every document ends with EOS: a new document
    starts after each EOS."""
    starts = torch.zeros_like(slots, dtype=torch.bool)
    starts[..., 1:] = slots[..., :-1] == eos_id
    return positions_from_starts(starts)


def split_documents(labels: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels, input positions) of rows whose slots have `positions` [..., seq_len + 1]: labels
    [..., seq_len] whose target starts a document become IGNORE_INDEX."""
    return labels.masked_fill(positions[..., 1:] == 0, IGNORE_INDEX), positions[..., :-1].contiguous()
