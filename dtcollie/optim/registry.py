"""Every optimizer the trainer knows, with its facts: one entry each.

Config reads the keys and defaults, the trainer and benchmarks `build`, the layout checks and the
memory planner `fused` and `state_copies`. Adding an optimizer is one file (its update rule and a
`build` function returning a `dtcollie.optim.protocol.TrainingOptimizer`) plus one entry here.
"""

import inspect
from collections.abc import Callable
from dataclasses import dataclass

from dtcollie.optim import adalomo, adamw, adan, lion, lomo, sophia


@dataclass(frozen=True)
class OptimizerSpec:
    # (the [optimizer] config, this rank's model parts, training.max_norm, the pipeline group or None)
    # -> the TrainingOptimizer the trainer steps
    build: Callable
    keys: frozenset  # the [optimizer] keys it reads besides name, lr and weight_decay
    about: str  # what it keeps per weight, for the memory benchmark's table
    betas: tuple = ()  # the published default decay rates (beta1, beta2, ...)
    fused: bool = False  # updates inside backward: no gradient accumulation, one gradient alive at a time
    state_copies: int = 0  # fp32 state tensors the size of each trainable weight (memory planner)


def class_betas(optimizer_class) -> tuple:
    """The decay rates an optimizer class takes by default (its paper's and reference package's)."""
    return inspect.signature(optimizer_class).parameters["betas"].default


OPTIMIZERS = {
    # torch's AdamW defaults to beta2 0.999; LLM recipes (Llama's among them) use 0.95.
    "adamw": OptimizerSpec(adamw.build, frozenset({"beta1", "beta2", "eps", "implementation"}),
                           "fused AdamW, 2 fp32 states", betas=(0.9, 0.95), state_copies=2),
    "lion": OptimizerSpec(lion.build, frozenset({"beta1", "beta2"}), "Lion, 1 state",
                          betas=class_betas(lion.Lion), state_copies=1),
    "adan": OptimizerSpec(adan.build, frozenset({"beta1", "beta2", "beta3", "eps", "no_prox"}),
                          "Adan, 4 states (m, v, n, previous grad)", betas=class_betas(adan.Adan), state_copies=4),
    "sophiag": OptimizerSpec(sophia.build, frozenset({"beta1", "beta2", "rho", "hessian_interval"}),
                             "SophiaG, 2 states; update_hessian() every step", betas=class_betas(sophia.SophiaG),
                             state_copies=2),
    "lomo": OptimizerSpec(lomo.build, frozenset({"clip_grad_value"}), "LOMO: SGD fused into backward, no state",
                          fused=True),
    "adalomo": OptimizerSpec(adalomo.build, frozenset({"clip_grad_value", "clip_threshold", "decay_rate"}),
                             "AdaLomo fused into backward, factored row/col state", fused=True),
}


def build_optimizer(cfg, parts: list, max_norm: float, pp_group=None):
    """The trainer's optimizer for `[optimizer]` (`cfg`, a checked dtcollie.config.Optimizer)."""
    return OPTIMIZERS[cfg.name].build(cfg, parts, max_norm, pp_group)

