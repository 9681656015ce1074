"""Per-rank parameter memory of a layout, worked out without GPUs and without allocating anything.

Each simulated rank joins a fake process group (no communication, no peers) of the layout's world
size, builds the one DeviceMesh and runs the trainer's own `parallelize_model` on the meta device,
so the shard shapes come from the real plan (pipeline split, TP, FSDP2 with its padding), not from a
formula that could drift from it. Memory is then read off the local shards:

- parameters and gradients: the sharded (FSDP) or TP-local parameters in their storage dtype. With
  `mixed_precision = "bf16"` that is still fp32: FSDP2's MixedPrecisionPolicy (or autocast, on
  one process) only casts for compute, and the gradient is reduced to the sharded fp32 param.
- optimizer state: copies of the parameter per optimizer (AdamW 2, Lion 1, Adan 4, SophiaG 2);
  LOMO keeps none and AdaLomo only factored row/column statistics (counted as none). Fused
  optimizers (LOMO, AdaLomo) also never hold more than one gradient: grads count the largest one.
- gathered: the largest FSDP unit (one block, or the root's embedding + final norm + output)
  all-gathered in the compute dtype. It is transient, but FSDP prefetches the next unit while one
  is in use, so about two of them coexist. With fsdp_reshard_after_forward = false every unit
  stays gathered from forward to backward, so all of them count.

FSDP2 shards dim 0 of each (TP-local) tensor like `torch.chunk`: ceil(n / dp_shard) rows per rank,
the last ranks holding fewer (or none). Every rank still allocates the padded ceil-size buffer, and
the dp_shard-rank-0 shard is always full, so the ranks planned here (dp_shard, dp_replicate and tp
coordinates 0, one per pipeline rank) hold exactly the padded size: the most any rank of their
stage holds. Ranks that differ only in dp or tp coordinates hold equally large shards.
Activations, the autocast weight cache and communication buffers are not counted.
"""

import copy
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from dtcollie.config import JobConfig
from dtcollie.models.llama import Transformer, count_parameters
from dtcollie.optim.registry import OPTIMIZERS
from dtcollie.parallel.build import ParallelModel, parallelize_model
from dtcollie.parallel.mesh import MESH_DIMS, ParallelDims
from dtcollie.precision import BF16_COMPUTE, compute_dtype
from dtcollie.torch_private import init_fake_process_group
from dtcollie.run_spec import RunSpec, model_args_for, resolve

GIB = 1024 ** 3


def plan_vocab_size(cfg: JobConfig) -> int:
    """The tokenizer's vocabulary, loaded only when the model leaves its vocabulary to the tokenizer
    (only then is the size unknowable otherwise); 0 when the model has its own."""
    if model_args_for(cfg, 0).vocab_size:
        return 0
    from dtcollie.data import load_tokenizer

    return load_tokenizer(cfg.data.tokenizer).vocab_size


def target_device(cfg: JobConfig) -> torch.device:
    """The device the job is meant for (check_layout only looks at its type); "auto" plans for CUDA."""
    return torch.device("cpu" if cfg.training.device == "cpu" else "cuda")


def check_plan(cfg: JobConfig, world_size: int) -> RunSpec:
    """Everything the trainer checks before its process group starts (its own `resolve`)."""
    return resolve(cfg, world_size, target_device(cfg), plan_vocab_size(cfg))


