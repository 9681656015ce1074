"""Training checkpoints on one process: exact resume, retention, atomicity, refusal of mismatches."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dtcollie import config
from dtcollie.dcp_weights import load_weights_as_stored
from dtcollie.errors import CheckpointError
from dtcollie.train import Trainer
from dtcollie.metrics import read_losses

FAST = [("training.seq_len", "32"), ("training.eval_interval", "0"), ("metrics.log_freq", "1"),
        ("metrics.enable_tensorboard", "false")]


def job(folder: Path, overrides: list) -> config.JobConfig:
    return config.load("train_configs/debug.toml", FAST + [("job.dump_folder", str(folder))] + overrides)


def interrupted_run(folder: Path, overrides: list, stop_after: int) -> Trainer:
    """Start a run, stop it after `stop_after` steps (as a crash after a checkpoint would), start again."""
    first = Trainer(job(folder, overrides))
    first.cfg.training.steps = stop_after  # the schedule was built for the full run: only the loop ends early
    first.train()
    second = Trainer(job(folder, overrides))
    assert second.step == stop_after
    second.train()
    return second


RESUMED_RUNS = {  # name: overrides
    "adamw": [("optimizer.name", "adamw")],
    "adalomo": [("optimizer.name", "adalomo")],
    "sophiag": [("optimizer.name", "sophiag"), ("optimizer.hessian_interval", "2")],
    "adan": [("optimizer.name", "adan")],
    "lomo_bf16_weights": [("optimizer.name", "lomo"), ("optimizer.lr", "0.5"),
                          ("training.mixed_precision", "bf16_weights")],
}


@pytest.mark.parametrize("run", RESUMED_RUNS.values(), ids=RESUMED_RUNS.keys())
def test_resume_is_bit_identical(tmp_path, run):
    overrides = [("training.steps", "6"), ("checkpoint.interval", "2")] + run
    Trainer(job(tmp_path / "whole", overrides)).train()
    interrupted_run(tmp_path / "resumed", overrides, stop_after=3)
    whole, resumed = read_losses(tmp_path / "whole"), read_losses(tmp_path / "resumed")
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    assert [resumed[s] for s in (4, 5, 6)] == [whole[s] for s in (4, 5, 6)]  # bit-identical
    assert whole[6] != whole[3]


def test_keeps_the_latest_k_and_saves_at_the_end(tmp_path):
    Trainer(job(tmp_path, [("training.steps", "5"), ("checkpoint.interval", "2"),
                           ("checkpoint.keep_latest_k", "2")])).train()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-4", "step-5"]


def test_partial_checkpoint_is_ignored_with_a_warning(tmp_path, caplog):
    overrides = [("training.steps", "2"), ("checkpoint.interval", "1")]
    Trainer(job(tmp_path, overrides)).train()
    partial = tmp_path / "checkpoints" / "step-3.partial"
    shutil.copytree(tmp_path / "checkpoints" / "step-2", partial)
    (partial / ".metadata").unlink()
    trainer = Trainer(job(tmp_path, [("training.steps", "3"), ("checkpoint.interval", "1")]))
    assert trainer.step == 2
    assert "ignoring incomplete checkpoint" in caplog.text and not partial.exists()


def test_the_end_of_a_run_saves_its_weights_alone(tmp_path):
    trainer = Trainer(job(tmp_path, [("training.steps", "3"), ("checkpoint.interval", "2")]))
    trainer.train()
    weights = load_weights_as_stored(tmp_path / "weights")
    assert sorted(weights) == sorted(trainer.model.parts[0].state_dict())
    for name, tensor in trainer.model.parts[0].state_dict().items():
        assert torch.equal(weights[name], tensor), name
    assert json.loads((tmp_path / "weights" / "model_args.json").read_text())["max_seq_len"] == 2048  # the flavor's
    assert (tmp_path / "weights" / "tokenizer.json").read_bytes() == Path(trainer.cfg.data.tokenizer,
                                                                          "tokenizer.json").read_bytes()
    # Not a resumable checkpoint: a longer run continues from the last checkpoint.
    assert Trainer(job(tmp_path, [("training.steps", "4"), ("checkpoint.interval", "2")])).step == 3
    Trainer(job(tmp_path / "no_weights", [("training.steps", "1"), ("checkpoint.save_weights", "false")])).train()
    assert not (tmp_path / "no_weights" / "weights").exists()


def test_checkpoint_of_another_model_is_refused(tmp_path):
    Trainer(job(tmp_path, [("training.steps", "1"), ("checkpoint.interval", "1")])).train()
    args = tmp_path / "args.json"
    args.write_text(json.dumps({"dim": 128, "n_layers": 8, "n_heads": 4, "n_kv_heads": 2, "hidden_dim": 256,
                                "vocab_size": 2048}))
    with pytest.raises(config.ConfigError, match=r"holds a run with model.args_path = '', not '.*args.json'; a "
                                                 r"resumed run must keep it"):
        Trainer(job(tmp_path, [("training.steps", "2"), ("model.args_path", str(args))]))
    shutil.copytree(tmp_path / "checkpoints", tmp_path / "copied" / "checkpoints")  # a run folder without its config
    with pytest.raises(CheckpointError, match=r"does not match the model; .*shape mismatch: model\.layers\.0\."):
        Trainer(job(tmp_path / "copied", [("training.steps", "2"), ("model.args_path", str(args))]))


def test_sigkill_during_a_save_keeps_the_previous_checkpoint(tmp_path):
    """Kill the process while a checkpoint is being written: the next start warns, drops the partial
    folder and resumes from the last complete checkpoint."""
    command = [sys.executable, "-m", "dtcollie.train", "--training.steps", "100000", "--training.seq_len", "32",
               "--training.eval_interval", "0", "--checkpoint.interval", "1", "--checkpoint.keep_latest_k", "2",
               "--job.dump_folder", str(tmp_path)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints, deadline = tmp_path / "checkpoints", time.monotonic() + 180
    try:
        while time.monotonic() < deadline:
            if any(checkpoints.glob("step-*.partial")) and any(checkpoints.glob("step-*[0-9]")):
                # Freeze it, then kill it only if the save is still unfinished (not yet renamed).
                process.send_signal(signal.SIGSTOP)
                if any(checkpoints.glob("step-*.partial")):
                    process.send_signal(signal.SIGKILL)
                    break
                process.send_signal(signal.SIGCONT)
            time.sleep(0.0005)
    finally:
        process.kill()
        process.wait()
    (partial,) = [p for p in checkpoints.glob("step-*.partial")]  # the kill landed during a save
    killed_step = int(partial.name.removeprefix("step-").removesuffix(".partial"))
    trainer = Trainer(job(tmp_path, [("training.steps", "100000"), ("checkpoint.interval", "1")]))
    assert trainer.step == killed_step - 1
    assert not partial.exists()


def test_a_checkpoint_saved_by_an_earlier_version_still_resumes(tmp_path):
    """saved_by_v1/step-2 was written by dtcollie at commit 295b553 (fp64, AdamW, the args in
    model_args.json), before checkpoints were collected from stateful components; losses.json
    holds that run's steps 3 and 4. Resuming it here must continue exactly that run."""
    saved = Path(__file__).parent / "saved_by_v1"
    shutil.copytree(saved / "step-2", tmp_path / "checkpoints" / "step-2")
    trainer = Trainer(job(tmp_path, [("model.args_path", str(saved / "model_args.json")), ("training.steps", "4"),
                                     ("checkpoint.interval", "2"), ("training.mixed_precision", "fp64"),
                                     ("checkpoint.save_weights", "false")]))
    assert trainer.step == 2
    trainer.train()
    expected = {int(step): loss for step, loss in json.loads((saved / "losses.json").read_text()).items()}
    resumed = read_losses(tmp_path)
    assert [resumed[step] for step in (3, 4)] == pytest.approx([expected[3], expected[4]], rel=1e-10)
