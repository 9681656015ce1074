"""Fuzzing the Hugging Face readers: config.json / model_args.json of hostile JSON, and safetensors
files and indexes that are damaged, replaced or missing, give their model or a one-line UserError
(see fuzz_inputs.py for the inputs and the budget).
"""

import dataclasses
import itertools
import json
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dtcollie.errors import CheckpointError, ConfigError, UserError
from dtcollie.models.hf import (CONFIG_FILE, INDEX_FILE, MODEL_ARGS_FILE, SINGLE_FILE, expected_shapes,
                                load_hf_state_dict, load_model_args, save_model_args)
from dtcollie.models.llama import ModelArgs

from fuzz_inputs import (EDGE_JSON_TEXTS, HOSTILE_TEXTS, any_bytes, edge_failures, fixed_budget, json_mutated,
                         json_members, json_object_text, json_texts, mutated, reader_outcome, shorten, texts)

@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama as transformers saves it: in one model.safetensors, and in shards with an index;
    and a dtcollie model_args.json of it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("hf")
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=32)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="3KB")
    save_model_args(load_model_args(root / "single"), root / MODEL_ARGS_FILE)
    return {"single": root / "single", "sharded": root / "sharded", "model_args": root / MODEL_ARGS_FILE}


def test_the_valid_seed_hf_folders_load(hf_folders):
    args = load_model_args(hf_folders["single"])
    assert (args.dim, args.n_layers, args.n_kv_heads, args.vocab_size) == (16, 1, 1, 64)
    assert load_model_args(hf_folders["model_args"]) == args
    for layout in ("single", "sharded"):
        loaded_args, state_dict = load_hf_state_dict(hf_folders[layout])
        assert loaded_args == args and len(state_dict) == len(expected_shapes(args)) == 12


def read_model_args(content: bytes, name: str):
    """`load_model_args` of a file `name` holding `content`: the ModelArgs or the ConfigError."""
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, name).write_bytes(content)
        result = reader_outcome(lambda: load_model_args(Path(folder, name)), ConfigError)
    assert isinstance(result, (ModelArgs, ConfigError)), result
    return result


HF_KEYS = ["model_type", "architectures", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
           "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps",
           "rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor", "tie_word_embeddings",
           "sliding_window", "use_sliding_window", "hidden_act", "attention_bias", "mlp_bias",
           "original_max_position_embeddings"]
MODEL_ARGS_KEYS = [f.name for f in dataclasses.fields(ModelArgs)]


@fixed_budget(200)
@given(st.data())
def test_model_args_of_hostile_json(hf_folders, data):
    seeds = {"config.json": json.loads((hf_folders["single"] / CONFIG_FILE).read_text()),
             MODEL_ARGS_FILE: json.loads(hf_folders["model_args"].read_text())}
    name = data.draw(st.sampled_from(sorted(seeds)), label="file")
    seed = seeds[name]
    # Keys of the file set to any JSON: past json.dumps' reach too (RAW_JSON), and mostly known keys.
    keys = st.sampled_from(HF_KEYS if name == "config.json" else MODEL_ARGS_KEYS) | texts()
    overrides = st.dictionaries(keys, json_texts(), min_size=1, max_size=3)
    content = data.draw(st.one_of(
        any_bytes(max_size=200), mutated(json.dumps(seed, indent=2).encode()), json_mutated(seed).map(
            lambda document: json.dumps(document).encode()),
        overrides.map(lambda changed: json_object_text({**json_members(seed), **changed}).encode())), label="content")
    read_model_args(content, name)


LLAMA3_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16}


def test_edge_values_for_every_model_args_key(hf_folders):
    # The random JSON above seldom pairs a key with the value that breaks it; this table pairs all.
    config_json = json.loads((hf_folders["single"] / CONFIG_FILE).read_text())
    model_args = json.loads(hf_folders["model_args"].read_text())
    # Llama 3 RoPE scaling, whose numbers are read only when it is there: HF's form and dtcollie's.
    seeds = {"config.json": (config_json, HF_KEYS, "rope_parameters",
                             {**config_json["rope_parameters"], "rope_type": "llama3", **LLAMA3_SCALING}),
             MODEL_ARGS_FILE: (model_args, MODEL_ARGS_KEYS, "rope_scaling", LLAMA3_SCALING)}
    cases = []
    for name, (seed, keys, rope_key, rope) in seeds.items():
        edits = [({key: value}, f"{key}: {shorten(value)}") for key, value in itertools.product(keys, EDGE_JSON_TEXTS)]
        for key, value in itertools.product(LLAMA3_SCALING, EDGE_JSON_TEXTS):
            scaling = json_object_text({**json_members(rope), key: value})
            edits.append(({rope_key: scaling}, f"{rope_key}.{key}: {shorten(value)}"))
        for edit, label in edits:
            content = json_object_text({**json_members(seed), **edit}).encode()
            cases.append((f"{name} {label}", lambda c=content, n=name: read_model_args(c, n), ()))
    failures = edge_failures(cases)
    assert not failures, "\n".join(failures)


