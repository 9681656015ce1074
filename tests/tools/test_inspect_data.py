"""tools/inspect_data.py run as a user would: the marked rows and the counts of a chat config and of
a token corpus."""

import json
import re
import subprocess
import sys
from pathlib import Path

from dtcollie import config
from dtcollie.data import build_dataset, load_tokenizer
from dtcollie.loss import IGNORE_INDEX
from dtcollie.data.tokenize_corpus import tokenize_corpus

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
    trained = int((dataset.labels != IGNORE_INDEX).sum())
    assert f"{len(dataset):,} rows of 128 tokens" in done.stdout and f"trained {trained:,} (" in done.stdout
    # ¦ opens each conversation after the first; the padding tail is not shown.
    starts = (dataset.positions[0] == 0) & (dataset.input_ids[0] != tokenizer.pad_id)
    assert row.count("¦") == int(starts.sum()) - 1 >= 1
    assert all(part.startswith("<|im_start|>") for part in row.split("¦"))


def test_bad_config_is_one_line():
    done = run_tool("--config", "train_configs/debug_chat.toml", "--data.kind", "chatt")
    assert done.returncode == 2 and done.stderr.startswith("error: ") and done.stderr.count("\n") == 1


def test_token_corpus_rows_show_document_starts_and_the_corpus_counts(tmp_path):
    corpus = tmp_path / "answers"
    tokenize_corpus([str(REPO / "dtcollie/assets/sft/train.jsonl")], str(corpus),
                    str(REPO / "dtcollie/assets/tokenizer"), text_field="output", progress=False)
    done = run_tool("--config", "train_configs/debug.toml", "--data.kind", "tokens", "--data.sources", str(corpus),
                    "--data.document_mask", "true", "--n", "2")
    assert done.returncode == 0, done.stderr
    row = done.stdout.split("--- row 0 ---\n")[1].split("\n--- row 1 ---")[0]
    # The answers are a few tokens each: every one after the first starts after ¦, and its first
    # token is not trained (nothing before it in its document predicts it).
    assert row.count("¦") >= 10 and all(not part.startswith("«") for part in row.split("¦")[1:])
    manifest = json.loads((corpus / "corpus.json").read_text())
    assert (f"{corpus} (weight 1): {manifest['tokens']:,} tokens, {manifest['documents']:,} documents in 1 shards"
            in done.stdout)
