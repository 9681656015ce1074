"""LOMO: SGD fused into backward (Lv et al. 2023, "Full Parameter Fine-tuning for Large Language
Models with Limited Resources").

Each parameter is updated inside its post-accumulate-grad hook and its gradient freed at once, so
the optimizer holds no state and no full set of gradients ever exists. The rule, per parameter:

    g = clip_by_value(grad / loss_scale) * clip_coef          (each step optional)
    p <- p - lr * (g + weight_decay * p)

which is how the reference (`lomo-optim`'s `Lomo`) applies decay: `p *= 1 - lr*wd` then
`p -= lr*g`, the same thing; with plain SGD, coupled L2 and decoupled decay coincide. The decay
is not part of the gradient that is clipped. `clip_coef = min(1, clip_grad_norm / (norm + 1e-6))`
with the global norm from the first backward pass (`grad_norm`), as in the reference.

fp16 parameters get a dynamic loss scaler (see `fused.py` for how an overflow skips the whole
step safely); the reference instead forces clip_grad_norm on for fp16 and keeps the same two
passes. The optimizer's update is computed in float32 (float64 for float64 weights) and written back in the parameter's dtype.
"""

from torch import nn

from dtcollie.optim.fused import FusedOptimizer, build_fused, local, pieces
from dtcollie.precision import accumulation_dtype


class LOMO(FusedOptimizer):
    """Usage per batch: `loss = model(...)`; [`opt.grad_norm(loss)`]; `opt.fused_backward(loss, lr)`.

    `pp_group`: the pipeline process group (None without pipeline parallelism) over which the
    squared gradient norm of the stages is summed.
    """

    def __init__(self, model: nn.Module, lr: float, clip_grad_norm: float | None = None,
                 clip_grad_value: float | None = None, weight_decay: float = 0.0,
                 loss_scale: float | None = None, loss_scale_window: int = 1000, pp_group=None):
        if lr < 0 or weight_decay < 0:
            raise ValueError(f"LOMO needs lr >= 0 and weight_decay >= 0 (got {lr}, {weight_decay})")
        super().__init__(model, dict(lr=lr, weight_decay=weight_decay), clip_grad_norm, clip_grad_value,
                         loss_scale, loss_scale_window, pp_group)

    def _update(self, param, grad, group) -> None:
        # Piece by piece: a bf16 weight never gets a whole float32 copy (nor does its gradient).
        for p_piece, g_piece in zip(pieces(local(param)), pieces(grad.contiguous())):
            p32 = p_piece.to(accumulation_dtype(p_piece.dtype))  # float32 itself: no copy
            if group["weight_decay"]:
                p32.mul_(1.0 - group["lr"] * group["weight_decay"])
            p32.add_(self.prepared(g_piece), alpha=-group["lr"])
            p_piece.copy_(p32)


def build(cfg, parts: list, max_norm: float, pp_group=None):
    return build_fused(LOMO, cfg, parts, max_norm, pp_group)
