"""AdaLomo: Adafactor-style adaptive updates fused into backward (Lv et al. 2023, "AdaLomo").

Per parameter, at step t (1-based, counted per parameter like Adam's `step`):

    g    = clip_by_value(grad / loss_scale) * clip_coef     (global-norm clip from the first pass)
    s    = g*g + eps1;   beta2t = 1 - t**decay_rate          (t = 1 gives beta2t = 0: EMA = s)
    matrix (ndim >= 2):  row <- beta2t*row + (1-beta2t)*mean(s, -1)
                         col <- beta2t*col + (1-beta2t)*mean(s, -2)
                         u = g / sqrt(row[..., None] * col[..., None, :] / mean(row, -1))
    vector:              v <- beta2t*v + (1-beta2t)*s;   u = g / sqrt(v)
    u   /= max(1, RMS(u) / clip_threshold)                    (grouped update normalisation)
    lr_t = lr * max(eps2, RMS(p))                             (RMS of p before this step's decay)
    p   <- p * (1 - lr_t * weight_decay) - lr_t * u

That order and decay form (decoupled, with the parameter-scaled lr) are the reference's
(`lomo-optim`'s `AdaLomo.fuse_update`). Differences: the reference always multiplies the loss by a
fixed 1024 and never checks overflow; here fp16 parameters get the dynamic scaler of `fused.py`
and other dtypes none. The reference keeps one global step counter and never checkpoints its
state; here the EMAs and steps live in `self.state[p]` and go through `state_dict()`.

DTensor parameters: row/col EMAs are DTensors whose placements follow the parameter's on the
dims they keep (see `fused.drop_dim_placements`), the vector EMA has the parameter's placements,
so DCP can save them. Each mean and RMS is a local sum all-reduced over the mesh dims sharding
the reduced dims, so every rank computes what one process would.
"""

import math

import torch
from torch import nn

from dtcollie.optim.fused import (PIECE, FusedOptimizer, build_fused, drop_dim_placements, global_mean_square,
                                  like_param, local, sum_over_shards)
from dtcollie.precision import accumulation_dtype


