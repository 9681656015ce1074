"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms").

The update is the sign of an interpolation between momentum and gradient, so every element moves
by exactly lr: one state tensor (half of AdamW's) and no second moment. Same rule and defaults as
`lion_pytorch.Lion` with decoupled_weight_decay=False.
"""

import torch
from torch.optim import Optimizer

from dtcollie.optim.grad_norm import closure_loss, local, local_grad
from dtcollie.optim.protocol import TrainingOptimizer, decay_groups, trainable


class Lion(Optimizer):
    """p ← p(1−lr·wd);  p ← p − lr·sign(β1·m + (1−β1)·g);  m ← β2·m + (1−β2)·g.

    Works on plain and DTensor parameters alike (elementwise, on the local shards).
    """

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0):
        if lr < 0.0 or weight_decay < 0.0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Lion: need lr >= 0, weight_decay >= 0, 0 <= betas < 1 "
                             f"(got lr={lr}, betas={betas}, weight_decay={weight_decay})")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["exp_avg"] = torch.zeros_like(param)
                p, g, m = local(param), local_grad(param, param.grad), local(state["exp_avg"])
                p.mul_(1.0 - lr * wd)
                p.add_(m.mul(beta1).add_(g, alpha=1.0 - beta1).sign_(), alpha=-lr)
                m.mul_(beta2).add_(g, alpha=1.0 - beta2)
        return loss


def build(cfg, parts: list, max_norm: float, pp_group=None) -> TrainingOptimizer:
    groups = decay_groups(trainable(parts), cfg.weight_decay)
    return TrainingOptimizer(Lion(groups, lr=cfg.lr, betas=cfg.betas()), max_norm)
