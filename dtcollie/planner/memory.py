"""Peak memory per rank of a layout: the parameter plan plus measured activations.

    total = params + grads + optimizer state + gathered FSDP units   (dtcollie.parallel.plan, the real plan)
          + activations                                             (probes, composed by the schedule)
          + buffers                                                 (RoPE tables, pipeline receive buffers)

Activations: each pipeline micro-batch on a stage keeps, until its backward, one block's saved
activations per layer it holds (a checkpointed layer keeps only its input) plus what the stage's
ends keep (the logits and loss on the last stage, the output a pipeline stage passes on, the input
it received), all measured by `dtcollie.planner.probe` at the run's width, TP plan, dtype and
micro-batch size. The schedule (torch's own `pipeline_order` for this pipeline rank) says how many
micro-batches each stage holds at every moment; the peak is the largest sum of what is held, plus
the transient a backward adds on top (the recomputed block, the logits' gradient). Without a
pipeline one micro-batch is in flight at a time.

Gradients are counted whole, as on every micro-batch after a step's first; at a step of one
micro-batch they are still being created while activations are freed, so the estimate is high
there by up to the gradients.
"""

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage

from dtcollie.parallel.pipeline import SCHEDULES, SINGLE_STAGE_SCHEDULES, stage_indices, stage_layer_ids
from dtcollie.parallel.plan import fake_process_group, plan_rank, representative_ranks
from dtcollie.planner.probe import ProbeShape, probe
from dtcollie.precision import compute_dtype
from dtcollie.run_spec import RunSpec, lora_settings

RELEASES = ("B", "I")  # a full backward or an input backward (zero-bubble) frees a micro-batch's activations


@dataclass(frozen=True)
class StageActivations:
    """One pipeline micro-batch on one stage: bytes kept from its forward until its backward, and
    the most its backward adds on top of them."""

    kept: int
    transient: int


def probe_shape(spec: RunSpec) -> ProbeShape:
    cfg, dims = spec.cfg, spec.dims
    return ProbeShape(args=spec.model_args, tp=dims.tp, sequence_parallel=dims.tp > 1 and cfg.parallelism.sequence_parallel,
                      loss_parallel=dims.tp > 1 and cfg.parallelism.loss_parallel,
                      compute_dtype=compute_dtype(cfg.training.mixed_precision),
                      micro_batch=cfg.training.micro_batch_size // spec.pp_microbatches,
                      seq_len=cfg.training.seq_len, lora=lora_settings(cfg))


def checkpointed_layers(spec: RunSpec, layer_ids: list[int]) -> list[bool]:
    """Which of these layers activation checkpointing wraps (as `apply_activation_checkpointing` does)."""
    ac = spec.cfg.activation_checkpoint
    return [ac.mode == "full" or (ac.mode == "selective" and layer % ac.selective_every == 0) for layer in layer_ids]


def stage_kind(stage: int, num_stages: int) -> str:
    if num_stages == 1:
        return "whole"
    return "first" if stage == 0 else "last" if stage == num_stages - 1 else "middle"


def stage_activations(spec: RunSpec, kind: str, layer_ids: list[int]) -> StageActivations:
    """A stage's per-micro-batch activations: per layer the measured difference between a two-block
    and a one-block probe (checkpointed or not), plus the one-block probe's remainder (its ends)."""
    shape = probe_shape(spec)
    wrapped = checkpointed_layers(spec, layer_ids)

    def per_block(checkpointed: bool) -> int:
        return probe(shape, "whole", 2, checkpointed).kept - probe(shape, "whole", 1, checkpointed).kept

    ends = probe(shape, kind, 1, False).kept - per_block(False)
    kept = ends + sum(per_block(c) for c in wrapped)
    transient = max(probe(shape, kind, 1, c).transient for c in set(wrapped) or {False})
    return StageActivations(kept=kept, transient=transient)


def schedule_actions(spec: RunSpec, pp_rank: int) -> list[tuple[int, str]]:
    """(stage, action) in the order torch's schedule runs them on this pipeline rank: "F" forward,
    "B" full backward, "I"/"W" zero-bubble input/weight backward (others are communication)."""
    parallelism = spec.cfg.parallelism
    return pipeline_order(parallelism.pp_schedule, spec.dims.pp, parallelism.pp_stages_per_rank,
                          spec.pp_microbatches, pp_rank)


@lru_cache(maxsize=None)
def pipeline_order(schedule: str, pp: int, stages_per_rank: int, n_microbatches: int,
                   pp_rank: int) -> list[tuple[int, str]]:
    num_stages = pp * stages_per_rank
    with fake_process_group(pp_rank, pp):
        stages = [PipelineStage(nn.Identity(), stage, num_stages, torch.device("cpu"), group=dist.group.WORLD)
                  for stage in stage_indices(pp_rank, pp, stages_per_rank, schedule)]
        schedule_object = SCHEDULES[schedule](stages[0] if schedule in SINGLE_STAGE_SCHEDULES else stages,
                                              n_microbatches=n_microbatches, loss_fn=lambda *args: None)
        order = schedule_object.pipeline_order[pp_rank]
    return [(action.stage_index, action.computation_type.value) for action in order if action is not None]


