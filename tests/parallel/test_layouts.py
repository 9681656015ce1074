"""Every parallel layout trains the debug model exactly like one process.

Each layout runs the real entry point under torchrun (gloo, CPU) for 5 fp32 steps from the same
initial weights (a DCP folder, which also exercises resharding on load) and the same data; its
per-step losses must equal the single-process run's to 1e-5 relative. The single-process reference
runs with 1 and with 2 OpenMP threads (the layouts with 1 per rank), and both must match: a bar
that held only for one summation order would fail here rather than on another machine.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from debug_weights import ONE_NOVEL, save_debug_init

from dtcollie.dcp_weights import load_weights_as_stored
from dtcollie.metrics import read_losses, read_records

STEPS = 5
COMMON = ["--training.steps", str(STEPS), "--training.seq_len", "32", "--metrics.log_freq", "1",
          "--training.eval_interval", "0", "--metrics.enable_tensorboard", "false",
          "--training.global_batch_size", "8", "--checkpoint.save_weights", "false", *ONE_NOVEL]
THREADS = (1, 2)  # OpenMP threads of the single-process references


def train(folder: Path, weights: Path, nproc: int, overrides: list[str], threads: int = 1) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command = (launcher if nproc > 1 else [sys.executable]) + ["-m", "dtcollie.train", *COMMON,
                                                              "--checkpoint.initial_load_path", str(weights),
                                                              "--job.dump_folder", str(folder), *overrides]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return save_debug_init(tmp_path_factory.mktemp("weights"), seq_len=32)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, weights) -> dict[int, list[float]]:
    """The single-process losses, by OpenMP thread count."""
    references = {threads: losses_of_run(tmp_path_factory.mktemp(f"one_{threads}_threads"), weights, 1, [], threads)
                  for threads in THREADS}
    for losses in references.values():
        assert len(losses) == STEPS and losses[-1] < losses[0]
    return references


def losses_of_run(folder, weights, nproc, overrides, threads: int = 1) -> list[float]:
    train(folder, weights, nproc, overrides, threads)
    return list(read_losses(folder).values())


def assert_matches(losses: list[float], references: dict[int, list[float]], rel: float) -> None:
    for threads, expected in references.items():
        assert losses == pytest.approx(expected, rel=rel), f"the reference with {threads} OpenMP threads"


LAYOUTS = {
    # name: (processes, overrides)
    "dp_shard2_accumulate": (2, ["--training.micro_batch_size", "2"]),
    "hsdp_2x2_full_ac": (4, ["--parallelism.dp_replicate", "2", "--training.micro_batch_size", "2",
                             "--activation_checkpoint.mode", "full"]),
    "tp2_sp_lp": (2, ["--parallelism.tp", "2"]),
    "tp2_no_sp": (2, ["--parallelism.tp", "2", "--parallelism.sequence_parallel", "false"]),
    "tp2_no_sp_no_lp": (2, ["--parallelism.tp", "2", "--parallelism.sequence_parallel", "false",
                            "--parallelism.loss_parallel", "false"]),
    "dp_shard2_tp2_selective_ac": (4, ["--parallelism.tp", "2", "--training.micro_batch_size", "4",
                                       "--activation_checkpoint.mode", "selective"]),
    "tp2_compile": (2, ["--parallelism.tp", "2", "--compile.enable", "true"]),
    "pp2_gpipe": (2, ["--parallelism.pp", "2", "--parallelism.pp_schedule", "GPipe"]),
    "pp2_1f1b_accumulate": (2, ["--parallelism.pp", "2", "--parallelism.pp_schedule", "1F1B",
                                "--training.micro_batch_size", "4"]),
    "pp2_interleaved_1f1b": (2, ["--parallelism.pp", "2", "--parallelism.pp_schedule", "Interleaved1F1B",
                                 "--parallelism.pp_stages_per_rank", "2", "--parallelism.pp_microbatches", "4"]),
    "pp2_zero_bubble_v": (2, ["--parallelism.pp", "2", "--parallelism.pp_schedule", "ZBVZeroBubble",
                              "--parallelism.pp_stages_per_rank", "2"]),
    "tp2_pp2": (4, ["--parallelism.tp", "2", "--parallelism.pp", "2"]),
    "dp_shard2_pp2": (4, ["--parallelism.pp", "2", "--training.micro_batch_size", "4"]),
    "dp_shard2_tp2_pp2": pytest.param((8, ["--parallelism.tp", "2", "--parallelism.pp", "2",
                                           "--training.micro_batch_size", "4"]), marks=pytest.mark.slow),
}


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_layout_matches_one_process(tmp_path, weights, reference, layout):
    nproc, overrides = layout
    assert_matches(losses_of_run(tmp_path, weights, nproc, overrides), reference, rel=1e-5)


def test_bf16_pipeline_computes_in_bf16(tmp_path, weights, reference):
    """bf16 on a layout without data parallelism still gets FSDP's mixed-precision policy."""
    losses = losses_of_run(tmp_path, weights, 2, ["--parallelism.pp", "2", "--training.mixed_precision", "bf16"])
    assert_matches(losses, reference, rel=5e-3)
    assert max(abs(a - b) / b for a, b in zip(losses, reference[1])) > 1e-6  # not an fp32 run