@contextmanager
def fake_process_group(rank: int, world_size: int):
    """This process plays `rank` of `world_size`; collectives return at once and move nothing."""
    if dist.is_initialized():
        raise RuntimeError("a process group is already running; plan ranks in a process without one")
    init_fake_process_group(rank, world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def representative_ranks(dims: ParallelDims) -> list[int]:
    """One rank per pipeline rank: the one at coordinate 0 of every other mesh dim (mesh order is
    pp, dp_replicate, dp_shard, tp, row-major), which holds the padded, largest FSDP shards."""
    per_pipeline_rank = dims.world_size // dims.pp
    return [pp_rank * per_pipeline_rank for pp_rank in range(dims.pp)]


def build_rank(spec: RunSpec, rank: int) -> ParallelModel:
    """`rank`'s parallelised model parts on the meta device, built under a fake process group.
    Call `check_plan` first: layout errors must surface before any process group exists."""
    dims = spec.dims
    if dims.world_size == 1:
        return parallelize_model(spec, None)
    with fake_process_group(rank, dims.world_size):
        return parallelize_model(spec, dims.build_mesh("cpu"))


def local_tensor(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if isinstance(param, DTensor) else param


def tp_local_numel(param: torch.Tensor) -> int:
    """Elements of the tensor as FSDP all-gathers it: whole over data parallel, still TP-sharded."""
    if not isinstance(param, DTensor):
        return param.numel()
    numel = param.numel()
    names = param.device_mesh.mesh_dim_names or ()
    for index, placement in enumerate(param.placements):
        if placement.is_shard() and index < len(names) and names[index] == "tp":
            numel //= param.device_mesh.size(index)
    return numel


def gathered_units(model: ParallelModel, compute: torch.dtype) -> list[int]:
    """Bytes of each FSDP unit once all-gathered in `compute` (the param_dtype every unit's
    mixed-precision policy has); none without FSDP."""
    units = []
    for part in model.parts:
        for module in part.modules():
            if not isinstance(module, FSDPModule):
                continue
            nested = {id(p) for child in module.modules() if child is not module and isinstance(child, FSDPModule)
                      for p in child.parameters()}
            own = [p for p in module.parameters() if id(p) not in nested]
            units.append(sum(tp_local_numel(p) for p in own) * compute.itemsize)
    return units


def gathered_bytes(cfg: JobConfig, model: ParallelModel) -> int:
    """All-gathered parameter memory at its peak: the largest unit when units are freed after
    forward, every unit when fsdp_reshard_after_forward = false keeps them until backward."""
    units = gathered_units(model, compute_dtype(cfg.training.mixed_precision))
    return max(units, default=0) if cfg.parallelism.fsdp_reshard_after_forward else sum(units)


def layer_ids(model: ParallelModel) -> list[int]:
    return sorted(int(name) for part in model.parts for name in part.layers.keys())


def plan_rank(spec: RunSpec, rank: int) -> dict:
    """What `rank` holds under this layout: its stages and layers, its parameter count, and the
    parameter, gradient, optimizer-state and gathered-unit bytes that implies."""
    cfg, dims = spec.cfg, spec.dims
    model = build_rank(spec, rank)
    params = model.parameters()
    sizes = [local_tensor(p).numel() * local_tensor(p).element_size() for p in params]
    param_bytes = sum(sizes)
    # Gradients and optimizer state exist for trainable parameters only (under LoRA, the adapters).
    trainable = [size for p, size in zip(params, sizes) if p.requires_grad]
    optimizer = OPTIMIZERS[cfg.optimizer.name]
    grad_bytes = max(trainable, default=0) if optimizer.fused else sum(trainable)
    state_bytes = optimizer.state_copies * sum(trainable)
    gathered = gathered_bytes(cfg, model)
    compute = compute_dtype(cfg.training.mixed_precision)
    return {
        "rank": rank,
        "pp_rank": rank // (dims.world_size // dims.pp),
        "stages": list(model.stage_ids),
        "layers": layer_ids(model),
        "has_embedding": model.has_first_stage,
        "has_output": model.has_last_stage,
        "params": sum(local_tensor(p).numel() for p in params),
        "param_bytes": param_bytes,
        "grad_bytes": grad_bytes,
        "optimizer_bytes": state_bytes,
        "gathered_bytes": gathered,
        "total_bytes": param_bytes + grad_bytes + state_bytes + gathered,
        # Every FSDP unit gathered, and whole (TP-local) gradients, in the compute dtype: what a
        # pipeline schedule holds unsharded during a step (dtcollie.planner.memory).
        "unit_bytes": sum(gathered_units(model, compute)),
        "unsharded_grad_bytes": sum(tp_local_numel(p) for p in params if p.requires_grad) * compute.itemsize,
    }


def planning_config(cfg: JobConfig) -> JobConfig:
    """`cfg` with torch.compile off and the sdpa kernel (neither holds a parameter; flash-attn need not
    be installed on the machine that plans, and importing
    inductor would cost the planner seconds."""
    cfg = copy.deepcopy(cfg)
    cfg.compile.enable = False
    cfg.model.attention = "sdpa"
    return cfg


def plan(cfg: JobConfig, world_size: int) -> dict:
    """The whole plan: checks first (no process group yet), then one simulated rank per pipeline rank."""
    cfg = planning_config(cfg)
    spec = check_plan(cfg, world_size)
    with torch.device("meta"):
        model_params = count_parameters(Transformer(spec.saved_args))
    ranks = [plan_rank(spec, rank) for rank in representative_ranks(spec.dims)]
    return {"args": spec.saved_args, "dims": spec.dims, "model_params": model_params, "ranks": ranks}


def layer_ranges(ids: list[int]) -> str:
    """[0, 1, 2, 8, 9] -> "0-2,8-9"."""
    runs = []
    for i in ids:
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(f"{a}-{b}" if a != b else str(a) for a, b in runs) or "-"


def gib(value: int) -> str:
    return f"{value / GIB:.2f}"


def format_plan(result: dict, cfg: JobConfig) -> str:
    """The plan as a header, an aligned table (one row per pipeline rank) and notes."""
    dims, args = result["dims"], result["args"]
    precision = cfg.training.mixed_precision
    name = cfg.model.args_path or cfg.model.flavor
    lines = [f"model {name}: {result['model_params']:,} parameters (dim {args.dim}, {args.n_layers} layers, "
             f"vocab {args.vocab_size}); world {dims.world_size}: {dims.describe()}; mixed_precision {precision}"]
    header = ("rank", "pp", "stages", "layers", "emb/out", "params", "params GiB", "grads GiB", "state GiB",
              "gathered GiB", "total GiB")
    rows = [header]
    for r in result["ranks"]:
        ends = "+".join(name for name, held in (("emb", r["has_embedding"]), ("out", r["has_output"])) if held)
        rows.append((str(r["rank"]), str(r["pp_rank"]), ",".join(map(str, r["stages"])), layer_ranges(r["layers"]),
                     ends or "-", f"{r['params']:,}", gib(r["param_bytes"]), gib(r["grad_bytes"]),
                     gib(r["optimizer_bytes"]), gib(r["gathered_bytes"]), gib(r["total_bytes"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        lines.append("  ".join(cell.ljust(w) if i < 5 else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(row, widths))).rstrip())
    lines += notes(cfg, dims)
    return "\n".join(lines)


def notes(cfg: JobConfig, dims: ParallelDims) -> list[str]:
    """What the columns mean for this layout, and what the table leaves out."""
    parallelism, precision = cfg.parallelism, cfg.training.mixed_precision
    compute = "bf16" if precision in BF16_COMPUTE else "fp32"
    weights = "bf16 weights (no master copy)" if precision == "bf16_weights" else "fp32 master weights"
    alike = [name for name in MESH_DIMS[1:] if getattr(dims, name) > 1]
    optimizer = OPTIMIZERS[cfg.optimizer.name]
    padding = " (FSDP pads uneven dim-0 shards to the first shard's size)" if dims.dp_shard > 1 else ""
    out = [f"one row per pipeline rank; ranks differing only in {' / '.join(alike)} hold equal shards{padding}"
           if alike else "one row per pipeline rank",
           f"params, grads, state: {weights} of this rank, their gradients, {cfg.optimizer.name} state "
           f"({optimizer.state_copies} copies of the weights"
           + ("; fused: one gradient at a time)" if optimizer.fused else ")")]
    if dims.dp > 1:
        if parallelism.fsdp_reshard_after_forward:
            out.append(f"gathered: largest FSDP unit all-gathered in {compute}, transient (with prefetch about two "
                       f"coexist)")
        else:
            out.append(f"gathered: every FSDP unit all-gathered in {compute} (fsdp_reshard_after_forward = false "
                       f"keeps them from forward to backward)")
    else:
        out.append("gathered: 0 without FSDP (dp = 1)" +
                   ("; bf16 autocast caches a bf16 copy of the weights it uses" if precision == "bf16" else ""))
    if parallelism.fsdp_cpu_offload and dims.dp > 1:
        out.append("fsdp_cpu_offload = true: params, grads and optimizer state live in host memory, not on the GPU")
    out.append("total = params + grads + state + gathered, before activations")
    return out
