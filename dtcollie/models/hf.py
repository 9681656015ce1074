"""Hugging Face checkpoints <-> dtcollie: config.json <-> ModelArgs, weight names, safetensors I/O.

The families are those `HF_FAMILIES` lists (Llama, Qwen2/2.5, Qwen3, Mistral); the config's
`model_type` picks one, and every key that changes the math is either mapped or refused by name.

The dtcollie model uses HF's rotate-half RoPE, so conversion is a pure renaming: no q/k permutation.
Tied models (`tie_word_embeddings`) store only the embedding on both sides: HF has no
`lm_head.weight`, dtcollie keeps only `tok_embeddings.weight`. Weights keep the dtype they were
stored in unless a cast is asked for, so HF -> DCP -> HF is bit-exact.
"""

import contextlib
import dataclasses
import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from dtcollie.dcp_weights import (MANIFEST_FILE, check_shapes, load_weights_as_stored, model_state_dict, one_line,
                                  prepare_output_folder, save_model_weights)
from dtcollie.errors import CheckpointError, ConfigError, shown
from dtcollie.models.hf_files import (GENERATION_CONFIG, TOKENIZER_FILES, copy_generation_config,
                                      copy_tokenizer_files, export_tokenizer, write_side_files)
from dtcollie.models.llama import FAMILIES, ROPE_SCALING_KEYS, ModelArgs, Transformer, is_finite_number

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MODEL_ARGS_FILE = "model_args.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"
# What `save_hf` writes, so a forced overwrite can clear a previous export first: a stale
# `model.safetensors` next to a new index would be picked up by transformers instead of the shards.
HF_OUTPUT_PATTERNS = (CONFIG_FILE, "model*.safetensors", INDEX_FILE, GENERATION_CONFIG, *TOKENIZER_FILES)
DCP_OUTPUT_PATTERNS = (".metadata", "*.distcp", MANIFEST_FILE, MODEL_ARGS_FILE, GENERATION_CONFIG, *TOKENIZER_FILES)

# model_type: (transformers config class, causal-LM architecture), one per dtcollie family.
HF_FAMILIES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
               "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM")}
assert tuple(HF_FAMILIES) == FAMILIES
HF_DEFAULT_ROPE_THETA = 10000.0  # every supported family's transformers default
HF_DEFAULTED_KEYS = ("head_dim", "max_position_embeddings", "rms_norm_eps", "sliding_window", "tie_word_embeddings")
HF_SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
LLAMA3_KEYS = ROPE_SCALING_KEYS[:3]  # read from the config; the context falls back to max_position_embeddings


# ---------------------------------------------------------------------------------------------
# config.json <-> ModelArgs


def hf_config_class(model_type: str):
    import transformers  # imported here: only conversion needs transformers

    return getattr(transformers, HF_FAMILIES[model_type][0])


def hf_defaults(model_type: str) -> dict:
    """The family's transformers defaults for the keys a config.json may leave out (head_dim None:
    derived from the width; Qwen3's is 128, Mistral's sliding_window 4096)."""
    defaults = {f.name: f.default for f in dataclasses.fields(hf_config_class(model_type))
                if f.default is not dataclasses.MISSING}
    return {key: defaults[key] for key in HF_DEFAULTED_KEYS if key in defaults}


