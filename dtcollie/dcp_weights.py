"""Model weights in torch.distributed.checkpoint (DCP) folders.

The DCP keys are the model's own state_dict keys at the top level; a tied model stores only
`tok_embeddings.weight`. DCP reshards on load, so one folder loads into a single-process model or a
DTensor-parallel one, and `copy_` into the target casts, so a bf16 folder loads into an fp32 model.

DCP's `.metadata` file is a pickle. It is read here with an allow-list unpickler, so a crafted
checkpoint cannot run code; DCP itself reads tensor data with `torch.load(weights_only=True)`, and
only tensors are ever requested because the keys are checked against the model first.

Every folder dtcollie writes also lists DCP's files in it (`.metadata`, `*.distcp`) and their sizes
in `files.json`, written once the folder is complete; readers check it first, so a truncated or
missing file is named before DCP reads anything. Corruption DCP meets while reading (a garbled
pickle, short data) becomes a CheckpointError naming the folder too. (The sizes catch truncation;
changed bytes inside a tensor's data are not detectable without checksums, which would cost a full
read of every checkpoint.)
"""

import contextlib
import json
import math
import pickle
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.tensor import DTensor, distribute_tensor

from dtcollie.errors import CheckpointError

METADATA_FILE = ".metadata"
MANIFEST_FILE = "files.json"  # each DCP file of the folder and its size in bytes, written when it is complete
MAX_LISTED = 5  # mismatched keys named in one error message
MAX_ELEMENTS = 2**48  # no real tensor is larger; a size past it is corruption, refused before allocating

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
SAFE_METADATA_GLOBALS = {
    *((_DCP_METADATA, name) for name in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                          "TensorProperties", "ChunkStorageMetadata", "MetadataIndex",
                                          "StorageMeta", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # maps a layout name such as 'torch.strided' to the layout
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


def model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state_dict under stored names: a tied output projection is the embedding, so it
    is left out, or, on a pipeline stage holding the output but not the embedding, stored as the
    `tok_embeddings.weight` it is a copy of (dtcollie.parallel.tied); see `stored_name`."""
    state_dict = model.state_dict()
    if "tok_embeddings.weight" in state_dict and is_tied(model):
        state_dict.pop("output.weight", None)
    return {stored_name(model, name): tensor for name, tensor in state_dict.items()}


def copy_full_tensors(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy whole tensors (under stored names) into `model`'s parameters and buffers that `state`
    holds; a DTensor takes its own shard. Every rank holds the whole tensor, so each slices locally:
    no communication."""
    with torch.no_grad():
        for name, param in model_state_dict(model).items():
            if name not in state:
                continue
            full = state[name].to(device=param.device, dtype=param.dtype)
            if isinstance(param, DTensor):
                full = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
                param = param.to_local()
            param.copy_(full)


def is_tied(model: nn.Module) -> bool:
    return getattr(getattr(model, "args", None), "tie_embeddings", False)


def stored_name(model: nn.Module, name: str) -> str:
    """The checkpoint key of `model`'s parameter `name`: its own, but the embedding's for the output
    copy of a tied model on a pipeline stage without the embedding."""
    if name.startswith("output.weight") and is_tied(model) and model.tok_embeddings is None:
        return "tok_embeddings.weight" + name.removeprefix("output.weight")
    return name


def check_shapes(found: dict[str, tuple | None], expected: dict[str, tuple], source: str,
                 allow_unexpected: bool = False) -> None:
    """Refuse missing, unexpected (unless allowed) or mis-shaped tensors, naming the first few of each.

    `found` maps names to shapes; None marks an entry that is not a tensor.
    """
    missing = [name for name in expected if name not in found]
    unexpected = [] if allow_unexpected else [name for name in found if name not in expected]
    wrong = [f"{name} (checkpoint {_shape(found[name])}, model {list(expected[name])})"
             for name in expected if name in found and _shape(found[name]) != list(expected[name])]
    problems = [f"{label}: {first_names(names)}" for label, names in
                (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)) if names]
    if problems:
        raise CheckpointError(f"{source} does not match the model; " + "; ".join(problems))


def _shape(shape: tuple | None) -> list | str:
    return "not a tensor" if shape is None else list(shape)


def first_names(names: list[str]) -> str:
    """The first MAX_LISTED names, and how many more."""
    more = f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else ""
    return ", ".join(names[:MAX_LISTED]) + more


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata and nothing else: any other global is refused."""

    def find_class(self, module: str, name: str):
        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in SAFE_METADATA_GLOBALS or is_dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose metadata is read with the allow-list unpickler instead of `pickle.load`."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        # Same steps as FileSystemReader.read_metadata, with the unpickler swapped.
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            metadata = _MetadataUnpickler(stream).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def read_checkpoint_metadata(folder: str | Path) -> Metadata:
    """The DCP metadata of `folder`; a missing or unreadable one is a CheckpointError."""
    folder = Path(folder)
    if not (folder / METADATA_FILE).is_file():
        what = "does not exist" if not folder.exists() else f"has no {METADATA_FILE} (not a DCP checkpoint)"
        raise CheckpointError(f"checkpoint folder {folder} {what}")
    check_manifest(folder)
    try:
        metadata = SafeFileSystemReader(folder).read_metadata()
    except Exception as err:  # corrupt bytes can make the unpickler raise anything
        raise CheckpointError(f"checkpoint {folder / METADATA_FILE} is unreadable: {one_line(err)}") from None
    entries = getattr(metadata, "state_dict_metadata", None)
    if not isinstance(metadata, Metadata) or not isinstance(entries, dict):
        raise CheckpointError(f"checkpoint {folder / METADATA_FILE} does not hold DCP metadata")
    malformed = [key for key, entry in entries.items() if not well_formed(entry)]
    if malformed:
        raise CheckpointError(f"checkpoint {folder / METADATA_FILE} describes entries no tensor can have: "
                              f"{first_names([repr(key) for key in malformed])}")
    return metadata


def well_formed(entry) -> bool:
    """A byte entry, or a tensor entry with a dtype and a size of non-negative ints of at most
    MAX_ELEMENTS elements in all (what readers allocate before DCP reads the data)."""
    if isinstance(entry, BytesStorageMetadata):
        return True
    if not isinstance(entry, TensorStorageMetadata):
        return False
    size, dtype = getattr(entry, "size", None), getattr(getattr(entry, "properties", None), "dtype", None)
    return (isinstance(size, torch.Size) and all(type(n) is int and n >= 0 for n in size)
            and math.prod(size) <= MAX_ELEMENTS and isinstance(dtype, torch.dtype))


def write_manifest(folder: str | Path) -> None:
    """List the complete folder's DCP files and their sizes in files.json (see the module doc)."""
    folder = Path(folder)
    files = {p.name: p.stat().st_size for p in sorted([folder / METADATA_FILE, *folder.glob("*.distcp")])}
    (folder / MANIFEST_FILE).write_text(json.dumps(files, indent=1) + "\n")


def check_manifest(folder: Path) -> None:
    """Refuse a folder whose files differ from its files.json. Folders written before files.json
    existed, or by other tools, have none and are read as they are."""
    path = folder / MANIFEST_FILE
    if not path.is_file():
        return
    try:
        files = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise CheckpointError(f"checkpoint {path} is unreadable: {one_line(err)}") from None
    if not (isinstance(files, dict) and all(Path(name).name == name and type(size) is int
                                            for name, size in files.items())):
        raise CheckpointError(f"checkpoint {path} is not a list of file sizes; the folder was changed by hand")
    for name, size in files.items():
        if not (folder / name).is_file():
            raise CheckpointError(f"checkpoint {folder} is incomplete: {name} is missing")
        found = (folder / name).stat().st_size
        if found != size:
            raise CheckpointError(f"checkpoint {folder / name} has {found:,} bytes, but {MANIFEST_FILE} says "
                                  f"{size:,}: it is truncated or was changed")


def first_failure(err: BaseException) -> tuple[int | None, BaseException]:
    """(rank, exception) of the lowest failing rank of DCP's CheckpointException, which gathers every
    rank's; (None, err) for any other exception."""
    if isinstance(err, CheckpointException) and err.failures:
        rank = min(err.failures)
        return rank, err.failures[rank][0]
    return None, err


def one_line(err: BaseException) -> str:
    """An exception as one line: DCP's CheckpointException by the first failing rank's exception."""
    rank, inner = first_failure(err)
    if rank is not None:
        return f"rank {rank}: {one_line(inner)}"
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 300 else text[:300] + "..."


def checkpoint_shapes(metadata: Metadata) -> dict[str, tuple | None]:
    """Key -> global shape for tensors, None for anything else stored."""
    return {key: tuple(entry.size) if isinstance(entry, TensorStorageMetadata) else None
            for key, entry in metadata.state_dict_metadata.items()}


@contextlib.contextmanager
def single_process_dcp():
    """DCP warns on every call without a process group; on one process that is the intended use."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is .*single process")
        yield


def _no_dist() -> bool:
    return not (dist.is_available() and dist.is_initialized())


def save_model_weights(model_or_state_dict: nn.Module | dict, folder: str | Path) -> None:
    """Save a model's weights (or a dtcollie-named state dict, as given) as a DCP folder."""
    if isinstance(model_or_state_dict, nn.Module):
        state_dict = model_state_dict(model_or_state_dict)
    else:
        state_dict = dict(model_or_state_dict)
    Path(folder).mkdir(parents=True, exist_ok=True)
    with single_process_dcp():
        dcp.save(state_dict, storage_writer=FileSystemWriter(folder), no_dist=_no_dist())
    if _no_dist() or dist.get_rank() == 0:  # dcp.save returns once every rank's files are written
        write_manifest(folder)


def load_model_weights(model: nn.Module | list[nn.Module], folder: str | Path, reference: nn.Module | None = None) -> None:
    """Load a DCP folder into `model` in place, after checking keys and shapes match exactly.

    `model` may be the list of pipeline stages one rank holds; then `reference` is the unsplit
    (meta) model that the checkpoint must match, and each stage loads its own keys, all in one DCP
    call so every rank makes the same collective calls. DTensor parameters load their shards."""
    parts = model if isinstance(model, list) else [model]
    expected = model_state_dict(reference if reference is not None else parts[0])
    check_shapes(checkpoint_shapes(read_checkpoint_metadata(folder)),
                 {name: tuple(t.shape) for name, t in expected.items()}, f"checkpoint {folder}")
    # Only the reference's keys: a LoRA model loads its base weights and keeps its fresh adapters.
    dcp_load({name: t for part in parts for name, t in model_state_dict(part).items() if name in expected}, folder)


TRAINING_MODEL_PREFIX = "model."  # a training checkpoint (dtcollie.checkpointer) stores its weights under it


def stored_model_entries(metadata: Metadata) -> dict[str, str]:
    """Model weight name -> stored key: every entry of a weights folder, or a training checkpoint's
    `model.*` entries (its optimizer state and the rest are not weights)."""
    keys = metadata.state_dict_metadata
    if "step" not in keys:
        return {key: key for key in keys}
    return {key.removeprefix(TRAINING_MODEL_PREFIX): key for key in keys if key.startswith(TRAINING_MODEL_PREFIX)}


def stored_model_shapes(folder: str | Path) -> dict[str, tuple | None]:
    """Weight name -> shape of a weights folder or training checkpoint (see stored_model_entries)."""
    metadata = read_checkpoint_metadata(folder)
    shapes = checkpoint_shapes(metadata)
    return {name: shapes[key] for name, key in stored_model_entries(metadata).items()}


def load_weights_as_stored(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every weight of a DCP folder (or a training checkpoint's weights), on CPU, in the dtype it
    was saved in (for conversion tools)."""
    metadata = read_checkpoint_metadata(folder)
    entries = stored_model_entries(metadata)
    shapes = checkpoint_shapes(metadata)
    not_tensors = [name for name, key in entries.items() if shapes[key] is None]
    if not_tensors:
        raise CheckpointError(f"checkpoint {folder} holds non-tensor entries: {first_names(not_tensors)}")
    stored = {key: torch.empty(metadata.state_dict_metadata[key].size,
                               dtype=metadata.state_dict_metadata[key].properties.dtype) for key in entries.values()}
    dcp_load(stored, folder)
    return {name: stored[key] for name, key in entries.items()}


def dcp_load(state_dict: dict, folder: str | Path, no_dist: bool | None = None) -> None:
    """DCP-load `folder` into `state_dict` in place; corrupt or truncated data is a CheckpointError.
    `no_dist` defaults to whether there is no process group."""
    try:
        with single_process_dcp():
            dcp.load(state_dict, storage_reader=SafeFileSystemReader(folder),
                     no_dist=_no_dist() if no_dist is None else no_dist)
    except (Exception, CheckpointException) as err:  # the keys and shapes were checked: this is the data
        raise CheckpointError(f"checkpoint {folder} has a corrupt or truncated data file ({one_line(err)}); "
                              f"restore the folder from a copy, or use another checkpoint") from None


def prepare_output_folder(folder: str | Path, force: bool, patterns: tuple[str, ...]) -> None:
    """Create `folder`, refusing a non-empty one unless `force`; with `force`, first delete the files
    matching `patterns` (what the writer itself produces), so no stale shard outlives the overwrite."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"output path {folder} exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()):
        if not force:
            raise CheckpointError(f"output folder {folder} is not empty; choose a new folder or overwrite "
                                  f"it with --force")
        for pattern in patterns:
            for path in folder.glob(pattern):
                if path.is_file():
                    path.unlink()
    folder.mkdir(parents=True, exist_ok=True)
