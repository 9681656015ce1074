"""Adan (Xie et al. 2022, "Adan: Adaptive Nesterov Momentum Algorithm"), as in sail-sg/Adan.

Nesterov momentum without the extra forward pass: an EMA of gradient differences stands in for
the look-ahead gradient. Betas follow the official code, not the paper: the paper writes
m ← (1−β1)·m + β1·g with β1 = 0.02, the code (and this class) uses β1 = 0.98 for the same rule.

Mapping to the official `_single_tensor_adan` (bias_correction_i = 1 − β_i^k, k = step):
    denom = √n / √bias_correction3 + eps
    p    -= lr / bias_correction1 · m / denom  +  lr · β2 / bias_correction2 · d / denom
`no_prox=True` decays p by (1 − lr·wd) before that step; `no_prox=False` (the default) divides by
(1 + lr·wd) after it, the proximal form. At the first step the previous gradient is the current
one, so the difference is 0. With max_grad_norm > 0 every gradient is scaled by
min(max_grad_norm / (‖g‖ + eps), 1), ‖g‖ being the global norm over all parameters of all groups
(and of all pipeline stages when `pp_group` is given); the official code uses the group's eps
there too. Unlike the official code, `p.grad` is left unscaled: the clipped gradient lives only
in the update and in the stored previous gradient.
"""

import math

import torch
import torch.distributed as dist
from torch.optim import Optimizer

from dtcollie.optim.grad_norm import closure_loss, global_grad_norm, local, local_grad
from dtcollie.optim.protocol import TrainingOptimizer, decay_groups, trainable


class Adan(Optimizer):
    """Adan with bias correction and optional global-norm clipping; DTensor parameters welcome.

    State per parameter: exp_avg (m), exp_avg_diff (d), exp_avg_sq (n), prev_grad (the last
    clipped gradient) and step. `pp_group` is not saved in state_dict: pass it again on resume.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float, float] = (0.98, 0.92, 0.99),
                 eps: float = 1e-8, weight_decay: float = 0.0, no_prox: bool = False,
                 max_grad_norm: float = 0.0, pp_group: dist.ProcessGroup | None = None):
        if (lr < 0.0 or eps < 0.0 or weight_decay < 0.0 or max_grad_norm < 0.0
                or len(betas) != 3 or not all(0.0 <= b < 1.0 for b in betas)):
            raise ValueError(f"Adan: need lr, eps, weight_decay, max_grad_norm >= 0 and three betas in [0, 1) "
                             f"(got lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}, "
                             f"max_grad_norm={max_grad_norm})")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, no_prox=no_prox,
                        max_grad_norm=max_grad_norm)
        super().__init__(params, defaults)
        self.pp_group = pp_group

    def _clip_coefficient(self) -> torch.Tensor | float:
        """min(max_grad_norm / (global norm + eps), 1), or 1.0 when clipping is off."""
        max_norm = self.defaults["max_grad_norm"]
        if max_norm <= 0.0:
            return 1.0
        params = [p for group in self.param_groups for p in group["params"]]
        grads = [p.grad for p in params if p.grad is not None]
        device = local(params[0]).device
        norm = global_grad_norm(grads, device=device, pp_group=self.pp_group)
        return (max_norm / (norm + self.defaults["eps"])).clamp(max=1.0)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        clip = self._clip_coefficient()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._update(param, group, clip)
        return loss

    def _update(self, param: torch.Tensor, group: dict, clip: torch.Tensor | float) -> None:
        beta1, beta2, beta3 = group["betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        state = self.state[param]
        if not state:
            state["step"] = torch.tensor(0.0)
            for name in ("exp_avg", "exp_avg_diff", "exp_avg_sq", "prev_grad"):
                state[name] = torch.zeros_like(param)
        state["step"] += 1
        k = state["step"].item()
        p, g = local(param), local_grad(param, param.grad)
        m, d, n, prev = (local(state[name]) for name in ("exp_avg", "exp_avg_diff", "exp_avg_sq", "prev_grad"))
        if not (isinstance(clip, float) and clip == 1.0):
            g = g * clip.to(g.device)
        if k == 1:
            prev.copy_(g)
        diff = g - prev
        m.mul_(beta1).add_(g, alpha=1.0 - beta1)
        d.mul_(beta2).add_(diff, alpha=1.0 - beta2)
        corrected = diff.mul_(beta2).add_(g)  # g + β2·(g − g_prev), in diff's buffer
        n.mul_(beta3).addcmul_(corrected, corrected, value=1.0 - beta3)
        denom = n.sqrt().div_(math.sqrt(1.0 - beta3 ** k)).add_(eps)
        if group["no_prox"]:
            p.mul_(1.0 - lr * wd)
        p.addcdiv_(m, denom, value=-lr / (1.0 - beta1 ** k))
        p.addcdiv_(d, denom, value=-lr * beta2 / (1.0 - beta2 ** k))
        if not group["no_prox"]:
            p.div_(1.0 + lr * wd)
        prev.copy_(g)


def build(cfg, parts: list, max_norm: float, pp_group=None) -> TrainingOptimizer:
    """The trainer clips by the global norm itself, so Adan's own clipping stays off."""
    groups = decay_groups(trainable(parts), cfg.weight_decay)
    return TrainingOptimizer(Adan(groups, lr=cfg.lr, betas=cfg.betas(), eps=cfg.eps, no_prox=cfg.no_prox), max_norm)
