"""Hardware profiles for the planner: a GPU's peak, memory and links, one TOML file each.

The bundled profiles live in `dtcollie/planner/hardware/<name>.toml`; every number there carries a
comment saying where it comes from (docs/planner_time_model.md collects them). A user's own TOML file
with the same keys loads the same way, so a measured box (nccl-tests, a matmul benchmark) can replace
the published figures. Every problem with a file is one `ConfigError` line naming the file and key.
"""

import difflib
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from dtcollie.config import read_toml_file
from dtcollie.errors import ConfigError, shown

PROFILE_FOLDER = Path(__file__).resolve().parent / "hardware"


def documented(doc: str):
    """A required field with its one-line doc (shown when the key is missing or wrong)."""
    return field(metadata={"doc": doc})


@dataclass(frozen=True)
class Hardware:
    name: str = documented("short name of the profile")
    description: str = documented("what box this describes: GPU, links, NICs")
    peak_tflops: float = documented("dense bf16 tensor-core peak with FP32 accumulate, TFLOPS per GPU (no sparsity)")
    efficiency: float = documented("fraction of peak_tflops a well-tuned training step's compute reaches, in (0, 1]")
    memory_gib: float = documented("GPU memory the driver reports, GiB")
    reserved_gib: float = documented("memory training cannot use (CUDA context, NCCL buffers, fragmentation), GiB")
    intra_node_gbps: float = documented("NCCL bus bandwidth per GPU inside one node, GB/s (1 GB = 1e9 bytes)")
    inter_node_gbps: float = documented("NCCL bus bandwidth per GPU between nodes, GB/s (1 GB = 1e9 bytes)")
    intra_node_latency_us: float = documented("latency of one ring step inside a node, microseconds")
    inter_node_latency_us: float = documented("latency of one ring step between nodes, microseconds")


KEYS = {f.name: f for f in fields(Hardware)}


def bundled_names() -> tuple[str, ...]:
    return tuple(sorted(path.stem for path in PROFILE_FOLDER.glob("*.toml")))


def load_hardware(name_or_path: str) -> Hardware:
    """A bundled profile by name (`h100_sxm`), or a user's TOML file by path; checked."""
    if name_or_path in bundled_names():
        return read_profile(PROFILE_FOLDER / f"{name_or_path}.toml")
    path = Path(name_or_path)
    if path.suffix == ".toml" or len(path.parts) > 1 or path.is_file():
        return read_profile(path)
    raise ConfigError(f"unknown hardware profile {name_or_path!r}; choose one of {', '.join(bundled_names())}, "
                      f"or give the path of a .toml file with the same keys")


def read_profile(path: Path) -> Hardware:
    data = read_toml(path)
    for name in data:
        if name not in KEYS:
            close = difflib.get_close_matches(name, KEYS, n=1)
            hint = f"; did you mean {close[0]}?" if close else f"; the keys are {', '.join(KEYS)}"
            raise ConfigError(f"hardware profile {path}: unknown key {name!r}{hint}")
    for name, f in KEYS.items():
        if name not in data:
            raise ConfigError(f"hardware profile {path}: missing key {name} ({f.metadata['doc']})")
        check_value(path, name, data[name], f.type)
    hardware = Hardware(**{name: value if KEYS[name].type is str else float(value) for name, value in data.items()})
    if hardware.efficiency > 1:
        raise ConfigError(f"hardware profile {path}: efficiency = {hardware.efficiency} is a fraction of peak; "
                          f"it must be at most 1")
    if hardware.reserved_gib >= hardware.memory_gib:
        raise ConfigError(f"hardware profile {path}: reserved_gib = {hardware.reserved_gib} leaves nothing of "
                          f"memory_gib = {hardware.memory_gib}")
    return hardware


def read_toml(path: Path) -> dict:
    return read_toml_file(path, "hardware profile")


def check_value(path: Path, name: str, value, kind: type) -> None:
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"hardware profile {path}: {name} = {shown(value)} must be a string")
        return
    # bool is an int to Python, never a number here; TOML allows inf and nan, which no link or GPU has.
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not is_number or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"hardware profile {path}: {name} = {shown(value)} must be a positive finite number "
                          f"({KEYS[name].metadata['doc']})")
