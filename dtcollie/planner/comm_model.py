"""The collectives of one optimizer step (`dtcollie.train.Trainer.train_step`), in closed form.

`step_collectives(spec, pp_rank)` lists what the rank at coordinate 0 of every mesh dim but pp
issues, from the model's shapes and the config alone; `dtcollie.planner.comm_count` counts a real
step and the tests require the two to agree exactly. Sizes follow `Collective.nbytes`. The sources:

- FSDP2: per unit (each block, and the root: embedding / final norm / output) an all-gather in the
  parameter dtype and a reduce-scatter in the reduce dtype; under HSDP an all-reduce of the shard.
- tensor parallel: activations around every projection pair, the vocab-parallel loss, and the
  gradients of weights that are replicated over tp but see only part of the activations.
- pipeline: hidden states forward and their gradients back, per pipeline micro-batch; the tied
  embedding's gradient exchange.
- scalars: label-token count, gradient norm, loss.

Size-1 groups issue nothing (torch skips them), so nothing is listed for them. Checked against
torch 2.13 for the optimizers that communicate nothing in their own step (MODELLED_OPTIMIZERS).
"""

import math
from dataclasses import dataclass

from dtcollie.errors import ConfigError
from dtcollie.models.llama import ModelArgs
from dtcollie.parallel.pipeline import stage_indices, stage_layer_ids
from dtcollie.planner.collectives import Collective
from dtcollie.precision import accumulation_dtype, compute_dtype
from dtcollie.run_spec import RunSpec

MODELLED_OPTIMIZERS = ("adamw",)
# Zero-bubble schedules split backward into input and weight passes, which FSDP sees differently (and
# under ZBVZeroBubble with FSDP torch 2.13 never reduces the last stage's gradients: not a model's job).
MODELLED_SCHEDULES = ("GPipe", "1F1B", "Interleaved1F1B")
LOSS_PARALLEL_REDUCTIONS = 3  # max, sum of exp, target logit: torch's vocab-parallel cross-entropy
COLWISE_INPUTS = 5  # wq, wk, wv, w1, w3: each column-parallel projection sums its input's gradient itself


@dataclass(frozen=True)
class Stage:
    """One pipeline stage this rank holds: its layers and whether it has the ends of the model."""

    index: int
    layers: list[int]
    first: bool
    last: bool


@dataclass(frozen=True)
class Step:
    """What every formula below needs, worked out once from the spec."""

    spec: RunSpec
    args: ModelArgs
    stages: list[Stage]
    stage_ranks: dict[int, int]  # stage index -> pipeline rank holding it
    pp_rank: int
    param_bytes: int  # the dtype weights are gathered and compute in
    master_bytes: int  # the dtype gradients are reduced and kept in
    passes: int  # forward + backward passes per step (pipeline micro-batches over all accumulation steps)
    rows: int  # sequences per pass

    @property
    def dims(self):
        return self.spec.dims

    @property
    def parallelism(self):
        return self.spec.cfg.parallelism

    def activation(self, seq: int | None = None) -> int:
        """Bytes of one pass's hidden states [rows, seq, dim] in the compute dtype."""
        return self.rows * (seq or self.spec.cfg.training.seq_len) * self.args.dim * self.param_bytes


def step_collectives(spec: RunSpec, pp_rank: int) -> list[Collective]:
    """Every collective one optimizer step issues on the rank at pipeline rank `pp_rank` and
    coordinate 0 of the other mesh dims (every rank of a pipeline stage issues the same, except
    where uneven FSDP shards make a tied embedding's local gradient differ)."""
    check_modelled(spec)
    if spec.dims.world_size == 1:
        return []
    step = describe_step(spec, pp_rank)
    return (fsdp_collectives(step) + hsdp_collectives(step) + tensor_parallel_collectives(step)
            + replicated_weight_collectives(step) + pipeline_collectives(step) + tied_embedding_collectives(step)
            + scalar_collectives(step))


def check_modelled(spec: RunSpec) -> None:
    cfg = spec.cfg
    if cfg.optimizer.name not in MODELLED_OPTIMIZERS:
        raise ConfigError(f"the communication model covers optimizer.name = {' or '.join(MODELLED_OPTIMIZERS)}, "
                          f"not {cfg.optimizer.name!r} (its step communicates on its own)")
    if cfg.peft.method != "none" or cfg.compile.enable:
        raise ConfigError("the communication model covers full-model training without compile; set peft.method = "
                          "'none' and compile.enable = false")
    if spec.dims.pp > 1 and cfg.parallelism.pp_schedule not in MODELLED_SCHEDULES:
        raise ConfigError(f"the communication model covers parallelism.pp_schedule = {', '.join(MODELLED_SCHEDULES)}, "
                          f"not {cfg.parallelism.pp_schedule!r}")