BF16_WEIGHTS = ["--training.mixed_precision", "bf16_weights", "--optimizer.name", "adalomo", "--optimizer.lr", "1e-2",
                "--checkpoint.save_weights", "true"]


def saved_dtypes(folder: Path) -> set[torch.dtype]:
    return {tensor.dtype for tensor in load_weights_as_stored(folder / "weights").values()}


@pytest.fixture(scope="module")
def bf16_weights_reference(tmp_path_factory, weights) -> dict[int, list[float]]:
    references = {}
    for threads in THREADS:
        folder = tmp_path_factory.mktemp(f"bf16_weights_{threads}_threads")
        references[threads] = losses_of_run(folder, weights, 1, BF16_WEIGHTS, threads)
        assert saved_dtypes(folder) == {torch.bfloat16}
    return references


@pytest.mark.parametrize("layout", [["--training.micro_batch_size", "4"], ["--parallelism.tp", "2"],
                                    ["--parallelism.pp", "2"]], ids=["dp_shard2", "tp2", "pp2"])
def test_bf16_weights_layout_matches_one_process(tmp_path, weights, bf16_weights_reference, layout):
    """bf16 weights (AdaLomo) on 2 processes: the 1-process bf16 losses, to bf16 summation-order noise
    (measured up to 1.1e-4 relative, under pp 2; fp32 weights differ by 1.7e-3)."""
    losses = losses_of_run(tmp_path, weights, 2, BF16_WEIGHTS + layout)
    assert saved_dtypes(tmp_path) == {torch.bfloat16}
    assert_matches(losses, bf16_weights_reference, rel=5e-4)


def test_metrics_written_once_with_layout(tmp_path, weights):
    result = train(tmp_path, weights, 2, ["--parallelism.tp", "2"])
    records = read_records(tmp_path)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # rank 0 only, once per step
    assert all(r["world_size"] == 2 and r["layout"] == "tp 2" for r in records)
    assert (tmp_path / "config.toml").exists()
    assert "world 2 (tp 2)" in result.stdout


def run_ranks_directly(world: int, overrides: list[str], tmp_path) -> list[subprocess.CompletedProcess]:
    """Start `world` ranks by hand (as torchrun would), so each rank's exit code and stderr can be read."""
    processes = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT="29581")
        processes.append(subprocess.Popen([sys.executable, "-m", "dtcollie.train", *COMMON,
                                           "--job.dump_folder", str(tmp_path), *overrides],
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    results = []
    for process in processes:
        out, err = process.communicate(timeout=120)  # a hang fails here instead of blocking the suite
        results.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    return results


@pytest.mark.parametrize("world,overrides,message", [
    (2, ["--parallelism.tp", "4"], "pp 1 x dp_replicate 1 x tp 4 = 4, so dp_shard = -1 cannot fill it"),
    (3, ["--parallelism.tp", "3"], "parallelism.tp = 3 does not divide the model's attention heads (4)"),
    (2, ["--parallelism.dp_shard", "1"], "x tp 1 = 1, but the world size is 2"),
    (2, ["--parallelism.pp", "2", "--parallelism.pp_schedule", "Interleaved1F1B",
         "--parallelism.pp_stages_per_rank", "8"], "16"),
])
def test_bad_layout_is_one_line_exit_2_on_every_rank(tmp_path, world, overrides, message):
    for result in run_ranks_directly(world, overrides, tmp_path):
        assert result.returncode == 2, result.stderr[-2000:]
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
        assert message in result.stderr
