"""Updates fused into backward (LOMO, AdaLomo): hooks, the two-pass norm, the loss scaler, reductions.

LOMO's memory saving comes from never holding a full set of gradients: a hook registered with
`Tensor.register_post_accumulate_grad_hook` updates each parameter as soon as its gradient is
accumulated and frees that gradient at once. Anything that needs the whole model's gradients
(the global norm for clipping, the overflow check for fp16) therefore needs a first backward pass
that only measures them (`grad_norm`), before the backward pass that updates (`fused_backward`).

Overflow and fused updates: a parameter updated before an inf/nan is seen in a later gradient
could not be rolled back. So with a loss scaler the norm pass is mandatory: it sums the squared
unscaled gradients of every parameter (reduced over the mesh and `pp_group`, so all ranks agree);
a non-finite total means an overflow somewhere, and the update pass is skipped entirely (no
parameter is touched, the scale shrinks). The second backward recomputes the same gradients from
the retained graph, so a clean first pass means a clean second pass.

DTensor parameters: elementwise work runs on local shards. Every statistic that spans a tensor
(a row mean, an RMS, a squared norm) is a local partial sum followed by an all-reduce over exactly
the mesh dims that shard the dims being reduced; a mesh dim that replicates the tensor is not
reduced, so it is counted once. `_StridedShard` (FSDP2 over TP) shards a dim like `Shard` does.
"""

import contextlib
import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.placement_types import Replicate, Shard

from dtcollie.optim.grad_norm import closure_loss, local, local_grad
from dtcollie.optim.protocol import GlobalBatch, TrainingOptimizer
from dtcollie.precision import accumulation_dtype
from dtcollie.torch_private import _StridedShard


# ---------------------------------------------------------------------------- DTensor helpers

PIECE = 2**20  # elements per piece of a chunked update: bounds its float32 temporaries


