"""ParallelDims: the layout sizes, checked, and the one DeviceMesh every process group comes from."""

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from dtcollie.config import Parallelism
from dtcollie.errors import ConfigError
from dtcollie.torch_private import flatten_mesh

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


@dataclass(frozen=True)
class ParallelDims:
    pp: int
    dp_replicate: int
    dp_shard: int
    tp: int

    @classmethod
    def from_config(cls, cfg: Parallelism, world_size: int) -> "ParallelDims":
        """Resolve dp_shard = -1 and check that the product of the sizes is the world size."""
        fixed = cfg.pp * cfg.dp_replicate * cfg.tp
        dp_shard = cfg.dp_shard
        if dp_shard == -1:
            if world_size % fixed:
                raise ConfigError(f"world size {world_size} is not divisible by pp {cfg.pp} x dp_replicate "
                                  f"{cfg.dp_replicate} x tp {cfg.tp} = {fixed}, so dp_shard = -1 cannot fill it")
            dp_shard = world_size // fixed
        if dp_shard == 0:
            raise ConfigError("parallelism.dp_shard = 0 is not allowed; use -1 (the rest) or a size >= 1")
        if fixed * dp_shard != world_size:
            raise ConfigError(f"pp {cfg.pp} x dp_replicate {cfg.dp_replicate} x dp_shard {dp_shard} x tp {cfg.tp} = "
                              f"{fixed * dp_shard}, but the world size is {world_size}; the product must equal it")
        return cls(pp=cfg.pp, dp_replicate=cfg.dp_replicate, dp_shard=dp_shard, tp=cfg.tp)

    @property
    def world_size(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.tp

    @property
    def dp(self) -> int:
        """Data-parallel degree: ranks that see different data."""
        return self.dp_replicate * self.dp_shard

    def describe(self) -> str:
        return " x ".join(f"{name} {getattr(self, name)}" for name in MESH_DIMS if getattr(self, name) > 1) or "1 process"

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """One mesh with all four named dims (size-1 dims included, so code can always index them)."""
        return init_device_mesh(device_type, tuple(getattr(self, name) for name in MESH_DIMS),
                                mesh_dim_names=MESH_DIMS)


def data_parallel_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """dp_replicate x dp_shard flattened into one `dp` dim, for data loading and loss sums. Keep the
    result: torch deprecates slicing a flattened dim from the root mesh (mesh["dp"])."""
    return flatten_mesh(mesh["dp_replicate", "dp_shard"], "dp")
