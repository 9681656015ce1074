"""Pipeline parallelism: which layers go to which stage, which stages a rank owns, and the
`torch.distributed.pipelining` schedule that runs them.

The model is cut by deleting parts of a (meta) copy, never by tracing: each stage is a
`Transformer` whose `layers` ModuleDict keeps only its own keys and whose embedding / final norm /
output projection are `None` where the stage does not own them, so parameter names
("layers.5.attention.wq.weight") are the same as in the whole model and checkpoints load unchanged.
Stage input/output shapes are not given to `PipelineStage`: torch 2.13 infers them from the first
micro-batch at the first `step()` (one extra forward/backward on one micro-batch, no grads kept).
"""

import copy

import torch
from torch import nn
from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B,
                                          ScheduleInterleavedZeroBubble, ScheduleZBVZeroBubble)
from torch.distributed.pipelining.schedules import PipelineScheduleSingle

from dtcollie.errors import ConfigError
from dtcollie.models.llama import ModelArgs, TransformerBlock

SCHEDULES = {
    "GPipe": ScheduleGPipe,
    "1F1B": Schedule1F1B,
    "Interleaved1F1B": ScheduleInterleaved1F1B,
    "InterleavedZeroBubble": ScheduleInterleavedZeroBubble,
    "ZBVZeroBubble": ScheduleZBVZeroBubble,
}
SINGLE_STAGE_SCHEDULES = ("GPipe", "1F1B")
INTERLEAVED_SCHEDULES = ("Interleaved1F1B", "InterleavedZeroBubble")
V_SCHEDULES = ("ZBVZeroBubble",)


# ---------------------------------------------------------------------------------------------
# Layer partition


def stage_layer_ids(model_args: ModelArgs, num_stages: int, partition: str) -> list[list[int]]:
    """Layer ids for each of `num_stages` pipeline stages, contiguous and in order.

    "uniform" spreads layers as evenly as possible; "parameters" balances parameter counts, which
    matters when the embedding and output projection are large next to one layer (Llama 3's 128k
    vocabulary); "3,5" gives explicit counts for hand-tuned layouts."""
    n_layers = model_args.n_layers
    if num_stages > n_layers:
        raise ConfigError(f"{num_stages} pipeline stages (parallelism.pp x parallelism.pp_stages_per_rank) need at "
                          f"least {num_stages} layers, but the model has {n_layers}; lower pp or pp_stages_per_rank")
    partition = partition.strip()
    if partition == "uniform":
        counts = uniform_counts(n_layers, num_stages)
    elif partition == "parameters":
        counts = parameter_balanced_counts(model_args, num_stages)
    else:
        counts = explicit_counts(partition, n_layers, num_stages)
    return counts_to_ids(counts)


def uniform_counts(n_layers: int, num_stages: int) -> list[int]:
    """Equal counts; the first `n_layers % num_stages` stages take one layer more."""
    base, extra = divmod(n_layers, num_stages)
    return [base + (1 if stage < extra else 0) for stage in range(num_stages)]


def explicit_counts(partition: str, n_layers: int, num_stages: int) -> list[int]:
    """Parse "3,5" and check it describes exactly this model and stage count."""
    try:
        counts = [int(part) for part in partition.split(",")]
    except ValueError:
        raise ConfigError(f"parallelism.pp_partition = {partition!r} is not 'uniform', 'parameters' or a comma list "
                          f"of layer counts such as '3,5'") from None
    if len(counts) != num_stages:
        raise ConfigError(f"parallelism.pp_partition = {partition!r} has {len(counts)} entries but there are "
                          f"{num_stages} pipeline stages (pp x pp_stages_per_rank); give one layer count per stage")
    if min(counts) < 1:
        raise ConfigError(f"parallelism.pp_partition = {partition!r} gives a stage {min(counts)} layers; every "
                          f"stage needs at least 1")
    if sum(counts) != n_layers:
        raise ConfigError(f"parallelism.pp_partition = {partition!r} sums to {sum(counts)} layers but the model has "
                          f"{n_layers}; the counts must add up to model n_layers")
    return counts


