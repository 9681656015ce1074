"""One rank's failure under torchrun ends every rank soon, each rank's output one line naming it.

The fault reaches one rank only through a `sitecustomize` module on PYTHONPATH (Python imports it
at start-up): it patches one dtcollie function in the worker whose RANK is the failing one and
notes when the fault fires. torchrun's agent has no RANK and runs unpatched.
"""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from dtcollie import rank_failure
from dtcollie.errors import DataError

REPO = Path(__file__).resolve().parents[1]

HOOK = """\
import os, time
from pathlib import Path
if os.environ.get("RANK") == "{rank}":
    def fired():
        Path(__file__).with_name("fired_at").write_text(repr(time.time()))
{patch}
"""
# Rank 1's copy of the training text is not UTF-8: a DataError while building the data loader, in
# the trainer's setup after the process group is up (no StopFlag yet).
CORRUPT_TEXT = """\
    from dtcollie.data import files
    corrupt = Path(__file__).with_name("corrupt.txt")
    corrupt.write_bytes(b"\\xffnot utf-8")
    read_text = files._read_text
    def _read_text(path):
        fired()
        return read_text(str(corrupt))
    files._read_text = _read_text
"""
# A bug on rank 0 in the training loop (StopFlag active), while rank 1 goes on to the next step.
BUG_IN_LOOP = """\
    from dtcollie import metrics
    def console_line(*args):
        fired()
        return 1 / 0
    metrics.console_line = console_line
"""


def launch(tmp_path, failing_rank: int, patch: str) -> tuple[subprocess.CompletedProcess, dict[int, list[str]], float]:
    """torchrun with 2 ranks, the fault on `failing_rank`; (torchrun's result, each rank's stderr
    lines, seconds from the fault to torchrun's exit)."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK.format(rank=failing_rank, patch=patch))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "--log-dir", str(tmp_path / "logs"), "--redirects", "3",
               "-m", "dtcollie.train", "--config", "train_configs/debug.toml", "--training.steps", "3",
               "--training.micro_batch_size", "4", "--training.seq_len", "32", "--training.eval_interval", "0",
               "--metrics.enable_tensorboard", "false", "--checkpoint.save_weights", "false",
               "--job.dump_folder", str(tmp_path / "out")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    ended = time.time()
    lines = {rank: next((tmp_path / "logs").glob(f"*/attempt_0/{rank}/stderr.log")).read_text().splitlines()
             for rank in (0, 1)}
    return result, lines, ended - float((hook / "fired_at").read_text())


def exit_codes(torchrun_stderr: str) -> list[int]:
    """Both ranks' exit codes, from torchrun's failure summary."""
    return sorted(int(code) for code in re.findall(r"^\s+exitcode\s+: (-?\d+)", torchrun_stderr, re.MULTILINE))


def assert_one_error_line(lines: list[str]) -> str:
    assert not any("Traceback" in line for line in lines), "\n".join(lines)
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], "\n".join(lines)
    return lines[-1]


def test_a_user_error_on_one_rank_ends_both_with_one_line_each(tmp_path):
    result, lines, seconds = launch(tmp_path, 1, CORRUPT_TEXT)
    own = assert_one_error_line(lines[1])
    assert re.fullmatch(r"error: \S+corrupt\.txt is not UTF-8 text \(.*\); convert it to UTF-8", own)
    failed = own.removeprefix("error: ")
    assert assert_one_error_line(lines[0]) == f"error: rank 1 failed: {failed}; this rank (0) stopped"
    assert result.returncode != 0
    assert exit_codes(result.stderr) == [2, 2], result.stderr
    assert seconds < 30


def test_a_bug_on_one_rank_shows_its_traceback_and_ends_the_other_with_one_line(tmp_path):
    result, lines, seconds = launch(tmp_path, 0, BUG_IN_LOOP)
    assert "Traceback" in "\n".join(lines[0]) and lines[0][-1].endswith("ZeroDivisionError: division by zero")
    assert not any(line.startswith("error:") for line in lines[0])
    assert assert_one_error_line(lines[1]) == \
        "error: rank 0 failed: ZeroDivisionError: division by zero; this rank (1) stopped"
    assert exit_codes(result.stderr) == [1, 1], result.stderr
    assert seconds < 30


def test_the_first_recorded_failure_is_the_one_reported():
    store = dist.HashStore()
    assert rank_failure.read_failure(store) is None
    assert rank_failure.describe_stop(None, 3) == ("error: another rank failed; this rank (3) stopped", 1)
    rank_failure.record_failure(store, 1, DataError("train.txt is not UTF-8 text"))
    rank_failure.record_failure(store, 2, ValueError("later\nsecond line"))
    first = rank_failure.read_failure(store)
    assert rank_failure.describe_stop(first, 0) == (
        "error: rank 1 failed: train.txt is not UTF-8 text; this rank (0) stopped", 2)
    bug_store = dist.HashStore()
    rank_failure.record_failure(bug_store, 2, ValueError("later\nsecond line"))
    assert rank_failure.describe_stop(rank_failure.read_failure(bug_store), 0) == (
        "error: rank 2 failed: ValueError: later; this rank (0) stopped", 1)


@pytest.mark.parametrize("err, gone", [
    (RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:7813."), True),
    (dist.DistNetworkError("Failed to recv, got 0 bytes."), True),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
])
def test_a_lost_peer_is_told_from_a_bug(err, gone):
    assert rank_failure.peer_gone(err) == gone
