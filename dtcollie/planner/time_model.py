"""Step time of one layout: compute, communication per mesh dim, pipeline bubble; tokens/GPU/s and MFU.

A first-order model, for ranking layouts against each other, not for predicting a run to the percent.
Its assumptions, each said once, here:

- Compute runs at `hw.peak_tflops * hw.efficiency` (one number for every kernel; `efficiency` comes
  from published end-to-end MFU, see the profiles).
- Collectives follow NCCL's ring algorithm (alpha-beta model), at the bus bandwidth nccl-tests
  reports for the link the group uses: `collective_seconds`. A group is on the "intra" link when
  all its ranks share a node, else on the "inter" link, and then it runs at the inter-node figure
  throughout (its slowest hop sets the ring's pace): `dim_links`.
- Overlap (`OVERLAPPED_DIMS`, `SMALL_ALL_REDUCE_BYTES`):
  FSDP's all-gathers and reduce-scatters (dp_shard) and HSDP's gradient all-reduce (dp_replicate)
  overlap with compute: FSDP2 prefetches the next layer's parameters while this layer computes and
  reduces each layer's gradients while backward goes on. Only the part of them longer than the
  compute time is exposed. They hide behind compute only, never behind exposed communication.
  TP/SP collectives sit between two dependent matmuls and are fully exposed; pipeline sends and
  receives are exposed (the next stage waits for them; they are small); scalars (the "dp" loss and
  norm reductions, and any all-reduce under 1 MiB) are exposed latency.
- Pipeline bubble: the idle fraction `b` of the schedule (`bubble_fraction`) stretches the busy
  time: total = (compute + exposed communication) / (1 - b).
"""

from dataclasses import dataclass

from dtcollie.errors import ConfigError
from dtcollie.planner.collectives import KINDS, Collective
from dtcollie.planner.hardware import Hardware

# dtcollie.parallel.mesh.MESH_DIMS, written again so the model needs no torch (a test checks they agree).
MESH_ORDER = ("pp", "dp_replicate", "dp_shard", "tp")

# Dims whose collectives overlap with compute (the rest are exposed): why, per dim.
OVERLAPPED_DIMS = {
    "dp_shard": "FSDP2 prefetches the next all-gather during compute and reduce-scatters during backward",
    "dp_replicate": "the HSDP gradient all-reduce runs layer by layer while backward goes on",
}
# An all-reduce below this is a scalar (loss, grad norm, a flag): the step waits for it, whatever its dim.
SMALL_ALL_REDUCE_BYTES = 1 << 20

SCHEDULES = ("GPipe", "1F1B", "Interleaved1F1B", "InterleavedZeroBubble", "ZBVZeroBubble")


def dim_links(dims, gpus_per_node: int) -> dict[str, str]:
    """For each mesh dim and "dp": "intra" if every group of that dim stays inside one node, else
    "inter". `dims` is a `ParallelDims` (or anything with its four sizes). Ranks are numbered
    row-major over (pp, dp_replicate, dp_shard, tp) and fill node after node, so a dim's groups
    have stride = product of the sizes after it and span stride * size consecutive ranks, aligned
    to multiples of the span: all of them stay in a node iff the span divides gpus_per_node."""
    sizes = {name: getattr(dims, name) for name in MESH_ORDER}
    world = sizes["pp"] * sizes["dp_replicate"] * sizes["dp_shard"] * sizes["tp"]
    if gpus_per_node < 1:
        raise ConfigError(f"gpus_per_node = {gpus_per_node} must be at least 1")
    if world > gpus_per_node and world % gpus_per_node:
        raise ConfigError(f"the layout has {world} ranks, not a whole number of nodes of {gpus_per_node} GPUs; "
                          f"use a world size that is a multiple of gpus_per_node")
    spans = {}
    stride = 1
    for name in reversed(MESH_ORDER):
        spans[name] = (stride * sizes[name], sizes[name])
        stride *= sizes[name]
    spans["dp"] = (sizes["tp"] * sizes["dp_shard"] * sizes["dp_replicate"], sizes["dp_shard"] * sizes["dp_replicate"])
    # A group of one rank, or any group of a job that fits in one node, is on one node. Otherwise a
    # span that does not divide the node size puts some groups across a node boundary (tp = 3 on
    # nodes of 4: ranks 3, 4, 5), and the slowest group sets the pace.
    return {name: "intra" if size == 1 or world <= gpus_per_node or gpus_per_node % span == 0 else "inter"
            for name, (span, size) in spans.items()}


def collective_seconds(c: Collective, link: str, hw: Hardware) -> float:
    """Ring time of one collective on a link ("intra" or "inter"): all-gather and reduce-scatter move
    (n-1)/n of the buffer per rank in n-1 steps, all-reduce 2(n-1)/n in 2(n-1) steps (a
    reduce-scatter then an all-gather), send/recv the buffer in one step. This is how nccl-tests
    defines bus bandwidth, so the profiles' busbw figures plug in directly. 1 GB = 1e9 bytes."""
    if c.kind not in KINDS:
        raise ValueError(f"unknown collective kind {c.kind!r}; expected one of {KINDS}")
    if link not in ("intra", "inter"):
        raise ValueError(f"link must be 'intra' or 'inter', got {link!r}")
    if c.nbytes < 0 or c.group_size < 1:
        raise ValueError(f"a collective needs nbytes >= 0 and group_size >= 1, got {c}")
    n = c.group_size
    if n == 1:
        return 0.0  # a group of one rank moves nothing
    if c.kind in ("all_gather", "reduce_scatter"):
        moved, steps = (n - 1) / n * c.nbytes, n - 1
    elif c.kind == "all_reduce":
        moved, steps = 2 * (n - 1) / n * c.nbytes, 2 * (n - 1)
    else:
        moved, steps = c.nbytes, 1
    gbps, latency_us = ((hw.intra_node_gbps, hw.intra_node_latency_us) if link == "intra"
                        else (hw.inter_node_gbps, hw.inter_node_latency_us))
    return moved / (gbps * 1e9) + steps * latency_us * 1e-6


