"""Random initial weights on CPU layouts equal one process's: no pipeline stage repeats another's
draws and no shard repeats another shard's."""

import torch
from torch.distributed.tensor import DTensor

from debug_weights import ONE_NOVEL
from dtcollie import config
from dtcollie.dcp_weights import model_state_dict
from spawn import run_ranks

FAST = ["--training.seq_len", "32", "--training.eval_interval", "0", *ONE_NOVEL]
LAYOUTS = {"pp2_tp2": ["--parallelism.pp", "2", "--parallelism.tp", "2"],
           "dp_shard2_tp2": ["--parallelism.tp", "2", "--training.micro_batch_size", "4"]}


def job(folder: str, overrides: list) -> config.JobConfig:
    _, pairs = config.parse_overrides(FAST + overrides + ["--job.dump_folder", folder])
    return config.load("train_configs/debug.toml", pairs)


def initial_weights(cfg: config.JobConfig) -> dict[str, list]:
    """This rank's whole tensors (DTensors gathered) of the freshly built trainer, as plain lists."""
    from dtcollie.train import Trainer

    weights = {}
    for part in Trainer(cfg).model.parts:
        for name, tensor in model_state_dict(part).items():
            weights[name] = (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).tolist()
    return weights


def layout_weights(rank: int, world_size: int, folder: str) -> dict:
    return {name: initial_weights(job(f"{folder}/{name}", overrides)) for name, overrides in LAYOUTS.items()}


def test_cpu_layouts_draw_the_one_process_initial_weights(tmp_path):
    reference = {name: torch.tensor(values) for name, values in initial_weights(job(str(tmp_path / "one"), [])).items()}
    ranks = run_ranks(4, layout_weights, str(tmp_path), timeout=300)
    for layout in LAYOUTS:
        seen = set()
        for weights in ranks:
            for name, values in weights[layout].items():
                assert torch.equal(torch.tensor(values), reference[name]), (layout, name)
                seen.add(name)
        assert seen == set(reference), layout  # every weight is on some rank
