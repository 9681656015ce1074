"""FSDP2 (`fully_shard`) per transformer block plus the root, over the data-parallel mesh.

A 1-D `dp_shard` mesh is ZeRO-3; a 2-D (`dp_replicate`, `dp_shard`) mesh is HSDP (shard inside a
group, replicate across groups).
"""

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from dtcollie.precision import accumulation_dtype


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, param_dtype: torch.dtype, reshard_after_forward: bool,
               cpu_offload: bool) -> None:
    """Shard each block, then the root (embedding, final norm and output stay in the root group).

    Gradients are reduced as sums, not averages: the trainer already divides the loss by the label
    tokens of the whole global batch, across all data-parallel ranks."""
    options = dict(mesh=dp_mesh, reshard_after_forward=reshard_after_forward,
                   mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype,
                                                  reduce_dtype=accumulation_dtype(param_dtype)),
                   offload_policy=CPUOffloadPolicy() if cpu_offload else OffloadPolicy())
    for block in model.layers.values():
        fully_shard(block, **options)
    fully_shard(model, **options)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            # Plain SUM collectives: gloo has no PREMUL_SUM, and a factor of 1 needs no scaling.
            module.set_force_sum_reduction_for_comms(True)
