"""The measured side of the planner's memory estimate: a real training step's peak on this rank.

`measure_rank(cfg)` builds this rank's model parts exactly as the trainer does (its own
`parallelize_model`, `materialize`, `ModelRunner`, optimizer), runs one optimizer step on random
tokens, then measures the second, whose optimizer state exists, as every later step's does. The
meter is torch's CPU allocator as the profiler's memory records report it (`dtcollie.bench.memory`):
every allocation and free, so the figure is the same on every machine and counts torch's
allocations only (not gloo's own buffers). Building is not measured (the CPU initialisation of a
split model draws the whole model once, a one-off); what is measured:

- peak: the most in use during the second step, from the start of building on;
- start: in use when the second step began (parameters, optimizer state, buffers; no gradients).

Call it in every rank of a layout (gloo process group already started for several ranks).
"""

import dataclasses

import torch

from dtcollie.bench.memory import MemoryMeter
from dtcollie.config import JobConfig
from dtcollie.model_runner import ModelRunner, StepBatch
from dtcollie.optim.registry import build_optimizer
from dtcollie.parallel.build import materialize, parallelize_model
from dtcollie.parallel.mesh import data_parallel_mesh
from dtcollie.parallel.plan import check_plan, planning_config


def random_batches(cfg: JobConfig, vocab_size: int, count: int, seed: int) -> list[dict]:
    training = cfg.training
    generator = torch.Generator().manual_seed(seed)
    shape = (training.micro_batch_size, training.seq_len)
    return [{"input_ids": torch.randint(0, vocab_size, shape, generator=generator),
             "labels": torch.randint(0, vocab_size, shape, generator=generator)} for _ in range(count)]


def measure_rank(cfg: JobConfig, world_size: int) -> dict:
    """This rank's {"peak_bytes", "start_bytes"} of the layout's second training step, on CPU."""
    cfg = planning_config(cfg)
    spec = dataclasses.replace(check_plan(cfg, world_size), device=torch.device("cpu"))
    mesh = spec.dims.build_mesh("cpu") if world_size > 1 else None
    dp_mesh = data_parallel_mesh(mesh) if mesh is not None else None
    batches = random_batches(cfg, spec.model_args.vocab_size, spec.accumulation_steps, cfg.job.seed)
    model = parallelize_model(spec, mesh)
    with MemoryMeter("allocator") as meter:
        materialize(model, spec.model_args, "", spec.device, cfg.job.seed)
        runner = ModelRunner(spec, model, mesh, dp_mesh)
        optimizer = build_optimizer(cfg.optimizer, model.parts, cfg.training.max_norm, runner.pp_group)
        optimizer.train_step(StepBatch(runner, batches, 0))
        with meter.counted():
            optimizer.train_step(StepBatch(runner, batches, 1))
    return {"peak_bytes": meter.peak_bytes, "start_bytes": meter.start_bytes}
