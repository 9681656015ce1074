"""LoRA adapters out of dtcollie: the `lora.json` beside a checkpoint, and Hugging Face PEFT folders.

A PEFT folder is `adapter_config.json` plus `adapter_model.safetensors`, which
`peft.PeftModel.from_pretrained(LlamaForCausalLM..., folder)` loads. Tensor names are the HF
Llama names from `dtcollie.models.hf` under PEFT's `base_model.model.` prefix, e.g.
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`. The model uses HF's rotate-half
RoPE, so q/k adapters need no permutation, just like the base weights.
"""

import dataclasses
import json
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from torch.distributed.tensor import DTensor

from dtcollie.dcp_weights import (check_shapes, load_weights_as_stored, model_state_dict, prepare_output_folder,
                                  stored_model_shapes)
from dtcollie.errors import CheckpointError, ConfigError
from dtcollie.models.hf import (HF_OUTPUT_PATTERNS, MODEL_ARGS_FILE, load_model_args, save_hf, to_hf_name)
from dtcollie.models.hf_files import TOKENIZER_FILES, copy_tokenizer_files, export_tokenizer, write_side_files
from dtcollie.models.llama import ModelArgs, Transformer
from dtcollie.peft.lora import (TARGETS, LoRAConfig, apply_lora, check_lora_config, is_lora_key, lora_config,
                                merge_lora_state_dict)

LORA_CONFIG_FILE = "lora.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_OUTPUT_PATTERNS = (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, *TOKENIZER_FILES)
PEFT_PREFIX = "base_model.model."
HF_LORA_NAMES = {"lora_a": "lora_A", "lora_b": "lora_B"}


# ---------------------------------------------------------------------------------------------
# lora.json: the hyperparameters a checkpoint's adapters were trained with


def save_lora_config(folder: str | Path, config: LoRAConfig) -> None:
    """Write `folder/lora.json` (next to the model weights) so export can rebuild the adapters."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / LORA_CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")


def load_lora_config(folder: str | Path) -> LoRAConfig:
    """The LoRAConfig in `folder/lora.json`; a missing or malformed file is a user error."""
    path = Path(folder) / LORA_CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint folder {folder} has no {LORA_CONFIG_FILE}; the trainer writes it with "
                              f"save_lora_config next to LoRA weights")
    try:
        config = LoRAConfig(**json.loads(path.read_text()))
        check_lora_config(config)
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ConfigError) as err:  # TypeError: bad key or type
        raise ConfigError(f"{path} is not a valid LoRA config: {err}") from None
    return config


# ---------------------------------------------------------------------------------------------
# PEFT format


def hf_target_name(target: str) -> str:
    """dtcollie target name -> PEFT target_modules name (wq -> q_proj, w1 -> gate_proj, output -> lm_head)."""
    path = "output" if target == "output" else f"layers.0.{TARGETS[target]}"
    return to_hf_name(f"{path}.weight").split(".")[-2]


def peft_name(name: str) -> str:
    """`layers.0.attention.wq.lora_a` -> `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`."""
    prefix, _, which = name.rpartition(".")
    module = to_hf_name(f"{prefix}.weight").removesuffix(".weight")
    return f"{PEFT_PREFIX}{module}.{HF_LORA_NAMES[which]}.weight"


def peft_adapter_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter tensors of a dtcollie state dict (plain tensors) under their PEFT names."""
    return {peft_name(name): tensor.contiguous() for name, tensor in state_dict.items() if is_lora_key(name)}


