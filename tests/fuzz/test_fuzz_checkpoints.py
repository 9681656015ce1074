"""Fuzzing the checkpoint readers: DCP weights folders and Hugging Face folders whose files are
damaged, replaced or missing give their weights or a one-line UserError (see fuzz_inputs.py for the
inputs and the budget).

Changed bytes inside tensor data may load: without checksums they cannot be told from real values
(dcp_weights.py says so), so the property is only that nothing but the project's error escapes.
"""

import dataclasses
import json
import pickle
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

from dtcollie.dcp_weights import (MANIFEST_FILE, METADATA_FILE, load_weights_as_stored, save_model_weights,
                                  write_manifest)
from dtcollie.errors import CheckpointError, ConfigError, UserError
from dtcollie.models.hf import (CONFIG_FILE, INDEX_FILE, MODEL_ARGS_FILE, SINGLE_FILE, expected_shapes,
                                load_hf_state_dict, load_model_args, save_model_args)
from dtcollie.models.llama import ModelArgs

from fuzz_inputs import (any_bytes, fixed_budget, json_mutated, json_object_text, json_texts, mutated,
                         reader_outcome, texts)

generator = torch.Generator().manual_seed(0)
# A few small tensors of the dtypes a weights folder holds.
WEIGHTS = {"tok_embeddings.weight": torch.randn(8, 4, generator=generator),
           "layers.0.attention.wq.weight": torch.randn(4, 4, generator=generator).to(torch.bfloat16),
           "norm.weight": torch.ones(4), "positions": torch.arange(5)}


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("weights")
    save_model_weights(WEIGHTS, folder)
    return folder


def load_changed_weights(weights: Path, change):
    """`load_weights_as_stored` of a copy of the weights folder after `change(folder)`: the state
    dict (of tensors) or the CheckpointError."""
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch, "weights")
        shutil.copytree(weights, folder)
        change(folder)
        result = reader_outcome(lambda: load_weights_as_stored(folder), CheckpointError)
    if not isinstance(result, CheckpointError):
        assert isinstance(result, dict) and all(isinstance(t, torch.Tensor) for t in result.values()), result
    return result


def test_the_valid_seed_weights_load(weights):
    # The damage below is done to this folder; it must load whole, or only errors are tested.
    loaded = load_changed_weights(weights, lambda folder: None)
    assert loaded.keys() == WEIGHTS.keys()
    assert all(torch.equal(loaded[name], tensor) and loaded[name].dtype == tensor.dtype
               for name, tensor in WEIGHTS.items())


def dcp_files(weights: Path) -> list[str]:
    return sorted(path.name for path in weights.iterdir())


@fixed_budget(120)
@given(st.data())
def test_dcp_folder_with_a_damaged_or_missing_file(weights, data):
    name = data.draw(st.sampled_from(dcp_files(weights)), label="file")
    original = (weights / name).read_bytes()
    content = data.draw(st.one_of(mutated(original), mutated(original, edits=("flip",)), any_bytes(),
                                  st.none()), label="content")  # None: the file is deleted
    # Without files.json (folders of other tools have none) every damage reaches DCP's own reading.
    keep_manifest = data.draw(st.booleans(), label="keep files.json")

    def damage(folder: Path):
        if content is None:
            (folder / name).unlink()
        else:
            (folder / name).write_bytes(content)
        if not keep_manifest and name != MANIFEST_FILE:
            (folder / MANIFEST_FILE).unlink()
    load_changed_weights(weights, damage)


# Values a field of DCP's metadata might hold after damage or by design of whoever wrote it.
metadata_values = st.one_of(
    st.none(), st.integers(-3, 8), st.sampled_from([2**62, -2**63]), texts(), st.just([]), st.just({}),
    st.builds(BytesStorageMetadata),
    st.lists(st.integers(-2, 6) | st.just(2**62), max_size=3).map(torch.Size),  # sizes, offsets
    st.sampled_from([torch.float32, torch.int64, torch.bfloat16, torch.bool, torch.complex64, torch.float8_e4m3fn]))


