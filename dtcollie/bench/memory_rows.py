"""What each row of the memory benchmark runs: a model in the row's precision, an optimizer, one step.

Precision (`dtype` "bf16"): the forward-only and the LOMO/AdaLomo rows hold bf16 weights and
nothing else (no fp32 master copy: that is what fusing the update into backward is for), as the
trainer's `mixed_precision = "bf16_weights"` does. The other optimizers train the way its
`mixed_precision = "bf16"` does: fp32 master weights, fp32 gradients and fp32 states, bf16
autocast. `dtype` "fp32": fp32 everywhere.

Recipe: dtcollie's training rows checkpoint every block and compute the output projection and
cross-entropy in sequence chunks (`dtcollie.loss_chunked`); the pytorch-optimizer rows run the
published LOMO/AdaLOMO as documented, on the plain model with full logits and an fp32 loss.
None clips gradients, so LOMO/AdaLomo run one backward per step. The LoRA row trains rank-8 adapters
with AdamW on a frozen bf16 base, as a LoRA fine-tune of bf16 weights would.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from dtcollie.config import Optimizer as OptimizerConfig
from dtcollie.loss import cross_entropy_sum
from dtcollie.loss_chunked import chunked_lm_loss_sum
from dtcollie.models.llama import ModelArgs, Transformer
from dtcollie.optim.protocol import Pass, backward_passes
from dtcollie.optim.registry import OPTIMIZERS, build_optimizer
from dtcollie.parallel.activation import apply_activation_checkpointing
from dtcollie.parallel.reduce import clip_global_grad_norm
from dtcollie.peft import apply_lora, init_lora

REFERENCE_PACKAGE = "pytorch-optimizer"
REFERENCE_ROWS = {f"lomo({REFERENCE_PACKAGE})": "LOMO", f"adalomo({REFERENCE_PACKAGE})": "AdaLOMO"}
OPTIMIZER_STATE = {
    **{name: spec.about for name, spec in OPTIMIZERS.items()},
    "lora": "LoRA rank 8 on every block projection: frozen base, fp32 adapters + AdamW states, bf16 autocast",
}
LORA_TARGETS = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]
ROWS = ("forward-only", *OPTIMIZER_STATE, *REFERENCE_ROWS)
LR = 1e-4


@dataclass(frozen=True)
class BenchSpec:
    """One row's run: everything the fresh process needs, JSON-serialisable."""
    row: str
    model_args: dict
    dtype: str  # "bf16" or "fp32"
    batch: int
    seq_len: int
    steps: int
    loss_chunk: int  # sequence positions per chunk of the output projection + cross-entropy
    device: str


def holds_bf16_weights(row: str, dtype: str) -> bool:
    """Whether the row's weights themselves are bf16 (else fp32, under bf16 autocast when dtype is bf16)."""
    fused = row in OPTIMIZERS and OPTIMIZERS[row].fused
    return dtype == "bf16" and (row in ("forward-only", "lora") or fused or row in REFERENCE_ROWS)


def row_notes(row: str, dtype: str) -> str:
    if holds_bf16_weights(row, dtype):
        weights = "bf16 weights"
    else:
        weights = "fp32 master weights + grads, bf16 autocast" if dtype == "bf16" else "fp32 weights"
    if row == "forward-only":
        return f"{weights}; forward under no_grad, full logits"
    if row in REFERENCE_ROWS:
        return f"{weights}; {REFERENCE_PACKAGE} {REFERENCE_ROWS[row]}; no checkpointing, full fp32 logits"
    return f"{weights}; {OPTIMIZER_STATE[row]}; all blocks checkpointed, chunked loss"


def build_model(args: ModelArgs, dtype: torch.dtype, checkpointing: bool, device: torch.device,
                lora: bool = False) -> Transformer:
    """Built on meta, cast there, then materialised: no moment holds a second copy of the weights.
    With `lora` the frozen base is in `dtype` and the adapters in fp32."""
    with torch.device("meta"):
        model = Transformer(args)
    if lora:
        apply_lora(model, rank=8, alpha=16.0, target_modules=LORA_TARGETS)
    if checkpointing:
        apply_activation_checkpointing(model, "full", 1)
    model.to(dtype=dtype)
    for param in model.parameters():
        if lora and param.requires_grad:
            param.data = param.data.float()
    model.to_empty(device=device)
    model.init_weights()
    init_lora(model)
    return model


def build_step(spec: BenchSpec) -> Callable[[], None]:
    """Build the row's model and optimizer; return one step (forward, backward, update)."""
    device = torch.device(spec.device)
    args = ModelArgs(**spec.model_args)
    bf16_weights = holds_bf16_weights(spec.row, spec.dtype)
    model = build_model(args, torch.bfloat16 if bf16_weights else torch.float32,
                        checkpointing=spec.row in OPTIMIZER_STATE, device=device, lora=spec.row == "lora")
    tokens = torch.randint(0, args.vocab_size, (spec.batch, spec.seq_len + 1), device=device)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    if spec.row == "forward-only":
        return torch.no_grad()(lambda: model(inputs))
    if spec.row in REFERENCE_ROWS:
        return reference_step(spec.row, model, inputs, labels)
    autocast = spec.dtype == "bf16" and (not bf16_weights or spec.row == "lora")

    def loss() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            return chunked_lm_loss_sum(model, inputs, labels, spec.loss_chunk) / labels.numel()

    name = "adamw" if spec.row == "lora" else spec.row
    optimizer = build_optimizer(OptimizerConfig(name=name, lr=LR), [model], max_norm=0.0)
    return lambda: optimizer.train_step(BenchBatch(model, loss, labels.numel()))


class BenchBatch:
    """The trainer's GlobalBatch for one unpipelined micro-batch. Every step counts as step 1, so
    SophiaG runs its Hessian pass every step (on the real labels: the same memory as sampled ones)."""

    step = 1

    def __init__(self, model: nn.Module, loss: Callable[[], torch.Tensor], tokens: int):
        self.model, self.loss, self.tokens = model, loss, tokens

    def backward(self, sampled_labels: bool = False) -> torch.Tensor:
        loss = self.loss()
        loss.backward()
        return loss.detach()

    def backward_passes(self, passes: list[Pass]) -> torch.Tensor:
        loss = self.loss()
        backward_passes(loss, passes)
        return loss.detach()

    def clip_gradients(self, max_norm: float) -> torch.Tensor:
        parameters = list(self.model.parameters())
        return clip_global_grad_norm(parameters, max_norm, parameters[0].device)


def reference_step(row: str, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> Callable[[], None]:
    """pytorch-optimizer's LOMO / AdaLOMO, used as its docs show: loss, then `fused_backward(loss, lr)`."""
    import pytorch_optimizer  # an optional package: imported only for its rows

    optimizer = getattr(pytorch_optimizer, REFERENCE_ROWS[row])(model, lr=LR)
    return lambda: optimizer.fused_backward(cross_entropy_sum(model(inputs), labels) / labels.numel(), LR)
