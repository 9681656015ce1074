"""The closed-form communication model equals what a real training step issues, exactly.

One spawned group of 4 gloo ranks builds a `Trainer` per layout and counts the collectives of its
second `train_step` (`CollectiveCounter`); every rank's count, per (mesh dim, kind), must equal
`step_collectives` for its pipeline rank in number and in bytes. The second step, because the first
does one-off work a steady step does not: a pipeline stage infers its shapes with an extra forward
and backward and exchanges their metadata, and FSDP initialises lazily.

Two model shapes: a plain one, and one that ties the embeddings (a pipeline exchanges their
gradients) and has q/k/v biases and q/k norms (replicated tp weights with partial gradients), so
that more of the formulas can fail.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

from dtcollie import config
from dtcollie.data import load_tokenizer
from dtcollie.parallel.mesh import MESH_DIMS
from dtcollie.planner.collectives import Collective, totals
from dtcollie.planner.comm_model import step_collectives
from dtcollie.run_spec import resolve

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parallel"))
from spawn import run_ranks  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
WORLD = 4
# Model shapes (model.args_path files, written per run), smaller than the debug flavor to save time.
# An FFN width of 382 makes FSDP pad dim 0 (382 / 4 and 191 / 2 shards).
PLAIN = dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=0, hidden_dim=382, max_seq_len=2048)
SHAPES = {"plain": PLAIN, "tied": {**PLAIN, "n_layers": 4, "tie_embeddings": True, "qkv_bias": True, "qk_norm": True}}
CASES = {  # name: the model shape and overrides
    "fsdp4_accumulate": {"model": "plain", "training.micro_batch_size": "1",
                         "training.global_batch_size": "8"},  # 2 micro-batches: FSDP reduces each
    "hsdp2x2_bf16_no_reshard": {"model": "plain", "parallelism.dp_replicate": "2", "training.mixed_precision": "bf16",
                                "parallelism.fsdp_reshard_after_forward": "false",
                                "training.micro_batch_size": "1", "training.global_batch_size": "4"},
    "dp2_tp2_sp_selective_ac": {"model": "tied", "parallelism.tp": "2",
                                "activation_checkpoint.mode": "selective", "training.micro_batch_size": "1",
                                "training.global_batch_size": "2"},
    "dp2_tp2_no_sp_no_lp_full_ac": {"model": "tied", "parallelism.tp": "2",
                                    "parallelism.sequence_parallel": "false", "parallelism.loss_parallel": "false",
                                    "activation_checkpoint.mode": "full", "training.micro_batch_size": "2",
                                    "training.global_batch_size": "4"},
    "dp2_pp2_1f1b_accumulate": {"model": "tied", "parallelism.pp": "2", "parallelism.pp_schedule": "1F1B",
                                "training.micro_batch_size": "2", "training.global_batch_size": "8"},
    "tp2_pp2_interleaved_bf16": {"model": "tied", "parallelism.pp": "2", "parallelism.tp": "2",
                                 "parallelism.pp_schedule": "Interleaved1F1B", "parallelism.pp_stages_per_rank": "2",
                                 "parallelism.pp_microbatches": "2",
                                 "training.mixed_precision": "bf16", "training.micro_batch_size": "2",
                                 "training.global_batch_size": "2"},
}


def job_config(name: str, folder: Path) -> config.JobConfig:
    overrides = {"training.seq_len": "16", "training.eval_interval": "0", "metrics.enable_tensorboard": "false",
                 "checkpoint.save_weights": "false", "data.train_files": str(folder / "text.txt"),
                 "job.dump_folder": str(folder / name), **CASES[name]}
    overrides["model.args_path"] = str(folder / f"{overrides.pop('model')}.json")
    return config.load(str(REPO / "train_configs" / "debug.toml"), list(overrides.items()))


def count_worker(rank: int, world: int, folder: str) -> dict:
    """Per case: (this rank's pipeline rank, the collectives of its second step as tuples)."""
    from dtcollie.planner.comm_count import CollectiveCounter
    from dtcollie.train import Trainer

    counted = {}
    for name in CASES:
        trainer = Trainer(job_config(name, Path(folder)))
        batches = trainer.train_loader.batches()
        trainer.step = 1
        trainer.train_step(batches)  # one-off work (see above): not counted
        trainer.step = 2
        with CollectiveCounter(trainer.mesh, trainer.dp_mesh) as counter:
            trainer.train_step(batches)
        counted[name] = (trainer.mesh["pp"].get_local_rank(),
                         [(c.dim, c.kind, c.nbytes, c.group_size) for c in counter.collectives])
        del trainer
    return counted


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("comm")
    # A slice of the shipped text: tokenizing the whole corpus would take most of the test's time.
    (folder / "text.txt").write_text((REPO / "dtcollie/assets/text/persuasion.txt").read_text()[:30000])
    for name, shape in SHAPES.items():
        (folder / f"{name}.json").write_text(json.dumps(shape))
    return folder


@pytest.fixture(scope="module")
def counted(folder) -> list[dict]:
    return run_ranks(WORLD, count_worker, str(folder), timeout=300)


@pytest.fixture(scope="module")
def vocab_size() -> int:
    return load_tokenizer(str(REPO / "dtcollie/assets/tokenizer")).vocab_size


@pytest.mark.parametrize("name", CASES)
def test_model_equals_the_counted_step(name, folder, counted, vocab_size):
    spec = resolve(job_config(name, folder), WORLD, torch.device("cpu"), vocab_size)
    for rank, per_case in enumerate(counted):
        pp_rank, collectives = per_case[name]
        measured = totals([Collective(*c) for c in collectives])
        assert measured == totals(step_collectives(spec, pp_rank)), f"rank {rank}"
    # The case exercises what it is named for: every mesh dim of the layout carries traffic.
    dims = spec.dims
    assert {dim for dim, _ in measured} >= {dim for dim in MESH_DIMS if getattr(dims, dim) > 1}