def args_from_hf_config(cfg: dict) -> ModelArgs:
    """ModelArgs for an HF config.json of a supported family (transformers 5 `rope_parameters` or
    the older layout). A key the file leaves out takes the family's transformers default.

    Anything the dtcollie model cannot compute (other biases, activations, RoPE types, per-layer
    sliding windows) is refused by name rather than silently converted into a different model.
    """
    _check_hf_supported(cfg)
    family = cfg["model_type"]
    cfg = {**hf_defaults(family), **cfg}
    missing = [key for key in HF_SHAPE_KEYS if cfg.get(key) is None]
    if missing:
        raise ConfigError(f"HF config has no {missing[0]!r}; it is needed to build the model")
    not_int = [key for key in (*HF_SHAPE_KEYS, "num_key_value_heads", "head_dim", "max_position_embeddings",
                               "sliding_window") if cfg.get(key) is not None and type(cfg[key]) is not int]
    if not_int:
        raise ConfigError(f"HF config {not_int[0]} must be an integer, got {shown(cfg[not_int[0]])}")
    dim, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
    n_kv_heads = cfg.get("num_key_value_heads") or n_heads
    if n_kv_heads > 0 and n_heads % n_kv_heads:
        raise ConfigError(f"HF config num_attention_heads={n_heads} is not a multiple of "
                          f"num_key_value_heads={n_kv_heads}")
    head_dim = cfg.get("head_dim") or 0
    max_seq_len = cfg["max_position_embeddings"]
    rope_theta, rope_scaling = _rope_from_hf(cfg, max_seq_len)
    try:
        return ModelArgs(
            dim=dim, n_layers=cfg["num_hidden_layers"], n_heads=n_heads, n_kv_heads=n_kv_heads,
            head_dim=0 if head_dim * n_heads == dim else head_dim,  # 0 means "derived", as in FLAVORS
            vocab_size=cfg["vocab_size"], hidden_dim=cfg["intermediate_size"],
            norm_eps=_hf_number(cfg["rms_norm_eps"], "rms_norm_eps"), rope_theta=rope_theta,
            rope_scaling=rope_scaling, max_seq_len=max_seq_len,
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=family == "qwen2", qk_norm=family == "qwen3",
            sliding_window=(cfg.get("sliding_window") or 0) if family == "mistral" else 0, family=family)
    except ConfigError as err:
        raise ConfigError(f"HF config describes no possible model: {err}") from None


def _hf_number(value, key: str) -> float:
    if not is_finite_number(value):
        raise ConfigError(f"HF config {key} must be a finite number, got {shown(value)}")
    return float(value)


def _check_hf_supported(cfg: dict) -> None:
    family = cfg.get("model_type")
    if not isinstance(family, str) or family not in HF_FAMILIES:
        raise ConfigError(f"HF config model_type={family!r} is not supported; supported: {', '.join(HF_FAMILIES)}")
    architectures = cfg.get("architectures") or [HF_FAMILIES[family][1]]
    if architectures != [HF_FAMILIES[family][1]]:
        raise ConfigError(f"HF config architectures={architectures} is not supported; a {family} model must be "
                          f"{HF_FAMILIES[family][1]}")
    for key in ("attention_bias", "mlp_bias"):  # qwen2's fixed q/k/v biases are not a config key
        if cfg.get(key):
            raise ConfigError(f"HF config {key}=true is not supported: dtcollie's {family} has no such biases")
    if cfg.get("use_sliding_window"):
        raise ConfigError(f"HF config use_sliding_window=true is not supported for {family} (a window on some "
                          f"layers only); only mistral's all-layer sliding_window is")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"HF config hidden_act={cfg['hidden_act']!r} is not supported; only 'silu' is")


def _rope_from_hf(cfg: dict, max_seq_len: int) -> tuple[float, dict]:
    """(rope_theta, dtcollie rope_scaling) with transformers' precedence rules.

    transformers takes `rope_scaling` over `rope_parameters`, a theta inside the dict over a
    top-level `rope_theta`, accepts `type` for `rope_type`, and falls back to
    max_position_embeddings for a missing llama3 original_max_position_embeddings.
    """
    key = "rope_scaling" if cfg.get("rope_scaling") else "rope_parameters"
    rope = cfg.get(key) or {}
    if not isinstance(rope, dict) or any(isinstance(value, dict) for value in rope.values()):
        raise ConfigError(f"HF config {key} must be one flat dict; per-layer RoPE is not supported")
    theta = _hf_number(rope.get("rope_theta", cfg.get("rope_theta", HF_DEFAULT_ROPE_THETA)), "rope_theta")
    partial = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise ConfigError(f"HF config partial_rotary_factor={partial} is not supported; only full RoPE is")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return theta, {}
    if rope_type != "llama3":
        raise ConfigError(f"HF config {key}.rope_type={rope_type!r} is not supported; use 'default' or 'llama3'")
    absent = [name for name in LLAMA3_KEYS if rope.get(name) is None]
    if absent:
        raise ConfigError(f"HF config {key} has rope_type 'llama3' but no {absent[0]!r}")
    scaling = {name: _hf_number(rope[name], f"{key}.{name}") for name in LLAMA3_KEYS}
    old_context = (cfg.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings")
                   or max_seq_len)
    scaling["original_max_position_embeddings"] = int(_hf_number(old_context, "original_max_position_embeddings"))
    return theta, scaling


