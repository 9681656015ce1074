"""Forward and backward of the model this rank trains, one micro-batch at a time (on one stage or
through a pipeline schedule), and `StepBatch`: one optimizer step's micro-batches, the
`dtcollie.optim.protocol.GlobalBatch` every optimizer drives.

The loss of every optimizer step is the mean over all label tokens of the global batch, whatever
the micro-batch split, so gradient accumulation gives the same numbers as one big batch.
"""

import contextlib

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from dtcollie.errors import DataError
from dtcollie.loss import IGNORE_INDEX, cross_entropy_sum, sample_labels
from dtcollie.optim.protocol import Pass, backward_passes
from dtcollie.parallel.build import ParallelModel
from dtcollie.parallel.pipeline import build_schedule
from dtcollie.parallel.reduce import clip_global_grad_norm, sum_over
from dtcollie.parallel.tied import TiedPipelineEmbedding
from dtcollie.run_spec import RunSpec


def plain(tensor: torch.Tensor) -> torch.Tensor:
    """A detached ordinary tensor holding the full value (a loss-parallel loss is a replicated
    DTensor, loss-parallel logits a vocab-sharded one)."""
    tensor = tensor.detach()
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


class ModelRunner:
    """This rank's model parts with everything a forward and backward needs: the pipeline schedule,
    the loss, the tied-embedding exchange and the process groups losses are summed over."""

    def __init__(self, spec: RunSpec, model: ParallelModel, mesh, dp_mesh):
        cfg, dims, device = spec.cfg, spec.dims, spec.device
        self.model, self.dims, self.device, self.seed = model, dims, device, cfg.job.seed
        parallelism = cfg.parallelism
        self.loss_parallel = dims.tp > 1 and parallelism.loss_parallel
        # The loss_parallel() context works by DTensor dispatch, which a compiled loss bypasses.
        compile_loss = cfg.compile.enable and not self.loss_parallel
        self.loss_fn = torch.compile(cross_entropy_sum) if compile_loss else cross_entropy_sum
        self.dp_groups = [dp_mesh.get_group()] if dp_mesh is not None and dims.dp > 1 else []
        self.pp_group = mesh["pp"].get_group() if dims.pp > 1 else None
        # The step loss lives on the last pipeline stage and is split over data-parallel ranks.
        self.loss_groups = self.dp_groups + ([self.pp_group] if self.pp_group is not None else [])
        self.tied = TiedPipelineEmbedding.of(model.parts, spec.model_args.tie_embeddings, self.pp_group)
        if self.tied is not None:
            self.tied.copy_embedding_to_output()
        self.schedule = None
        if dims.pp > 1:
            self.schedule = build_schedule(model.parts, model.stage_ids, model.num_stages, self.pp_group, device,
                                           parallelism.pp_schedule, spec.pp_microbatches, self.step_loss)
        self.autocast_dtype = spec.autocast_dtype
        # Set per batch: the loss divides by the global batch's label tokens; labels are drawn
        # from the model's softmax under this key (Sophia's Hessian pass). The pipeline schedule
        # calls step_loss itself, so these cannot be arguments.
        self.label_tokens = 1
        self.sampling_key = None

    def loss_context(self):
        """Vocab-parallel cross-entropy needs the loss and its backward inside loss_parallel()."""
        return loss_parallel() if self.loss_parallel else contextlib.nullcontext()

    def forward(self, inputs: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        """Logits of the (single-stage) model, under autocast when this run uses it."""
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            return self.model.parts[0](inputs, positions)

    def step_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One (pipeline) micro-batch's share of the step loss: summed token losses over the label
        tokens of the whole global batch."""
        if self.sampling_key is not None:
            labels = sample_labels(plain(logits), labels, self.sampling_key)
        return self.loss_fn(logits, labels) / self.label_tokens

    def stage_loss(self, inputs: torch.Tensor, labels: torch.Tensor, documents: dict) -> torch.Tensor:
        """The (single-stage) model's share of the step loss for one micro-batch, graph attached."""
        return self.step_loss(self.forward(inputs, documents.get("positions")), labels)

    def inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(inputs, labels, documents) on this device; documents: packed rows' positions, which every
        pipeline stage's attention needs ({} for unpacked rows)."""
        documents = {"positions": batch["positions"].to(self.device)} if "positions" in batch else {}
        return batch["input_ids"].to(self.device), batch["labels"].to(self.device), documents

    def run(self, batch: dict, backward: bool) -> torch.Tensor:
        """Forward (and backward) of one micro-batch; returns its share of the step's token-mean loss
        (zero on ranks without the last pipeline stage)."""
        inputs, labels, documents = self.inputs(batch)
        with self.loss_context():
            if self.schedule is not None:
                return self.schedule_step(inputs, labels, documents, backward)
            loss = self.stage_loss(inputs, labels, documents)
            if backward:
                loss.backward()
        return plain(loss)

    def run_passes(self, batches: list[dict], passes: list[Pass]) -> torch.Tensor:
        """Each pass's backward over `batches`. One stage keeps every micro-batch's graph between
        passes (the fused optimizers, which use this, take one micro-batch per step); a pipeline
        schedule runs forward and backward again in each pass."""
        if self.schedule is not None:
            for make_pass in passes:
                with make_pass() as run:
                    loss = sum(self.run(batch, backward=run is not False) for batch in batches)
            return loss
        losses = []
        with self.loss_context():
            for batch in batches:
                losses.append(self.stage_loss(*self.inputs(batch)))
            backward_passes(sum(losses), passes)
        return plain(sum(losses))

    def schedule_step(self, inputs: torch.Tensor, labels: torch.Tensor, documents: dict,
                      backward: bool) -> torch.Tensor:
        """`documents` ({"positions": ...} or empty) goes to every stage: the schedule passes keyword
        inputs to all stages, split into micro-batches like the tokens."""
        losses = []
        stage_inputs = (inputs,) if self.model.has_first_stage else ()
        targets = dict(target=labels, losses=losses) if self.model.has_last_stage else {}
        # return_outputs=False: the last stage would otherwise keep every micro-batch's logits.
        (self.schedule.step if backward else self.schedule.eval)(*stage_inputs, return_outputs=False, **targets,
                                                                 **documents)
        return plain(sum(losses)) if losses else torch.zeros((), device=self.device)

    def count_label_tokens(self, batches: list[dict]) -> int:
        """Label tokens of the whole global batch: this rank's micro-batches summed over data parallel;
        every loss until the next count divides by it."""
        local = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
        self.label_tokens = int(sum_over(torch.tensor(local, device=self.device), self.dp_groups).item())
        return self.label_tokens

    def global_loss(self, loss: torch.Tensor) -> float:
        """The step's loss over all ranks, from each rank's share."""
        return sum_over(loss.double(), self.loss_groups).item()

    def sum_tied_gradients(self) -> None:
        if self.tied is not None:
            self.tied.sum_gradients()

    def clip_gradients(self, max_norm: float) -> torch.Tensor:
        parameters = self.model.parameters()
        counted = self.tied.counted_parameters(parameters) if self.tied is not None else None
        return clip_global_grad_norm(parameters, max_norm, self.device, self.pp_group, counted)

    def evaluate(self, batches: list[dict]) -> float:
        """Token-mean loss over `batches` (every rank's), without gradients."""
        self.count_label_tokens(batches)
        with torch.no_grad():
            return self.global_loss(sum(self.run(batch, backward=False) for batch in batches))


class StepBatch:
    """One optimizer step's micro-batches on this rank (a `GlobalBatch`)."""

    def __init__(self, runner: ModelRunner, micro_batches: list[dict], step: int):
        self.runner, self.micro_batches, self.step = runner, micro_batches, step
        self.tokens = sum(b["input_ids"].numel() for b in micro_batches) * runner.dims.dp
        if runner.count_label_tokens(micro_batches) == 0:
            raise DataError(f"step {step}: the global batch has no label tokens; check the data "
                            f"(sft outputs truncated by training.seq_len?)")

    def backward(self, sampled_labels: bool = False) -> torch.Tensor:
        runner = self.runner
        # Each sequence's draw depends only on the seed, the step and the sequence: every layout
        # samples the same labels.
        runner.sampling_key = (runner.seed, self.step) if sampled_labels else None
        try:
            loss = sum(runner.run(batch, backward=True) for batch in self.micro_batches)
        finally:
            runner.sampling_key = None
        runner.sum_tied_gradients()
        return loss

    def backward_passes(self, passes: list[Pass]) -> torch.Tensor:
        return self.runner.run_passes(self.micro_batches, passes)

    def clip_gradients(self, max_norm: float) -> torch.Tensor:
        return self.runner.clip_gradients(max_norm)