def metadata_children(node) -> list:
    """(container, key) of each part of a metadata node: a dataclass's fields, a dict's values, a
    list's items. Tuples (torch.Size, ...) are leaves: they are replaced whole."""
    if dataclasses.is_dataclass(node):
        return [(node, f.name) for f in dataclasses.fields(node)]
    if isinstance(node, dict):
        return [(node, key) for key in node]
    return [(node, index) for index in range(len(node))] if isinstance(node, list) else []


def get_part(container, key):
    return getattr(container, key) if dataclasses.is_dataclass(container) else container[key]


def set_part(container, key, value):
    if dataclasses.is_dataclass(container):
        object.__setattr__(container, key, value)
    else:
        container[key] = value


@dataclasses.dataclass
class EditedMetadata:
    """Metadata and the edits made to it; a failing example shows the edits, not the whole tree."""
    metadata: Metadata
    edits: list[str]

    def __repr__(self) -> str:
        return "EditedMetadata(" + "; ".join(self.edits) + ")"


@st.composite
def edited_metadata(draw, metadata: Metadata, max_edits: int = 3) -> EditedMetadata:
    """A deep copy of `metadata` with 1..max_edits parts, each found by a random walk from the root,
    replaced by one of `metadata_values`, or, in a dict, deleted or renamed to any text."""
    metadata, edits = pickle.loads(pickle.dumps(metadata)), []
    for _ in range(draw(st.integers(1, max_edits))):
        container, key, node, path = None, None, metadata, "metadata"
        while metadata_children(node) and (container is None or draw(st.integers(0, 3))):
            container, key = draw(st.sampled_from(metadata_children(node)))
            node = get_part(container, key)
            path += f".{key}" if dataclasses.is_dataclass(container) else f"[{key!r}]"
        edit = draw(st.sampled_from(["replace", "delete", "rename"]) if isinstance(container, dict) else
                    st.just("replace"))
        if edit == "replace":
            value = draw(metadata_values)
            set_part(container, key, value)
            edits.append(f"{path} = {value!r}")
        elif edit == "delete":
            del container[key]
            edits.append(f"del {path}")
        else:
            new_key = draw(texts())
            container[new_key] = container.pop(key)
            edits.append(f"{path} renamed {new_key!r}")
    return EditedMetadata(metadata, edits)


@fixed_budget(120)
@given(st.data())
def test_dcp_folder_with_edited_metadata(weights, data):
    # The allow-list unpickler reads these (they hold only allowed types): the damage reaches the code
    # that trusts the metadata's structure.
    edited = data.draw(edited_metadata(pickle.loads((weights / METADATA_FILE).read_bytes())), label="metadata")

    def replace_metadata(folder: Path):
        (folder / METADATA_FILE).write_bytes(pickle.dumps(edited.metadata))
        write_manifest(folder)  # consistent sizes: the reader gets past files.json
    load_changed_weights(weights, replace_metadata)


# --- Hugging Face folders -----------------------------------------------------------------------

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


@fixed_budget(250)
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
        overrides.map(lambda changed: json_object_text({**{k: json.dumps(v) for k, v in seed.items()},
                                                        **changed}).encode())), label="content")
    read_model_args(content, name)


def safetensors_parts(path: Path) -> tuple[dict, bytes]:
    """(header, tensor data) of a safetensors file: 8 bytes of header length, the JSON header, the data."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def safetensors_bytes(header, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


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


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_an_hf_folder_without_weights_is_one_line(hf_folders, layout):
    # The deletions above remove one file; without any weight file at all the folder names what is missing.
    weights = SINGLE_FILE if layout == "single" else INDEX_FILE
    error = load_changed_hf_folder(hf_folders[layout], weights, None)
    assert isinstance(error, CheckpointError) and f"has neither {SINGLE_FILE} nor {INDEX_FILE}" in str(error)
