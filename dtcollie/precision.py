"""The dtypes behind `training.mixed_precision`: what the weights compute in, and what sums and
updates run in."""

import torch

BF16_COMPUTE = ("bf16", "bf16_weights")  # the training.mixed_precision values whose math runs in bf16


def compute_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype the model's math runs in: bf16 for the bf16 modes, else the weights' own dtype."""
    if mixed_precision in BF16_COMPUTE:
        return torch.bfloat16
    return torch.float64 if mixed_precision == "fp64" else torch.float32


def accumulation_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype losses, norms, gradient reductions and optimizer updates run in: float32, or
    float64 when any input is float64 (the fp64 mode must not round through float32 anywhere)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32
