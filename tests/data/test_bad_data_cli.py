"""Bad data through the trainer's command line: one line naming the file and record, exit code 2."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dtcollie.data.tokenize_corpus import tokenize_corpus

REPO = Path(__file__).resolve().parents[2]
GOOD_CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}


def train(tmp_path, *overrides) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "dtcollie.train", "--config", "train_configs/debug.toml", "--training.steps", "1",
               "--job.dump_folder", str(tmp_path / "out"), "--metrics.enable_tensorboard", "false",
               "--training.eval_interval", "0", *overrides]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)


def truncated_corpus(tmp_path):
    tokenize_corpus([str(REPO / "dtcollie/assets/sft/train.jsonl")], str(tmp_path / "corpus"),
                    str(REPO / "dtcollie/assets/tokenizer"), text_field="output", progress=False)
    shard = next((tmp_path / "corpus").glob("*.bin"))
    shard.write_bytes(shard.read_bytes()[:-3])  # a write cut short
    message = rf"{shard.name} has [\d,]+ bytes, but corpus.json says .*: truncated"
    return ["--data.kind", "tokens", "--data.sources", str(tmp_path / "corpus")], message


def chat_records(tmp_path, bad: dict) -> list[str]:
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(GOOD_CHAT) + "\n" + json.dumps(bad) + "\n")
    return ["--data.kind", "chat", "--data.tokenizer", "dtcollie/assets/chat_tokenizer", "--data.train_files",
            str(path), "--data.val_fraction", "0"]


def no_assistant(tmp_path):
    bad = {"messages": [{"role": "user", "content": "Hi"}]}
    return chat_records(tmp_path, bad), r"chat.jsonl line 2: has no assistant turn"


def failing_template(tmp_path):
    (tmp_path / "bad.jinja").write_text("{{ raise_exception('this template renders nothing') }}")
    overrides = chat_records(tmp_path, GOOD_CHAT) + ["--data.chat_template", str(tmp_path / "bad.jinja")]
    return overrides, r"chat.jsonl line 1: the chat template failed to render it .*this template renders nothing"


# A chat record without an assistant turn or with an unknown role fails where any bad record does
# (records.py; each message is tested in test_chat_data): no_assistant runs that path here.
@pytest.mark.parametrize("case", [truncated_corpus, no_assistant, failing_template],
                         ids=lambda case: case.__name__)
def test_bad_data_is_one_line_and_exit_2(tmp_path, case):
    overrides, message = case(tmp_path)
    result = train(tmp_path, *overrides)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr[-2000:]
    assert re.search(message, result.stderr), result.stderr
