"""AdamW for the trainer: torch's own, with the kernel `optimizer.implementation` picks."""

import torch

from dtcollie.optim.protocol import TrainingOptimizer, decay_groups, trainable

KERNELS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}


def build(cfg, parts: list, max_norm: float, pp_group=None) -> TrainingOptimizer:
    implementation = "fused" if cfg.implementation == "auto" else cfg.implementation  # fused: CUDA and CPU
    optimizer = torch.optim.AdamW(decay_groups(trainable(parts), cfg.weight_decay), lr=cfg.lr, betas=cfg.betas(),
                                  eps=cfg.eps, **KERNELS[implementation])
    return TrainingOptimizer(optimizer, max_norm)
