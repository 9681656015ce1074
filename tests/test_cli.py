"""Entry points as a shell runs them: output piped into a reader that stops early ends quietly."""

import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize("command, buffered", [
    (["-m", "dtcollie.train", "--help"], False),  # unbuffered: print itself raises BrokenPipeError
    (["-m", "dtcollie.generate", "--help"], True),  # argparse's help, SystemExit, then run_main's flush raises
], ids=["train_unbuffered", "generate_buffered"])
def test_help_into_a_closed_pipe_has_no_traceback(command, buffered):
    env = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    process = subprocess.Popen([sys.executable, *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env)
    process.stdout.close()  # the reader is gone before the first write, as `| head` after its lines
    stderr = process.stderr.read()
    assert process.wait(timeout=60) == 1
    assert stderr == ""
