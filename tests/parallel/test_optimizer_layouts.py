"""Every optimizer, and LoRA, gives the same parameters on every layout as on one process.

For each layout one launch (tests/parallel/train_jobs.py) trains the debug model for 5 steps with
each optimizer from the same initial weights in the fp64 mode (`training.mixed_precision =
"fp64"`: weights, compute, reductions and updates in float64), and with AdamW, LOMO and AdaLomo
in fp32 too (under dp_shard 2 and pp 2; tp 2 and dp_shard 2 x tp 2 run fp64 only, to keep the
suite in its time budget: fp32 under tp is covered by tests/parallel/test_layouts.py). The 4-rank
dp_shard 2 x tp 2 launch leaves out Lion and SophiaG, whose updates are element-wise DTensor code
that tp 2 and dp_shard 2 already run; it keeps AdamW, Adan (a global norm over both dims), LOMO and
AdaLomo (local shards, explicit reductions) and LoRA. LOMO
and AdaLomo update inside backward (under pp in each stage's FSDP post-backward); Sophia refreshes
its Hessian at steps 1, 3 and 5 from labels sampled the same way on every layout. The
single-process reference runs twice, with 1 and with 2 OpenMP threads (the layouts run 1 per
rank), so each comparison also crosses a change of summation order on the same machine.

Which bar where, and why:

- fp64, every optimizer and LoRA: every step's loss within 1e-12 relative, and the trained
  parameters (each run's model-only end checkpoint; LoRA's adapters) within 1e-10 relative
  Frobenius error ||found - expected|| / ||expected||, tensor by tensor. Summation order moves an
  fp64 result by about 1e-16; a wrong reduction, a missed shard or a skipped update moves it by
  far more than 1e-10.
- fp32, AdamW, LOMO and AdaLomo: every step's loss within 1e-5 relative, as the 3D layout tests
  require (the other optimizers' fp32 path is the same code in another dtype; fp64 tests them).
- fp32 parameters, LOMO and AdaLomo only: tensor by tensor within 1e-5. Their update is
  proportional to the gradient, so fp32 summation noise stays noise (measured below 1e-7).
  AdamW, Adan and SophiaG divide each element by a running magnitude and Lion takes its sign: the
  fp32 noise of the rare gradient elements near zero (about 3e-8 absolute) decides their update,
  so which elements differ, and by how much, depends on the CPU's kernels and thread count
  (Lion: a few of 2.1M elements take the other sign, 2 lr each; a 1e-5 whole-model bar held on one
  CPU and failed on another). For them fp32 parameters are not compared; fp64 is their test.
- LoRA's frozen base must be bit-identical in both precisions.
"""

from pathlib import Path

import pytest
import torch
from debug_weights import ONE_NOVEL, save_debug_init
from train_jobs import launch_jobs

from dtcollie.dcp_weights import load_weights_as_stored
from dtcollie.metrics import read_losses

STEPS = 5
COMMON = ["--config", "train_configs/debug.toml", "--training.steps", str(STEPS), "--training.seq_len", "32",
          "--training.eval_interval", "0", "--metrics.log_freq", "1", "--metrics.enable_tensorboard", "false",
          "--training.global_batch_size", "8", "--lr_scheduler.warmup_steps", "0", *ONE_NOVEL]
RUNS = {  # name: overrides
    "adamw": ["--optimizer.name", "adamw"],
    "lion": ["--optimizer.name", "lion", "--optimizer.lr", "1e-4"],
    "adan": ["--optimizer.name", "adan"],
    "sophiag": ["--optimizer.name", "sophiag", "--optimizer.hessian_interval", "2"],
    "lomo": ["--optimizer.name", "lomo", "--optimizer.lr", "0.5"],
    "adalomo": ["--optimizer.name", "adalomo"],
    "lora": ["--peft.method", "lora", "--peft.target_modules", '["wq", "wv", "w2", "output"]',
             "--optimizer.lr", "1e-2"],
}
PRECISIONS = {"fp64": tuple(RUNS), "fp32": ("adamw", "lomo", "adalomo")}  # precision: the runs in it
LOSS_TOLERANCE = {"fp32": 1e-5, "fp64": 1e-12}
PARAMETER_TOLERANCE = {"fp32": 1e-5, "fp64": 1e-10}
FP32_PARAMETERS_COMPARED = ("lomo", "adalomo")  # updates proportional to the gradient; see above
THREADS = (1, 2)  # OpenMP threads of the single-process references
FP64_ONLY = {"fp64": PRECISIONS["fp64"]}
LAYOUTS = {  # name: (processes, overrides, the runs of each precision)
    "dp_shard2": (2, ["--training.micro_batch_size", "4"], PRECISIONS),
    "tp2": (2, ["--parallelism.tp", "2"], FP64_ONLY),
    "dp_shard2_tp2": (4, ["--parallelism.tp", "2", "--training.micro_batch_size", "4"],
                      {"fp64": ("adamw", "adan", "lomo", "adalomo", "lora")}),
    "pp2": (2, ["--parallelism.pp", "2"], PRECISIONS),
}