class AdaLomo(FusedOptimizer):
    """Usage per batch: `loss = model(...)`; `opt.fused_backward(loss, lr)` (runs the norm pass first
    when clip_grad_norm or a loss scaler needs it); or `loss.backward(); opt.step()`."""

    def __init__(self, model: nn.Module, lr: float = 1e-3, eps: tuple[float, float] = (1e-30, 1e-3),
                 clip_threshold: float = 1.0, decay_rate: float = -0.8, weight_decay: float = 0.0,
                 clip_grad_norm: float | None = None, clip_grad_value: float | None = None,
                 loss_scale: float | None = None, loss_scale_window: int = 1000, pp_group=None):
        if lr < 0 or weight_decay < 0 or clip_threshold <= 0 or decay_rate >= 0:
            raise ValueError("AdaLomo needs lr >= 0, weight_decay >= 0, clip_threshold > 0 and decay_rate < 0")
        defaults = dict(lr=lr, eps=tuple(eps), clip_threshold=clip_threshold, decay_rate=decay_rate,
                        weight_decay=weight_decay)
        super().__init__(model, defaults, clip_grad_norm, clip_grad_value, loss_scale, loss_scale_window,
                         pp_group)

    def _init_state(self, param) -> dict:
        state, p_local, shape = self.state[param], local(param), param.shape
        state["step"] = torch.zeros((), dtype=torch.float32)
        local_shape = p_local.shape
        zeros = lambda s: torch.zeros(s, dtype=accumulation_dtype(p_local.dtype), device=p_local.device)  # noqa: E731
        if param.dim() >= 2:
            state["exp_avg_sq_row"] = like_param(zeros(local_shape[:-1]), param, shape[:-1],
                                                 drop_dim_placements(param, param.dim() - 1))
            state["exp_avg_sq_col"] = like_param(zeros(local_shape[:-2] + local_shape[-1:]), param,
                                                 shape[:-2] + shape[-1:], drop_dim_placements(param, param.dim() - 2))
        else:
            state["exp_avg_sq"] = like_param(zeros(local_shape), param, shape)
        return state

    def _update(self, param, grad, group) -> None:
        state = self.state[param] if self.state[param] else self._init_state(param)
        eps1, eps2 = group["eps"]
        state["step"] += 1
        beta2t = 1.0 - float(state["step"]) ** group["decay_rate"]
        p_local = local(param)
        lr = group["lr"] * global_mean_square(p_local, param).sqrt().clamp(min=eps2)  # before this step's decay
        # Memory: no whole float32 copy of the gradient or the update. Three passes over blocks of
        # rows (statistics, the update's RMS, the update), each block converted by `prepared` afresh.
        grad_blocks = row_blocks(grad.contiguous())
        if param.dim() >= 2:
            row_factor, col_factor = self._factored_scales(param, state, grad_blocks, beta2t, eps1)
        else:
            exp_avg_sq = local(state["exp_avg_sq"])
            g32 = self.prepared(grad)
            exp_avg_sq.mul_(beta2t).add_(g32.square_().add_(eps1), alpha=1.0 - beta2t)
            row_factor, col_factor = torch.ones(1, 1, 1, device=g32.device), exp_avg_sq.rsqrt().view(1, 1, -1)

        def update_blocks():
            start = 0
            for block in grad_blocks:
                rows = slice(start, start + block.shape[1])
                start = rows.stop
                yield self.prepared(block).mul_(row_factor[:, rows]).mul_(col_factor)

        square = sum(torch.linalg.vector_norm(update).square() for update in update_blocks())
        update_rms = (sum_over_shards(square, param) / param.numel()).sqrt()
        step_size = lr / (update_rms / group["clip_threshold"]).clamp(min=1.0)
        for p_block, update in zip(row_blocks(p_local), update_blocks()):
            p32 = p_block.to(accumulation_dtype(p_block.dtype))  # float32 itself: no copy
            if group["weight_decay"]:
                p32.mul_(1.0 - lr * group["weight_decay"])
            p_block.copy_(p32.sub_(update.mul_(step_size)))

    def _factored_scales(self, param, state, grad_blocks, beta2t: float, eps1: float):
        """Update the row/column EMAs from the gradient; the factors [lead, rows, 1] and [lead, 1, cols]
        whose product is the rsqrt of the factored second moment."""
        ndim = param.dim()
        row, col = local(state["exp_avg_sq_row"]), local(state["exp_avg_sq_col"])
        lead, local_cols = grad_blocks[0].shape[0], grad_blocks[0].shape[2]
        local_rows = sum(block.shape[1] for block in grad_blocks)
        # Sums of g^2 + eps1 over the last / second-to-last dim, locally, then over the mesh dims
        # that shard that dim; divided by the full dim for the means.
        row_sum = torch.cat([torch.linalg.vector_norm(self.prepared(g), dim=-1).square() for g in grad_blocks], dim=1)
        col_sum = sum(torch.linalg.vector_norm(self.prepared(g), dim=-2).square() for g in grad_blocks)
        row_sum = row_sum.view(row.shape) + eps1 * local_cols
        col_sum = col_sum.view(col.shape) + eps1 * local_rows
        row.mul_(beta2t).add_(sum_over_shards(row_sum, param, [ndim - 1]) / param.shape[-1], alpha=1.0 - beta2t)
        col.mul_(beta2t).add_(sum_over_shards(col_sum, param, [ndim - 2]) / param.shape[-2], alpha=1.0 - beta2t)
        # mean(row) runs over the row vector's last dim, which is the parameter's dim ndim-2.
        row_mean = sum_over_shards(row.sum(dim=-1, keepdim=True), param, [ndim - 2]) / param.shape[-2]
        return (row / row_mean).rsqrt().view(lead, local_rows, 1), col.rsqrt().view(lead, 1, local_cols)


def row_blocks(tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Views [lead, rows, cols] of a contiguous tensor (a vector: [1, 1, n]), split along rows into
    blocks of about PIECE elements (writes go through to `tensor`)."""
    view = tensor.view(math.prod(tensor.shape[:-2]), *tensor.shape[-2:]) if tensor.dim() >= 2 else tensor.view(1, 1, -1)
    lead, _, cols = view.shape
    return view.split(max(1, PIECE // max(1, lead * cols)), dim=1)


def build(cfg, parts: list, max_norm: float, pp_group=None):
    return build_fused(AdaLomo, cfg, parts, max_norm, pp_group, clip_threshold=cfg.clip_threshold,
                       decay_rate=cfg.decay_rate)
