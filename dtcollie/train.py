"""Entry point and training loop: `python -m dtcollie.train --config FILE [--section.key value ...]`.

Also runs under `torchrun -m dtcollie.train`. The loss of every optimizer step is the mean over all
label tokens of the global batch, whatever the micro-batch split, so gradient accumulation gives
the same numbers as one big batch.
"""

import contextlib
import copy
import dataclasses
import itertools
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from dtcollie import config as config_module
from dtcollie.checkpointer import Checkpointer, checkpoint_step, resume, training_state, weights_state
from dtcollie.cli import run_main
from dtcollie.config import ConfigError, JobConfig
from dtcollie.evals import EvalTasks, WholeLogits
from dtcollie.errors import DataError
from dtcollie.data import build_dataloader, load_tokenizer
from dtcollie.loss import IGNORE_INDEX, cross_entropy_sum, sample_labels
from dtcollie.lr import build_lr_scheduler
from dtcollie.metrics import MetricsLogger, Throughput, console_line, format_duration, peak_flops, peak_memory_gib
from dtcollie.models.hf import MODEL_ARGS_FILE, load_model_args, save_model_args
from dtcollie.models.hf_files import copy_generation_config, copy_tokenizer_files
from dtcollie.optim import SophiaG
from dtcollie.optim.build import FUSED_OPTIMIZERS, build_optimizer
from dtcollie.peft import save_lora_config
from dtcollie.models.llama import FLAVORS, ModelArgs, Transformer, count_parameters, flops_per_token
from dtcollie.parallel.build import check_layout, lora_settings, materialize, parallelize_model
from dtcollie.parallel.mesh import ParallelDims, data_parallel_mesh
from dtcollie.parallel.pipeline import build_schedule
from dtcollie.parallel.reduce import clip_global_grad_norm, sum_over
from dtcollie.parallel.tied import TiedPipelineEmbedding
from dtcollie.run_folder import RUN_CONFIG, describe_run_start, plan_run_start, remove_old_run
from dtcollie.rank_warnings import filter_rank_warnings

logger = logging.getLogger("dtcollie")


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("training.device = 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def model_args_for(cfg: JobConfig, vocab_size: int) -> ModelArgs:
    """The flavor (or the args file), with the tokenizer's vocabulary and this run's attention kernel.
    `max_seq_len` stays the model's own context (at least training.seq_len): it is what the saved
    model_args.json and an HF export say; the trainer builds its RoPE tables for seq_len only."""
    # config.load has checked the flavor's name.
    args = load_model_args(cfg.model.args_path) if cfg.model.args_path else copy.deepcopy(FLAVORS[cfg.model.flavor])
    if args.vocab_size == 0:
        args.vocab_size = vocab_size
    elif vocab_size > args.vocab_size:
        raise ConfigError(f"the tokenizer has {vocab_size} tokens but the model's vocabulary has only "
                          f"{args.vocab_size}; use the model's own tokenizer (data.tokenizer)")
    args.max_seq_len = max(args.max_seq_len, cfg.training.seq_len)
    args.attention = cfg.model.attention
    return args


def plain(tensor: torch.Tensor) -> torch.Tensor:
    """A detached ordinary tensor holding the full value (a loss-parallel loss is a replicated
    DTensor, loss-parallel logits a vocab-sharded one)."""
    tensor = tensor.detach()
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


class StopFlag:
    """While active, SIGINT/SIGTERM only set a flag: the loop finishes the current step and exits
    cleanly. The previous handlers come back on exit."""

    def __enter__(self):
        self.signal_name = None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc_info):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name


