"""Fuzzing the DCP readers: weights folders whose files are damaged, replaced or missing, or whose
metadata is edited, give their weights or a one-line CheckpointError (see fuzz_inputs.py for the
inputs and the budget).

Changed bytes inside tensor data may load: without checksums they cannot be told from real values
(dcp_weights.py says so), so the property is only that nothing but the project's error escapes.
"""

import dataclasses
import logging
import pickle
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

from dtcollie.dcp_weights import (MANIFEST_FILE, METADATA_FILE, load_weights_as_stored, save_model_weights,
                                  write_manifest)
from dtcollie.errors import CheckpointError

from fuzz_inputs import any_bytes, edge_failures, fixed_budget, mutated, reader_outcome, texts

generator = torch.Generator().manual_seed(0)
# A few small tensors of the dtypes a weights folder holds.
WEIGHTS = {"tok_embeddings.weight": torch.randn(8, 4, generator=generator),
           "layers.0.attention.wq.weight": torch.randn(4, 4, generator=generator).to(torch.bfloat16),
           "norm.weight": torch.ones(4), "positions": torch.arange(5)}


@pytest.fixture(scope="module", autouse=True)
def quiet_dcp_logger():
    """DCP logs each failed load at ERROR with its traceback; hundreds of expected failures would bury
    the report of a real one."""
    dcp_logger = logging.getLogger("c10d-NullHandler-dcp_logger")
    dcp_logger.disabled = True
    yield
    dcp_logger.disabled = False


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


# Values a part of DCP's metadata might hold after damage, or by design of whoever wrote it.
ODD_METADATA_VALUES = (None, -1, 2**62, "a\nb", "missing.distcp", [], {}, BytesStorageMetadata(), torch.Size([-1]),
                       torch.Size([2**62, 2**62]), torch.bool)
metadata_values = st.one_of(
    st.sampled_from(ODD_METADATA_VALUES), st.integers(-3, 8), st.sampled_from([-2**63, torch.Size([])]), texts(),
    st.lists(st.integers(-2, 6) | st.just(2**62), max_size=3).map(torch.Size),  # sizes, offsets
    st.sampled_from([torch.float32, torch.int64, torch.bfloat16, torch.complex64]))


def metadata_children(node) -> list:
    """The keys of a metadata node's parts: a dataclass's fields, a dict's keys, a list's indices.
    Tuples (torch.Size, ...) are leaves: they are replaced whole."""
    if dataclasses.is_dataclass(node):
        return [f.name for f in dataclasses.fields(node) if hasattr(node, f.name)]
    if isinstance(node, dict):
        return list(node)
    return list(range(len(node))) if isinstance(node, list) else []


def get_part(container, key):
    return getattr(container, key) if dataclasses.is_dataclass(container) else container[key]


def set_part(container, key, value):
    if dataclasses.is_dataclass(container):
        object.__setattr__(container, key, value)
    else:
        container[key] = value


def deletable(container, key) -> bool:
    """A dict entry or list item, or a dataclass attribute the object holds itself (not a class default)."""
    return not dataclasses.is_dataclass(container) or key in vars(container)


def delete_part(container, key):
    """A dataclass loses the attribute: what a damaged pickle that never sets it unpickles to."""
    if dataclasses.is_dataclass(container):
        object.__delattr__(container, key)
    else:
        del container[key]


def describe(path: list) -> str:
    return "metadata" + "".join(f".{key}" if isinstance(key, str) and key.isidentifier() and not via_dict
                                else f"[{key!r}]" for key, via_dict in path)


class EditedMetadata:
    """Pickled metadata and the edits made to it; a failing example shows the edits, not the bytes.
    (A plain class: hypothesis prints a dataclass field by field.)"""

    def __init__(self, pickled: bytes, edits: list[str]):
        self.pickled, self.edits = pickled, edits

    def __repr__(self) -> str:
        return "EditedMetadata(" + "; ".join(self.edits) + ")"


def container_of(metadata: Metadata, path: list):
    """The node holding the part at `path` ([(key, whether it is a dict key)]) and the part's key."""
    container = metadata
    for key, _ in path[:-1]:
        container = get_part(container, key)
    return container, path[-1][0]


