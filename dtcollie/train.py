"""Entry point and training loop: `python -m dtcollie.train --config FILE [--section.key value ...]`.

Also runs under `torchrun -m dtcollie.train`. Forward and backward are `dtcollie.model_runner`'s;
the optimizer step is the optimizer's own (`dtcollie.optim.protocol`).
"""

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

from dtcollie import config as config_module
from dtcollie.checkpointer import Checkpointer, checkpoint_step, weights_state
from dtcollie.cli import run_main
from dtcollie.config import JobConfig
from dtcollie.data import build_dataloader, load_tokenizer
from dtcollie.errors import UserError
from dtcollie.evals import EvalTasks, WholeLogits
from dtcollie.lr import build_lr_scheduler
from dtcollie.metrics import MetricsLogger, Throughput, console_line, format_duration, peak_flops, peak_memory_gib
from dtcollie.model_runner import ModelRunner, StepBatch
from dtcollie.models.hf import MODEL_ARGS_FILE, save_model_args
from dtcollie.models.hf_files import copy_generation_config, copy_tokenizer_files
from dtcollie.models.llama import Transformer, count_parameters, flops_per_token
from dtcollie.optim.registry import build_optimizer
from dtcollie.parallel.build import materialize, parallelize_model
from dtcollie.parallel.compile import compile_settings
from dtcollie.parallel.mesh import data_parallel_mesh
from dtcollie.peft import save_lora_config
from dtcollie.rank_warnings import filter_rank_warnings
from dtcollie.run_folder import RUN_CONFIG, describe_run_start, plan_run_start, remove_old_run
from dtcollie.run_spec import lora_settings, pick_device, resolve
from dtcollie.train_state import (LoaderState, LossScalerState, ModelState, OptimizerState, RNGState,
                                  SchedulerState, StepCounter)