def pieces(tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Flat views of a contiguous tensor, PIECE elements each (writes go through to `tensor`)."""
    return tensor.view(-1).split(PIECE)


def sharded_dim(placement, ndim: int) -> int | None:
    """The tensor dim a placement shards (Shard or _StridedShard), or None."""
    if isinstance(placement, (Shard, _StridedShard)):
        return placement.dim % ndim
    if not isinstance(placement, Replicate):
        raise ValueError(f"fused optimizers need Shard or Replicate parameter placements, got {placement}")
    return None


def mesh_dims_sharding(tensor: torch.Tensor, dims=None) -> list[int]:
    """Mesh dims of a DTensor that shard any of tensor `dims` (all dims when None); [] for plain tensors."""
    if not isinstance(tensor, DTensor):
        return []
    ndim = tensor.dim()
    wanted = set(range(ndim)) if dims is None else {d % ndim for d in dims}
    return [i for i, pl in enumerate(tensor.placements) if sharded_dim(pl, ndim) in wanted]


def sum_over_shards(value: torch.Tensor, tensor: torch.Tensor, dims=None) -> torch.Tensor:
    """In place: sum a rank-local partial sum over the mesh dims that shard `dims` of `tensor`."""
    for mesh_dim in mesh_dims_sharding(tensor, dims):
        dist.all_reduce(value, group=tensor.device_mesh.get_group(mesh_dim))
    return value


def global_mean_square(local_value: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """Mean of squares over the full logical `tensor`, given its local shard (float32 scalar; float64
    for float64 input)."""
    dtype = accumulation_dtype(local_value.dtype)
    # In pieces: vector_norm(dtype=float32) makes a float32 copy of a whole bf16 input.
    square = sum(torch.linalg.vector_norm(piece, dtype=dtype).square() for piece in pieces(local_value.contiguous()))
    return sum_over_shards(torch.as_tensor(square, dtype=dtype, device=local_value.device), tensor) / tensor.numel()


def drop_dim_placements(param: torch.Tensor, dropped: int) -> list | None:
    """Placements of a statistic that reduced `param` over dim `dropped` (a row or column EMA).

    A mesh dim sharding the dropped dim leaves the statistic replicated (it was summed over that
    mesh dim); a mesh dim sharding another dim keeps sharding it, renumbered, so the statistic's
    local part lines up with the parameter's local rows or columns.
    """
    if not isinstance(param, DTensor):
        return None
    ndim, out = param.dim(), []
    for pl in param.placements:
        d = sharded_dim(pl, ndim)
        if d is None or d == dropped:
            out.append(Replicate())
        else:
            new = d if d < dropped else d - 1
            out.append(_StridedShard(new, split_factor=pl.split_factor) if isinstance(pl, _StridedShard)
                       else Shard(new))
    return out


def like_param(local_value: torch.Tensor, param: torch.Tensor, shape, placements=None) -> torch.Tensor:
    """Wrap a local state tensor as a DTensor on the parameter's mesh (or return it for plain params)."""
    if not isinstance(param, DTensor):
        return local_value
    shape = torch.Size(shape)
    placements = param.placements if placements is None else placements
    return DTensor.from_local(local_value, param.device_mesh, placements, run_check=False,
                              shape=shape, stride=torch.empty(shape, device="meta").stride())


class SquareNormAccumulator:
    """Sum of squared gradients over the whole model, reduced once at the end.

    Local partial sums are kept per (mesh, sharding mesh dims) so each bucket is all-reduced over
    exactly those dims; hooks fire in the same order on every rank of a mesh, so the buckets (and
    the collectives) line up. Pipeline stages hold disjoint parameters: the total is then summed
    over `pp_group`.
    """

    def __init__(self):
        self.buckets: dict = {}

    def add(self, param: torch.Tensor, square: torch.Tensor) -> None:
        """`square`: the local shard's sum of squared gradients."""
        key = (param.device_mesh, tuple(mesh_dims_sharding(param))) if isinstance(param, DTensor) else None
        if key in self.buckets:
            self.buckets[key] = (self.buckets[key][0], self.buckets[key][1] + square)
        else:
            self.buckets[key] = (param, square)

    def total(self, device, pp_group=None) -> torch.Tensor:
        squares = [square for _, square in self.buckets.values()]
        total = torch.zeros((), dtype=accumulation_dtype(*(square.dtype for square in squares)), device=device)
        for param, square in self.buckets.values():
            total += sum_over_shards(square, param).to(device)
        if pp_group is not None:
            dist.all_reduce(total, group=pp_group)
        return total


# ---------------------------------------------------------------------------- loss scaler

class DynamicLossScaler:
    """fp16 dynamic loss scale: halve on overflow, double after `window` clean steps in a row."""

    def __init__(self, init_scale: float = 2.0 ** 16, window: int = 1000, factor: float = 2.0,
                 min_scale: float = 1.0):
        self.scale, self.window, self.factor, self.min_scale = float(init_scale), window, factor, min_scale
        self.clean_steps = 0

    def update(self, overflow: bool) -> None:
        if overflow:
            self.scale = max(self.scale / self.factor, self.min_scale)
            self.clean_steps = 0
            return
        self.clean_steps += 1
        if self.clean_steps >= self.window:
            self.scale *= self.factor
            self.clean_steps = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_steps": self.clean_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.clean_steps = float(state["scale"]), int(state["clean_steps"])


# ---------------------------------------------------------------------------- the fused base

class FusedOptimizer(torch.optim.Optimizer):
    """Base of LOMO and AdaLomo: subclasses give `_update(param, grad32, group)` on local shards.

    `fused_backward(loss, lr)` runs backward with the update fused; when a global norm is needed
    (clip_grad_norm, or a loss scaler's overflow check) it first runs `grad_norm(loss)` if the
    caller has not. `step()` is for callers that ran backward themselves (reads `.grad`; gradients
    must then come from `scale_loss(loss)` when a scaler is on). Gradient accumulation over
    micro-batches is not possible with fused updates (as in the reference).
    """

    def __init__(self, model: nn.Module, defaults: dict, clip_grad_norm=None, clip_grad_value=None,
                 loss_scale: float | None = None, loss_scale_window: int = 1000, pp_group=None):
        params = [p for p in model.parameters() if p.requires_grad]
        super().__init__(params, defaults)
        self.clip_grad_norm, self.clip_grad_value, self.pp_group = clip_grad_norm, clip_grad_value, pp_group
        # A scaler only for fp16 parameters unless a scale is given (bf16/fp32 do not overflow).
        if loss_scale is None and any(p.dtype == torch.float16 for p in params):
            loss_scale = 2.0 ** 16
        self.scaler = DynamicLossScaler(loss_scale, loss_scale_window) if loss_scale else None
        self._mode = None  # None: hooks idle (user backward); "norm"; "update"
        self._norms = None
        self._clip_coef = None  # set by the norm pass, consumed by the update pass
        self._overflow = False
        self.last_grad_norm = None
        self._group_index = {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in params]

    # -- public API

    @property
    def needs_norm_pass(self) -> bool:
        return bool(self.clip_grad_norm) or self.scaler is not None

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scaler.scale if self.scaler is not None else loss

    def grad_norm(self, loss: torch.Tensor) -> torch.Tensor:
        """First pass: backward (graph retained) that only sums squared gradients, freeing each.

        Returns the global gradient norm (non-finite on overflow, after which the step is skipped).
        """
        with self.norm_pass():
            self.scale_loss(loss).backward(retain_graph=True)
        return self.last_grad_norm

    def fused_backward(self, loss: torch.Tensor, lr: float | None = None) -> bool:
        """Backward with each parameter updated as its gradient arrives; False if skipped (overflow)."""
        if lr is not None:
            for group in self.param_groups:
                group["lr"] = lr
        if self.needs_norm_pass and self._clip_coef is None and not self._overflow:
            self.grad_norm(loss)
        with self.update_pass() as applied:
            if applied:
                self.scale_loss(loss).backward()
        return applied

    @contextlib.contextmanager
    def norm_pass(self):
        """Hooks only measure during any backward inside (LOMO's first pass; under pipeline
        parallelism a whole schedule step); `last_grad_norm` holds the global norm afterwards."""
        self._norms = SquareNormAccumulator()
        self._mode = "norm"
        try:
            yield
        finally:
            self._mode = None
        self._finish_norm()

    @contextlib.contextmanager
    def update_pass(self):
        """Hooks update during any backward inside. Yields False when the norm pass found an overflow:
        the caller must then skip its backward (no parameter is touched)."""
        applied = not self._overflow
        self._mode = "update" if applied else None
        try:
            yield applied
        finally:
            self._mode = None
        self._end_step(applied=applied)

    @torch.no_grad()
    def step(self, closure=None):
        """Unfused step from `.grad` (filled by the caller's backward); gradients are freed."""
        loss = closure_loss(closure)
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if self.needs_norm_pass:
            self._norms = SquareNormAccumulator()
            for p in params:
                self._norms.add(p, self._square_sum(local_grad(p, p.grad)))
            self._finish_norm()
        if not self._overflow:
            for p in params:
                self._update(p, local_grad(p, p.grad), self._group_of(p))
        for p in params:
            p.grad = None
        self._end_step(applied=not self._overflow)
        return loss

    def remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.scaler is not None:
            state["loss_scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        scaler = state_dict.pop("loss_scaler", None)
        # torch casts floating state to the parameter dtype: keep the saved (float32) dtypes.
        saved = [state_dict["state"].get(i, {}) for g in state_dict["param_groups"] for i in g["params"]]
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for p, entries in zip(params, saved):
            for key, value in entries.items():
                if torch.is_tensor(value):
                    self.state[p][key] = self.state[p][key].to(value.dtype)
        if scaler is not None and self.scaler is not None:
            self.scaler.load_state_dict(scaler)

    # -- internals

    def _group_of(self, param):
        return self.param_groups[self._group_index[id(param)]]

    def _on_grad(self, param: torch.Tensor) -> None:
        if self._mode is None:
            return  # a backward the caller drives: leave .grad for step()
        grad, param.grad = local_grad(param, param.grad), None  # freed after this: one gradient alive at a time
        with torch.no_grad():
            if self._mode == "norm":
                self._norms.add(param, self._square_sum(grad))
            else:
                self._update(param, grad, self._group_of(param))

    def _square_sum(self, grad: torch.Tensor) -> torch.Tensor:
        """Sum of the squared unscaled gradient of a local shard, in float32 (float64) pieces."""
        return sum(self.prepared(piece, clip=False).square().sum() for piece in pieces(grad.contiguous()))

    def prepared(self, grad: torch.Tensor, clip: bool = True) -> torch.Tensor:
        """A (piece of a) local gradient as a new float32 tensor (float64 for a float64 one), unscaled,
        clipped by value and by the global norm. Subclasses call it from `_update`, on the whole
        gradient or piece by piece."""
        g = grad.to(accumulation_dtype(grad.dtype), copy=True)
        if self.scaler is not None:
            g.div_(self.scaler.scale)
        if clip and self.clip_grad_value:
            g.clamp_(-self.clip_grad_value, self.clip_grad_value)
        if clip and self.clip_grad_norm and self._clip_coef is not None:
            g.mul_(self._clip_coef)
        return g

    def _finish_norm(self) -> torch.Tensor:
        params = [p for g in self.param_groups for p in g["params"]]
        device = local(params[0]).device if params else torch.device("cpu")
        norm = self._norms.total(device, self.pp_group).sqrt()
        self._norms = None
        self.last_grad_norm = norm
        self._overflow = not bool(torch.isfinite(norm))
        if self._overflow:
            self._clip_coef = None
        elif self.clip_grad_norm:
            self._clip_coef = torch.clamp(self.clip_grad_norm / (norm + 1e-6), max=1.0)
        else:
            self._clip_coef = torch.ones((), device=device)
        return norm

    def _end_step(self, applied: bool) -> None:
        if self.scaler is not None:
            self.scaler.update(overflow=not applied)
        self._clip_coef, self._overflow = None, False

    def _update(self, param, grad, group) -> None:
        """The rule on the local shard: `grad` is the raw local gradient; see `prepared`."""
        raise NotImplementedError


# ---------------------------------------------------------------------------- under the trainer

class FusedTraining(TrainingOptimizer):
    """LOMO/AdaLomo under the trainer: the batch's backward runs with the update fused into it; with
    clipping (or a loss scaler) a first backward only measures the global norm. The grad norm
    reported is that measurement (nan when nothing needed it)."""

    @property
    def retains_graph(self) -> bool:
        return self.optimizer.needs_norm_pass

    def train_step(self, batch: GlobalBatch) -> tuple[torch.Tensor, torch.Tensor]:
        optimizer = self.optimizer
        passes = [optimizer.norm_pass, optimizer.update_pass] if optimizer.needs_norm_pass else [optimizer.update_pass]
        loss = batch.backward_passes(passes)
        norm = optimizer.last_grad_norm
        return loss, torch.tensor(math.nan) if norm is None else norm


def build_fused(optimizer_class, cfg, parts: list, max_norm: float, pp_group, **options) -> FusedTraining:
    """A fused optimizer over this rank's model parts, clipping by the global norm (two passes)."""
    module = parts[0] if len(parts) == 1 else nn.ModuleList(parts)
    optimizer = optimizer_class(module, cfg.lr, clip_grad_norm=max_norm or None,
                                clip_grad_value=cfg.clip_grad_value or None, weight_decay=cfg.weight_decay,
                                pp_group=pp_group, **options)
    return FusedTraining(optimizer, max_norm)
