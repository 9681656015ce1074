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

import torch
from torch import nn

from dtcollie.optim.fused import (FusedOptimizer, drop_dim_placements, global_mean_square, like_param,
                                  local, pieces, sum_over)


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
        zeros = lambda s: torch.zeros(s, dtype=torch.float32, device=p_local.device)  # noqa: E731
        if param.dim() >= 2:
            state["exp_avg_sq_row"] = like_param(zeros(local_shape[:-1]), param, shape[:-1],
                                                 drop_dim_placements(param, param.dim() - 1))
            state["exp_avg_sq_col"] = like_param(zeros(local_shape[:-2] + local_shape[-1:]), param,
                                                 shape[:-2] + shape[-1:], drop_dim_placements(param, param.dim() - 2))
        else:
            state["exp_avg_sq"] = like_param(zeros(local_shape), param, shape)
        return state

    def _update(self, param, grad, group) -> None:
        grad32 = self.prepared(grad)
        state = self.state[param] if self.state[param] else self._init_state(param)
        eps1, eps2 = group["eps"]
        state["step"] += 1
        beta2t = 1.0 - float(state["step"]) ** group["decay_rate"]
        ndim = param.dim()
        # Memory: besides the float32 gradient, only row/column-sized temporaries; sums of
        # g^2 + eps1 are squared norms plus eps1 times the local count, and the update is built in
        # the gradient's own buffer.
        if ndim >= 2:
            row, col = local(state["exp_avg_sq_row"]), local(state["exp_avg_sq_col"])
            # Means over the last / second-to-last dim: sum locally, then over the mesh dims that shard it.
            row_sum = torch.linalg.vector_norm(grad32, dim=-1).square() + eps1 * grad32.shape[-1]
            col_sum = torch.linalg.vector_norm(grad32, dim=-2).square() + eps1 * grad32.shape[-2]
            row.mul_(beta2t).add_(sum_over(row_sum, param, [ndim - 1]) / param.shape[-1], alpha=1.0 - beta2t)
            col.mul_(beta2t).add_(sum_over(col_sum, param, [ndim - 2]) / param.shape[-2], alpha=1.0 - beta2t)
            # mean(row) runs over the row vector's last dim, which is the parameter's dim ndim-2.
            row_mean = sum_over(row.sum(dim=-1, keepdim=True), param, [ndim - 2]) / param.shape[-2]
            update = grad32.mul_((row / row_mean).rsqrt().unsqueeze(-1)).mul_(col.rsqrt().unsqueeze(-2))
        else:
            exp_avg_sq = local(state["exp_avg_sq"])
            exp_avg_sq.mul_(beta2t).add_(grad32 * grad32 + eps1, alpha=1.0 - beta2t)
            update = grad32.mul_(exp_avg_sq.rsqrt())
        update_rms = global_mean_square(update, param).sqrt()
        update.div_((update_rms / group["clip_threshold"]).clamp(min=1.0))

        p_local = local(param)
        lr = group["lr"] * global_mean_square(p_local, param).sqrt().clamp(min=eps2)
        # Piece by piece, so a bf16 weight never gets a whole float32 copy.
        for p_piece, u_piece in zip(pieces(p_local), pieces(update)):
            p32 = p_piece.float()
            if group["weight_decay"]:
                p32.mul_(1.0 - lr * group["weight_decay"])
            p32.sub_(u_piece * lr)
            p_piece.copy_(p32)
