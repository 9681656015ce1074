"""Reductions over exactly the mesh dims a quantity is spread across."""

import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def sum_over(value: torch.Tensor, groups: list) -> torch.Tensor:
    """All-reduce (sum) `value` over each process group in turn; no groups: unchanged."""
    for group in groups:
        dist.all_reduce(value, group=group)
    return value


def clip_global_grad_norm(parameters: list, max_norm: float, pp_group=None) -> torch.Tensor:
    """L2 norm of all gradients of the whole model, then clip to `max_norm` (0: only measure).

    DTensor gradients (TP and FSDP shards) give a norm that `full_tensor()` reduces over their
    mesh; pipeline stages hold disjoint parameters, so squared norms are summed over `pp_group`."""
    grads = [p.grad for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    if pp_group is not None:
        norm = sum_over(norm ** 2, [pp_group]).sqrt()
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm if max_norm > 0 else math.inf, norm)
    return norm
