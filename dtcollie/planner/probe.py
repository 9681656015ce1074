"""Activation memory of one pipeline micro-batch on one stage, measured by running the real model
code on fake tensors.

A probe builds a stage of the model with one or two transformer blocks at the real width, under
the run's tensor-parallel plan (on a fake process group of tp ranks) and activation checkpointing,
and runs forward and backward on fake tensors under `MemoryTracker`: a FakeTensorMode that counts
the bytes of every storage from its creation until Python frees it. Nothing is allocated and
nothing is computed, so a 7B-wide block costs what a tiny one does. The second of two passes is
measured: its gradients accumulate into existing buffers, as on every micro-batch but a step's
first (the planner counts the gradients themselves with the parameters):

- kept: bytes still held when forward has ended, until backward consumes them: activations saved
  for backward, the loss, and the stage output (the logits on the last stage) a pipeline keeps;
- transient: how far memory rises above `kept` during backward: the recomputed block under
  checkpointing, the logits' gradient, a block's input gradients, gradient temporaries.

Every figure is for one micro-batch; the planner multiplies by the micro-batches a schedule keeps
in flight (`dtcollie.planner.memory`). Measured on CPU fake tensors: SDPA there is the
flash-attention CPU kernel (it keeps the log-sum-exp, not the seq x seq scores), as flash-attn does
on a GPU.
"""

import contextlib
import dataclasses
import weakref
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from dtcollie.loss import cross_entropy_sum
from dtcollie.models.llama import ModelArgs, Transformer
from dtcollie.parallel.activation import apply_activation_checkpointing
from dtcollie.parallel.tensor import apply_tensor_parallel
from dtcollie.parallel.mesh import ParallelDims
from dtcollie.parallel.plan import fake_process_group
from dtcollie.peft import LoRAConfig, apply_lora

KINDS = ("whole", "first", "middle", "last")  # which ends of the model a stage holds


class MemoryTracker(FakeTensorMode):
    """Fake tensors whose storage bytes are counted while alive: `in_use` now, `peak` since the last
    `reset_peak()`. It sees every op on fake tensors, including those DTensor runs on its local
    shards (a mode above DTensor would see only the DTensor-level ops)."""

    def __init__(self):
        super().__init__(allow_non_fake_inputs=True)
        self._sizes = WeakIdKeyDictionary()
        self.in_use = self.peak = 0

    def reset_peak(self) -> None:
        self.peak = self.in_use

    def _freed(self, nbytes: int) -> None:
        self.in_use -= nbytes

    def _count(self, tensor) -> None:
        if isinstance(tensor, DTensor):
            tensor = tensor._local_tensor
        if not isinstance(tensor, torch.Tensor):
            return
        storage = tensor.untyped_storage()
        if storage in self._sizes:
            return
        nbytes = storage.nbytes()
        self._sizes[storage] = nbytes
        weakref.finalize(storage, self._freed, nbytes)
        self.in_use += nbytes
        self.peak = max(self.peak, self.in_use)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if out is not NotImplemented:
            for tensor in tree_leaves(out):
                self._count(tensor)
        return out


@dataclass(frozen=True)
class ProbeShape:
    """What a probe's memory depends on, and nothing else: probes are cached by it across layouts."""

    args: ModelArgs  # the model's shape; n_layers is replaced by the probe's block count
    tp: int
    sequence_parallel: bool
    loss_parallel: bool
    compute_dtype: torch.dtype
    micro_batch: int  # sequences in one pipeline micro-batch
    seq_len: int
    lora: LoRAConfig | None  # when LoRA trains adapters only

    @property
    def boundary_seq(self) -> int:
        """Tokens per row of the hidden states a pipeline stage hands on: its sequence shard under SP."""
        return self.seq_len // self.tp if self.sequence_parallel else self.seq_len


@dataclass(frozen=True)
class ProbeResult:
    kept: int
    transient: int


def stage_part(shape: ProbeShape, kind: str, blocks: int) -> Transformer:
    """A model part holding `blocks` blocks and the ends `kind` names, on the meta device, with the
    run's adapters, compute dtype, TP plan and checkpointing (FSDP is left out: its gathered
    buffers are counted with the parameters)."""
    args = dataclasses.replace(shape.args, n_layers=blocks, max_seq_len=shape.seq_len)
    with torch.device("meta"):
        part = Transformer(args)
    if kind in ("middle", "last"):
        part.tok_embeddings = None
    if kind in ("first", "middle"):
        part.norm = part.output = None
    if shape.lora is not None:
        apply_lora(part, **dataclasses.asdict(shape.lora))
    part.to(dtype=shape.compute_dtype)
    return part


def run_probe(shape: ProbeShape, kind: str, blocks: int, checkpointed: bool, mesh) -> ProbeResult:
    part = stage_part(shape, kind, blocks)
    if shape.tp > 1:
        apply_tensor_parallel(part, mesh["tp"], shape.sequence_parallel, shape.loss_parallel)
    apply_activation_checkpointing(part, "full" if checkpointed else "none", 1)
    batch, seq = shape.micro_batch, shape.seq_len
    with MemoryTracker() as tracker:
        part.to_empty(device="cpu")
        part.init_rope()
        if kind in ("whole", "first"):
            inputs = torch.zeros(batch, seq, dtype=torch.long)
        else:  # the hidden states a pipeline stage receives (sequence-sharded under SP)
            inputs = torch.zeros(batch, shape.boundary_seq, shape.args.dim, dtype=shape.compute_dtype, requires_grad=True)
        labels = torch.zeros(batch, seq, dtype=torch.long)
        for _ in range(2):  # the first pass creates the gradients; the second is measured
            before = tracker.in_use
            tracker.reset_peak()
            # Under loss_parallel the loss and its backward both run inside the context, as in the trainer.
            with loss_parallel() if kind in ("whole", "last") and shape.loss_parallel and shape.tp > 1 \
                    else contextlib.nullcontext():
                out = part(inputs)
                # A pipeline schedule keeps each micro-batch's stage output, the logits on the last
                # stage, until its backward; one process frees them once the loss has them.
                held = out if kind == "last" else None
                if kind in ("whole", "last"):
                    out = cross_entropy_sum(out, labels)
                kept = tracker.in_use - before
                out.backward(None if kind in ("whole", "last") else torch.ones_like(out))
            del out, held
    return ProbeResult(kept=kept, transient=tracker.peak - before - kept)


_measured: dict[str, ProbeResult] = {}


def probe(shape: ProbeShape, kind: str, blocks: int, checkpointed: bool) -> ProbeResult:
    """`run_probe` (cached) on a fake process group of tp ranks, this process playing rank 0."""
    key = repr((shape, kind, blocks, checkpointed))
    if key not in _measured:
        if shape.tp == 1:
            _measured[key] = run_probe(shape, kind, blocks, checkpointed, None)
        else:
            with fake_process_group(0, shape.tp):
                mesh = ParallelDims(pp=1, dp_replicate=1, dp_shard=1, tp=shape.tp).build_mesh("cpu")
                _measured[key] = run_probe(shape, kind, blocks, checkpointed, mesh)
    return _measured[key]