def safetensors_parts(path: Path) -> tuple[dict, bytes]:
    """(header, tensor data) of a safetensors file: 8 bytes of header length, the JSON header, the data."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def safetensors_bytes(header, data: bytes) -> bytes:
    return safetensors_text(json.dumps(header), data)


def safetensors_text(header: str, data: bytes) -> bytes:
    """A safetensors file of a header given as JSON text (which may be RAW_JSON)."""
    encoded = header.encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


def load_changed_hf_folder(folder: Path, name: str, content: bytes | None):
    """`load_hf_state_dict` (which checks the folder with check_hf_folder first) of a copy of `folder`
    with file `name` replaced by `content` (None: deleted): the args and state dict, or the UserError."""
    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(scratch, "hf")
        shutil.copytree(folder, copy)
        if content is None:
            (copy / name).unlink()
        else:
            (copy / name).write_bytes(content)
        result = reader_outcome(lambda: load_hf_state_dict(copy), UserError)
    if not isinstance(result, UserError):
        args, state_dict = result
        assert {k: tuple(t.shape) for k, t in state_dict.items()} == expected_shapes(args)
    return result


@fixed_budget(120)
@given(st.data())
def test_hf_folder_with_a_damaged_or_missing_file(hf_folders, data):
    layout = data.draw(st.sampled_from(["single", "sharded"]), label="layout")
    folder = hf_folders[layout]
    names = sorted(path.name for path in folder.iterdir() if path.name != "generation_config.json")
    name = data.draw(st.sampled_from(names), label="file")
    original = (folder / name).read_bytes()
    edits = [mutated(original), any_bytes(), st.none()]
    if name.endswith(".safetensors"):  # a valid header length and JSON, wrong contents: reaches safetensors' checks
        header, tensors = safetensors_parts(folder / name)
        edits.append(json_mutated(header).map(lambda changed: safetensors_bytes(changed, tensors)))
    elif name.endswith(".json"):
        edits.append(json_mutated(json.loads(original)).map(lambda changed: json.dumps(changed).encode()))
    content = data.draw(st.one_of(edits), label="content")
    load_changed_hf_folder(folder, name, content)


def test_edge_values_for_every_part_of_safetensors_headers_and_index(hf_folders):
    # The random edits above seldom pair a part with the value that breaks it; this table pairs all:
    # the first tensor's dtype, shape and offsets set to each edge value or renamed to each edge text,
    # and likewise the first entry of the shards' index.
    single, sharded = hf_folders["single"] / SINGLE_FILE, hf_folders["sharded"] / INDEX_FILE
    header, tensors = safetensors_parts(single)
    index = json.loads(sharded.read_text())
    first_tensor = next(name for name in header if name != "__metadata__")
    first_entry = next(iter(index["weight_map"]))
    cases = []
    for value in EDGE_JSON_TEXTS:
        for part in ("dtype", "shape", "data_offsets"):
            changed = json_members({**header, first_tensor: json_object_text({**json_members(header[first_tensor]),
                                                                              part: value})})
            content = safetensors_text(json_object_text(changed), tensors)
            cases.append((f"{SINGLE_FILE} {part}: {shorten(value)}",
                          lambda c=content: load_changed_hf_folder(single.parent, SINGLE_FILE, c), ()))
        weight_map = json_object_text({**json_members(index["weight_map"]), first_entry: value})
        content = json_object_text({**json_members(index), "weight_map": weight_map}).encode()
        cases.append((f"{INDEX_FILE} weight_map entry: {shorten(value)}",
                      lambda c=content: load_changed_hf_folder(sharded.parent, INDEX_FILE, c), ()))
    for text in HOSTILE_TEXTS:
        renamed = {text if name == first_tensor else name: part for name, part in header.items()}
        content = safetensors_bytes(renamed, tensors)
        cases.append((f"{SINGLE_FILE} tensor renamed {text!r}",
                      lambda c=content: load_changed_hf_folder(single.parent, SINGLE_FILE, c), ()))
    failures = edge_failures(cases)
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_an_hf_folder_without_weights_is_one_line(hf_folders, layout):
    # The deletions above remove one file; without any weight file at all the folder names what is missing.
    weights = SINGLE_FILE if layout == "single" else INDEX_FILE
    error = load_changed_hf_folder(hf_folders[layout], weights, None)
    assert isinstance(error, CheckpointError) and f"has neither {SINGLE_FILE} nor {INDEX_FILE}" in str(error)