def bubble_fraction(schedule: str, pp: int, n_microbatches: int, stages_per_rank: int) -> float:
    """Idle fraction of a pipeline step, with m micro-batches and v stages per rank:
    GPipe, 1F1B: (pp-1)/(m+pp-1); Interleaved1F1B: (pp-1)/(v*m+pp-1) (Narayanan et al. 2021).
    Zero-bubble schedules (Qi et al. 2023) fill the warm-up and cool-down with the weight-gradient
    pass W. We count the bubble their ZB-H1 schedule leaves, a third of 1F1B's when forward, input
    gradient and weight gradient take equal time: (pp-1)/(3*v*m+pp-1). Their near-zero bubble
    (ZB-H2, ZB-V with m >= 2*pp) needs those three passes equal and more memory; we do not assume
    it. pp = 1: no bubble."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"pipeline schedule {schedule!r} is unknown; choose one of {', '.join(SCHEDULES)}")
    for name, value in (("pp", pp), ("n_microbatches", n_microbatches), ("stages_per_rank", stages_per_rank)):
        if value < 1:
            raise ConfigError(f"{name} = {value} must be at least 1")
    if pp == 1:
        return 0.0
    if schedule in ("GPipe", "1F1B"):
        work = n_microbatches
    elif schedule == "Interleaved1F1B":
        work = stages_per_rank * n_microbatches
    else:
        work = 3 * stages_per_rank * n_microbatches
    return (pp - 1) / (work + pp - 1)


@dataclass(frozen=True)
class StepTime:
    """One optimizer step, in seconds. `comm_s` and `exposed_comm_s` are per mesh dim (and "dp"):
    every collective's time summed, and the part of it the step waits for."""

    compute_s: float
    comm_s: dict[str, float]
    exposed_comm_s: dict[str, float]
    bubble_s: float
    total_s: float

    @property
    def exposed_s(self) -> float:
        return sum(self.exposed_comm_s.values())


def overlaps_compute(c: Collective) -> bool:
    """Whether a collective hides behind compute (the module docstring says why)."""
    is_scalar = c.kind == "all_reduce" and c.nbytes < SMALL_ALL_REDUCE_BYTES
    return c.dim in OVERLAPPED_DIMS and not is_scalar


def step_time(flops_per_rank: float, collectives: list[Collective], links: dict[str, str], hw: Hardware,
              bubble: float) -> StepTime:
    """`flops_per_rank`: what one rank computes per optimizer step, recomputation included (hardware
    FLOPs). `collectives`: one rank's collectives per step. `links`: from `dim_links`. `bubble`:
    from `bubble_fraction`."""
    if flops_per_rank < 0 or not 0 <= bubble < 1:
        raise ValueError(f"need flops_per_rank >= 0 and 0 <= bubble < 1, got {flops_per_rank} and {bubble}")
    compute_s = flops_per_rank / (hw.peak_tflops * 1e12 * hw.efficiency)
    comm_s, hidden_s, exposed_s = {}, {}, {}
    for c in collectives:
        if c.dim not in links:
            raise ValueError(f"no link for mesh dim {c.dim!r}; links has {sorted(links)}")
        seconds = collective_seconds(c, links[c.dim], hw)
        comm_s[c.dim] = comm_s.get(c.dim, 0.0) + seconds
        bucket = hidden_s if overlaps_compute(c) else exposed_s
        bucket[c.dim] = bucket.get(c.dim, 0.0) + seconds
    # Overlapping collectives show only where they outlast compute; that excess is shared out in
    # proportion to each dim's overlapping time.
    overlapping = sum(hidden_s.values())
    excess = max(0.0, overlapping - compute_s)
    exposed = {dim: exposed_s.get(dim, 0.0) + (hidden_s.get(dim, 0.0) * excess / overlapping if excess else 0.0)
               for dim in comm_s}
    busy = compute_s + sum(exposed.values())
    total = busy / (1 - bubble)
    return StepTime(compute_s=compute_s, comm_s=comm_s, exposed_comm_s=exposed, bubble_s=total - busy,
                    total_s=total)


def tokens_per_gpu_per_second(tokens_per_step: int, world_size: int, step_s: float) -> float:
    """Throughput per GPU: every token of the optimizer step (all data-parallel ranks together)
    over all GPUs and the step's time."""
    return tokens_per_step / world_size / step_s


def mfu(model_flops_per_step_per_gpu: float, step_s: float, hw: Hardware) -> float:
    """Model FLOPs utilisation: the model's FLOPs (6N per token plus attention, per GPU, without
    activation recomputation) per second over the GPU's peak. The hardware FLOPs that `step_time`
    takes (recomputation included) are a different, larger number; the caller passes each."""
    return model_flops_per_step_per_gpu / step_s / (hw.peak_tflops * 1e12)
