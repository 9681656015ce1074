"""Learning-rate schedule: linear warmup, then cosine, linear or no decay down to `min_lr`."""

import math
import warnings

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from dtcollie.config import LRScheduler

# LOMO and AdaLomo update inside backward and never call optimizer.step(), which LambdaLR takes for
# a scheduler stepped before its optimizer.
warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`")


def lr_at(step: int, peak_lr: float, total_steps: int, cfg: LRScheduler) -> float:
    """Learning rate for optimizer step `step` (1-based): warmup reaches the peak at `warmup_steps`,
    and decay reaches `min_lr` exactly at `total_steps`."""
    if step <= cfg.warmup_steps:
        return peak_lr * step / cfg.warmup_steps
    if cfg.decay_type == "constant":
        return peak_lr
    # A run no longer than its warmup has no decay phase: the step after its last is at min_lr.
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    if cfg.decay_type == "linear":
        return peak_lr - (peak_lr - cfg.min_lr) * progress
    return cfg.min_lr + (peak_lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_lr_scheduler(optimizer: Optimizer, peak_lr: float, total_steps: int, cfg: LRScheduler) -> LambdaLR:
    """A LambdaLR (so its state checkpoints like any torch scheduler) stepped once per optimizer step.

    LambdaLR evaluates its factor at 0 for the first step, hence the +1."""
    if peak_lr == 0.0:
        return LambdaLR(optimizer, lambda index: 0.0)
    return LambdaLR(optimizer, lambda index: lr_at(index + 1, peak_lr, total_steps, cfg) / peak_lr)