def hf_config_from_args(args: ModelArgs, dtype: torch.dtype | None = None, token_ids: dict | None = None) -> dict:
    """The HF config dict of `args`'s family, as transformers itself would write it; `token_ids`
    (bos/eos/pad_token_id) come from the tokenizer, which ModelArgs does not know (unset without)."""
    if args.vocab_size <= 0:
        raise ConfigError("model vocab_size is unset; an HF config needs the real vocabulary size")
    rope = {"rope_type": "llama3" if args.rope_scaling else "default", "rope_theta": args.rope_theta,
            **args.rope_scaling}
    family_keys = {"qwen2": dict(use_sliding_window=False), "qwen3": dict(use_sliding_window=False),
                   "mistral": dict(sliding_window=args.sliding_window or None)}.get(args.family, {})
    config = hf_config_class(args.family)(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.hidden_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads,
        head_dim=args.attention_head_dim, max_position_embeddings=args.max_seq_len, rms_norm_eps=args.norm_eps,
        tie_word_embeddings=args.tie_embeddings, rope_parameters=rope, architectures=[HF_FAMILIES[args.family][1]],
        dtype=str(dtype).removeprefix("torch.") if dtype else None,
        **{"bos_token_id": None, "eos_token_id": None, **(token_ids or {})}, **family_keys)
    return config.to_diff_dict()


