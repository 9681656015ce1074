"""Tensor-parallel styles that also accept LoRALinear, so the Llama TP plan needs no LoRA cases.

torch's ColwiseParallel / RowwiseParallel shard only nn.Linear and nn.Embedding. These subclasses
shard a LoRALinear's three weights so that both paths of its forward have the base layout:

- colwise (W Shard(0)): A Replicate, B Shard(0). x A^T is replicated (every rank needs all of it,
  and it is only `rank` wide), x A^T B^T comes out Shard(-1) like x W^T.
- rowwise (W Shard(1)): A Shard(1), B Replicate. x A^T is a Partial sum over ranks, and so is
  x A^T B^T, like x W^T: the output hook reduces the sum of both paths once (all-reduce, or
  reduce-scatter with sequence parallel), with no extra collective for the adapter.

The input and output hooks are the parent style's, so input/output layouts (sequence parallel,
loss parallel) behave exactly as for an nn.Linear. The forward itself is LoRALinear's: DTensor
propagates the layouts above through its matmuls.
"""

from functools import partial

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Placement, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from dtcollie.peft.lora import LoRALinear


class _LoRAStyle:
    """Mixin: a LoRALinear gets `lora_placements` and the parent style's hooks; anything else the parent's `_apply`."""

    lora_placements: dict[str, Placement]
    lora_input_layouts: tuple[Placement, ...]

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, LoRALinear):
            return super()._apply(module, device_mesh)
        self.desired_input_layouts = self.lora_input_layouts
        return distribute_module(
            module, device_mesh, self._partition_lora,
            partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
            partial(self._prepare_output_fn, self.output_layouts, self.use_local_output))

    def _partition_lora(self, name: str, module: nn.Module, device_mesh: DeviceMesh) -> None:
        if not isinstance(module, LoRALinear):  # distribute_module also visits the dropout submodule
            return
        for param_name, placement in self.lora_placements.items():
            param = getattr(module, param_name)
            if param is None:  # no bias
                continue
            tensor = distribute_tensor(param, device_mesh, [placement], src_data_rank=self.src_data_rank)
            module.register_parameter(param_name, nn.Parameter(tensor, requires_grad=param.requires_grad))


class LoRAColwiseParallel(_LoRAStyle, ColwiseParallel):
    """ColwiseParallel; on a LoRALinear: weight and bias Shard(0), lora_a Replicate, lora_b Shard(0)."""

    lora_placements = {"weight": Shard(0), "bias": Shard(0), "lora_a": Replicate(), "lora_b": Shard(0)}
    lora_input_layouts = (Replicate(),)


class LoRARowwiseParallel(_LoRAStyle, RowwiseParallel):
    """RowwiseParallel; on a LoRALinear: weight Shard(1), bias Replicate (added once, after the
    reduction), lora_a Shard(1), lora_b Replicate."""

    lora_placements = {"weight": Shard(1), "bias": Replicate(), "lora_a": Shard(1), "lora_b": Replicate()}
    lora_input_layouts = (Shard(-1),)
