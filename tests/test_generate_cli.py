"""`python -m dtcollie.generate` as a user runs it: a trained checkpoint, one process and tp 2, and
bad input as one line with exit code 2."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dtcollie import config
from dtcollie.train import Trainer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A short debug run's final training checkpoint (its run config names the tokenizer)."""
    folder = tmp_path_factory.mktemp("run")
    cfg = config.load("train_configs/debug.toml", [("training.steps", "5"), ("training.eval_interval", "0"),
                                                   ("checkpoint.interval", "5"), ("job.dump_folder", str(folder)),
                                                   ("metrics.enable_tensorboard", "false")])
    Trainer(cfg).train()
    return folder / "checkpoints" / "step-5"


def run(*args, nproc: int = 1) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    return subprocess.run([*launcher, "-m", "dtcollie.generate", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_one_process_and_tp2_print_the_same_greedy_text(trained, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("It is a truth universally\n\nThe family of Dashwood had long been settled in Sussex.\nEmma\n")
    one = run("--checkpoint", trained, "--prompts", prompts, "--max-new-tokens", "24")
    assert one.returncode == 0, one.stderr
    completions = one.stdout.split("--- ")[1:]
    assert len(completions) == 3 and completions[0].startswith("It is a truth universally\n")
    assert all(len(c.split("\n", 1)[1].strip()) > 0 for c in completions)
    tp = run("--checkpoint", trained, "--prompts", prompts, "--max-new-tokens", "24", nproc=2)
    assert tp.returncode == 0, tp.stderr
    assert tp.stdout == one.stdout
    single = run("--checkpoint", trained, "--prompt", "It is a truth universally", "--max-new-tokens", "24")
    assert single.returncode == 0 and single.stdout.strip() == completions[0].split("\n", 1)[1].strip()


@pytest.mark.parametrize("arguments, message", [
    (["--checkpoint", "nowhere", "--prompt", "x"], "checkpoint nowhere is not a folder"),
    (["--prompt", "word " * 3000, "--max-new-tokens", "8"], r"exceeds the model's max_seq_len \(2048\)"),
    (["--chat", "--prompt", "hi"], "has no chat template"),
    (["--prompt", "x", "--top-p", "0"], "0 < top_p <= 1"),
], ids=["missing_checkpoint", "prompt_too_long", "chat_without_template", "bad_top_p"])
def test_bad_input_is_one_line_and_exit_2(trained, arguments, message):
    if "--checkpoint" not in arguments:
        arguments = ["--checkpoint", str(trained), *arguments]
    done = run(*arguments)
    assert done.returncode == 2 and done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    assert re.search(message, done.stderr), done.stderr


def test_interactive_chat_answers_each_turn_until_end_of_input(tmp_path):
    folder = tmp_path / "chat_run"
    cfg = config.load("train_configs/debug_chat.toml", [("training.steps", "3"), ("training.eval_interval", "0"),
                                                        ("checkpoint.interval", "3"), ("job.dump_folder", str(folder)),
                                                        ("metrics.enable_tensorboard", "false")])
    Trainer(cfg).train()
    command = [sys.executable, "-m", "dtcollie.generate", "--checkpoint", str(folder / "checkpoints/step-3"), "--chat",
               "--max-new-tokens", "6"]
    done = subprocess.run(command, input="What is 3 plus 14?\nAnd 4 plus 4?\n", capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr
    turns = done.stdout.split("you> ")
    assert len(turns) == 4 and turns[-1] == ""  # two answered turns, then the prompt that met end of input
    assert all(turn.strip() for turn in turns[1:3])
