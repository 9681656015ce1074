"""Gradient helpers shared by the optimizers: local shards for elementwise rules, the global norm.

Elementwise update rules (Lion, Adan, Sophia) need no communication when a parameter, its
gradient and its state all have the same DTensor layout: each rank updates the elements it holds.
Running them on the local shards skips DTensor dispatch per op. A global norm is different: it
must sum over the full logical tensors, so it is computed with DTensor ops, which reduce over
exactly the mesh dims each tensor is sharded on (and count replicated dims once).
"""

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from dtcollie.precision import accumulation_dtype


def closure_loss(closure) -> torch.Tensor | None:
    """`Optimizer.step(closure)`'s loss: the closure re-evaluated with gradients on, or None."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The rank-local part of a DTensor (a view that in-place ops write through), or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def local_grad(param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The gradient's local shard, laid out like the parameter's local shard.

    FSDP2 and TP give grads the parameter's placements already; a grad that differs (a Partial
    one, say) is redistributed first, which is the only communication an elementwise rule needs.
    """
    if isinstance(param, DTensor) != isinstance(grad, DTensor):
        raise TypeError("a parameter and its gradient must both be DTensors or both plain tensors "
                        f"(got {type(param).__name__} and {type(grad).__name__})")
    if isinstance(grad, DTensor):
        if grad.device_mesh != param.device_mesh or tuple(grad.placements) != tuple(param.placements):
            grad = grad.redistribute(param.device_mesh, param.placements)
        return grad.to_local()
    return grad


def global_grad_norm(grads: Iterable[torch.Tensor], device: torch.device,
                     pp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """L2 norm over the full logical tensors of all `grads` (plain tensor, float32 or float64, on `device`).

    DTensors are grouped by mesh because one DTensor reduction cannot mix meshes; plain tensors
    form their own group. Pipeline stages hold disjoint parameters, so the squared norms of all
    stages are summed over `pp_group`; every rank of that group must call this.
    """
    by_mesh: dict = {}
    for grad in grads:
        by_mesh.setdefault(grad.device_mesh if isinstance(grad, DTensor) else None, []).append(grad)
    square = torch.zeros((), dtype=accumulation_dtype(*(g.dtype for group in by_mesh.values() for g in group)), device=device)
    for tensors in by_mesh.values():
        norm = torch.nn.utils.get_total_norm(tensors, norm_type=2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        square += norm.to(device=device, dtype=square.dtype) ** 2
    if pp_group is not None:
        dist.all_reduce(square, group=pp_group)
    return square.sqrt()