class Trainer:
    """One training job on this process: the whole model, or this rank's part of a parallel layout."""

    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        training = cfg.training
        self.device = pick_device(training.device)
        self.rank = int(os.environ.get("RANK", "0"))
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.dims = ParallelDims.from_config(cfg.parallelism, world_size)
        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        self.saved_args = model_args_for(cfg, self.tokenizer.vocab_size)
        # The RoPE tables only need to cover the training length.
        self.model_args = dataclasses.replace(self.saved_args, max_seq_len=training.seq_len)
        check_layout(cfg, self.model_args, self.dims, self.device)
        self.run_start = plan_run_start(cfg)
        # Everything above is checked identically on every rank; from here on ranks communicate.
        self.mesh = self.dp_mesh = None
        if world_size > 1:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self.mesh = self.dims.build_mesh(self.device.type)
            self.dp_mesh = data_parallel_mesh(self.mesh)
            dist.barrier()  # every rank has read the run folder before rank 0 changes it
        torch.manual_seed(cfg.job.seed)
        self.model = parallelize_model(cfg, self.model_args, self.dims, self.mesh)
        materialize(self.model, self.model_args, cfg.checkpoint.initial_load_path, self.device, cfg.job.seed)
        # The loss_parallel() context works by DTensor dispatch, which a compiled loss bypasses.
        compile_loss = cfg.compile.enable and not (self.dims.tp > 1 and cfg.parallelism.loss_parallel)
        self.loss_fn = torch.compile(cross_entropy_sum) if compile_loss else cross_entropy_sum
        self.dp_groups = [self.dp_mesh.get_group()] if self.mesh is not None and self.dims.dp > 1 else []
        self.pp_group = self.mesh["pp"].get_group() if self.dims.pp > 1 else None
        # The step loss lives on the last pipeline stage and is split over data-parallel ranks.
        self.loss_groups = self.dp_groups + ([self.pp_group] if self.pp_group is not None else [])
        self.tied = TiedPipelineEmbedding.of(self.model.parts, self.model_args.tie_embeddings, self.pp_group)
        if self.tied is not None:
            self.tied.copy_embedding_to_output()
        self.schedule = self.build_schedule() if self.dims.pp > 1 else None
        self.optimizer = build_optimizer(cfg.optimizer, self.model.parts, training.max_norm, self.pp_group)
        self.fused = cfg.optimizer.name in FUSED_OPTIMIZERS
        self.scheduler = build_lr_scheduler(self.optimizer, cfg.optimizer.lr, training.steps, cfg.lr_scheduler)
        self.accumulation_steps = training.global_batch_size // (training.micro_batch_size * self.dims.dp)
        self.train_loader = self.loader("train")
        self.val_loader = self.loader("val") if training.eval_interval else None
        self.eval_tasks = EvalTasks.of(cfg, self.dims.pp)
        # Multi-process layouts use FSDP's mixed-precision policy; one process uses autocast.
        use_autocast = training.mixed_precision == "bf16" and self.mesh is None
        self.autocast_dtype = torch.bfloat16 if use_autocast else None
        self.step = 0
        self.last_losses = {}  # the latest train and val loss, for the closing summary
        self.global_label_tokens = 1
        self.sampling_key = None  # set during Sophia's Hessian pass
        resumed = self.run_start.resume_from
        self.start_run_folder()
        self.metrics = MetricsLogger(cfg.job.dump_folder, cfg.metrics.enable_tensorboard, enabled=self.rank == 0,
                                     resumed_step=None if resumed is None else checkpoint_step(resumed))
        self.metrics.console(self.weights_origin())
        self.checkpointer = Checkpointer(cfg.checkpoint, cfg.job.dump_folder, self.rank, use_dist=self.mesh is not None)
        self.checkpointer.remove_partial()
        if resumed is not None:
            resume(self, resumed)
            self.checkpointer.last_saved_step = self.step
            self.metrics.console(describe_run_start(self.run_start, training.steps))

    def start_run_folder(self) -> None:
        """Rank 0 clears a replaced run and writes this run's config.toml; every rank then waits."""
        folder = Path(self.cfg.job.dump_folder)
        if self.rank == 0:
            if self.run_start.replace_old:
                remove_old_run(folder)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / RUN_CONFIG).write_text(config_module.to_toml(self.cfg))
        if self.mesh is not None:
            dist.barrier()

    def weights_origin(self) -> str:
        path = self.cfg.checkpoint.initial_load_path
        if path:
            return f"initial weights: loaded from {path}"
        return f"initial weights: random (job.seed {self.cfg.job.seed}; set checkpoint.initial_load_path to start " \
               f"from a model)"

    def build_schedule(self):
        parallelism = self.cfg.parallelism
        microbatches = parallelism.pp_microbatches or self.model.num_stages
        return build_schedule(self.model.parts, self.model.stage_ids, self.model.num_stages, self.pp_group,
                              self.device, parallelism.pp_schedule, microbatches, self.step_loss)

    def loader(self, split: str):
        training = self.cfg.training
        dp_rank = self.dp_mesh.get_local_rank() if self.dp_mesh is not None else 0
        return build_dataloader(self.cfg.data, self.tokenizer, training.seq_len, training.micro_batch_size,
                                dp_rank, self.dims.dp, split, self.cfg.job.seed)

    def loss_context(self):
        """Vocab-parallel cross-entropy needs the loss and its backward inside loss_parallel()."""
        parallelism = self.cfg.parallelism
        return loss_parallel() if self.dims.tp > 1 and parallelism.loss_parallel else contextlib.nullcontext()

    def forward(self, inputs: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        """Logits of the (single-stage) model, under autocast when this run uses it."""
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            return self.model.parts[0](inputs, positions)

    def step_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One (pipeline) micro-batch's share of the step loss: summed token losses over the label
        tokens of the whole global batch. In Sophia's Hessian pass the labels are drawn from the
        model's own softmax instead."""
        if self.sampling_key is not None:
            labels = sample_labels(plain(logits), labels, self.sampling_key)
        return self.loss_fn(logits, labels) / self.global_label_tokens

    def run_micro_batch(self, batch: dict, backward: bool) -> torch.Tensor:
        """Forward (and backward) of one micro-batch; returns its share of the step's token-mean loss
        (zero on ranks without the last pipeline stage)."""
        inputs = batch["input_ids"].to(self.device)
        labels = batch["labels"].to(self.device)
        # Packed rows' document positions; every pipeline stage's attention needs them.
        documents = {"positions": batch["positions"].to(self.device)} if "positions" in batch else {}
        with self.loss_context():
            if self.schedule is not None and backward and self.fused:
                return self.fused_schedule_step(inputs, labels, documents)
            if self.schedule is not None:
                return self.schedule_step(inputs, labels, documents, backward)
            logits = self.forward(inputs, documents.get("positions"))
            loss = self.step_loss(logits, labels)
            if backward and self.fused:
                self.optimizer.fused_backward(loss)  # parameters are updated during this backward
            elif backward:
                loss.backward()
        return plain(loss)

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

    def fused_schedule_step(self, inputs: torch.Tensor, labels: torch.Tensor, documents: dict) -> torch.Tensor:
        """LOMO/AdaLomo under pipeline parallelism: each stage's FSDP post-backward fires the update
        hooks once the schedule's micro-batches are all in. Clipping needs the global norm before any
        update, so the schedule then runs twice: once measuring, once updating."""
        if self.optimizer.needs_norm_pass:
            with self.optimizer.norm_pass():
                self.schedule_step(inputs, labels, documents, backward=True)
        with self.optimizer.update_pass() as applied:
            return self.schedule_step(inputs, labels, documents, backward=applied)

    def count_label_tokens(self, batches: list[dict]) -> int:
        """Label tokens of the whole global batch: this rank's micro-batches summed over data parallel."""
        local = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
        return int(sum_over(torch.tensor(local, device=self.device), self.dp_groups).item())

    def train_step(self, batches) -> tuple[float, float, int]:
        """One optimizer step over the global batch; returns (loss, grad norm, tokens in the global batch)."""
        micro_batches = [next(batches) for _ in range(self.accumulation_steps)]
        self.global_label_tokens = self.count_label_tokens(micro_batches)
        if self.global_label_tokens == 0:
            raise DataError(f"step {self.step}: the global batch has no label tokens; check the data "
                            f"(sft outputs truncated by training.seq_len?)")
        loss = sum(self.run_micro_batch(batch, backward=True) for batch in micro_batches)
        tokens = sum(b["input_ids"].numel() for b in micro_batches) * self.dims.dp
        if self.fused:
            norm = self.optimizer.last_grad_norm  # measured by the two-pass clipping, if any
            grad_norm = torch.tensor(math.nan) if norm is None else norm
        else:
            parameters = self.model.parameters()
            if self.tied is not None:
                self.tied.sum_gradients()
            counted = self.tied.counted_parameters(parameters) if self.tied is not None else None
            grad_norm = clip_global_grad_norm(parameters, self.cfg.training.max_norm, self.device, self.pp_group,
                                              counted)
            self.optimizer_step(micro_batches, tokens)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss = sum_over(loss.double(), self.loss_groups)
        return loss.item(), grad_norm.item(), tokens

    def optimizer_step(self, micro_batches: list[dict], global_tokens: int) -> None:
        if not isinstance(self.optimizer, SophiaG):
            self.optimizer.step()
            return
        # Sophia scales its Hessian estimate by the tokens of the global batch.
        self.optimizer.step(bs=global_tokens)
        if (self.step - 1) % self.cfg.optimizer.hessian_interval == 0:
            self.sophia_hessian_pass(micro_batches)

    def sophia_hessian_pass(self, micro_batches: list[dict]) -> None:
        """Gauss-Newton-Bartlett over the global batch: gradients of the token-mean loss on labels
        sampled from the model's own softmax (positions without labels stay ignored). Each
        sequence's draw depends only on the seed, the step and the sequence, so every layout
        estimates the same Hessian."""
        self.optimizer.zero_grad(set_to_none=True)
        self.sampling_key = (self.cfg.job.seed, self.step)
        try:
            for batch in micro_batches:
                self.run_micro_batch(batch, backward=True)
        finally:
            self.sampling_key = None
        if self.tied is not None:
            self.tied.sum_gradients()
        self.optimizer.update_hessian()

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Token-mean loss and perplexity over the first `eval_steps` validation batches."""
        self.model.train(False)
        batches = list(itertools.islice(self.val_loader, self.cfg.training.eval_steps))
        self.global_label_tokens = self.count_label_tokens(batches)
        loss = sum(self.run_micro_batch(batch, backward=False) for batch in batches)
        self.model.train(True)
        loss = sum_over(loss.double(), self.loss_groups).item()
        return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 700.0))}

    @torch.no_grad()
    def run_evaluators(self) -> None:
        """The [eval] tasks on the training model, spread over data-parallel ranks."""
        self.model.train(False)
        dp_rank = self.dp_mesh.get_local_rank() if self.dp_mesh is not None else 0
        result, samples = self.eval_tasks.run(WholeLogits(self.model.parts[0]), self.tokenizer,
                                              self.cfg.training.seq_len, dp_rank, self.dims.dp,
                                              self.dp_groups[0] if self.dp_groups else None)
        self.model.train(True)
        self.metrics.log(self.step, result)
        self.metrics.console(f"evaluation at step {self.step} | " + " | ".join(
            f"{key.removeprefix('eval_')} {value:.4f}" for key, value in result.items()))
        if samples:
            self.metrics.text(self.step, "eval/samples", "\n\n".join(
                f"**prompt** {prompt}  \n**answer** {answer}  \n**generated** {completion}"
                for prompt, answer, completion in samples))

    def train(self) -> None:
        cfg, training = self.cfg, self.cfg.training
        with torch.device("meta"):
            whole = Transformer(self.model_args)
        params = count_parameters(whole)
        flops = flops_per_token(self.model_args, count_parameters(whole, exclude_embedding=True), training.seq_len)
        # MFU is per device: the global token rate shares the work over all ranks.
        throughput = Throughput(training.steps, flops / self.dims.world_size,
                                peak_flops(self.device, training.mixed_precision))
        self.metrics.console(f"dtcollie: {params:,} parameters | device {self.device} | world {self.dims.world_size} "
                             f"({self.dims.describe()}) | global batch {training.global_batch_size} x "
                             f"{training.seq_len} tokens ({self.accumulation_steps} micro-batches of "
                             f"{training.micro_batch_size} per data-parallel rank) | dump {cfg.job.dump_folder}")
        batches = self.train_loader.batches()
        started = time.monotonic()
        with StopFlag() as stop:
            self.run_steps(batches, throughput, stop)
            if self.checkpointer.enabled and self.checkpointer.last_saved_step != self.step:
                self.save_checkpoint()
            self.checkpointer.wait()
            finished = self.step == training.steps
            if finished and cfg.checkpoint.save_weights:
                self.checkpointer.save_weights(self.weights_folder, weights_state(self.model.parts),
                                               self.write_model_files)
        self.metrics.console(self.summary(time.monotonic() - started, stop.signal_name))
        self.metrics.close()

    @property
    def weights_folder(self) -> Path:
        return Path(self.cfg.job.dump_folder) / "weights"

    def summary(self, seconds: float, signal_name: str | None) -> str:
        """The closing lines: how far the run got, its last losses and where its outputs are."""
        cfg, folder = self.cfg, Path(self.cfg.job.dump_folder)
        losses = " | ".join(f"{name} {value:.4f}" for name, value in self.last_losses.items())
        how = "finished" if signal_name is None else f"stopped by {signal_name}"
        lines = [f"run {how}: step {self.step} of {cfg.training.steps} in {format_duration(seconds)}"
                 + (f" | {losses}" if losses else "")]
        if self.step == cfg.training.steps and cfg.checkpoint.save_weights:
            export = (f"tools/export_lora.py --checkpoint {self.weights_folder} --out ADAPTER_FOLDER --merge-into "
                      f"HF_FOLDER" if lora_settings(cfg) is not None
                      else f"tools/convert_dcp_to_hf.py --dcp {self.weights_folder} --out HF_FOLDER")
            lines.append(f"  weights      {self.weights_folder}  (export: python {export})")
        if self.checkpointer.last_saved_step is not None:
            lines.append(f"  checkpoint   {self.checkpointer.folder / f'step-{self.checkpointer.last_saved_step}'}"
                         + ("  (the same command resumes it)" if self.step < cfg.training.steps else ""))
        lines.append(f"  metrics      {folder / 'metrics.jsonl'}")
        if cfg.metrics.enable_tensorboard:
            lines.append(f"  TensorBoard  tensorboard --logdir {folder / 'tb'}")
        return "\n".join(lines)

    def save_checkpoint(self) -> None:
        self.checkpointer.save(self.step, training_state(self), self.write_model_files)
        self.metrics.console(f"checkpoint step-{self.step} saved")

    def write_model_files(self, folder: Path) -> None:
        """What the weights in a checkpoint or weights folder are: the model's shape (with its own
        context length), the LoRA settings, the tokenizer and the generation config."""
        save_model_args(self.saved_args, folder / MODEL_ARGS_FILE)
        lora = lora_settings(self.cfg)
        if lora is not None:
            save_lora_config(folder, lora)
        copy_tokenizer_files(self.cfg.data.tokenizer, folder)
        copy_generation_config([self.cfg.data.tokenizer, self.cfg.checkpoint.initial_load_path], folder)

    def agreed_stop(self, stop: StopFlag) -> bool:
        """Whether any rank was signalled: all ranks must leave the loop after the same step."""
        flag = torch.tensor(float(stop.signal_name is not None), device=self.device)
        if self.mesh is not None:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def run_steps(self, batches, throughput: Throughput, stop: StopFlag) -> None:
        cfg, training = self.cfg, self.cfg.training
        while self.step < training.steps and not self.agreed_stop(stop):
            lr = self.scheduler.get_last_lr()[0]
            self.step += 1
            loss, grad_norm, tokens = self.train_step(batches)
            throughput.add(tokens)
            if self.step % cfg.metrics.log_freq == 0 or self.step in (1, training.steps):
                record = {"loss": loss, "lr": lr, "grad_norm": grad_norm, **throughput.report(self.step),
                          "peak_memory_gib": peak_memory_gib(self.device), "world_size": self.dims.world_size,
                          "layout": self.dims.describe()}
                self.metrics.log(self.step, record)
                self.metrics.console(console_line(self.step, training.steps, record))
            self.last_losses["train loss"] = loss
            if self.checkpointer.due(self.step):
                self.save_checkpoint()
            due = training.eval_interval and (self.step % training.eval_interval == 0 or self.step == training.steps)
            if self.val_loader is not None and due:
                result = self.evaluate()
                self.metrics.log(self.step, result)
                self.last_losses["val loss"] = result["val_loss"]
                self.metrics.console(f"validation at step {self.step} | loss {result['val_loss']!r} | "
                                     f"perplexity {result['val_perplexity']:.3f}")
            if self.eval_tasks is not None and due:
                self.run_evaluators()


def main(argv: list[str]) -> None:
    if "--help" in argv or "-h" in argv:
        print("usage: python -m dtcollie.train --config FILE [--section.key value ...]\n\n"
              "Input paths are relative to the config file's folder (command line: to the working directory); "
              "dtcollie/assets/... are the files shipped in the package.\n\nkeys and defaults:\n"
              + config_module.reference())
        return
    config_path, overrides = config_module.parse_overrides(argv)
    cfg = config_module.load(config_path, overrides)
    logging.basicConfig(level=logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING,
                        format="%(message)s")
    filter_rank_warnings()
    try:
        Trainer(cfg).train()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
