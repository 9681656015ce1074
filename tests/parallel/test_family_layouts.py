"""Every model family trains exactly like one process on every kind of layout.

A small model of each family (Qwen2's q/k/v biases, Qwen3's q/k norms with an explicit head_dim,
Mistral's sliding window shorter than the sequence, Llama 3.2's tied embeddings) starts from one
saved initial checkpoint whose biases and norms are random too, so each family's extra part
matters. All families run in the same launches (one per process count, the jobs one after
another): 5 fp32 steps under dp_shard 2, tp 2, pp 2 and dp_shard 2 x tp 2 x pp 2, each step's
loss within 1e-5 relative of the single-process run's, which runs with 1 and with 2 OpenMP threads.
"""

import shutil
from pathlib import Path

import pytest
import torch
from train_jobs import launch_jobs

from dtcollie.dcp_weights import read_checkpoint_metadata, save_model_weights
from dtcollie.metrics import read_losses
from dtcollie.models.hf import randomize_norms_and_biases, save_model_args
from dtcollie.models.llama import ModelArgs, Transformer

STEPS = 5
SHAPE = dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=2048, hidden_dim=128, max_seq_len=32)
FAMILIES = {
    "qwen2": dict(qkv_bias=True, family="qwen2"),
    "qwen3": dict(qk_norm=True, head_dim=24, family="qwen3"),
    "mistral": dict(sliding_window=12, family="mistral"),
    "llama_tied": dict(tie_embeddings=True),
}
COMMON = ["--config", "train_configs/debug.toml", "--training.steps", str(STEPS), "--training.seq_len", "32",
          "--training.eval_interval", "0", "--metrics.log_freq", "1", "--metrics.enable_tensorboard", "false",
          "--training.global_batch_size", "8", "--lr_scheduler.warmup_steps", "0", "--checkpoint.save_weights", "false"]
LAYOUTS = {  # name: (processes, overrides)
    "dp_shard2": (2, ["--training.micro_batch_size", "4"]),
    "tp2": (2, ["--parallelism.tp", "2"]),
    "pp2": (2, ["--parallelism.pp", "2"]),
    "dp_shard2_tp2_pp2": (8, ["--parallelism.tp", "2", "--parallelism.pp", "2", "--training.micro_batch_size", "4"]),
}
THREADS = (1, 2)


def save_family_init(folder: Path, options: dict) -> Path:
    """Random init (biases and norms random too) as a DCP folder with its model_args.json."""
    args = ModelArgs(**SHAPE, **options)
    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights()
    randomize_norms_and_biases(model)
    save_model_weights(model, folder)
    save_model_args(args, folder / "model_args.json")
    return folder


def jobs(folder: Path, inits: dict[str, Path], overrides: list[str]) -> list[list[str]]:
    return [COMMON + ["--model.args_path", str(init / "model_args.json"), "--checkpoint.initial_load_path", str(init),
                      "--job.dump_folder", str(folder / family)] + overrides for family, init in inits.items()]


@pytest.fixture(scope="module")
def inits(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inits")
    return {family: save_family_init(root / family, options) for family, options in FAMILIES.items()}


@pytest.fixture(scope="module")
def references(tmp_path_factory, inits) -> dict[int, Path]:
    folders = {threads: tmp_path_factory.mktemp(f"one_{threads}_threads") for threads in THREADS}
    for threads, folder in folders.items():
        launch_jobs(folder, 1, jobs(folder, inits, []), threads)
    for family in FAMILIES:
        losses = list(read_losses(folders[1] / family).values())
        assert len(losses) == STEPS and losses[-1] < losses[0], family
    return folders


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_every_family_matches_one_process(tmp_path, inits, references, layout):
    nproc, overrides = layout
    launch_jobs(tmp_path, nproc, jobs(tmp_path, inits, overrides))
    for family in FAMILIES:
        for threads, reference in references.items():
            assert read_losses(tmp_path / family) == pytest.approx(read_losses(reference / family), rel=1e-5), \
                f"{family}, the reference with {threads} OpenMP threads"


def test_tied_pipeline_checkpoint_is_one_weight_and_resumes_on_one_process(tmp_path, inits, references):
    """A tied model trained under pp 2 saves the embedding once (no output.weight, optimizer state
    included), and its step-3 checkpoint resumes on one process into the reference's steps 4 and 5."""
    tied = {"llama_tied": inits["llama_tied"]}
    launch_jobs(tmp_path, 2, jobs(tmp_path / "pp2", tied, ["--parallelism.pp", "2", "--checkpoint.interval", "3"]))
    checkpoint = tmp_path / "pp2" / "llama_tied" / "checkpoints" / "step-3"
    keys = set(read_checkpoint_metadata(checkpoint).state_dict_metadata)
    assert "model.tok_embeddings.weight" in keys and "optimizer.tok_embeddings.weight.exp_avg" in keys
    assert not any("output.weight" in key for key in keys)
    resumed = tmp_path / "one" / "llama_tied"
    shutil.copytree(checkpoint, resumed / "checkpoints" / "step-3")
    launch_jobs(tmp_path / "one", 1, jobs(tmp_path / "one", tied, ["--checkpoint.interval", "3"]))
    expected = read_losses(references[1] / "llama_tied")
    assert read_losses(resumed) == pytest.approx({step: expected[step] for step in (4, 5)}, rel=1e-5)