logger = logging.getLogger("dtcollie")


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
        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        self.spec = resolve(cfg, world_size, self.device, self.tokenizer.vocab_size)
        self.dims, self.model_args = self.spec.dims, self.spec.model_args
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
        self.dp_rank = self.dp_mesh.get_local_rank() if self.dp_mesh is not None else 0
        # The data first: a corpus too small for seq_len is named before the model is allocated.
        self.train_loader = self.loader("train")
        self.val_loader = self.loader("val") if training.eval_interval else None
        torch.manual_seed(cfg.job.seed)
        self.model = parallelize_model(self.spec, self.mesh)
        materialize(self.model, self.model_args, cfg.checkpoint.initial_load_path, self.device, cfg.job.seed)
        self.runner = ModelRunner(self.spec, self.model, self.mesh, self.dp_mesh)
        self.optimizer = build_optimizer(cfg.optimizer, self.model.parts, training.max_norm, self.runner.pp_group)
        self.scheduler = build_lr_scheduler(self.optimizer.optimizer, cfg.optimizer.lr, training.steps,
                                            cfg.lr_scheduler)
        self.eval_tasks = EvalTasks.of(cfg, self.dims.pp)
        self.counter = StepCounter()
        self.last_losses = {}  # the latest train and val loss, for the closing summary
        resumed = self.run_start.resume_from
        self.start_run_folder()
        self.metrics = MetricsLogger(cfg.job.dump_folder, cfg.metrics.enable_tensorboard, enabled=self.rank == 0,
                                     resumed_step=None if resumed is None else checkpoint_step(resumed))
        self.metrics.console(self.weights_origin())
        self.checkpointer = Checkpointer(cfg.checkpoint, cfg.job.dump_folder, self.rank, use_dist=self.mesh is not None)
        self.checkpointer.remove_partial()
        if resumed is not None:
            self.checkpointer.load(resumed, self.stateful())
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

    def loader(self, split: str):
        training = self.cfg.training
        return build_dataloader(self.cfg.data, self.tokenizer, training.seq_len, training.micro_batch_size,
                                self.dp_rank, self.dims.dp, split, self.cfg.job.seed)

    def train_step(self, batches) -> tuple[float, float, int]:
        """One optimizer step over the global batch; returns (loss, grad norm, tokens in the global batch)."""
        batch = StepBatch(self.runner, [next(batches) for _ in range(self.spec.accumulation_steps)], self.step)
        loss, grad_norm = self.optimizer.train_step(batch)
        self.scheduler.step()
        return self.runner.global_loss(loss), grad_norm.item(), batch.tokens

    def evaluate(self) -> dict:
        """Token-mean loss and perplexity over the first `eval_steps` validation batches."""
        self.model.train(False)
        loss = self.runner.evaluate(list(itertools.islice(self.val_loader, self.cfg.training.eval_steps)))
        self.model.train(True)
        return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 700.0))}

    @torch.no_grad()
    def run_evaluators(self) -> None:
        """The [eval] tasks on the training model, spread over data-parallel ranks."""
        self.model.train(False)
        result, samples = self.eval_tasks.run(WholeLogits(self.model.parts[0]), self.tokenizer,
                                              self.cfg.training.seq_len, self.dp_rank, self.dims.dp,
                                              self.runner.dp_groups[0] if self.runner.dp_groups else None)
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
                             f"{training.seq_len} tokens ({self.spec.accumulation_steps} micro-batches of "
                             f"{training.micro_batch_size} per data-parallel rank) | dump {cfg.job.dump_folder}")
        batches = self.train_loader.batches()
        started = time.monotonic()
        with StopFlag() as stop, compile_settings(self.dims.tp > 1, self.optimizer.retains_graph):
            self.run_steps(batches, throughput, stop)
            if self.checkpointer.enabled and self.checkpointer.last_saved_step != self.step:
                self.save_checkpoint()
            self.checkpointer.wait()
            weights = self.save_weights() if self.step == training.steps and cfg.checkpoint.save_weights else None
        self.metrics.console(self.summary(time.monotonic() - started, stop.signal_name, weights))
        self.metrics.close()

    def save_weights(self) -> Path:
        """The trained model alone, into <dump_folder>/weights."""
        folder = Path(self.cfg.job.dump_folder) / "weights"
        self.checkpointer.save_weights(folder, weights_state(self.model.parts), self.write_model_files)
        return folder

    def summary(self, seconds: float, signal_name: str | None, weights: Path | None) -> str:
        """The closing lines: how far the run got, its last losses and where its outputs are."""
        cfg, folder = self.cfg, Path(self.cfg.job.dump_folder)
        losses = " | ".join(f"{name} {value:.4f}" for name, value in self.last_losses.items())
        how = "finished" if signal_name is None else f"stopped by {signal_name}"
        lines = [f"run {how}: step {self.step} of {cfg.training.steps} in {format_duration(seconds)}"
                 + (f" | {losses}" if losses else "")]
        if weights is not None:
            export = (f"tools/export_lora.py --checkpoint {weights} --out ADAPTER_FOLDER --merge-into HF_FOLDER"
                      if lora_settings(cfg) is not None
                      else f"tools/convert_dcp_to_hf.py --dcp {weights} --out HF_FOLDER")
            lines.append(f"  weights      {weights}  (export: python {export})")
        if self.checkpointer.last_saved_step is not None:
            lines.append(f"  checkpoint   {self.checkpointer.folder / f'step-{self.checkpointer.last_saved_step}'}"
                         + ("  (the same command resumes it)" if self.step < cfg.training.steps else ""))
        lines.append(f"  metrics      {folder / 'metrics.jsonl'}")
        if cfg.metrics.enable_tensorboard:
            lines.append(f"  TensorBoard  tensorboard --logdir {folder / 'tb'}")
        return "\n".join(lines)

    @property
    def step(self) -> int:
        """Optimizer steps taken."""
        return self.counter.step

    @step.setter
    def step(self, value: int) -> None:
        self.counter.step = value

    def stateful(self) -> dict:
        """What a checkpoint saves and a resume restores, by checkpoint name."""
        torch_optimizer = self.optimizer.optimizer
        components = {"model": ModelState(self.model.parts),
                      "optimizer": OptimizerState(torch_optimizer, self.model.parts)}
        if getattr(torch_optimizer, "scaler", None) is not None:
            components["optimizer.loss_scaler"] = LossScalerState(torch_optimizer.scaler)
        return {**components, "lr_scheduler": SchedulerState(self.scheduler, torch_optimizer),
                "dataloader": LoaderState(self.train_loader), "rng": RNGState(self.device), "step": self.counter}

    def save_checkpoint(self) -> None:
        self.checkpointer.save(self.step, self.stateful(), self.write_model_files)
        self.metrics.console(f"checkpoint step-{self.step} saved")

    def write_model_files(self, folder: Path) -> None:
        """What the weights in a checkpoint or weights folder are: the model's shape (with its own
        context length), the LoRA settings, the tokenizer and the generation config."""
        save_model_args(self.spec.saved_args, folder / MODEL_ARGS_FILE)
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
            self.check_finite(loss, lr)
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

    def check_finite(self, loss: float, lr: float) -> None:
        """Stop, on every rank at once (the loss is global), when training has diverged: training on
        would only save NaN weights over the last good checkpoint."""
        if math.isfinite(loss):
            return
        saved = self.checkpointer.last_saved_step
        last_good = f"the last checkpoint is step-{saved}" if saved is not None else "no checkpoint was saved"
        raise UserError(f"the training loss is {loss} at step {self.step} (learning rate {lr:.3g}): training "
                        f"diverged, so the run stops ({last_good}); lower optimizer.lr, clip with "
                        f"training.max_norm, or look for bad data in this step")


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
    Trainer(cfg).train()
    # Only after success: after a failure run_main ends this rank at once, as destroy_process_group
    # could wait on a peer that has gone.
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