def load_model_args(path: str | Path) -> ModelArgs:
    """ModelArgs from a dtcollie model_args.json or an HF config.json (a file, or a folder holding one)."""
    path = Path(path)
    if path.is_dir():
        candidates = [path / MODEL_ARGS_FILE, path / CONFIG_FILE]
        path = next((p for p in candidates if p.is_file()), candidates[0])
    if not path.is_file():
        raise ConfigError(f"model args file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as err:  # bad JSON or UTF-8, a 4300-digit integer, deep nesting
        raise ConfigError(f"model args file {path} is not valid JSON: {err or 'nested too deeply'}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"model args file {path} must hold a JSON object")
    # An HF config always names its model_type; a dtcollie one never does.
    if "model_type" not in data:
        return _args_from_dict(data, path)
    try:
        return args_from_hf_config(data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def _args_from_dict(data: dict, path: Path) -> ModelArgs:
    known = {f.name for f in dataclasses.fields(ModelArgs)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"model args file {path} has unknown key {unknown[0]!r}; known keys: {sorted(known)}")
    defaults = ModelArgs()
    for key, value in data.items():
        expected = type(getattr(defaults, key))
        # JSON has one number type: an int is a fine float, but a bool is not an int here.
        fits = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
        if not (fits or (expected is float and isinstance(value, int) and not isinstance(value, bool))):
            raise ConfigError(f"model args file {path}: {key} must be {expected.__name__}, got {value!r}")
    try:
        return ModelArgs(**data)
    except ConfigError as err:
        raise ConfigError(f"model args file {path} describes no possible model: {err}") from None


def save_model_args(args: ModelArgs, path: str | Path) -> None:
    """Write `args` as a dtcollie model_args.json that `load_model_args` reads back unchanged."""
    Path(path).write_text(json.dumps(dataclasses.asdict(args), indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# Parameter names

# Per-layer names after `layers.N.` (dtcollie) / `model.layers.N.` (HF).
LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wq.bias": "self_attn.q_proj.bias",  # qwen2
    "attention.wk.bias": "self_attn.k_proj.bias",
    "attention.wv.bias": "self_attn.v_proj.bias",
    "attention.q_norm.weight": "self_attn.q_norm.weight",  # qwen3
    "attention.k_norm.weight": "self_attn.k_norm.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
TOP_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
HF_LAYER_NAMES = {hf: ours for ours, hf in LAYER_NAMES.items()}
HF_TOP_NAMES = {hf: ours for ours, hf in TOP_NAMES.items()}
# Buffers some old HF checkpoints saved; transformers recomputes them, and so do we.
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


def to_hf_name(name: str) -> str:
    """dtcollie parameter name -> HF name (the same in every supported family)."""
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    match = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if match and match.group(2) in LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{LAYER_NAMES[match.group(2)]}"
    raise CheckpointError(f"parameter {name!r} has no HF name")


def from_hf_name(name: str) -> str:
    """HF name -> dtcollie name; unknown names are returned unchanged (and so reported as
    unexpected by the shape check) rather than raising here, so the error can list all of them."""
    if name in HF_TOP_NAMES:
        return HF_TOP_NAMES[name]
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if match and match.group(2) in HF_LAYER_NAMES:
        return f"layers.{match.group(1)}.{HF_LAYER_NAMES[match.group(2)]}"
    return name


def to_hf_state_dict(state_dict: dict, args: ModelArgs) -> dict:
    """Rename to HF; a tied model's output projection is the embedding, so it is not written twice."""
    return {to_hf_name(name): tensor for name, tensor in state_dict.items()
            if not (args.tie_embeddings and name == "output.weight")}


def from_hf_state_dict(hf_state_dict: dict) -> dict:
    """Rename HF tensors to dtcollie names, dropping buffers transformers itself ignores."""
    return {from_hf_name(name): tensor for name, tensor in hf_state_dict.items()
            if not name.endswith(IGNORED_HF_SUFFIXES)}


def expected_shapes(args: ModelArgs) -> dict[str, tuple]:
    """dtcollie weight name -> shape for `args`, from a model built on meta (no memory)."""
    with torch.device("meta"):
        model = Transformer(args)
    return {name: tuple(tensor.shape) for name, tensor in model_state_dict(model).items()}


# ---------------------------------------------------------------------------------------------
# Reading HF folders


def read_hf_args(folder: str | Path) -> ModelArgs:
    """ModelArgs from `folder/config.json`; a missing folder or file is a CheckpointError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"HF checkpoint folder {folder} does not exist")
    if not (folder / CONFIG_FILE).is_file():
        raise CheckpointError(f"HF checkpoint folder {folder} has no {CONFIG_FILE}")
    return load_model_args(folder / CONFIG_FILE)


def hf_weight_files(folder: str | Path) -> list[Path]:
    """The safetensors files of an HF folder: `model.safetensors`, else the shards its index names.

    The single file wins when both exist, as in transformers.
    """
    folder = Path(folder)
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    if not (folder / INDEX_FILE).is_file():
        raise CheckpointError(f"HF checkpoint folder {folder} has neither {SINGLE_FILE} nor {INDEX_FILE}")
    try:
        weight_map = json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))["weight_map"]
    except (ValueError, KeyError, TypeError, RecursionError) as err:  # ValueError: bad JSON or UTF-8
        raise CheckpointError(f"{folder / INDEX_FILE} is not a valid safetensors index: {err}") from None
    if not (isinstance(weight_map, dict) and all(isinstance(name, str) and Path(name).name == name
                                                 for name in weight_map.values())):
        raise CheckpointError(f"{folder / INDEX_FILE} is not a valid safetensors index: its weight_map must map "
                              f"tensor names to file names in the folder")
    files = [folder / name for name in sorted(set(weight_map.values()))]
    absent = [f.name for f in files if not f.is_file()]
    if absent:
        raise CheckpointError(f"HF checkpoint folder {folder} lacks shard(s) named in its index: {absent[:3]}")
    return files


def read_hf_shapes(files: list[Path]) -> dict[str, tuple]:
    """dtcollie name -> shape for every tensor in the files, reading only the safetensors headers."""
    shapes = {}
    for path in files:
        with unreadable_as_error(path), safe_open(path, framework="pt") as handle:
            for name in handle.keys():
                shapes[name] = tuple(handle.get_slice(name).get_shape())
    return from_hf_state_dict(shapes)


@contextlib.contextmanager
def unreadable_as_error(path: Path):
    """A truncated or garbled safetensors file (safetensors raises its own error type, or an OSError
    for a short read) as a CheckpointError naming it."""
    try:
        yield
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file ({one_line(err)}); download or export "
                              f"it again") from None


def check_hf_folder(folder: str | Path) -> tuple[ModelArgs, list[Path]]:
    """Args and weight files of an HF folder whose tensors match its config exactly (names and shapes)."""
    args = read_hf_args(folder)
    files = hf_weight_files(folder)
    check_shapes(read_hf_shapes(files), expected_shapes(args), f"HF checkpoint {folder}")
    return args, files


def load_hf_state_dict(folder: str | Path) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """(args, dtcollie-named state dict) of an HF folder, tensors in the dtype they were stored in."""
    args, files = check_hf_folder(folder)
    state_dict = {}
    for path in files:
        with unreadable_as_error(path):
            state_dict.update(from_hf_state_dict(load_file(path)))
    return args, state_dict


def from_hf(folder: str | Path, dtype: torch.dtype = torch.float32, device="cpu") -> Transformer:
    """A dtcollie Transformer with an HF Llama checkpoint's weights, cast to `dtype` on `device`.

    Built on meta and filled one shard at a time, so peak memory is the model plus one shard.
    """
    args, files = check_hf_folder(folder)
    with torch.device("meta"):
        model = Transformer(args)
    model.to(dtype=dtype)
    model.to_empty(device=device)
    model.init_rope()  # float32 tables, whatever the weight dtype
    params = model_state_dict(model)
    with torch.no_grad():
        for path in files:
            with unreadable_as_error(path):
                shard = from_hf_state_dict(load_file(path))
            for name, tensor in shard.items():
                params[name].copy_(tensor)
    return model


# ---------------------------------------------------------------------------------------------
# Writing HF folders

SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like '5GB' (10**9, as in transformers) or '512MiB' (2**20)."""
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
        if not match or match.group(2).upper() not in SIZE_UNITS:
            raise ConfigError(f"max shard size {size!r} is not a size; use bytes or e.g. '5GB', '500MB', '2GiB'")
        value = int(float(match.group(1)) * SIZE_UNITS[match.group(2).upper()])
    if value <= 0:
        raise ConfigError(f"max shard size must be positive, got {size!r}")
    return value


def plan_shards(state_dict: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    """Group names in order into shards of at most `max_bytes`; a bigger tensor gets a shard of its own."""
    shards, current, current_bytes = [], [], 0
    for name, tensor in state_dict.items():
        size = tensor.numel() * tensor.element_size()
        if current and current_bytes + size > max_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(name)
        current_bytes += size
    if current:
        shards.append(current)
    return shards


def save_hf(state_dict: dict[str, torch.Tensor], args: ModelArgs, folder: str | Path, *,
            max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, dtype: torch.dtype | None = None,
            force: bool = False, token_ids: dict | None = None) -> None:
    """Write a dtcollie-named state dict as an HF folder: config.json plus safetensors.

    One `model.safetensors` when it fits in `max_shard_size`, else numbered shards and
    `model.safetensors.index.json`. `dtype` casts floating tensors; None keeps each as it is.
    `token_ids` go into config.json (see `hf_config_from_args`).
    """
    max_bytes = parse_size(max_shard_size)
    check_shapes({name: tuple(t.shape) for name, t in _drop_tied_output(state_dict, args).items()},
                 expected_shapes(args), "state dict to export")
    tensors = {name: _cast(t, dtype).contiguous() for name, t in to_hf_state_dict(state_dict, args).items()}
    folder = Path(folder)
    prepare_output_folder(folder, force, HF_OUTPUT_PATTERNS)
    stored_dtype = next(iter(tensors.values())).dtype
    config = hf_config_from_args(args, stored_dtype, token_ids)
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    shards = plan_shards(tensors, max_bytes)
    if len(shards) == 1:
        save_file(tensors, folder / SINGLE_FILE, metadata={"format": "pt"})
        return
    weight_map = {}
    for index, names in enumerate(shards, start=1):
        file_name = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        save_file({name: tensors[name] for name in names}, folder / file_name, metadata={"format": "pt"})
        weight_map.update({name: file_name for name in names})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _drop_tied_output(state_dict: dict, args: ModelArgs) -> dict:
    return {k: v for k, v in state_dict.items() if not (args.tie_embeddings and k == "output.weight")}


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


@torch.no_grad()
def randomize_norms_and_biases(model: torch.nn.Module) -> None:
    """Norm scales uniform in [0.5, 1.5] and biases N(0, 0.5) instead of their ones and zeros, so a
    swapped, dropped or mis-sharded one changes the numbers (an HF or a dtcollie model)."""
    for name, param in model.named_parameters():
        if "norm" in name:
            param.uniform_(0.5, 1.5)
        elif name.endswith("bias"):
            param.normal_(0.0, 0.5)


def save_random_hf_model(folder: str | Path, config, seed: int = 0) -> ModelArgs:
    """A randomly initialised HF model of a transformers `config` (one of the supported families),
    written by transformers itself, with random norms and biases too: a stand-in for a downloaded
    folder where no model hub can be reached. Returns the ModelArgs dtcollie reads from it."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    randomize_norms_and_biases(model)
    folder = Path(folder)
    prepare_output_folder(folder, False, HF_OUTPUT_PATTERNS)
    model.save_pretrained(folder)
    return read_hf_args(folder)


# ---------------------------------------------------------------------------------------------
# Whole-folder conversions (the tools are thin wrappers over these)


def convert_hf_to_dcp(hf_folder: str | Path, dcp_folder: str | Path, force: bool = False) -> ModelArgs:
    """HF folder -> DCP folder of dtcollie weights (stored dtype kept) plus its model_args.json, and
    the HF folder's tokenizer files and generation_config.json (so the DCP folder is also the
    tokenizer folder a run can name in data.tokenizer)."""
    args, state_dict = load_hf_state_dict(hf_folder)
    dcp_folder = Path(dcp_folder)
    prepare_output_folder(dcp_folder, force, DCP_OUTPUT_PATTERNS)
    save_model_weights(state_dict, dcp_folder)
    save_model_args(args, dcp_folder / MODEL_ARGS_FILE)
    copy_tokenizer_files(hf_folder, dcp_folder)
    copy_generation_config([hf_folder], dcp_folder)
    return args


def convert_dcp_to_hf(dcp_folder: str | Path, hf_folder: str | Path, *, dtype: torch.dtype | None = None,
                      max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, force: bool = False,
                      tokenizer: str | Path | None = None) -> tuple[ModelArgs, str | None]:
    """DCP folder written by `convert_hf_to_dcp` (or training) -> HF folder transformers loads alone:
    config.json with the special-token ids, safetensors, the tokenizer's files (from `tokenizer`,
    else those in the DCP folder) and generation_config.json. Returns (args, tokenizer folder used
    or None when there was none)."""
    args_path = Path(dcp_folder) / MODEL_ARGS_FILE
    if not args_path.is_file():
        raise CheckpointError(f"DCP folder {dcp_folder} has no {MODEL_ARGS_FILE}; it says which model the "
                              f"weights belong to (convert_hf_to_dcp.py writes it)")
    args = load_model_args(args_path)
    tokenizer, token_ids = export_tokenizer(dcp_folder, tokenizer)
    state_dict = load_weights_as_stored(dcp_folder)
    save_hf(state_dict, args, hf_folder, max_shard_size=max_shard_size, dtype=dtype, force=force, token_ids=token_ids)
    write_side_files(hf_folder, tokenizer, [dcp_folder], token_ids)
    return args, tokenizer
