"""Training on token-shard corpora (data.kind = "tokens"): a weighted mixture of two corpora made by
tokenize_corpus, with document masks, resumes mid-epoch exactly under the same layout and continues
the same global data order under another data-parallel size.

A constant learning rate makes 3 steps followed by a resume to 6 the same job as one run of 6;
all runs start from one saved initial checkpoint.
"""

import shutil
from pathlib import Path

import pytest
from debug_weights import save_debug_init
from train_jobs import launch_jobs

from dtcollie.data.tokenize_corpus import tokenize_corpus
from dtcollie.metrics import read_losses

TOKENIZER = "dtcollie/assets/tokenizer"


def run(folder: Path, weights: Path, corpora: Path, steps: int, overrides: list[str] = ()) -> list[str]:
    return ["--config", "train_configs/debug.toml", "--training.seq_len", "32", "--training.eval_interval", "0",
            "--metrics.log_freq", "1", "--metrics.enable_tensorboard", "false", "--lr_scheduler.warmup_steps", "0",
            "--lr_scheduler.decay_type", "constant", "--optimizer.lr", "3e-3", "--checkpoint.interval", "3",
            "--checkpoint.save_weights", "false", "--data.kind", "tokens", "--data.sources", f"{corpora / 'books'}:3,{corpora / 'answers'}:1",
            "--data.document_mask", "true", "--checkpoint.initial_load_path", str(weights),
            "--job.dump_folder", str(folder), "--training.steps", str(steps), *overrides]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tokens")
    corpora = folder / "corpora"
    # Small shards, so blocks come from several shards of each corpus.
    tokenize_corpus(["dtcollie/assets/text/*.txt"], str(corpora / "books"), TOKENIZER, tokens_per_shard=40_000,
                    progress=False)
    tokenize_corpus(["dtcollie/assets/sft/train.jsonl"], str(corpora / "answers"), TOKENIZER, text_field="output",
                    progress=False)
    weights = save_debug_init(folder / "weights", seq_len=32)
    launch_jobs(folder, 1, [run(folder / "whole", weights, corpora, 6), run(folder / "first", weights, corpora, 3)])
    for name in ("same_layout", "dp_shard2"):
        shutil.copytree(folder / "first", folder / name)
    launch_jobs(folder, 1, [run(folder / "same_layout", weights, corpora, 6)])
    launch_jobs(folder, 2, [run(folder / "dp_shard2", weights, corpora, 6, ["--training.micro_batch_size", "4"])])
    return folder


def test_resume_continues_the_exact_token_stream(runs):
    whole, resumed = read_losses(runs / "whole"), read_losses(runs / "same_layout")
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    assert [resumed[s] for s in (4, 5, 6)] == [whole[s] for s in (4, 5, 6)]  # bit-identical
    assert len({whole[s] for s in range(1, 7)}) == 6


def test_resume_under_another_dp_size_continues_the_global_order(runs):
    whole, resumed = read_losses(runs / "whole"), read_losses(runs / "dp_shard2")
    assert [resumed[s] for s in (4, 5, 6)] == pytest.approx([whole[s] for s in (4, 5, 6)], rel=1e-5)
