"""How the trainer drives every optimizer: one `train_step(batch)` per optimizer step.

The trainer hands over a `GlobalBatch` (its micro-batches, ready to run forward and backward on
this rank's model) and gets back the step's loss and global gradient norm; what is special about an
optimizer stays in its own file: the fused update inside backward and its two-pass clipping
(`dtcollie.optim.fused`), Sophia's Hessian pass on sampled labels (`dtcollie.optim.sophia`).
Each optimizer's facts (its config keys, published defaults, fused or not) are its entry in
`dtcollie.optim.registry`.
"""

import contextlib
from collections.abc import Callable
from typing import Protocol

import torch

Pass = Callable[[], contextlib.AbstractContextManager]  # a context a backward runs inside; yields False to skip it


class GlobalBatch(Protocol):
    """The trainer's side of one optimizer step: this rank's micro-batches of the global batch."""

    step: int  # the step being taken, from 1
    tokens: int  # tokens in the whole global batch (all data-parallel ranks)

    def backward(self, sampled_labels: bool = False) -> torch.Tensor:
        """Forward and backward of every micro-batch, gradients accumulating in `.grad` (tied copies
        summed); returns the step's loss on this rank. `sampled_labels`: labels drawn from the
        model's own softmax instead, the same draw on every layout."""

    def backward_passes(self, passes: list[Pass]) -> torch.Tensor:
        """One backward of the whole batch inside each pass's context, in order (the graph kept
        between passes where the layout allows, else the forward run again); returns the loss."""

    def clip_gradients(self, max_norm: float) -> torch.Tensor:
        """The global norm of the accumulated gradients (whole model, every layout); clips them to
        `max_norm` (0: only measure)."""


def decay_groups(parameters: list, weight_decay: float) -> list[dict]:
    """Parameter groups: weight decay on matrices and embeddings, none on norm scales."""
    decay = [p for p in parameters if p.ndim >= 2]
    no_decay = [p for p in parameters if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def trainable(parts: list) -> list[torch.Tensor]:
    """The weights an optimizer updates (with LoRA, the adapters)."""
    return [p for part in parts for p in part.parameters() if p.requires_grad]


def backward_passes(loss: torch.Tensor, passes: list[Pass]) -> None:
    """`loss.backward()` inside each pass's context; the graph is kept for every pass but the last."""
    for index, make_pass in enumerate(passes):
        with make_pass() as run:
            if run is not False:
                loss.backward(retain_graph=index < len(passes) - 1)


class TrainingOptimizer:
    """The trainer's handle on an optimizer that steps from accumulated gradients: backward over
    the batch, clip by the global norm, step. `optimizer` is the torch optimizer (its state, its
    param_groups for the LR schedule)."""

    def __init__(self, optimizer: torch.optim.Optimizer, max_norm: float):
        self.optimizer, self.max_norm = optimizer, max_norm

    @property
    def retains_graph(self) -> bool:
        """Whether its backwards keep the graph for another pass (compiled code must allow it)."""
        return False

    def train_step(self, batch: GlobalBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step; returns (this rank's loss, the global gradient norm)."""
        loss = batch.backward()
        grad_norm = batch.clip_gradients(self.max_norm)
        self.step_from_gradients(batch)
        self.optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm

    def step_from_gradients(self, batch: GlobalBatch) -> None:
        self.optimizer.step()
