"""Entry point and training loop: `python -m dtcollie.train --config FILE [--section.key value ...]`.

Also runs under `torchrun -m dtcollie.train`. The loss of every optimizer step is the mean over all
label tokens of the global batch, whatever the micro-batch split, so gradient accumulation gives
the same numbers as one big batch.
"""

import copy
import itertools
import logging
import math
import os
import signal
import sys
from pathlib import Path

import torch

from dtcollie import config as config_module
from dtcollie.checkpoint import load_model_weights
from dtcollie.cli import run_main
from dtcollie.config import ConfigError, JobConfig
from dtcollie.data import build_dataloader, load_tokenizer
from dtcollie.loss import IGNORE_INDEX, cross_entropy_sum
from dtcollie.lr import build_lr_scheduler
from dtcollie.metrics import MetricsLogger, Throughput, console_line, peak_flops, peak_memory_gib
from dtcollie.models.hf import load_model_args
from dtcollie.models.llama import FLAVORS, ModelArgs, Transformer, check_attention, count_parameters, flops_per_token

logger = logging.getLogger("dtcollie")


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("training.device = 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def model_args_for(cfg: JobConfig, vocab_size: int) -> ModelArgs:
    """The flavor (or the args file), with the tokenizer's vocabulary and this run's settings."""
    if cfg.model.args_path:
        args = load_model_args(cfg.model.args_path)
    elif cfg.model.flavor in FLAVORS:
        args = copy.deepcopy(FLAVORS[cfg.model.flavor])
    else:
        raise ConfigError(f"model.flavor = {cfg.model.flavor!r} is not known; choose one of {', '.join(FLAVORS)} "
                          f"or set model.args_path")
    if args.vocab_size == 0:
        args.vocab_size = vocab_size
    elif vocab_size > args.vocab_size:
        raise ConfigError(f"the tokenizer has {vocab_size} tokens but the model's vocabulary has only "
                          f"{args.vocab_size}; use the model's own tokenizer (data.tokenizer)")
    # The RoPE tables only need to cover the training length.
    args.max_seq_len = cfg.training.seq_len
    args.attention = cfg.model.attention
    return args


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and embeddings, none on norm scales."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_adamw(model: torch.nn.Module, cfg: config_module.Optimizer, device: torch.device):
    implementation = cfg.implementation
    if implementation == "auto":
        implementation = "fused"  # torch has fused AdamW kernels for both CUDA and CPU
    kernel = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}[implementation]
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.eps, **kernel)


