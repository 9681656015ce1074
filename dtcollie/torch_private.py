"""Every private torch and torchdata API dtcollie calls, in one place, each with why it is needed.

All were checked with torch 2.13 and torchdata 0.11; a torch upgrade should start here. Besides
these calls, three classes override a private method of their torch base class, which cannot move
here: `dtcollie.dcp_weights.SafeFileSystemReader` (DCP's `_get_metadata_path`, to read metadata
with an allow-list unpickler), `dtcollie.peft.tensor_parallel` (the TP styles' `_apply`, to shard
LoRA adapters with their base layer) and `dtcollie.models.llama.Transformer` (`nn.Module._apply`,
to keep tied weights tied through `to_empty`).
"""

import torch.distributed as dist
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
# FSDP2 over TP shards a parameter's dim 0 in strides; code that inspects placements must know it.
from torch.distributed.tensor.placement_types import _StridedShard

__all__ = ["checkpoint_wrapper", "_StridedShard", "default_store", "flatten_mesh", "init_fake_process_group",
           "loader_batches_yielded", "loader_finished"]

# checkpoint_wrapper: torch's activation-checkpointing module wrapper (TorchTitan's too); the
# public torch.utils.checkpoint has no module wrapper that keeps state_dict names loadable.


def default_store() -> dist.Store:
    """The default process group's store, where a failing rank leaves its message for the others
    (`dtcollie.rank_failure`); torch has no public getter for it."""
    return dist.distributed_c10d._get_default_store()


def flatten_mesh(mesh: DeviceMesh, name: str) -> DeviceMesh:
    """All dims of `mesh` as one dim `name`: DeviceMesh has no public way to merge dims (data loading
    and loss sums need dp_replicate x dp_shard as one group)."""
    return mesh._flatten(name)


def init_fake_process_group(rank: int, world_size: int) -> None:
    """A process group whose collectives return at once, for planning a layout's memory in one
    process; torch ships its store only under torch.testing."""
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)


def loader_batches_yielded(state: dict) -> int:
    """Batches a torchdata StatefulDataLoader has yielded in its epoch, from its state_dict (the
    loader has no public counter)."""
    return state["_num_yielded"]


def loader_finished(state: dict) -> bool:
    """Whether a StatefulDataLoader state was saved after its epoch ran out."""
    return bool(state.get("_iterator_finished"))
