import math

import pytest
import torch

from dtcollie.config import LRScheduler
from dtcollie.lr import build_lr_scheduler


def lrs(steps: int, peak: float, cfg: LRScheduler) -> list[float]:
    """Learning rate actually used by each optimizer step."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    scheduler = build_lr_scheduler(optimizer, peak, steps, cfg)
    used = []
    for _ in range(steps):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return used


def test_warmup_then_cosine_to_min():
    used = lrs(10, 1.0, LRScheduler(warmup_steps=4, decay_type="cosine", min_lr=0.1))
    assert used[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    # Halfway through the 6 decay steps the cosine is at the midpoint between peak and floor.
    assert used[6] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 3 / 6)))
    assert used[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(used[3:], used[4:]))


def test_linear_and_constant():
    assert lrs(5, 2.0, LRScheduler(warmup_steps=0, decay_type="linear", min_lr=0.0)) == pytest.approx(
        [2.0 - 2.0 * k / 5 for k in range(1, 6)])
    assert lrs(4, 2.0, LRScheduler(warmup_steps=2, decay_type="constant", min_lr=0.0)) == pytest.approx(
        [1.0, 2.0, 2.0, 2.0])


@pytest.mark.parametrize("decay_type", ["cosine", "linear"])
def test_a_run_as_long_as_its_warmup_ends_at_the_peak(decay_type):
    # The scheduler steps once more after the last step, past the warmup with no decay phase.
    assert lrs(4, 1.0, LRScheduler(warmup_steps=4, decay_type=decay_type, min_lr=0.1)) == pytest.approx(
        [0.25, 0.5, 0.75, 1.0])


def test_scheduler_state_resumes():
    cfg = LRScheduler(warmup_steps=3, decay_type="cosine", min_lr=0.01)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    scheduler = build_lr_scheduler(optimizer, 0.5, 12, cfg)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    resumed_optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    resumed = build_lr_scheduler(resumed_optimizer, 0.5, 12, cfg)
    resumed.load_state_dict(scheduler.state_dict())
    resumed.step()
    # The resumed schedule continues where the first left off: step 7 uses the 7th rate.
    assert resumed_optimizer.param_groups[0]["lr"] == pytest.approx(lrs(12, 0.5, cfg)[6])
