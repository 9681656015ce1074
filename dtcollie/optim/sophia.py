"""SophiaG (Liu et al. 2023, "Sophia: A Scalable Stochastic Second-order Optimizer").

Momentum divided by a diagonal Hessian estimate, clipped elementwise to [-1, 1] so that flat or
badly estimated directions move by at most lr. Same rule, state names and defaults as the official
`sophia-opt` package (SophiaG, without its `maximize`/`capturable` options).

`SophiaTraining` estimates the Hessian every k steps with the Gauss-Newton-Bartlett trick: it
backpropagates the loss on labels sampled from the model's own softmax and calls
`update_hessian()`, which folds g⊙g of those grads into an EMA. The mini-batch-mean gradient's
square is 1/B of the per-example estimate, which is why `step(bs=...)` multiplies h by bs: as in
the official training script, bs is the number of tokens in the batch (batch size × sequence length).
"""

import torch
from torch.optim import Optimizer

from dtcollie.optim.grad_norm import closure_loss, local, local_grad
from dtcollie.optim.protocol import GlobalBatch, TrainingOptimizer, decay_groups, trainable


class SophiaG(Optimizer):
    """p ← p(1−lr·wd);  m ← β1·m + (1−β1)·g;  p ← p − lr·sign(m)·min(|m| / (ρ·bs·h + 1e-15), 1).

    `update_hessian()`: h ← β2·h + (1−β2)·g⊙g from the current grads (the GNB pass's).
    Works on plain and DTensor parameters alike (elementwise, on the local shards).
    """

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.965, 0.99),
                 rho: float = 0.04, weight_decay: float = 0.1):
        if lr < 0.0 or rho < 0.0 or weight_decay < 0.0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"SophiaG: need lr, rho, weight_decay >= 0 and 0 <= betas < 1 "
                             f"(got lr={lr}, betas={betas}, rho={rho}, weight_decay={weight_decay})")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), rho=rho, weight_decay=weight_decay))

    def _state(self, param: torch.Tensor) -> dict:
        state = self.state[param]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(param)
            state["hessian"] = torch.zeros_like(param)
        return state

    @torch.no_grad()
    def update_hessian(self) -> None:
        for group in self.param_groups:
            beta2 = group["betas"][1]
            for param in group["params"]:
                if param.grad is None:
                    continue
                g = local_grad(param, param.grad)
                local(self._state(param)["hessian"]).mul_(beta2).addcmul_(g, g, value=1.0 - beta2)

    @torch.no_grad()
    def step(self, closure=None, bs: int = 5120):
        loss = closure_loss(closure)
        for group in self.param_groups:
            lr, wd, rho = group["lr"], group["weight_decay"], group["rho"]
            beta1 = group["betas"][0]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self._state(param)
                state["step"] += 1
                p, g = local(param), local_grad(param, param.grad)
                m, h = local(state["exp_avg"]), local(state["hessian"])
                p.mul_(1.0 - lr * wd)
                m.mul_(beta1).add_(g, alpha=1.0 - beta1)
                ratio = (m.abs() / (rho * bs * h + 1e-15)).clamp_(max=1.0)
                p.addcmul_(m.sign(), ratio, value=-lr)
        return loss


class SophiaTraining(TrainingOptimizer):
    """SophiaG under the trainer: the step scales the Hessian by the global batch's tokens; at step
    1 and every `hessian_interval` steps after, a Gauss-Newton-Bartlett pass over the global batch
    (gradients of the token-mean loss on labels sampled from the model's own softmax; positions
    without labels stay ignored) updates the Hessian estimate."""

    def __init__(self, optimizer: SophiaG, max_norm: float, hessian_interval: int):
        super().__init__(optimizer, max_norm)
        self.hessian_interval = hessian_interval

    def step_from_gradients(self, batch: GlobalBatch) -> None:
        self.optimizer.step(bs=batch.tokens)
        if (batch.step - 1) % self.hessian_interval == 0:
            self.optimizer.zero_grad(set_to_none=True)
            batch.backward(sampled_labels=True)
            self.optimizer.update_hessian()


def build(cfg, parts: list, max_norm: float, pp_group=None) -> SophiaTraining:
    groups = decay_groups(trainable(parts), cfg.weight_decay)
    return SophiaTraining(SophiaG(groups, lr=cfg.lr, betas=cfg.betas(), rho=cfg.rho), max_norm, cfg.hessian_interval)
