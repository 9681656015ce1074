"""Reductions over exactly the mesh dims a quantity is spread across."""

import math

import torch
import torch.distributed as dist

from dtcollie.optim.grad_norm import global_grad_norm


def sum_over(value: torch.Tensor, groups: list) -> torch.Tensor:
    """All-reduce (sum) `value` over each process group in turn; no groups: unchanged."""
    for group in groups:
        dist.all_reduce(value, group=group)
    return value


def clip_global_grad_norm(parameters: list, max_norm: float, device: torch.device, pp_group=None,
                          counted: list | None = None) -> torch.Tensor:
    """L2 norm of all gradients of the whole model (over TP/FSDP shards and pipeline stages), then
    clip `parameters` to `max_norm` (0: only measure). `counted`: the parameters the norm sums
    over, if not all (a copy of another parameter is counted once)."""
    counted = parameters if counted is None else counted
    norm = global_grad_norm([p.grad for p in counted if p.grad is not None], device, pp_group)
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm if max_norm > 0 else math.inf, norm)
    return norm
