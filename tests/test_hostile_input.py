"""Values and environments that used to end in a traceback or a run that should have stopped."""

import errno
import os
import subprocess

import pytest

from dtcollie import config
from dtcollie.errors import DataError, UserError, environment_errors_as_user_errors
from dtcollie.cli import run_main
from dtcollie.train import Trainer, main

FAST = [("training.seq_len", "32"), ("training.eval_interval", "0"), ("metrics.enable_tensorboard", "false"),
        ("checkpoint.save_weights", "false")]


def trainer(tmp_path, *overrides) -> Trainer:
    return Trainer(config.load("train_configs/debug.toml", FAST + [("job.dump_folder", str(tmp_path / "out")),
                                                                   *overrides]))


def test_a_diverging_run_stops_instead_of_exiting_0(tmp_path):
    """A learning rate of 1e30 is finite, so the config takes it; before, the run trained to NaN and
    exited 0 (with a NaN checkpoint over the last good one)."""
    run = trainer(tmp_path, ("training.steps", "5"), ("optimizer.lr", "1e30"), ("lr_scheduler.min_lr", "0"),
                  ("lr_scheduler.warmup_steps", "0"), ("checkpoint.interval", "1"))
    with pytest.raises(UserError, match=r"the training loss is nan at step [2-5] \(learning rate [\d.]+e\+\d\d\): "
                                        r"training diverged, so the run stops \(the last checkpoint is step-[1-4]\)"):
        run.train()
    assert run.step < 5


def test_a_sequence_too_long_is_named_before_allocating(tmp_path):
    """seq_len 2**40 used to fail allocating the RoPE tables; now the config refuses it. Below the
    limit, the data is read before the model is built, so a corpus too small for 2**23 tokens is
    named without first allocating 2 GB of tables."""
    with pytest.raises(config.ConfigError, match=r"training.seq_len = 1099511627776 is too large; it must be < "
                                                 r"16777216"):
        trainer(tmp_path, ("training.seq_len", str(2**40)))
    with pytest.raises(DataError, match=r"train data has 619433 tokens \(167 documents incl. EOS\), but one sequence "
                                        r"needs seq_len \+ 1 = 8388609"):
        trainer(tmp_path, ("training.seq_len", str(2**23)))


@pytest.mark.parametrize("fault,message", [
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/run/metrics.jsonl"),
     "/data/run/metrics.jsonl: No space left on device; free disk space there or choose another folder"),
    (PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/data/run"),
     "/data/run: Permission denied; make it writable or choose another folder"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried to "
                  "allocate 140737488355328 bytes"),
     "out of memory ([enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory"),
])
def test_environment_faults_become_one_line(fault, message):
    with pytest.raises(UserError) as err, environment_errors_as_user_errors():
        raise fault
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_a_read_only_dump_folder_is_one_line_and_exit_2(tmp_path, capsys):
    """A real read-only filesystem (root ignores permission bits, so chmod would not do): before,
    the first write of the run folder ended in a PermissionError/OSError traceback."""
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(read_only)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a read-only tmpfs needs root; test_environment_faults_become_one_line covers the "
                    "message of a simulated EROFS/EACCES")
    try:
        with pytest.raises(SystemExit) as exit_code:
            run_main(main, ["--config", "train_configs/debug.toml", "--training.steps", "1",
                            "--job.dump_folder", str(read_only / "out")])
    finally:
        subprocess.run(["umount", "--lazy", str(read_only)], check=True)
    assert exit_code.value.code == 2
    assert capsys.readouterr().err == (f"error: {read_only / 'out'}: Read-only file system; the filesystem is "
                                       f"read-only; choose another folder\n")


def test_other_runtime_errors_stay_bugs():
    with pytest.raises(RuntimeError, match="a bug"), environment_errors_as_user_errors():
        raise RuntimeError("a bug")