def cycle(loader):
    """Batches forever, one epoch after another, each reshuffled by the sampler; starts at the
    loader's own epoch so a restored loader state continues where it was."""
    for epoch in itertools.count(loader.sampler.epoch):
        loader.sampler.set_epoch(epoch)
        yield from loader


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
    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        training = cfg.training
        self.device = pick_device(training.device)
        torch.manual_seed(cfg.job.seed)
        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        self.model_args = model_args_for(cfg, self.tokenizer.vocab_size)
        check_attention(self.model_args, self.device, training.mixed_precision)
        self.model = self.build_model()
        self.loss_fn = torch.compile(cross_entropy_sum) if cfg.compile.enable else cross_entropy_sum
        self.optimizer = build_adamw(self.model, cfg.optimizer, self.device)
        self.scheduler = build_lr_scheduler(self.optimizer, cfg.optimizer.lr, training.steps, cfg.lr_scheduler)
        self.dp_rank, self.dp_world = 0, 1
        self.accumulation_steps = training.global_batch_size // (training.micro_batch_size * self.dp_world)
        self.train_loader = self.loader("train")
        self.val_loader = self.loader("val") if training.eval_interval else None
        self.autocast_dtype = torch.bfloat16 if training.mixed_precision == "bf16" else None
        self.metrics = MetricsLogger(cfg.job.dump_folder, cfg.metrics.enable_tensorboard)
        self.step = 0

    def build_model(self) -> Transformer:
        with torch.device("meta"):
            model = Transformer(self.model_args)
        model.to_empty(device=self.device)
        if self.cfg.checkpoint.initial_load_path:
            model.init_rope()
            load_model_weights(model, self.cfg.checkpoint.initial_load_path)
        else:
            model.init_weights()
        if self.cfg.compile.enable:
            for block in model.layers.values():
                block.compile()
        return model

    def loader(self, split: str):
        training = self.cfg.training
        return build_dataloader(self.cfg.data, self.tokenizer, training.seq_len, training.micro_batch_size,
                                self.dp_rank, self.dp_world, split, self.cfg.job.seed)

    def loss_sum(self, batch: dict) -> torch.Tensor:
        """Summed cross-entropy over the batch's label tokens."""
        inputs = batch["input_ids"].to(self.device)
        labels = batch["labels"].to(self.device)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            logits = self.model(inputs)
        return self.loss_fn(logits, labels)

    def train_step(self, batches) -> tuple[float, float, int]:
        """One optimizer step over the global batch; returns (loss, grad norm, tokens seen)."""
        micro_batches = [next(batches) for _ in range(self.accumulation_steps)]
        label_tokens = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro_batches)
        if label_tokens == 0:
            raise ConfigError(f"step {self.step}: the global batch has no label tokens; check the data "
                              f"(sft outputs truncated by training.seq_len?)")
        loss_total = 0.0
        for batch in micro_batches:
            loss = self.loss_sum(batch) / label_tokens
            loss.backward()
            loss_total += loss.item()
        max_norm = self.cfg.training.max_norm
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm if max_norm > 0 else math.inf)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        tokens = sum(b["input_ids"].numel() for b in micro_batches)
        return loss_total, grad_norm.item(), tokens

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Token-mean loss and perplexity over the first `eval_steps` validation batches."""
        self.model.eval()
        total, tokens = 0.0, 0
        for index, batch in enumerate(self.val_loader):
            if index == self.cfg.training.eval_steps:
                break
            total += self.loss_sum(batch).item()
            tokens += int((batch["labels"] != IGNORE_INDEX).sum())
        self.model.train()
        loss = total / max(1, tokens)
        return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 700.0))}

    def write_run_config(self) -> None:
        folder = Path(self.cfg.job.dump_folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.toml").write_text(config_module.to_toml(self.cfg))

    def train(self) -> None:
        cfg, training = self.cfg, self.cfg.training
        self.write_run_config()
        params = count_parameters(self.model)
        flops = flops_per_token(self.model_args, count_parameters(self.model, exclude_embedding=True),
                                training.seq_len)
        throughput = Throughput(training.steps, flops, peak_flops(self.device, training.mixed_precision))
        self.metrics.console(f"dtcollie: {params:,} parameters | device {self.device} | world 1 | "
                             f"global batch {training.global_batch_size} x {training.seq_len} tokens "
                             f"({self.accumulation_steps} micro-batches of {training.micro_batch_size}) | "
                             f"dump {cfg.job.dump_folder}")
        batches = cycle(self.train_loader)
        with StopFlag() as stop:
            self.run_steps(batches, throughput, stop)
        if stop.signal_name is not None:
            self.metrics.console(f"stopped by {stop.signal_name} after step {self.step}")
        self.metrics.close()

    def run_steps(self, batches, throughput: Throughput, stop: StopFlag) -> None:
        cfg, training = self.cfg, self.cfg.training
        while self.step < training.steps and stop.signal_name is None:
            lr = self.scheduler.get_last_lr()[0]
            self.step += 1
            loss, grad_norm, tokens = self.train_step(batches)
            throughput.add(tokens)
            if self.step % cfg.metrics.log_freq == 0 or self.step in (1, training.steps):
                record = {"loss": loss, "lr": lr, "grad_norm": grad_norm, **throughput.report(self.step),
                          "peak_memory_gib": peak_memory_gib(self.device), "world_size": 1}
                self.metrics.log(self.step, record)
                self.metrics.console(console_line(self.step, training.steps, record))
            if self.val_loader is not None and (self.step % training.eval_interval == 0 or self.step == training.steps):
                result = self.evaluate()
                self.metrics.log(self.step, result)
                self.metrics.console(f"validation at step {self.step} | loss {result['val_loss']!r} | "
                                     f"perplexity {result['val_perplexity']:.3f}")


def main(argv: list[str]) -> None:
    if "--help" in argv or "-h" in argv:
        print("usage: python -m dtcollie.train --config FILE [--section.key value ...]\n\nkeys and defaults:\n"
              + config_module.reference())
        return
    config_path, overrides = config_module.parse_overrides(argv)
    cfg = config_module.load(config_path, overrides)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != 1:
        raise ConfigError(f"WORLD_SIZE = {world}, but this version trains on one process only")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    Trainer(cfg).train()


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
