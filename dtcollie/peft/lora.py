"""LoRA (Hu et al., arXiv 2106.09685) for the dtcollie Llama: adapter modules, apply, init, merge.

`apply_lora` swaps target projections for `LoRALinear`, which keeps the frozen base weight under its
original name (`layers.0.attention.wq.weight`), so base checkpoints load unchanged, and adds
`lora_a` / `lora_b` beside it. It works on the meta device: after `to_empty`, `init_lora` gives the
adapters their initial values (the Transformer's `init_weights` initialises only the base weights).
The forward is written with plain tensor ops, so under tensor parallelism DTensor propagates the
layouts that `dtcollie.peft.tensor_parallel` gives the adapter weights.
"""

import math
import zlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor

from dtcollie.errors import ConfigError, UserError

# Target name -> the projection's path inside a transformer block ("output" is the model's own).
TARGETS = {
    "wq": "attention.wq", "wk": "attention.wk", "wv": "attention.wv", "wo": "attention.wo",
    "w1": "feed_forward.w1", "w2": "feed_forward.w2", "w3": "feed_forward.w3",
    "output": "output",
}
LORA_SUFFIXES = (".lora_a", ".lora_b")
CHECKPOINT_WRAPPER_PART = "._checkpoint_wrapped_module"  # torch's checkpoint_wrapper inserts it in module names


@dataclass
class LoRAConfig:
    """The LoRA hyperparameters; field names equal the `[peft]` config keys."""

    rank: int = 8
    alpha: float = 16.0
    target_modules: list = field(default_factory=lambda: ["wq", "wk", "wv", "wo"])
    dropout: float = 0.0
    use_rslora: bool = False

    @property
    def scale(self) -> float:
        return lora_scale(self.rank, self.alpha, self.use_rslora)


def lora_scale(rank: int, alpha: float, use_rslora: bool) -> float:
    """alpha / rank, or alpha / sqrt(rank) for rank-stabilised LoRA (as in the peft package)."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def check_lora_config(config: LoRAConfig) -> None:
    """Refuse values LoRA cannot use, naming the `[peft]` key."""
    if config.rank < 1:
        raise ConfigError(f"peft.rank = {config.rank} must be at least 1")
    if not 0.0 <= config.dropout < 1.0:
        raise ConfigError(f"peft.dropout = {config.dropout} must be in [0, 1)")
    if not config.target_modules:
        raise ConfigError(f"peft.target_modules is empty; choose from {', '.join(TARGETS)}")
    unknown = [name for name in config.target_modules if name not in TARGETS]
    if unknown:
        raise ConfigError(f"peft.target_modules has unknown name {unknown[0]!r}; choose from {', '.join(TARGETS)}")
    if len(set(config.target_modules)) != len(config.target_modules):
        raise ConfigError(f"peft.target_modules {config.target_modules} names a projection twice")


class LoRALinear(nn.Module):
    """A linear layer plus a trainable low-rank update:
    y = x W^T + b + scale * dropout(x) A^T B^T, with W and the optional bias b frozen (the base's
    own), A [rank, in] and B [out, rank]."""

    def __init__(self, weight: nn.Parameter, rank: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, bias: nn.Parameter | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.rank, self.alpha, self.dropout, self.use_rslora = rank, alpha, dropout, use_rslora
        self.scale = lora_scale(rank, alpha, use_rslora)
        self.weight = weight
        self.weight.requires_grad_(False)
        self.register_parameter("bias", bias)
        if bias is not None:
            bias.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, device=weight.device, dtype=weight.dtype))
        self.lora_b = nn.Parameter(torch.empty(self.out_features, rank, device=weight.device, dtype=weight.dtype))
        # No random op at all without dropout (DTensor random ops have partial CPU support).
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if weight.device.type != "meta":
            self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self, generator: torch.Generator | None = None) -> None:
        """A as nn.Linear initialises its weight (Kaiming-uniform, a = sqrt(5)), B zero: the update starts at 0.

        A is drawn whole on the CPU (from `generator`) and each rank keeps its own shard of it, so a
        sharded (DTensor) A gets the same values under every layout. A is small (rank x in)."""
        full = torch.empty(self.lora_a.shape)
        nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=generator)
        full = full.to(device=self.lora_a.device, dtype=self.lora_a.dtype)
        if isinstance(self.lora_a, DTensor):
            # Adapter placements are Shard/Replicate on distinct dims: src_data_rank=None takes each
            # rank's chunk locally, with no communication.
            shard = distribute_tensor(full, self.lora_a.device_mesh, self.lora_a.placements, src_data_rank=None)
            self.lora_a.to_local().copy_(shard.to_local())
        else:
            self.lora_a.copy_(full)
        nn.init.zeros_(self.lora_b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_a), self.lora_b)
        return F.linear(x, self.weight, self.bias) + self.scale * update

    @torch.no_grad()
    def merged_linear(self) -> nn.Linear:
        """An nn.Linear holding W + scale * B A, in this module's weight Parameter (updated in place).

        With DTensor parameters B A comes out in W's layout (colwise: both Shard(0); rowwise: both
        Shard(1)), and the tensor-parallel input/output hooks move over, so a parallelised module
        keeps computing in the same layout."""
        self.weight.add_(self.scale * (self.lora_b @ self.lora_a))
        linear = nn.Linear(self.in_features, self.out_features, bias=False, device="meta")
        linear.weight, linear.bias = self.weight, self.bias
        # distribute_module registered the layout hooks on this module; nn.Module has no public
        # way to move hooks, so the dicts are shared with the replacement.
        linear._forward_pre_hooks.update(self._forward_pre_hooks)
        linear._forward_hooks.update(self._forward_hooks)
        return linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha}, dropout={self.dropout}, use_rslora={self.use_rslora}")


def target_parents(model: nn.Module, target_modules: list[str]) -> list[tuple[nn.Module, str]]:
    """(parent module, attribute) of every target projection this model (or pipeline stage) holds."""
    found = []
    for name in target_modules:
        if name == "output":
            if model.output is not None:
                found.append((model, "output"))
            continue
        parent_path, _, attribute = TARGETS[name].rpartition(".")
        found += [(block.get_submodule(parent_path), attribute) for block in model.layers.values()]
    return found


def apply_lora(model: nn.Module, rank: int, alpha: float, target_modules: list[str], dropout: float = 0.0,
               use_rslora: bool = False) -> None:
    """Freeze every parameter of `model` (a Transformer or a pipeline stage of one) and put a LoRA
    adapter on each target projection, in place. Parts a stage does not hold are skipped."""
    config = LoRAConfig(rank, alpha, list(target_modules), dropout, use_rslora)
    check_lora_config(config)
    if "output" in target_modules and model.args.tie_embeddings:
        raise ConfigError("peft.target_modules cannot include 'output' for a model with tied embeddings "
                          "(the output projection is the embedding)")
    parents = target_parents(model, config.target_modules)
    if any(isinstance(getattr(parent, attribute), LoRALinear) for parent, attribute in parents):
        raise UserError("apply_lora: the model already has LoRA adapters")
    model.requires_grad_(False)
    for parent, attribute in parents:
        base = getattr(parent, attribute)
        setattr(parent, attribute, LoRALinear(base.weight, rank, alpha, dropout, use_rslora, base.bias))


def lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """(qualified name, module) of every LoRALinear in `model`."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoRALinear)]


