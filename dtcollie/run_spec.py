"""One resolved run: `resolve(cfg, world_size, device, vocab_size)` checks a job for its layout and
derives every value the trainer and the layout planner need, once."""

import copy
import dataclasses
import os
from dataclasses import dataclass

import torch

from dtcollie.config import JobConfig
from dtcollie.errors import ConfigError
from dtcollie.models.hf import load_model_args
from dtcollie.models.llama import FLAVORS, ModelArgs, check_attention
from dtcollie.optim.registry import OPTIMIZERS
from dtcollie.parallel.mesh import ParallelDims
from dtcollie.parallel.pipeline import check_pipeline_config, num_microbatches
from dtcollie.parallel.tensor import check_tensor_parallel
from dtcollie.peft import LoRAConfig, check_lora_config


def model_args_for(cfg: JobConfig, vocab_size: int) -> ModelArgs:
    """The flavor (or the args file), with the tokenizer's vocabulary and this run's attention kernel.
    `max_seq_len` stays the model's own context (at least training.seq_len): it is what the saved
    model_args.json and an HF export say; the trainer builds its RoPE tables for seq_len only."""
    # config.load has checked the flavor's name.
    args = load_model_args(cfg.model.args_path) if cfg.model.args_path else copy.deepcopy(FLAVORS[cfg.model.flavor])
    if args.vocab_size == 0:
        args.vocab_size = vocab_size
    elif vocab_size > args.vocab_size:
        raise ConfigError(f"the tokenizer has {vocab_size} tokens but the model's vocabulary has only "
                          f"{args.vocab_size}; use the model's own tokenizer (data.tokenizer)")
    args.max_seq_len = max(args.max_seq_len, cfg.training.seq_len)
    args.attention = cfg.model.attention
    return args


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("training.device = 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


@dataclass(frozen=True)
class RunSpec:
    """Everything a job derives from its checked config and world size, worked out once; the
    trainer and the layout planner both start from it."""

    cfg: JobConfig
    dims: ParallelDims
    device: torch.device
    saved_args: ModelArgs  # the model's own shape and context: what model_args.json and exports say
    model_args: ModelArgs  # what is built: the same, with RoPE tables only for training.seq_len
    accumulation_steps: int  # micro-batches per data-parallel rank per optimizer step
    pp_microbatches: int  # micro-batches a pipeline schedule splits each one into (1 without pp)
    # FSDP wraps the model parts: to shard over data parallel, and also on a size-1 mesh (a) for
    # bf16 layouts, whose mixed-precision policy is what casts parameters for TP and pipeline stages
    # (autocast does not cover pipeline schedules); (b) for fused optimizers under pipeline
    # parallelism: a stage's gradients accumulate over the schedule's micro-batches, and FSDP's
    # post-backward then fires the update hooks once per step with the complete gradient, for every
    # schedule (zero-bubble ones fill .grad directly).
    wraps_fsdp: bool
    autocast_dtype: torch.dtype | None  # one process under bf16 autocasts; other layouts use FSDP's policy


def resolve(cfg: JobConfig, world_size: int, device: torch.device, vocab_size: int) -> RunSpec:
    """Check the job for this world size (every layout mistake as a ConfigError, raised alike on
    every rank before any collective) and derive its values. `vocab_size`: the tokenizer's."""
    if world_size < 1:
        raise ConfigError(f"world size {world_size} must be at least 1")
    training = cfg.training
    dims = ParallelDims.from_config(cfg.parallelism, world_size)
    saved_args = model_args_for(cfg, vocab_size)
    model_args = dataclasses.replace(saved_args, max_seq_len=training.seq_len)
    check_layout(cfg, model_args, dims, device)
    fused = OPTIMIZERS[cfg.optimizer.name].fused
    precision = training.mixed_precision
    multi_process = world_size > 1
    return RunSpec(cfg, dims, device, saved_args, model_args,
                   accumulation_steps=training.global_batch_size // (training.micro_batch_size * dims.dp),
                   pp_microbatches=num_microbatches(cfg.parallelism) if dims.pp > 1 else 1,
                   wraps_fsdp=dims.dp > 1 or (multi_process and precision == "bf16") or (dims.pp > 1 and fused),
                   autocast_dtype=torch.bfloat16 if precision == "bf16" and not multi_process else None)


def check_layout(cfg: JobConfig, args: ModelArgs, dims: ParallelDims, device: torch.device) -> None:
    """Every layout mistake, as a ConfigError raised identically on every rank before any collective."""
    training, lora = cfg.training, lora_settings(cfg)
    if lora is not None:
        check_lora_config(lora)
    check_attention(args, device, training.mixed_precision)
    check_tensor_parallel(args, dims.tp, training.seq_len, cfg.parallelism.sequence_parallel)
    if dims.pp > 1:
        check_pipeline_config(cfg.parallelism, args, training.micro_batch_size)
    name = cfg.optimizer.name
    fused = OPTIMIZERS[name].fused
    if args.tie_embeddings and dims.pp > 1 and fused and lora is None:
        raise ConfigError(f"optimizer.name = {name!r} updates inside backward, before the tied embedding's two "
                          f"pipeline copies can sum their gradients; use another optimizer or pp = 1")
    if training.mixed_precision == "bf16_weights" and (not fused or lora is not None):
        fused_names = " or ".join(repr(other) for other, spec in OPTIMIZERS.items() if spec.fused)
        raise ConfigError(f"training.mixed_precision = 'bf16_weights' keeps no fp32 master weights, which only "
                          f"optimizer.name = {fused_names} on a full model can train (got {name!r}"
                          f"{' with LoRA' if lora is not None else ''}); use mixed_precision = 'bf16'")
    if fused and training.global_batch_size != training.micro_batch_size * dims.dp:
        raise ConfigError(f"optimizer.name = {name!r} updates during backward, so it cannot accumulate gradients: "
                          f"set training.micro_batch_size = global_batch_size / data-parallel ranks = "
                          f"{training.global_batch_size} / {dims.dp}")
    per_step = training.micro_batch_size * dims.dp
    if training.global_batch_size % per_step:
        raise ConfigError(f"training.global_batch_size = {training.global_batch_size} is not a multiple of "
                          f"micro_batch_size {training.micro_batch_size} x data-parallel ranks {dims.dp} = {per_step}")


def lora_settings(cfg: JobConfig) -> LoRAConfig | None:
    """The run's LoRA hyperparameters, or None when it trains every weight."""
    if cfg.peft.method != "lora":
        return None
    peft = cfg.peft
    return LoRAConfig(peft.rank, peft.alpha, list(peft.target_modules), peft.dropout, peft.use_rslora)
