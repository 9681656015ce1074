"""Build the model one rank trains: pipeline split, then LoRA adapters, then TP, then activation
checkpointing, then compile, then FSDP, all on the meta device; then materialise and initialise or load.

No rank ever holds the full model unless the layout is one rank.
"""

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from dtcollie.dcp_weights import copy_full_tensors, load_model_weights, model_state_dict
from dtcollie.models.llama import ModelArgs, Transformer
from dtcollie.parallel.activation import apply_activation_checkpointing
from dtcollie.parallel.compile import compile_blocks
from dtcollie.parallel.fsdp import apply_fsdp
from dtcollie.parallel.pipeline import split_model, stage_indices, stage_layer_ids
from dtcollie.parallel.tensor import apply_tensor_parallel
from dtcollie.peft import apply_lora, init_lora
from dtcollie.precision import compute_dtype
from dtcollie.run_spec import RunSpec, lora_settings

@dataclass
class ParallelModel:
    """The model parts (pipeline stages) this rank holds; one part without pipeline parallelism."""

    parts: list[nn.Module]
    stage_ids: list[int]
    num_stages: int

    @property
    def has_first_stage(self) -> bool:
        return 0 in self.stage_ids

    @property
    def has_last_stage(self) -> bool:
        return self.num_stages - 1 in self.stage_ids

    def parameters(self):
        return [p for part in self.parts for p in part.parameters()]

    def train(self, mode: bool = True) -> None:
        for part in self.parts:
            part.train(mode)


def parallelize_model(spec: RunSpec, mesh: DeviceMesh | None) -> ParallelModel:
    """This rank's parts of the model, parallelised, still on the meta device (no memory used)."""
    cfg, args, dims = spec.cfg, spec.model_args, spec.dims
    parallelism = cfg.parallelism
    with torch.device("meta"):
        whole = Transformer(args)
    if dims.pp > 1:
        num_stages = dims.pp * parallelism.pp_stages_per_rank
        stage_ids = stage_indices(mesh["pp"].get_local_rank(), dims.pp, parallelism.pp_stages_per_rank,
                                  parallelism.pp_schedule)
        parts = split_model(whole, stage_ids, stage_layer_ids(args, num_stages, parallelism.pp_partition))
    else:
        num_stages, stage_ids, parts = 1, [0], [whole]
    precision = cfg.training.mixed_precision
    param_dtype = compute_dtype(precision)
    lora = lora_settings(cfg)
    for part in parts:
        if lora is not None:
            apply_lora(part, **dataclasses.asdict(lora))
        if precision in ("bf16_weights", "fp64"):
            part.to(dtype=param_dtype)  # the RoPE tables, cast too, are rebuilt in fp32 on materialising
        if dims.tp > 1:
            apply_tensor_parallel(part, mesh["tp"], parallelism.sequence_parallel, parallelism.loss_parallel)
        apply_activation_checkpointing(part, cfg.activation_checkpoint.mode, cfg.activation_checkpoint.selective_every)
        if cfg.compile.enable:
            compile_blocks(part, tensor_parallel=dims.tp > 1)
        if spec.wraps_fsdp:
            dp_mesh = mesh["dp_replicate", "dp_shard"] if dims.dp_replicate > 1 else mesh["dp_shard"]
            apply_fsdp(part, dp_mesh, param_dtype, parallelism.fsdp_reshard_after_forward,
                       parallelism.fsdp_cpu_offload)
    return ParallelModel(parts, stage_ids, num_stages)


def materialize(model: ParallelModel, args: ModelArgs, initial_load_path: str, device: torch.device,
                seed: int = 0) -> None:
    """Allocate this rank's shards on `device`, then random-initialise them or load a DCP folder
    (checked against the whole model's keys and shapes, resharded to this layout)."""
    for part in model.parts:
        part.to_empty(device=device)
        init_lora(part, seed)  # adapters (if any) start fresh; a base checkpoint holds none
    if initial_load_path:
        for part in model.parts:
            part.init_rope()
        with torch.device("meta"):
            whole = Transformer(args)
        load_model_weights(model.parts, initial_load_path, reference=whole)
    elif device.type == "cpu" and any(is_partial(part) for part in model.parts):
        init_as_one_process(model, args, seed)
    else:
        for part in model.parts:
            part.init_weights()


def is_partial(part: nn.Module) -> bool:
    """Whether `part` holds less than the whole model: a pipeline stage, or DTensor shards."""
    return (part.tok_embeddings is None or part.norm is None
            or any(isinstance(p, DTensor) for p in part.parameters()))


def init_as_one_process(model: ParallelModel, args: ModelArgs, seed: int) -> None:
    """The random initial weights one process would draw, on a layout that splits the model.

    Each rank draws its own parts alike from the same seed, so without this a pipeline stage would
    repeat the first stage's draws and, on CPU (where torch keeps no DTensor RNG tracker), every
    shard the first shard's. On CPU (a test and debug device) each rank initialises the whole
    model once in host memory and keeps its share; GPU layouts keep their own init."""
    dtype = next(p.dtype for part in model.parts for p in part.parameters())
    torch.manual_seed(seed)  # as the trainer seeded before building: one process draws from here
    with torch.device("meta"):
        whole = Transformer(args)
    whole.to(dtype=dtype).to_empty(device="cpu")
    whole.init_weights()
    state = model_state_dict(whole)
    for part in model.parts:
        part.init_rope()
        copy_full_tensors(part, state)