def adapter_config(config: LoRAConfig, base_model_name_or_path: str = "") -> dict:
    """PEFT's adapter_config.json for a causal-LM LoRA with these hyperparameters."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": config.rank, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "target_modules": [hf_target_name(t) for t in config.target_modules], "use_rslora": config.use_rslora,
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
    }


def write_peft_adapter(state_dict: dict[str, torch.Tensor], config: LoRAConfig, out_dir: str | Path,
                       base_model_name_or_path: str = "", force: bool = False) -> None:
    """Write the adapters of a dtcollie state dict (plain tensors) as a PEFT folder."""
    tensors = peft_adapter_tensors(state_dict)
    if not tensors:
        raise CheckpointError("the state dict holds no LoRA weights (no *.lora_a / *.lora_b keys)")
    prepare_output_folder(out_dir, force, PEFT_OUTPUT_PATTERNS)
    out_dir = Path(out_dir)
    save_file(tensors, out_dir / ADAPTER_WEIGHTS_FILE, metadata={"format": "pt"})
    text = json.dumps(adapter_config(config, base_model_name_or_path), indent=2) + "\n"
    (out_dir / ADAPTER_CONFIG_FILE).write_text(text)


def save_peft_adapter(model: nn.Module, out_dir: str | Path, base_model_name_or_path: str = "",
                      force: bool = False) -> None:
    """Write a model's adapters as a PEFT folder.

    DTensor adapters (TP, FSDP) are gathered, which is a collective: every rank of their mesh must
    call this; only global rank 0 writes. A pipeline stage holds only its own adapters: export a
    whole-model DCP checkpoint with tools/export_lora.py instead."""
    config = lora_config(model)
    adapters = {name: tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
                for name, tensor in model.state_dict().items() if is_lora_key(name)}
    if not dist.is_initialized() or dist.get_rank() == 0:
        write_peft_adapter({name: t.detach().cpu() for name, t in adapters.items()}, config, out_dir,
                           base_model_name_or_path, force)


# ---------------------------------------------------------------------------------------------
# DCP checkpoint -> PEFT folder (and a merged HF folder)


def lora_expected_shapes(args: ModelArgs, config: LoRAConfig) -> dict[str, tuple]:
    """dtcollie name -> shape of every tensor a LoRA model with `args` and `config` stores (meta, no memory)."""
    with torch.device("meta"):
        model = Transformer(args)
    apply_lora(model, **dataclasses.asdict(config))
    return {name: tuple(tensor.shape) for name, tensor in model_state_dict(model).items()}


def export_lora(checkpoint: str | Path, out_dir: str | Path, merge_into: str | Path | None = None,
                base_model_name_or_path: str = "", force: bool = False,
                base: str | Path | None = None, tokenizer: str | Path | None = None) -> tuple[ModelArgs, LoRAConfig]:
    """A weights folder or training checkpoint with LoRA weights, model_args.json and lora.json ->
    PEFT folder; with `merge_into` also an HF folder of the merged weights. A training checkpoint
    of a LoRA run holds only the adapters: merging it needs `base`, the base weights' DCP folder
    (the run's checkpoint.initial_load_path). Both folders get the tokenizer's files (`tokenizer`,
    else the checkpoint's own) and the merged one its generation config and special-token ids, as
    `convert_dcp_to_hf` writes them. Everything is checked before anything is written."""
    shapes = stored_model_shapes(checkpoint)
    if not any(is_lora_key(name) for name in shapes):
        raise CheckpointError(f"checkpoint {checkpoint} holds no LoRA weights (no *.lora_a / *.lora_b keys)")
    args_path = Path(checkpoint) / MODEL_ARGS_FILE
    if not args_path.is_file():
        raise CheckpointError(f"checkpoint folder {checkpoint} has no {MODEL_ARGS_FILE}; it says which model the "
                              f"weights belong to")
    args, config = load_model_args(args_path), load_lora_config(checkpoint)
    expected = lora_expected_shapes(args, config)
    adapters_only = all(is_lora_key(name) for name in shapes)
    base_expected = {name: shape for name, shape in expected.items() if not is_lora_key(name)}
    check_shapes(shapes, {name: shape for name, shape in expected.items() if is_lora_key(name) or not adapters_only},
                 f"checkpoint {checkpoint}")
    if merge_into is not None and adapters_only and base is None:
        raise CheckpointError(f"checkpoint {checkpoint} holds only the adapters; give the base weights' DCP folder "
                              f"(--base) to merge them")
    if base is not None:
        check_shapes(stored_model_shapes(base), base_expected, f"base checkpoint {base}")
    tokenizer, token_ids = export_tokenizer(checkpoint, tokenizer)
    prepare_output_folder(out_dir, force, PEFT_OUTPUT_PATTERNS)
    if merge_into is not None:
        prepare_output_folder(merge_into, force, HF_OUTPUT_PATTERNS)
    state_dict = load_weights_as_stored(checkpoint)
    write_peft_adapter(state_dict, config, out_dir, base_model_name_or_path, force)
    if tokenizer:
        copy_tokenizer_files(tokenizer, out_dir)
    if merge_into is not None:
        if base is not None:
            state_dict = {**load_weights_as_stored(base), **{k: v for k, v in state_dict.items() if is_lora_key(k)}}
        save_hf(merge_lora_state_dict(state_dict, config), args, merge_into, force=force, token_ids=token_ids)
        write_side_files(merge_into, tokenizer, [checkpoint, base], token_ids)
    return args, config
