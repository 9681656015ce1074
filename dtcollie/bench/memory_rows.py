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
from dtcollie.optim.build import FUSED_OPTIMIZERS, build_optimizer
from dtcollie.optim.sophia import SophiaG
from dtcollie.parallel.activation import apply_activation_checkpointing
from dtcollie.peft import apply_lora, init_lora

REFERENCE_PACKAGE = "pytorch-optimizer"
REFERENCE_ROWS = {f"lomo({REFERENCE_PACKAGE})": "LOMO", f"adalomo({REFERENCE_PACKAGE})": "AdaLOMO"}
OPTIMIZER_STATE = {
    "adamw": "fused AdamW, 2 fp32 states",
    "lion": "Lion, 1 state",
    "adan": "Adan, 4 states (m, v, n, previous grad)",
    "sophiag": "SophiaG, 2 states; update_hessian() every step",
    "lomo": "LOMO: SGD fused into backward, no state",
    "adalomo": "AdaLomo fused into backward, factored row/col state",
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
    return dtype == "bf16" and (row in ("forward-only", "lora") or row in FUSED_OPTIMIZERS or row in REFERENCE_ROWS)


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
    if spec.row in FUSED_OPTIMIZERS:
        return lambda: optimizer.fused_backward(loss())
    return optimizer_step(optimizer, loss, labels.numel())


def optimizer_step(optimizer: torch.optim.Optimizer, loss: Callable[[], torch.Tensor],
                   tokens: int) -> Callable[[], None]:
    """backward, step, free the gradients. SophiaG folds this step's own gradients into its Hessian
    estimate: the state and the memory are those of a real Gauss-Newton-Bartlett pass."""
    def step() -> None:
        loss().backward()
        if isinstance(optimizer, SophiaG):
            optimizer.update_hessian()
            optimizer.step(bs=tokens)
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def reference_step(row: str, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> Callable[[], None]:
    """pytorch-optimizer's LOMO / AdaLOMO, used as its docs show: loss, then `fused_backward(loss, lr)`."""
    import pytorch_optimizer  # an optional package: imported only for its rows

    optimizer = getattr(pytorch_optimizer, REFERENCE_ROWS[row])(model, lr=LR)
    return lambda: optimizer.fused_backward(cross_entropy_sum(model(inputs), labels) / labels.numel(), LR)
