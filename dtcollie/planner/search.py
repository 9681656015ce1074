"""Every layout of N GPUs for a config, each estimated: memory per rank, communication, step time.

A candidate fixes dp_replicate x dp_shard x tp x pp = N, the pipeline schedule (GPipe, 1F1B,
Interleaved1F1B with 2 stages per rank), the micro-batch size (a power of two dividing the batch
each data-parallel rank gets; under a pipeline the schedule splits it into single-sequence
micro-batches) and the activation-checkpointing mode (none, selective every 2nd block, full). The
config's own model, precision, optimizer, sequence length and global batch are kept. A candidate
the trainer would refuse is rejected with the trainer's reason; one over the memory budget with
its need; the rest are ranked by estimated tokens per GPU per second.
"""

from dataclasses import dataclass, field

import torch

from dtcollie.config import JobConfig
from dtcollie.errors import ConfigError
from dtcollie.models.llama import Transformer, count_parameters, flops_per_token
from dtcollie.parallel.mesh import ParallelDims
from dtcollie.parallel.plan import check_plan, planning_config
from dtcollie.planner.collectives import Collective
from dtcollie.planner.comm_model import step_collectives
from dtcollie.planner.hardware import Hardware
from dtcollie.planner.memory import checkpointed_layers, estimate
from dtcollie.planner.time_model import (StepTime, bubble_fraction, dim_links, mfu, step_time,
                                         tokens_per_gpu_per_second)

GIB = 1024 ** 3
SCHEDULES = (("GPipe", 1), ("1F1B", 1), ("Interleaved1F1B", 2))
AC_MODES = ("none", "selective", "full")
_non_embedding: dict[str, int] = {}  # weights but the embedding, by the model args' repr


@dataclass
class Layout:
    """One candidate and, once estimated, its numbers (or why it was rejected)."""

    dp_replicate: int
    dp_shard: int
    tp: int
    pp: int
    schedule: str
    stages_per_rank: int
    micro_batch: int
    ac: str
    rows: list = field(default_factory=list)  # memory per pipeline rank (dtcollie.planner.memory)
    collectives: list = field(default_factory=list)  # of the slowest pipeline rank
    time: StepTime | None = None
    tgs: float = 0.0
    mfu: float = 0.0
    rejected: str = ""

    def describe(self) -> str:
        sizes = [f"{name} {size}" for name, size in (("dp_replicate", self.dp_replicate), ("dp_shard", self.dp_shard),
                                                     ("tp", self.tp), ("pp", self.pp)) if size > 1]
        pipeline = f" {self.schedule}" + (f" x{self.stages_per_rank}" if self.stages_per_rank > 1 else "") \
            if self.pp > 1 else ""
        return (" x ".join(sizes) or "1 GPU") + pipeline

    @property
    def peak_bytes(self) -> int:
        return max(row["total_bytes"] for row in self.rows)


