"""Generation under tensor parallelism gives the one-process tokens, for every family.

Each family's tiny HF model generates greedily in float64 on 2 gloo ranks (weights sharded by the
TP plan, KV cache holding each rank's own heads) and on one process; the tokens must be equal.
"""

import sys
from pathlib import Path

import torch
from spawn import run_ranks
from torch.distributed.device_mesh import init_device_mesh

from dtcollie.generation import Sampling, generate
from dtcollie.inference import build_inference_model, load_weights

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from test_families import CONFIGS, save_hf_model  # noqa: E402
from test_generation import NEW_TOKENS, PAD, prompts  # noqa: E402

SAMPLING = Sampling(temperature=1.0, top_k=20, top_p=0.9, seed=5)


def generate_all(folders: list[str], mesh) -> dict[str, list]:
    results = {}
    for folder in folders:
        model = build_inference_model(*load_weights(folder), torch.device("cpu"), torch.float64, mesh)
        results[folder] = [generate(model, prompts(), NEW_TOKENS, pad_id=PAD),
                           generate(model, prompts(), 12, SAMPLING, pad_id=PAD)]
    return results


def tensor_parallel_worker(rank: int, world: int, folders: list[str]) -> dict[str, list]:
    return generate_all(folders, init_device_mesh("cpu", (world,), mesh_dim_names=("tp",)))


def test_tp2_generates_the_one_process_tokens(tmp_path):
    folders = [str(save_hf_model(tmp_path / name, config)) for name, (config, _) in sorted(CONFIGS.items())]
    one_process = generate_all(folders, None)
    for ranks in run_ranks(2, tensor_parallel_worker, folders, timeout=600):
        assert ranks == one_process
