"""The trainer's optimizer from `[optimizer]`: weight-decay groups, defaults, fused kinds."""

import torch
from torch import nn

from dtcollie.config import Optimizer as OptimizerConfig
from dtcollie.optim.adalomo import AdaLomo
from dtcollie.optim.adan import Adan
from dtcollie.optim.lion import Lion
from dtcollie.optim.lomo import LOMO
from dtcollie.optim.sophia import SophiaG

FUSED_OPTIMIZERS = ("lomo", "adalomo")  # update inside backward: no gradient accumulation, no optimizer.step()


def param_groups(parameters: list, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and embeddings, none on norm scales."""
    decay = [p for p in parameters if p.ndim >= 2]
    no_decay = [p for p in parameters if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(cfg: OptimizerConfig, parts: list[nn.Module], max_norm: float, pp_group=None):
    """`parts`: this rank's model parts. Fused optimizers take the one module and clip by the global
    norm themselves (two-pass); the others leave clipping to the trainer."""
    if cfg.name in FUSED_OPTIMIZERS:
        module = parts[0] if len(parts) == 1 else nn.ModuleList(parts)
        clipping = dict(clip_grad_norm=max_norm or None, clip_grad_value=cfg.clip_grad_value or None,
                        weight_decay=cfg.weight_decay, pp_group=pp_group)
        if cfg.name == "lomo":
            return LOMO(module, cfg.lr, **clipping)
        return AdaLomo(module, cfg.lr, clip_threshold=cfg.clip_threshold, decay_rate=cfg.decay_rate, **clipping)
    # Only trainable weights (with LoRA, the adapters) reach the optimizer.
    groups = param_groups([p for part in parts for p in part.parameters() if p.requires_grad], cfg.weight_decay)
    betas = cfg.betas()
    if cfg.name == "lion":
        return Lion(groups, lr=cfg.lr, betas=betas)
    if cfg.name == "adan":
        return Adan(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, no_prox=cfg.no_prox)
    if cfg.name == "sophiag":
        return SophiaG(groups, lr=cfg.lr, betas=betas, rho=cfg.rho)
    implementation = "fused" if cfg.implementation == "auto" else cfg.implementation  # fused: CUDA and CPU
    kernel = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}[implementation]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, **kernel)
