"""A model for inference from any checkpoint dtcollie reads, on one process or tensor-parallel.

Checkpoints: a Hugging Face folder (config.json + safetensors), a dtcollie weights folder (the
converter's output, or a run's `<dump_folder>/weights`) or a training checkpoint
(`<dump_folder>/checkpoints/step-N`); the last two carry `model_args.json`. A LoRA checkpoint
(`lora.json` beside it) is merged into its base weights (W + scale * B A): `base`, or the run's
`checkpoint.initial_load_path` read from `<dump_folder>/config.toml`.

The weights are read whole on CPU and each rank copies its own shard, so under tensor parallelism
a device holds 1/tp of the model; the host needs the whole of it once.
"""

import os
from pathlib import Path

import torch
from torch.distributed.device_mesh import DeviceMesh

from dtcollie import config as config_module
from dtcollie.dcp_weights import check_shapes, copy_full_tensors, load_weights_as_stored
from dtcollie.errors import CheckpointError
from dtcollie.models.hf import MODEL_ARGS_FILE, expected_shapes, load_hf_state_dict, load_model_args
from dtcollie.models.llama import ModelArgs, Transformer
from dtcollie.parallel.tensor import apply_tensor_parallel, check_tensor_parallel
from dtcollie.peft.export import LORA_CONFIG_FILE, load_lora_config
from dtcollie.peft.lora import merge_lora_state_dict

RUN_CONFIG = "config.toml"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}


def pick_device(name: str | None) -> torch.device:
    """"auto" (or None): CUDA when there is one, else CPU; "cuda" takes this rank's GPU."""
    if name in (None, "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(name)


def run_config(checkpoint: str | Path):
    """The config of the training run a `<dump_folder>/checkpoints/step-N` folder belongs to, or None."""
    path = Path(checkpoint).resolve().parent.parent / RUN_CONFIG
    return config_module.load(str(path)) if path.is_file() else None


def tokenizer_folder(checkpoint: str | Path, given: str | None = None) -> str:
    """`given`, else the checkpoint's own tokenizer.json (an HF folder), else its run's data.tokenizer."""
    if given:
        return given
    if Path(checkpoint, "tokenizer.json").is_file():
        return str(checkpoint)
    run = run_config(checkpoint)
    if run is None:
        raise CheckpointError(f"no tokenizer for {checkpoint}: it has no tokenizer.json and is not a training "
                              f"checkpoint of a run with a config.toml; name the tokenizer folder")
    return run.data.tokenizer


def load_weights(checkpoint: str | Path, base: str | Path | None = None) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """(args, full state dict on CPU in dtcollie names) of any checkpoint kind (see the module doc)."""
    folder = Path(checkpoint)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {checkpoint} is not a folder; give an HF folder, a dtcollie weights folder "
                              f"or a training checkpoint (<dump_folder>/checkpoints/step-N)")
    if (folder / "config.json").is_file() and not (folder / MODEL_ARGS_FILE).is_file():
        return load_hf_state_dict(folder)
    if not (folder / MODEL_ARGS_FILE).is_file():
        raise CheckpointError(f"checkpoint {checkpoint} has neither config.json (an HF folder) nor {MODEL_ARGS_FILE} "
                              f"(a dtcollie checkpoint)")
    args, state = load_model_args(folder / MODEL_ARGS_FILE), load_weights_as_stored(folder)
    if (folder / LORA_CONFIG_FILE).is_file():
        state = with_base_weights(folder, state, base)
        state = merge_lora_state_dict(state, load_lora_config(folder))
    check_shapes({name: tuple(t.shape) for name, t in state.items()}, expected_shapes(args), f"checkpoint {checkpoint}")
    return args, state


def with_base_weights(folder: Path, state: dict, base: str | Path | None) -> dict:
    """A LoRA training checkpoint holds only the adapters: add the base weights they adapt."""
    if any(not name.endswith((".lora_a", ".lora_b")) for name in state):
        return state  # a LoRA weights folder with its base weights in it
    if base is None:
        run = run_config(folder)
        base = run.checkpoint.initial_load_path if run is not None else ""
    if not base:
        raise CheckpointError(f"checkpoint {folder} holds only LoRA adapters and its run's config.toml names no "
                              f"base weights; give the base model's folder (--base)")
    return {**load_weights(base)[1], **state}


def build_inference_model(args: ModelArgs, state: dict[str, torch.Tensor], device: torch.device,
                          dtype: torch.dtype = torch.float32, tp_mesh: DeviceMesh | None = None) -> Transformer:
    """The model with `state` loaded, in eval mode; with `tp_mesh`, tensor-parallel over it (each rank
    keeps its shard of every weight; logits come out whole on every rank)."""
    with torch.device("meta"):
        model = Transformer(args)
    model.to(dtype=dtype)
    if tp_mesh is not None:
        check_tensor_parallel(args, tp_mesh.size(), 0, sequence_parallel=False)
        apply_tensor_parallel(model, tp_mesh, sequence_parallel=False, loss_parallel=False)
    model.to_empty(device=device)
    model.init_rope()
    copy_full_tensors(model, state)
    return model.eval()