def activation_timeline(spec: RunSpec, pp_rank: int, stage_ids: list[int], grad_bytes: int) -> tuple[int, int]:
    """(the most activation memory this rank holds at once, the most activations and gradients hold
    together) over one step. Gradients exist once a backward has run: from the second micro-batch
    (or pipeline step) on, and inside a pipeline step after the stage's first backward."""
    args, num_stages = spec.model_args, spec.dims.pp * spec.cfg.parallelism.pp_stages_per_rank
    layers = stage_layer_ids(args, num_stages, spec.cfg.parallelism.pp_partition) if num_stages > 1 \
        else [list(range(args.n_layers))]
    per_stage = {stage: stage_activations(spec, stage_kind(stage, num_stages), layers[stage]) for stage in stage_ids}
    if num_stages == 1:
        only = per_stage[0]
        peak = only.kept + only.transient
        return peak, peak + (grad_bytes if spec.accumulation_steps > 1 else 0)
    # With several accumulation steps the schedule runs again with this step's gradients present.
    held = peak = with_grads = 0
    grads = grad_bytes if spec.accumulation_steps > 1 else 0
    for stage, action in schedule_actions(spec, pp_rank):
        if action == "F":
            held += per_stage[stage].kept
            peak, with_grads = max(peak, held), max(with_grads, held + grads)
        elif action in RELEASES:
            busy = held + per_stage[stage].transient
            peak, with_grads = max(peak, busy), max(with_grads, busy + grads)
            held -= per_stage[stage].kept
            grads = grad_bytes
    return peak, with_grads


def buffer_bytes(spec: RunSpec, stage_ids: list[int]) -> int:
    """Each model part's RoPE cos and sin tables ([max_seq_len, head_dim], fp32) and, under a
    pipeline, the buffers each stage allocates once per micro-batch: a received input on every
    stage but the first, a received output gradient on every stage but the last."""
    args, shape = spec.model_args, probe_shape(spec)
    num_stages = spec.dims.pp * spec.cfg.parallelism.pp_stages_per_rank
    tables = len(stage_ids) * 2 * args.max_seq_len * args.attention_head_dim * 4
    if num_stages == 1:
        return tables
    boundary = shape.micro_batch * shape.boundary_seq * args.dim * shape.compute_dtype.itemsize
    ends = sum((stage > 0) + (stage < num_stages - 1) for stage in stage_ids)
    return tables + ends * spec.pp_microbatches * boundary


def step_gradient_bytes(spec: RunSpec, row: dict) -> int:
    """Gradient memory while a step's micro-batches run. Under a pipeline, torch's schedules keep
    an FSDP stage unsharded from its first backward to the step's end and accumulate unsharded
    gradients (`backward_maybe_with_nosync`: no reshard, no gradient sync), reducing once at the end:
    the stage's whole TP-local parameters and gradients in the compute dtype. Otherwise the
    gradients `plan_rank` counts (sharded under FSDP)."""
    if spec.dims.pp > 1 and spec.wraps_fsdp:
        return row["unit_bytes"] + row["unsharded_grad_bytes"]
    return row["grad_bytes"]


_plans: dict[str, dict] = {}


def cached_plan_rank(spec: RunSpec, rank: int) -> dict:
    """`plan_rank`, once per parameter layout: micro-batches and checkpointing do not change it."""
    cfg = spec.cfg
    parallelism = {**vars(cfg.parallelism), "pp_microbatches": None}
    key = repr((spec.dims, parallelism, cfg.optimizer.name, cfg.peft, cfg.training.mixed_precision, spec.model_args,
                spec.wraps_fsdp, rank))
    if key not in _plans:
        _plans[key] = plan_rank(spec, rank)
    return dict(_plans[key])


def estimate_rank(spec: RunSpec, rank: int) -> dict:
    """`plan_rank`'s parameter plan of `rank` with its activations and buffers; total is the peak:
    parameters, optimizer state, buffers and gathered units, plus the most activations and
    gradients hold together (gradients are created while activations are freed)."""
    row = cached_plan_rank(spec, rank)
    grads = step_gradient_bytes(spec, row)
    row["activation_bytes"], moving = activation_timeline(spec, row["pp_rank"], row["stages"], grads)
    row["buffer_bytes"] = buffer_bytes(spec, row["stages"])
    row["total_bytes"] = (row["param_bytes"] + row["optimizer_bytes"] + row["gathered_bytes"] + row["buffer_bytes"]
                          + max(moving, row["grad_bytes"]))
    return row


def estimate(spec: RunSpec) -> list[dict]:
    """One row per pipeline rank (ranks differing only in dp or tp coordinates hold alike)."""
    return [estimate_rank(spec, rank) for rank in representative_ranks(spec.dims)]

