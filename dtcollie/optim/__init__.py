"""Optimizers written for DTensor parameters: Lion, Adan, SophiaG, and LOMO/AdaLomo fused into
backward (plus the shared global gradient norm)."""

from dtcollie.optim.adalomo import AdaLomo
from dtcollie.optim.adan import Adan
from dtcollie.optim.grad_norm import global_grad_norm
from dtcollie.optim.lion import Lion
from dtcollie.optim.lomo import LOMO
from dtcollie.optim.sophia import SophiaG

__all__ = ["AdaLomo", "Adan", "LOMO", "Lion", "SophiaG", "global_grad_norm"]