def final_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_weights_as_stored(folder / "weights")


def train_all(folder: Path, weights: Path, nproc: int, overrides: list[str], threads: int = 1,
              runs: dict = PRECISIONS) -> None:
    jobs = [COMMON + ["--checkpoint.initial_load_path", str(weights), "--training.mixed_precision", precision,
                      "--job.dump_folder", str(folder / precision / name)] + RUNS[name] + overrides
            for precision, names in runs.items() for name in names]
    launch_jobs(folder, nproc, jobs, threads)


def relative_error(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    """||found - expected|| / ||expected|| over all the tensors of `expected` together."""
    difference = sum(float((found[key] - tensor).double().pow(2).sum()) for key, tensor in expected.items())
    return (difference / sum(float(tensor.double().pow(2).sum()) for tensor in expected.values())) ** 0.5


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return save_debug_init(tmp_path_factory.mktemp("weights"), seq_len=32)


@pytest.fixture(scope="module")
def references(tmp_path_factory, weights) -> dict[int, Path]:
    """The single-process runs, by OpenMP thread count."""
    folders = {threads: tmp_path_factory.mktemp(f"one_{threads}_threads") for threads in THREADS}
    for threads, folder in folders.items():
        train_all(folder, weights, 1, [], threads)
    initial = load_weights_as_stored(weights)
    for precision, names in PRECISIONS.items():
        for name in names:  # every run moved its trained weights far beyond the tolerance
            final = final_weights(folders[1] / precision / name)
            assert {t.dtype for t in final.values()} == {torch.float64 if precision == "fp64" else torch.float32}
            moved = {key: float((final[key] - t).abs().max() / t.abs().max()) for key, t in initial.items()}
            if name == "lora":  # the base stays frozen; the adapters' B matrices leave zero
                assert max(moved.values()) == 0.0
                assert min(float(t.abs().max()) for key, t in final.items() if key.endswith("lora_b")) > 1e-3
            else:
                assert max(moved.values()) > 1e-3, name
    for name in PRECISIONS["fp32"]:  # fp64 is the same training, only rounded less
        fp32, fp64 = read_losses(folders[1] / "fp32" / name), read_losses(folders[1] / "fp64" / name)
        assert fp64 == pytest.approx(fp32, rel=1e-4) and fp64 != fp32, name
    return folders


def compare(found_folder: Path, expected_folder: Path, precision: str, name: str) -> None:
    expected, found = final_weights(expected_folder), final_weights(found_folder)
    assert found.keys() == expected.keys(), name
    assert read_losses(found_folder) == pytest.approx(read_losses(expected_folder), rel=LOSS_TOLERANCE[precision])
    trained = {key: tensor for key, tensor in expected.items() if name != "lora" or "lora_" in key}
    for key in expected.keys() - trained.keys():  # LoRA's frozen base
        assert torch.equal(found[key], expected[key]), f"frozen {key} changed"
    if precision == "fp32" and name not in FP32_PARAMETERS_COMPARED:
        return
    for key, tensor in trained.items():
        error = relative_error({key: found[key]}, {key: tensor})
        assert error <= PARAMETER_TOLERANCE[precision], f"{key} has relative error {error:.2e}"


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_every_optimizer_gives_the_one_process_parameters(tmp_path, weights, references, layout):
    nproc, overrides, runs = layout
    train_all(tmp_path, weights, nproc, overrides, runs=runs)
    for threads, reference in references.items():
        for precision, names in runs.items():
            for name in names:
                try:
                    compare(tmp_path / precision / name, reference / precision / name, precision, name)
                except AssertionError as error:
                    raise AssertionError(f"{name}, {precision}, reference with {threads} threads: {error}") from None