def parameter_balanced_counts(model_args: ModelArgs, num_stages: int) -> list[int]:
    """Layer counts that minimise the largest stage's parameter count, with the embedding counted
    on the first stage and the final norm + output projection on the last."""
    layer, embedding, head = parameter_costs(model_args)
    n_layers = model_args.n_layers

    def stage_cost(stage: int, first_layer: int, end_layer: int) -> int:
        cost = (end_layer - first_layer) * layer
        cost += embedding if stage == 0 else 0
        cost += head if stage == num_stages - 1 else 0
        return cost

    # best[s][j]: smallest achievable maximum stage cost putting the first j layers on stages 0..s-1.
    inf = float("inf")
    best = [[inf] * (n_layers + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n_layers + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0
    for s in range(1, num_stages + 1):
        for j in range(s, n_layers + 1):
            for i in range(s - 1, j):
                value = max(best[s - 1][i], stage_cost(s - 1, i, j))
                if value < best[s][j]:
                    best[s][j], cut[s][j] = value, i
    counts, end = [], n_layers
    for s in range(num_stages, 0, -1):
        start = cut[s][end]
        counts.append(end - start)
        end = start
    return counts[::-1]


def parameter_costs(model_args: ModelArgs) -> tuple[int, int, int]:
    """Parameters of one block, of the embedding, and of final norm + output projection."""
    with torch.device("meta"):
        block = TransformerBlock(model_args)
    layer = sum(p.numel() for p in block.parameters())
    embedding = model_args.vocab_size * model_args.dim
    return layer, embedding, model_args.dim + model_args.vocab_size * model_args.dim


def counts_to_ids(counts: list[int]) -> list[list[int]]:
    ids, start = [], 0
    for count in counts:
        ids.append(list(range(start, start + count)))
        start += count
    return ids


# ---------------------------------------------------------------------------------------------
# Stage placement and configuration checks


def stage_indices(pp_rank: int, pp_size: int, stages_per_rank: int, schedule: str) -> list[int]:
    """Global stage indices owned by `pp_rank`, in increasing order.

    Looped placement (r, r+pp, r+2pp, ...) is what GPipe/1F1B/interleaved schedules expect; the
    V schedule places stage r and its mirror 2*pp-1-r on rank r, so the first and last stage share
    rank 0 and the turn of the V stays on the last rank without a send."""
    if schedule in V_SCHEDULES:
        if stages_per_rank != 2:
            raise ConfigError(f"parallelism.pp_schedule = {schedule!r} needs pp_stages_per_rank = 2, "
                              f"got {stages_per_rank}")
        return [pp_rank, 2 * pp_size - 1 - pp_rank]
    return [pp_rank + k * pp_size for k in range(stages_per_rank)]


def num_microbatches(parallelism_cfg) -> int:
    """Micro-batches per pipeline step: the configured count, or one per pipeline stage when 0."""
    return parallelism_cfg.pp_microbatches or parallelism_cfg.pp * parallelism_cfg.pp_stages_per_rank


def check_pipeline_config(parallelism_cfg, model_args: ModelArgs, micro_batch_size: int) -> None:
    """Raise a one-line ConfigError for any pipeline layout torch would reject or that would train
    wrongly, before any process group traffic (a mismatch found inside a schedule would hang the
    other ranks). Does nothing when pp == 1: the pipeline settings are then unused."""
    cfg = parallelism_cfg
    if cfg.pp == 1:
        return
    schedule, pp, per_rank = cfg.pp_schedule, cfg.pp, cfg.pp_stages_per_rank
    if schedule not in SCHEDULES:
        raise ConfigError(f"parallelism.pp_schedule = {schedule!r} is unknown; choose one of {', '.join(SCHEDULES)}")
    check_stages_per_rank(schedule, per_rank)
    num_stages = pp * per_rank
    if num_stages > model_args.n_layers:
        raise ConfigError(f"parallelism.pp {pp} x pp_stages_per_rank {per_rank} = {num_stages} pipeline stages but "
                          f"the model has {model_args.n_layers} layers; lower pp or pp_stages_per_rank")
    stage_layer_ids(model_args, num_stages, cfg.pp_partition)
    if model_args.tie_embeddings and schedule in V_SCHEDULES:
        raise ConfigError(f"tied embeddings with parallelism.pp_schedule = {schedule!r} are not supported (its V "
                          f"places the first and last stage on one rank); use 1F1B or Interleaved1F1B")
    check_microbatches(cfg, micro_batch_size)


def check_stages_per_rank(schedule: str, per_rank: int) -> None:
    if schedule in SINGLE_STAGE_SCHEDULES and per_rank != 1:
        raise ConfigError(f"parallelism.pp_schedule = {schedule!r} runs one stage per rank but pp_stages_per_rank = "
                          f"{per_rank}; set pp_stages_per_rank = 1 or use Interleaved1F1B")
    if schedule in INTERLEAVED_SCHEDULES and per_rank < 2:
        raise ConfigError(f"parallelism.pp_schedule = {schedule!r} needs pp_stages_per_rank >= 2, got {per_rank}; "
                          f"raise it or use 1F1B")
    if schedule in V_SCHEDULES and per_rank != 2:
        raise ConfigError(f"parallelism.pp_schedule = {schedule!r} needs pp_stages_per_rank = 2, got {per_rank}")


def check_microbatches(cfg, micro_batch_size: int) -> None:
    """The counts torch 2.13's schedules accept, checked here rather than inside the schedule."""
    n, pp, schedule = num_microbatches(cfg), cfg.pp, cfg.pp_schedule
    source = f"parallelism.pp_microbatches = {cfg.pp_microbatches}" if cfg.pp_microbatches else \
        f"{n} pipeline micro-batches (parallelism.pp_microbatches = 0: one per stage)"
    if micro_batch_size % n:
        raise ConfigError(f"training.micro_batch_size = {micro_batch_size} cannot be split into {source}; make "
                          f"micro_batch_size a multiple of the micro-batch count")
    if schedule == "1F1B" and n < pp:
        raise ConfigError(f"parallelism.pp_schedule = '1F1B' needs at least pp = {pp} micro-batches, got {source}; "
                          f"raise pp_microbatches (and micro_batch_size)")
    if schedule in INTERLEAVED_SCHEDULES:
        # torch splits the micro-batches into max(1, n // pp) rounds of equal size.
        rounds = max(1, n // pp)
        if n % rounds:
            raise ConfigError(f"parallelism.pp_schedule = {schedule!r} with pp = {pp} needs the micro-batch count to "
                              f"be below pp or a multiple of n // pp = {rounds}, got {source}; use a multiple of pp")


# ---------------------------------------------------------------------------------------------
# Model split and schedule


def split_model(model: nn.Module, stage_ids: list[int], layer_ids_per_stage: list[list[int]]) -> list[nn.Module]:
    """One copy of `model` per owned stage, keeping only that stage's layers.

    Copies are cheap on the meta device, which is where the trainer splits; layers are deleted
    from the ModuleDict (not renumbered) so names match the whole model's."""
    last = len(layer_ids_per_stage) - 1
    parts = []
    for stage in stage_ids:
        part = copy.deepcopy(model)
        keep = {str(i) for i in layer_ids_per_stage[stage]}
        for name in list(part.layers.keys()):
            if name not in keep:
                del part.layers[name]
        if stage != 0:
            part.tok_embeddings = None
        if stage != last:
            part.norm = None
            part.output = None
        parts.append(part)
    return parts


def build_schedule(model_parts: list[nn.Module], stage_ids: list[int], num_stages: int, pp_group,
                   device: torch.device, schedule: str, n_microbatches: int, loss_fn):
    """The pipelining schedule over this rank's stages.

    scale_grads=False: torch would otherwise divide gradients by the micro-batch count (it assumes
    a per-micro-batch mean loss); the trainer's loss_fn already divides by the global label-token
    count, so the gradient must be the plain sum over micro-batches."""
    stages = [PipelineStage(part, stage, num_stages, device, group=pp_group)
              for part, stage in zip(model_parts, stage_ids)]
    schedule_class = SCHEDULES[schedule]
    if issubclass(schedule_class, PipelineScheduleSingle):
        if len(stages) != 1:
            raise ConfigError(f"parallelism.pp_schedule = {schedule!r} runs one stage per rank, got {len(stages)}")
        return schedule_class(stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
    return schedule_class(stages, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
