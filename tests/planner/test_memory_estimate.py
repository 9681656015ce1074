"""The planner's per-rank memory estimate against the measured peak of real CPU training steps.

The estimate (`dtcollie.planner.memory.estimate`) never runs the layout: the parameter plan on a
fake process group, activations from one- and two-block probes on fake tensors, composed by
torch's pipeline order. The measurement (`dtcollie.planner.calibrate.measure_rank`) runs the
layout's second training step on gloo ranks and reads torch's CPU allocator. Each rank of a
pipeline stage is compared with that stage's estimate: total peak, and the part a step adds on top
of what it starts with (activations, gradients, gathered units) — both within 10%.

Each two-rank layout runs in its own launch of 2 spawned ranks; the one-process layouts run on rank 0.
"""

import sys
from pathlib import Path

import pytest

from dtcollie import config
from dtcollie.parallel.plan import check_plan, planning_config
from dtcollie.planner.calibrate import measure_rank
from dtcollie.planner.memory import estimate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parallel"))
from spawn import run_ranks  # noqa: E402

TOLERANCE = 0.10
# name: (world size, overrides); the debug model (8 blocks, dim 128, vocab 2048), seq 128, fp32 AdamW.
LAYOUTS = {
    "1 process, full AC": (1, ["--activation_checkpoint.mode", "full"]),
    "1 process, selective AC, accumulation 4": (1, ["--activation_checkpoint.mode", "selective",
                                                    "--training.micro_batch_size", "2"]),
    "tp 2, sequence parallel": (2, ["--parallelism.tp", "2"]),
    "dp_shard 2, full AC": (2, ["--parallelism.dp_shard", "2", "--training.global_batch_size", "16",
                                "--activation_checkpoint.mode", "full"]),
    "pp 2, 1F1B, accumulation 2": (2, ["--parallelism.pp", "2", "--training.micro_batch_size", "4"]),
    "pp 2, GPipe, 4 micro-batches, full AC": (2, ["--parallelism.pp", "2", "--parallelism.pp_schedule", "GPipe",
                                                  "--parallelism.pp_microbatches", "4",
                                                  "--activation_checkpoint.mode", "full"]),
}


def job(overrides: list[str]) -> config.JobConfig:
    return config.load(*config.parse_overrides(["--model.flavor", "debug", "--training.eval_interval", "0",
                                                *overrides]))


def _measure(rank: int, world_size: int, names: list[str]) -> dict:
    return {name: measure_rank(job(LAYOUTS[name][1]), LAYOUTS[name][0]) for name in names
            if rank < LAYOUTS[name][0]}


@pytest.fixture(scope="module")
def measured() -> list[dict]:
    """Each rank's peaks by layout. Each two-rank layout gets a launch of its own: measured after
    others in one process, the last one's peak came out 35% low (unexplained, see docs/planner.md)."""
    ranks = [{}, {}]
    one_process = [name for name, (world, _) in LAYOUTS.items() if world == 1]
    for names in [[name] for name, (world, _) in LAYOUTS.items() if world == 2] + [one_process]:
        for rank, values in enumerate(run_ranks(2, _measure, names, timeout=300)):
            ranks[rank].update(values)
    return ranks


def estimated_rows(name: str) -> tuple[int, list[dict]]:
    world, overrides = LAYOUTS[name]
    spec = check_plan(planning_config(job(overrides)), world)
    return spec.dims.world_size // spec.dims.pp, estimate(spec)


@pytest.mark.parametrize("name", LAYOUTS)
def test_estimate_is_within_ten_percent_of_the_measured_peak(measured, name):
    ranks_per_stage, rows = estimated_rows(name)
    world = LAYOUTS[name][0]
    for row in rows:
        stage_ranks = range(row["pp_rank"] * ranks_per_stage, (row["pp_rank"] + 1) * ranks_per_stage)
        for rank in stage_ranks:
            real = measured[rank][name] if world > 1 else measured[0][name]
            added = row["total_bytes"] - row["param_bytes"] - row["optimizer_bytes"] - row["buffer_bytes"]
            real_added = real["peak_bytes"] - real["start_bytes"]
            assert row["total_bytes"] == pytest.approx(real["peak_bytes"], rel=TOLERANCE), (name, rank)
            assert added == pytest.approx(real_added, rel=TOLERANCE), (name, rank)
