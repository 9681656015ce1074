"""Count the collectives a real training step issues on this rank, as `Collective`s per mesh dim.

A `TorchDispatchMode` sees every op below autograd: FSDP2's plain c10d calls (`c10d._allgather_base_`,
`c10d._reduce_scatter_base_`, `c10d.allreduce_`), the pipeline's point-to-point ones (`c10d.send`,
`c10d.recv_`), dtcollie's own `dist.all_reduce`s, and the functional collectives DTensor lowers its
redistributions to (`_c10d_functional.all_gather_into_tensor`, `reduce_scatter_tensor`, `all_reduce`).
torch's `CommDebugMode` counts ops too, but records neither sizes nor groups, nor point-to-point.
"""

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
# Private: a functional collective names its group only by string, and torch has no public lookup.
# (dtcollie.torch_private collects such calls; this one belongs there.)
from torch.distributed.distributed_c10d import _resolve_process_group
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from dtcollie.parallel.mesh import MESH_DIMS
from dtcollie.planner.collectives import Collective

c10d, functional = torch.ops.c10d, torch.ops._c10d_functional

# op -> (kind, the argument holding the buffer `Collective.nbytes` names, the argument holding the
# group). c10d ops take the ProcessGroup itself, functional ones its name; "out": the op's result.
OPS = {
    c10d._allgather_base_.default: ("all_gather", 0, 2),  # (output, input, group, ...)
    c10d._reduce_scatter_base_.default: ("reduce_scatter", 1, 2),  # (output, input, group, ...)
    c10d.allreduce_.default: ("all_reduce", 0, 1),  # ([tensors], group, ...)
    c10d.send.default: ("send", 0, 1),  # ([tensors], group, dst, tag)
    c10d.recv_.default: ("recv", 0, 1),  # ([tensors], group, src, tag)
    functional.all_gather_into_tensor.default: ("all_gather", "out", 2),  # (input, group_size, group_name)
    functional.reduce_scatter_tensor.default: ("reduce_scatter", 0, 3),  # (input, op, group_size, group_name)
    functional.all_reduce.default: ("all_reduce", 0, 2),  # (input, op, group_name)
}
# Ops of the collective namespaces that move no data of their own.
QUIET = {functional.wait_tensor.default, functional._wrap_tensor_autograd.default}


def group_ranks(mesh: DeviceMesh, dp_mesh: DeviceMesh | None) -> dict[str, tuple[int, ...]]:
    """Mesh dim name -> the global ranks of this rank's group along it ("dp": the flattened mesh)."""
    groups = {dim: mesh.get_group(dim) for dim in MESH_DIMS}
    if dp_mesh is not None:
        groups["dp"] = dp_mesh.get_group()
    return {dim: tuple(dist.get_process_group_ranks(group)) for dim, group in groups.items()}


def nbytes(value) -> int:
    tensors = value if isinstance(value, (list, tuple)) else [value]
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


class CollectiveCounter(TorchDispatchMode):
    """`with CollectiveCounter(mesh, dp_mesh) as counter: ...` then `counter.collectives`: every
    collective this rank issued inside the block, in order.

    A group is named by its ranks: the first of pp, dp_replicate, dp_shard, tp, dp whose group on
    this rank has exactly these ranks. Not by the group object: torch sometimes makes the flattened
    dp mesh its own group and sometimes reuses dp_shard's when the ranks are the same, and DTensor
    caches redistributions by mesh *value*, so in a process that built an equal mesh before it runs
    on that older mesh's groups. So `dp` is named only when dp_replicate and dp_shard are both > 1.
    Anything else a step issues in the collective namespaces is recorded too, as dim "unknown" and
    kind the op's name, so that a comparison shows it instead of the count hiding it."""

    def __init__(self, mesh: DeviceMesh, dp_mesh: DeviceMesh | None = None):
        super().__init__()
        self.ranks = group_ranks(mesh, dp_mesh)
        self.collectives: list[Collective] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # DTensor lowers the op to local ops and collectives, which come back here
        out = func(*args, **kwargs)
        if func in OPS:
            kind, buffer, group = OPS[func]
            self.record(kind, nbytes(out if buffer == "out" else args[buffer]), args[group])
        elif getattr(func, "namespace", None) in ("c10d", "_c10d_functional") and func not in QUIET:
            self.collectives.append(Collective("unknown", str(func), 0, 0))
        return out

    def record(self, kind: str, size: int, group) -> None:
        group = dist.ProcessGroup.unbox(group) if isinstance(group, torch.ScriptObject) else \
            _resolve_process_group(group)
        ranks = tuple(dist.get_process_group_ranks(group))
        dim = next((dim for dim, dim_ranks in self.ranks.items() if dim_ranks == ranks), f"ranks {list(ranks)}")
        self.collectives.append(Collective(dim, kind, size, len(ranks)))
