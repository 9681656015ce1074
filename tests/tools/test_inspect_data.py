"""tools/inspect_data.py run as a user would: the marked rows and the counts of a chat config."""

import re
import subprocess
import sys
from pathlib import Path

from dtcollie import config
from dtcollie.data import build_dataset, load_tokenizer
from dtcollie.data.sft import IGNORE

REPO = Path(__file__).resolve().parents[2]


def run_tool(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "inspect_data.py"), *args], capture_output=True,
                          text=True, timeout=300, cwd=REPO)


def test_chat_rows_mark_exactly_the_assistant_replies():
    done = run_tool("--config", "train_configs/debug_chat.toml", "--n", "1")
    assert done.returncode == 0, done.stderr
    row = done.stdout.split("--- row 0 ---\n")[1].rsplit("\n", 1)[0]
    # The first shipped conversation: a system message, then "What is 3 plus 14?" / "17." and
    # "What is 28 plus 6?" / "34."; the packed row continues with the next conversations.
    assert row.startswith("<|im_start|>system\nYou answer in one short sentence.<|im_end|>\n<|im_start|>user\n"
                          "What is 3 plus 14?<|im_end|>\n<|im_start|>assistant\n«17.<|im_end|>»\n")
    marked = re.findall("«(.*?)»", row, flags=re.DOTALL)
    assert marked[:2] == ["17.<|im_end|>", "34.<|im_end|>"]
    assert all(text.endswith("<|im_end|>") and "<|im_start|>" not in text for text in marked)
    cfg = config.load("train_configs/debug_chat.toml")
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    dataset = build_dataset(cfg.data, tokenizer, cfg.training.seq_len, "train")
    trained = int((dataset.labels != IGNORE).sum())
    assert f"{len(dataset):,} rows of 128 tokens" in done.stdout and f"trained {trained:,} (" in done.stdout
    # ¦ opens each conversation after the first; the padding tail is not shown.
    starts = (dataset.positions[0] == 0) & (dataset.input_ids[0] != tokenizer.pad_id)
    assert row.count("¦") == int(starts.sum()) - 1 >= 1
    assert all(part.startswith("<|im_start|>") for part in row.split("¦"))


def test_bad_config_is_one_line():
    done = run_tool("--config", "train_configs/debug_chat.toml", "--data.kind", "chatt")
    assert done.returncode == 2 and done.stderr.startswith("error: ") and done.stderr.count("\n") == 1