def describe_step(spec: RunSpec, pp_rank: int) -> Step:
    parallelism, args, dims = spec.cfg.parallelism, spec.model_args, spec.dims
    if dims.pp > 1:
        num_stages = dims.pp * parallelism.pp_stages_per_rank
        layers = stage_layer_ids(args, num_stages, parallelism.pp_partition)
        stage_ranks = {index: rank for rank in range(dims.pp) for index in
                       stage_indices(rank, dims.pp, parallelism.pp_stages_per_rank, parallelism.pp_schedule)}
    else:  # the whole model, whatever the (unused) pipeline settings say
        num_stages, layers, stage_ranks = 1, [list(range(args.n_layers))], {0: 0}
    stages = [Stage(index, layers[index], index == 0, index == num_stages - 1)
              for index in sorted(i for i, rank in stage_ranks.items() if rank == pp_rank)]
    param_dtype = compute_dtype(spec.cfg.training.mixed_precision)
    return Step(spec, args, stages, stage_ranks, pp_rank, param_dtype.itemsize,
                accumulation_dtype(param_dtype).itemsize, passes=spec.accumulation_steps * spec.pp_microbatches,
                rows=spec.cfg.training.micro_batch_size // spec.pp_microbatches)


# ---------------------------------------------------------------------------------------------
# Parameters: the local (tensor-parallel) shapes FSDP shards, as (rows, elements per row)


def block_shapes(args: ModelArgs, tp: int) -> list[tuple[int, int]]:
    """One transformer block's parameters on one tp rank: q/k/v and w1/w3 split by rows (output
    features), wo and w2 by columns, norms whole."""
    head_dim = args.attention_head_dim
    q, kv = args.n_heads * head_dim // tp, args.n_kv_heads * head_dim // tp
    shapes = [(q, args.dim), (kv, args.dim), (kv, args.dim), (args.dim, q),
              (args.hidden_dim // tp, args.dim), (args.dim, args.hidden_dim // tp), (args.hidden_dim // tp, args.dim),
              (args.dim, 1), (args.dim, 1)]
    if args.qkv_bias:
        shapes += [(q, 1), (kv, 1), (kv, 1)]
    if args.qk_norm:
        shapes += [(head_dim, 1), (head_dim, 1)]
    return shapes


def root_shapes(args: ModelArgs, tp: int, stage: Stage) -> list[tuple[int, int]]:
    """The stage's own parameters outside the blocks: embedding, final norm, output projection (the
    embedding once when tied on one stage); both vocabulary matrices are split by rows over tp."""
    shapes = [(args.vocab_size // tp, args.dim)] if stage.first else []
    if stage.last:
        shapes.append((args.dim, 1))
        if not (args.tie_embeddings and stage.first):
            shapes.append((args.vocab_size // tp, args.dim))
    return shapes


def fsdp_units(step: Step) -> list[list[tuple[int, int]]]:
    """This rank's FSDP units (each block, then each stage's root), as parameter shapes."""
    tp = step.dims.tp
    units = [block_shapes(step.args, tp) for stage in step.stages for _ in stage.layers]
    return units + [shapes for stage in step.stages if (shapes := root_shapes(step.args, tp, stage))]


def padded_numel(shapes: list[tuple[int, int]], shards: int) -> int:
    """A unit's all-gather buffer in elements: FSDP2 pads each parameter's dim 0 to a multiple of the
    shard count, so every rank's shard is one size."""
    return sum(math.ceil(rows / shards) * shards * per_row for rows, per_row in shapes)


# ---------------------------------------------------------------------------------------------
# The sources


def fsdp_rounds(step: Step) -> tuple[int, int]:
    """(FSDP rounds per step, forwards per round). A round ends in one gradient reduction: each
    micro-batch's backward without pipeline parallelism (dtcollie accumulates through FSDP's
    reduce-scatter, no no_sync), each schedule step under it (torch's schedules run every backward
    with gradient sync off and reduce once, in their REDUCE_GRAD action)."""
    return step.spec.accumulation_steps, step.spec.pp_microbatches


def fsdp_collectives(step: Step) -> list[Collective]:
    """Per unit and round on dp_shard (n = dp_shard, numel = padded_numel):
    all-gather numel x param bytes, (microbatches + 1) times with fsdp_reshard_after_forward (every
    forward gathers; of the backwards only the first after a forward does, as backwards leave the
    unit unsharded until the round's reduction), once without; reduce-scatter numel x master bytes once."""
    n = step.dims.dp_shard
    if not step.spec.wraps_fsdp or n == 1:
        return []
    rounds, forwards = fsdp_rounds(step)
    gathers = forwards + 1 if step.parallelism.fsdp_reshard_after_forward else 1
    out = []
    for unit in fsdp_units(step):
        numel = padded_numel(unit, n)
        out += [Collective("dp_shard", "all_gather", numel * step.param_bytes, n)] * (rounds * gathers)
        out += [Collective("dp_shard", "reduce_scatter", numel * step.master_bytes, n)] * rounds
    return out


def hsdp_collectives(step: Step) -> list[Collective]:
    """HSDP: per unit and round, an all-reduce over dp_replicate of the reduce-scattered shard,
    padded_numel / dp_shard x master bytes."""
    n = step.dims.dp_replicate
    if not step.spec.wraps_fsdp or n == 1:
        return []
    rounds, _ = fsdp_rounds(step)
    return [Collective("dp_replicate", "all_reduce", padded_numel(unit, step.dims.dp_shard) // step.dims.dp_shard
                       * step.master_bytes, n) for unit in fsdp_units(step)] * rounds


def tensor_parallel_collectives(step: Step) -> list[Collective]:
    """Per pass, on tp, with A = rows x seq_len x dim x param bytes (the hidden states):

    sequence parallel: each block gathers A before attention and before the FFN (all-gather) and
    reduce-scatters A after wo and w2; backward all-gathers the two output gradients and all-reduces
    A five times, once per column-parallel projection (wq, wk, wv, w1, w3 each receive the
    replicated input through their own `from_local`, whose backward sums the partial gradient: a
    reduce-scatter per input would do); the embedding reduce-scatters A (backward all-gathers),
    the output projection all-gathers A (backward reduce-scatters).
    Without: each block all-reduces A after wo and w2, and five times in backward; the embedding
    all-reduces A; the output projection's input gradient is all-reduced in backward.
    Activation checkpointing recomputes a checkpointed block's forward up to its last saved tensor:
    torch's non-reentrant checkpoint stops early, so the reduction after w2 is not repeated.
    The loss: with loss_parallel, 3 all-reduces of rows x seq_len x master bytes; without, the
    logits are all-gathered, rows x seq_len x vocab x param bytes."""
    tp = step.dims.tp
    if tp == 1:
        return []
    sp, seq = step.parallelism.sequence_parallel, step.spec.cfg.training.seq_len
    a = step.activation()

    def on_tp(kind: str, nbytes: int, count: int = 1) -> list[Collective]:
        return [Collective("tp", kind, nbytes, tp)] * count

    if sp:
        block = on_tp("all_gather", a, 4) + on_tp("reduce_scatter", a, 2) + on_tp("all_reduce", a, COLWISE_INPUTS)
        recompute = on_tp("all_gather", a, 2) + on_tp("reduce_scatter", a)
        embedding = output = on_tp("reduce_scatter", a) + on_tp("all_gather", a)
    else:
        block = on_tp("all_reduce", a, 2 + COLWISE_INPUTS)
        recompute = embedding = output = on_tp("all_reduce", a)
    if step.parallelism.loss_parallel:
        loss = on_tp("all_reduce", step.rows * seq * step.master_bytes, LOSS_PARALLEL_REDUCTIONS)
    else:
        loss = on_tp("all_gather", step.rows * seq * step.args.vocab_size * step.param_bytes)
    per_pass = []
    for stage in step.stages:
        per_pass += block * len(stage.layers) + recompute * len(checkpointed(step, stage.layers))
        per_pass += embedding if stage.first else []
        per_pass += output + loss if stage.last else []
    return per_pass * step.passes


def checkpointed(step: Step, layers: list[int]) -> list[int]:
    """The layers activation checkpointing wraps (`dtcollie.parallel.activation`)."""
    ac = step.spec.cfg.activation_checkpoint
    if ac.mode == "none":
        return []
    return layers if ac.mode == "full" else [i for i in layers if i % ac.selective_every == 0]


def replicated_weight_collectives(step: Step) -> list[Collective]:
    """Weights replicated over tp whose input is split over it (the norms under sequence parallel,
    q/k norms on each rank's heads) get a partial gradient, summed by an all-reduce of the weight
    (dim or head_dim elements) when it becomes the parameter's gradient: per round in FSDP's
    post-backward when FSDP wraps the model (param bytes; master bytes under pipeline parallelism,
    where FSDP accumulates unsharded gradients in its reduce dtype first), else per pass."""
    tp, args = step.dims.tp, step.args
    if tp == 1:
        return []
    per_block = [args.dim, args.dim] if step.parallelism.sequence_parallel else []
    per_block += [args.attention_head_dim] * 2 if args.qk_norm else []
    weights = []
    for stage in step.stages:
        weights += per_block * len(stage.layers)
        weights += [args.dim] if stage.last and step.parallelism.sequence_parallel else []
    if step.spec.wraps_fsdp:
        times, nbytes = fsdp_rounds(step)[0], step.master_bytes if step.dims.pp > 1 else step.param_bytes
    else:
        times, nbytes = step.passes, step.param_bytes
    return [Collective("tp", "all_reduce", numel * nbytes, tp) for numel in weights] * times


def pipeline_collectives(step: Step) -> list[Collective]:
    """Per pass and stage boundary this rank's stages share with another rank: the hidden states
    forward and their gradient back, rows x seq x dim x param bytes each, seq = seq_len / tp under
    sequence parallel (a stage hands on its local sequence shard). A stage whose neighbour sits on
    this rank (the V schedule) passes it in memory; keyword inputs (packed rows' positions) reach
    every stage from the schedule, not over the wire."""
    if step.dims.pp == 1:
        return []
    tp, seq = step.dims.tp, step.spec.cfg.training.seq_len
    a = step.activation(seq // tp if tp > 1 and step.parallelism.sequence_parallel else seq)
    out = []
    for stage in step.stages:
        if not stage.last and step.stage_ranks[stage.index + 1] != step.pp_rank:
            out += [Collective("pp", "send", a, step.dims.pp), Collective("pp", "recv", a, step.dims.pp)]
        if not stage.first and step.stage_ranks[stage.index - 1] != step.pp_rank:
            out += [Collective("pp", "recv", a, step.dims.pp), Collective("pp", "send", a, step.dims.pp)]
    return out * step.passes


def tied_embedding_collectives(step: Step) -> list[Collective]:
    """Tied embeddings under pipeline parallelism: once per step the first and the last stage swap
    their copy's local gradient (`dtcollie.parallel.tied`), a send and a recv of
    ceil(vocab / tp / dp_shard) x dim x master bytes (rank 0's FSDP shard is the largest)."""
    dims = step.dims
    if dims.pp == 1 or not step.args.tie_embeddings or not any(s.first or s.last for s in step.stages):
        return []
    rows = step.args.vocab_size // dims.tp
    rows = math.ceil(rows / dims.dp_shard) if step.spec.wraps_fsdp else rows
    nbytes = rows * step.args.dim * step.master_bytes
    return [Collective("pp", "send", nbytes, dims.pp), Collective("pp", "recv", nbytes, dims.pp)]


def data_parallel_dim(dims) -> str:
    """The mesh dim the data-parallel sums run on, named as the counter names it: the flattened
    `dp` only when both of its dims are real, else the one that is."""
    if dims.dp_replicate > 1 and dims.dp_shard > 1:
        return "dp"
    return "dp_shard" if dims.dp_shard > 1 else "dp_replicate"


def grad_norm_entries(step: Step) -> int:
    """Gradients the norm sums over on this rank: every parameter, the tied output copy of a
    pipelined model once (on the last stage's rank it is left out)."""
    count = sum(len(shapes) for shapes in fsdp_units(step))
    copy = step.args.tie_embeddings and step.dims.pp > 1 and any(s.last for s in step.stages) \
        and not any(s.first for s in step.stages)
    return count - copy


def scalar_collectives(step: Step) -> list[Collective]:
    """Once per step: the label-token count (int64) over data parallel; the gradient norm, whose
    per-parameter norms DTensor stacks and all-reduces (entries x master bytes) over each dim the
    gradients are sharded on (dp_shard under FSDP, tp), then its square (master bytes) over pp; the loss
    (float64) over data parallel, then pp."""
    dims, out = step.dims, []
    if dims.dp > 1:
        out.append(Collective(data_parallel_dim(dims), "all_reduce", 8, dims.dp))
    entries = grad_norm_entries(step) * step.master_bytes
    if step.spec.wraps_fsdp and dims.dp_shard > 1:
        out.append(Collective("dp_shard", "all_reduce", entries, dims.dp_shard))
    if dims.tp > 1:
        out.append(Collective("tp", "all_reduce", entries, dims.tp))
    if dims.pp > 1:
        out.append(Collective("pp", "all_reduce", step.master_bytes, dims.pp))
    if dims.dp > 1:
        out.append(Collective(data_parallel_dim(dims), "all_reduce", 8, dims.dp))
    if dims.pp > 1:
        out.append(Collective("pp", "all_reduce", 8, dims.pp))
    return out