def init_lora(model: nn.Module, seed: int = 0) -> None:
    """Initialise every adapter (A Kaiming-uniform, B zero), e.g. after `to_empty` from the meta device.

    Each adapter's A comes from a generator seeded by `seed` and the module's name (without the
    activation-checkpoint wrapper's part), so it is the same whatever the layout or pipeline split."""
    for name, module in lora_modules(model):
        name = name.replace(CHECKPOINT_WRAPPER_PART, "")
        module.reset_lora_parameters(torch.Generator().manual_seed(seed * 2**32 + zlib.crc32(name.encode())))


def lora_config(model: nn.Module) -> LoRAConfig:
    """The LoRA hyperparameters of a model with adapters; target_modules lists the adapted projections."""
    modules = lora_modules(model)
    if not modules:
        raise UserError("the model has no LoRA adapters; call apply_lora first")
    first = modules[0][1]
    targets = {name.rpartition(".")[2] for name, _ in modules}
    return LoRAConfig(first.rank, first.alpha, [t for t in TARGETS if t in targets], first.dropout, first.use_rslora)


def merge_lora(model: nn.Module) -> None:
    """Fold each adapter into its base weight (W += scale * B A) and put back a plain nn.Linear, in place.

    Plain and tensor-parallel (DTensor) parameters are supported; an FSDP-sharded model is not
    (FSDP tracks its modules' parameters): merge a gathered state dict instead (`merge_lora_state_dict`).
    The merged weights stay frozen, as apply_lora left them."""
    if any(isinstance(module, FSDPModule) for module in model.modules()):
        raise UserError("merge_lora cannot merge an FSDP-sharded model; merge its full state dict with "
                        "merge_lora_state_dict (or tools/export_lora.py --merge-into)")
    for name, module in lora_modules(model):
        parent_path, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent_path), attribute, module.merged_linear())


def is_lora_key(name: str) -> bool:
    return name.endswith(LORA_SUFFIXES)


def merge_lora_state_dict(state_dict: dict[str, torch.Tensor], config: LoRAConfig) -> dict[str, torch.Tensor]:
    """A state dict without adapters: each `X.weight` with `X.lora_a`/`X.lora_b` becomes W + scale * B A,
    computed in float32 and stored in W's dtype. The input is not modified."""
    merged = {name: tensor for name, tensor in state_dict.items() if not is_lora_key(name)}
    for name in state_dict:
        if name.endswith(".lora_a"):
            prefix = name.removesuffix(".lora_a")
            weight = merged[f"{prefix}.weight"]
            update = state_dict[f"{prefix}.lora_b"].float() @ state_dict[name].float()
            merged[f"{prefix}.weight"] = (weight.float() + config.scale * update).to(weight.dtype)
    return merged