def edit_metadata(metadata: Metadata, path: list, edit: str, value=None) -> str:
    """Apply one edit to the part of `metadata` at `path`: "replace" by `value`, "delete", or
    "rename" (a dict key) to `value`; returns its description."""
    container, key = container_of(metadata, path)
    if edit == "replace":
        set_part(container, key, value)
        return f"{describe(path)} = {value!r}"
    if edit == "delete":
        delete_part(container, key)
        return f"del {describe(path)}"
    container[value] = container.pop(key)
    return f"{describe(path)} renamed {value!r}"


@st.composite
def edited_metadata(draw, metadata: Metadata, max_edits: int = 3) -> EditedMetadata:
    """A deep copy of `metadata` with 1..max_edits parts, each found by a random walk from the root,
    replaced by one of `metadata_values`, deleted, or (a dict key) renamed to any text."""
    metadata, edits = pickle.loads(pickle.dumps(metadata)), []
    for _ in range(draw(st.integers(1, max_edits))):
        node, path = metadata, []
        while metadata_children(node) and (not path or draw(st.integers(0, 3))):
            key = draw(st.sampled_from(metadata_children(node)))
            path.append((key, isinstance(node, dict)))
            node = get_part(node, key)
        if not path:
            continue
        edits_here = ["replace", *(["delete"] if deletable(*container_of(metadata, path)) else []),
                      *(["rename"] if path[-1][1] else [])]
        edit = draw(st.sampled_from(edits_here))
        value = draw(texts() if edit == "rename" else metadata_values)
        edits.append(edit_metadata(metadata, path, edit, value))
    pickled = pickled_metadata(metadata)
    assume(pickled is not None)
    return EditedMetadata(pickled, edits)


def pickled_metadata(metadata: Metadata) -> bytes | None:
    """The metadata as DCP writes it, or None where pickling itself fails (TensorProperties pickles
    its fields by name: one deleted or of another type cannot be written, so no reader meets it)."""
    try:
        return pickle.dumps(metadata)
    except (AttributeError, KeyError, RuntimeError, TypeError):
        return None


def load_with_metadata(weights: Path, pickled: bytes):
    """The weights folder with its .metadata replaced, and a files.json that matches (so the reader
    gets past it to the metadata)."""
    def replace_metadata(folder: Path):
        (folder / METADATA_FILE).write_bytes(pickled)
        write_manifest(folder)
    return load_changed_weights(weights, replace_metadata)


@fixed_budget(120)
@given(st.data())
def test_dcp_folder_with_edited_metadata(weights, data):
    # The allow-list unpickler reads these (they hold only allowed types): the damage reaches the code
    # that trusts the metadata's structure.
    edited = data.draw(edited_metadata(pickle.loads((weights / METADATA_FILE).read_bytes())), label="metadata")
    load_with_metadata(weights, edited.pickled)


def part_of_each_kind(node, path=()) -> list[list]:
    """The path to every part of the metadata tree, taking only the first entry of each dict and list
    (the others are of the same kind)."""
    keys = metadata_children(node)
    if not dataclasses.is_dataclass(node):
        keys = keys[:1]
    paths = []
    for key in keys:
        step = [*path, (key, isinstance(node, dict))]
        paths += [step, *part_of_each_kind(get_part(node, key), step)]
    return paths


def test_edge_values_for_every_kind_of_metadata_part(weights):
    # The random edits above seldom pair a part with the value that breaks it; this table pairs all.
    seed = pickle.loads((weights / METADATA_FILE).read_bytes())
    paths = part_of_each_kind(seed)
    assert len(paths) >= 20
    cases = []
    for path in paths:
        deletion = [("delete", None)] if deletable(*container_of(seed, path)) else []
        for edit, value in [*deletion, *(("replace", value) for value in ODD_METADATA_VALUES)]:
            metadata = pickle.loads(pickle.dumps(seed))
            label = edit_metadata(metadata, path, edit, value)
            pickled = pickled_metadata(metadata)
            if pickled is not None:
                cases.append((label, lambda p=pickled: load_with_metadata(weights, p), ()))
    assert len(cases) >= 10 * len(paths)
    failures = edge_failures(cases)
    assert not failures, "\n".join(failures)