def factorizations(gpus: int) -> list[tuple[int, int, int, int]]:
    """(dp_replicate, dp_shard, tp, pp) with product `gpus`; dp_replicate > 1 only beside dp_shard > 1 (HSDP)."""
    divisors = [d for d in range(1, gpus + 1) if gpus % d == 0]
    return [(r, s, t, gpus // (r * s * t)) for r in divisors for s in divisors for t in divisors
            if gpus % (r * s * t) == 0 and (r == 1 or s > 1)]


def candidates(cfg: JobConfig, gpus: int) -> list[Layout]:
    global_batch = cfg.training.global_batch_size
    layouts = []
    for dp_replicate, dp_shard, tp, pp in factorizations(gpus):
        per_rank = global_batch // (dp_replicate * dp_shard) if global_batch % (dp_replicate * dp_shard) == 0 else 0
        sizes = [2 ** k for k in range(per_rank.bit_length()) if per_rank % 2 ** k == 0]
        for schedule, per in SCHEDULES if pp > 1 else (("1F1B", 1),):
            for micro_batch in sizes:
                if pp > 1 and micro_batch < pp * per:
                    continue  # fewer pipeline micro-batches than stages leaves stages idle
                layouts += [Layout(dp_replicate, dp_shard, tp, pp, schedule, per, micro_batch, ac) for ac in AC_MODES]
        if not per_rank:
            layouts.append(Layout(dp_replicate, dp_shard, tp, pp, "1F1B", 1, 1, "none", rejected=(
                f"the global batch {global_batch} does not split over {dp_replicate * dp_shard} data-parallel ranks")))
    return layouts


def layout_config(cfg: JobConfig, layout: Layout) -> JobConfig:
    cfg = planning_config(cfg)
    parallelism = cfg.parallelism
    parallelism.dp_replicate, parallelism.dp_shard, parallelism.tp, parallelism.pp = (
        layout.dp_replicate, layout.dp_shard, layout.tp, layout.pp)
    parallelism.pp_schedule, parallelism.pp_stages_per_rank = layout.schedule, layout.stages_per_rank
    parallelism.pp_microbatches = layout.micro_batch if layout.pp > 1 else 0
    cfg.training.micro_batch_size = layout.micro_batch
    cfg.activation_checkpoint.mode = layout.ac
    cfg.activation_checkpoint.selective_every = 2
    return cfg


def step_flops(spec) -> tuple[float, float]:
    """(model FLOPs of one optimizer step: 6 per weight and token plus attention; the hardware
    FLOPs: plus one more forward of each checkpointed block, 2 of the 6)."""
    args, training = spec.model_args, spec.cfg.training
    key = repr(args)
    if key not in _non_embedding:
        with torch.device("meta"):
            model = Transformer(args)
        _non_embedding[key] = count_parameters(model, exclude_embedding=True)
    non_embedding = _non_embedding[key]
    tokens = training.global_batch_size * training.seq_len
    model_flops = flops_per_token(args, non_embedding, training.seq_len) * tokens
    recomputed = sum(checkpointed_layers(spec, list(range(args.n_layers)))) / args.n_layers
    return model_flops, model_flops * (1 + recomputed / 3)


def evaluate(cfg: JobConfig, layout: Layout, hw: Hardware, gpus_per_node: int) -> None:
    """Fill in `layout`: rejected with the reason, or its memory, communication and time."""
    try:
        spec = check_plan(layout_config(cfg, layout), layout.dp_replicate * layout.dp_shard * layout.tp * layout.pp)
    except ConfigError as error:
        layout.rejected = str(error)
        return
    layout.rows = estimate(spec)
    budget = (hw.memory_gib - hw.reserved_gib) * GIB
    if layout.peak_bytes > budget:
        layout.rejected = f"needs {layout.peak_bytes / GIB:.1f} GiB per GPU, over the {budget / GIB:.1f} GiB budget"
        return
    world = spec.dims.world_size
    model_flops, hardware_flops = step_flops(spec)
    links = dim_links(spec.dims, gpus_per_node)
    bubble = bubble_fraction(layout.schedule, layout.pp, spec.pp_microbatches, layout.stages_per_rank)
    times = [(step_time(hardware_flops / world, collectives, links, hw, bubble), collectives)
             for collectives in (step_collectives(spec, pp_rank) for pp_rank in range(layout.pp))]
    layout.time, layout.collectives = max(times, key=lambda pair: pair[0].total_s)
    tokens = spec.cfg.training.global_batch_size * spec.cfg.training.seq_len
    layout.tgs = tokens_per_gpu_per_second(tokens, world, layout.time.total_s)
    layout.mfu = mfu(model_flops / world, layout.time.total_s, hw)


def plan_layouts(cfg: JobConfig, gpus: int, hw: Hardware, gpus_per_node: int) -> list[Layout]:
    """Every candidate, evaluated: the fitting ones fastest first, then the rejected ones."""
    if gpus < 1:
        raise ConfigError(f"--gpus must be at least 1, got {gpus}")
    # Refuses a world that is no whole number of nodes, before any estimate.
    dim_links(ParallelDims(pp=1, dp_replicate=1, dp_shard=gpus, tp=1), gpus_per_node)
    layouts = candidates(cfg, gpus)
    for layout in layouts:
        if not layout.rejected:
            evaluate(cfg, layout, hw, gpus_per_node)
    fitting = sorted((layout for layout in layouts if not layout.rejected), key=lambda layout: -layout.tgs)
    return fitting + [layout for layout in layouts if layout.rejected]


def comm_bytes_by_dim(collectives: list[Collective]) -> dict[str, int]:
    sizes = {}
    for collective in collectives:
        sizes[collective.dim] = sizes.get(collective.dim, 0) + collective.nbytes
    return sizes
