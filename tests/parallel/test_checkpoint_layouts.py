"""Checkpoints under parallel layouts: exact resume, async saves, and resharding to other layouts.

A constant learning rate makes a run of 3 steps followed by a resumed run of 6 the same job as one
run of 6 steps. All runs start from the same saved initial weights.
"""

import shutil
from pathlib import Path

import pytest
from debug_weights import ONE_NOVEL, save_debug_init
from train_jobs import launch_jobs

from dtcollie.metrics import read_losses

COMMON = ["--config", "train_configs/debug.toml", "--training.seq_len", "32", "--training.eval_interval", "0",
          "--metrics.log_freq", "1", "--metrics.enable_tensorboard", "false", "--lr_scheduler.warmup_steps", "0",
          "--lr_scheduler.decay_type", "constant", "--optimizer.lr", "3e-3", "--checkpoint.interval", "3",
          "--checkpoint.save_weights", "false", *ONE_NOVEL]
DP2_TP2 = ["--parallelism.tp", "2", "--training.micro_batch_size", "2"]  # 2 micro-batches per rank


def run(folder: Path, weights: Path, steps: int, overrides: list[str] = ()) -> list[str]:
    return COMMON + ["--checkpoint.initial_load_path", str(weights), "--job.dump_folder", str(folder),
                     "--training.steps", str(steps), *overrides]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """Under dp_shard 2 x tp 2: a whole 6-step run saving step-3 and step-6 in the background
    (async_mode), and 3 steps then a resume to 6 saving synchronously. The async step-3 is what
    the reshard tests continue from, so both save modes are resumed from exactly."""
    folder = tmp_path_factory.mktemp("dp2tp2")
    weights = save_debug_init(folder / "weights", seq_len=32)
    launch_jobs(folder, 4, [run(folder / "whole", weights, 6, DP2_TP2 + ["--checkpoint.async_mode", "async"]),
                            run(folder / "resumed", weights, 3, DP2_TP2), run(folder / "resumed", weights, 6, DP2_TP2)])
    return folder


def test_resume_under_the_same_layout(saved):
    whole, resumed = read_losses(saved / "whole"), read_losses(saved / "resumed")
    assert sorted(whole) == sorted(resumed) == [1, 2, 3, 4, 5, 6]
    assert [resumed[s] for s in (4, 5, 6)] == pytest.approx([whole[s] for s in (4, 5, 6)], rel=1e-6)
    assert sorted(p.name for p in (saved / "whole" / "checkpoints").iterdir()) == ["step-3", "step-6"]
    assert sorted(p.name for p in (saved / "resumed" / "checkpoints").iterdir()) == ["step-3", "step-6"]


@pytest.mark.parametrize("nproc,overrides", [(1, []), (2, ["--parallelism.pp", "2"]),
                                             (2, ["--training.micro_batch_size", "4"])],
                         ids=["one_process", "pp2", "dp_shard2"])
def test_checkpoint_reshards_to_another_layout(saved, tmp_path, nproc, overrides):
    """The async step-3 checkpoint of the dp_shard 2 x tp 2 run continues under another layout."""
    shutil.copytree(saved / "whole" / "checkpoints" / "step-3", tmp_path / "run" / "checkpoints" / "step-3")
    launch_jobs(tmp_path, nproc, [run(tmp_path / "run", saved / "weights", 6, overrides)])
    whole, resharded = read_losses(saved / "whole"), read_losses(tmp_path / "run")
    assert sorted(resharded) == [4, 5, 6]
    assert [resharded[s] for s in (4, 5, 6)] == pytest.approx([whole[s] for s in (4, 5, 6)], rel=1e-5)
