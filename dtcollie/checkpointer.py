"""Resumable training checkpoints: DCP folders `<dump_folder>/checkpoints/step-N`.

A checkpoint is one flat dict of tensors, so that loading unpickles nothing but the allow-listed
DCP metadata (DCP would `torch.load(weights_only=False)` any non-tensor entry):

- `model.<name>`: the trainable weights (with LoRA only the adapters; the frozen base weights come
  from `checkpoint.initial_load_path` again on resume);
- `optimizer.<name>.<state>`: each parameter's optimizer state keyed by the parameter's name,
  DTensors where the parameter is one, so DCP reshards it exactly like the weights;
  `optimizer.loss_scaler.*` for LOMO/AdaLomo's fp16 loss scale;
- `lr_scheduler`: the scheduler's state_dict as JSON bytes;
- `dataloader.*`: the loader's `position()` in the global data order, which does not depend on the
  layout (every layout takes the same global batches): `epoch` and `sequences` consumed of it for
  in-memory data, the blocks `taken` from each token corpus (and their `blocks` counts) for streams;
- `rng.cpu` (and `rng.cuda`), `step`.

Names are the whole model's, whatever the pipeline split, so a checkpoint saved under one layout
loads under any other. DCP writes into `step-N.partial`, renamed to `step-N` only once complete: a
crash during a save leaves the previous checkpoint intact, and the next start removes the partial
folder with a warning. At the end of a run the trained model alone goes to `<dump_folder>/weights`
(`checkpoint.save_weights`): the weights under their plain names, the format
`checkpoint.initial_load_path`, the converters and `dtcollie.generate` take. Every checkpoint and
weights folder also holds `model_args.json` (and `lora.json` for LoRA runs) and the run's tokenizer
files, so the tools can read it alone.
"""

import json
import logging
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter

from dtcollie.checkpoint import (SafeFileSystemReader, check_shapes, checkpoint_shapes, model_state_dict,
                                 read_checkpoint_metadata, single_process_dcp, stored_name)
from dtcollie.config import Checkpoint as CheckpointConfig

log = logging.getLogger("dtcollie")

STEP_KEY = "step"  # present in resumable checkpoints only
PARTIAL_SUFFIX = ".partial"
_STEP_FOLDER = re.compile(r"step-(\d+)")


def json_tensor(value) -> torch.Tensor:
    return torch.frombuffer(bytearray(json.dumps(value).encode()), dtype=torch.uint8)


def from_json_tensor(tensor: torch.Tensor):
    return json.loads(bytes(tensor.tolist()).decode())


def is_resumable(folder: str | Path) -> bool:
    return STEP_KEY in read_checkpoint_metadata(folder).state_dict_metadata


def trainable_state(parts: list) -> dict[str, torch.Tensor]:
    """The weights a checkpoint stores: every trainable parameter of this rank's model parts."""
    state = {}
    for part in parts:
        trainable = {stored_name(part, name) for name, p in part.named_parameters() if p.requires_grad}
        state.update({name: t for name, t in model_state_dict(part).items() if name in trainable})
    return state


def optimizer_state(optimizer: torch.optim.Optimizer, parts: list) -> dict[str, torch.Tensor]:
    """Each parameter's optimizer state under `<parameter name>.<state name>` (its stored name: a
    tied output copy's state is the embedding's, which it equals)."""
    state = {}
    for part in parts:
        for name, param in part.named_parameters():
            for key, value in optimizer.state.get(param, {}).items():
                state[f"{stored_name(part, name)}.{key}"] = value
    scaler = getattr(optimizer, "scaler", None)
    if scaler is not None:
        state["loss_scaler.scale"] = torch.tensor(scaler.scale, dtype=torch.float64)
        state["loss_scaler.clean_steps"] = torch.tensor(scaler.clean_steps)
    return state


def init_optimizer_state(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> None:
    """Create every parameter's state (torch optimizers create it lazily, on the first step) with one
    step on zero gradients at lr 0, so that a checkpoint can be loaded into it in place."""
    for param in params:
        param.grad = torch.zeros_like(param)
    lrs = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)


def _prefixed(prefix: str, entries: dict) -> dict:
    return {f"{prefix}.{key}": value for key, value in entries.items()}


def _unprefixed(prefix: str, entries: dict) -> dict:
    return {key[len(prefix) + 1:]: value for key, value in entries.items() if key.startswith(f"{prefix}.")}


def complete_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoint folders under `folder`, oldest first."""
    found = [(int(m.group(1)), p) for p in folder.glob("step-*")
             if (m := _STEP_FOLDER.fullmatch(p.name)) and (p / ".metadata").is_file()]
    return [p for _, p in sorted(found)]


def checkpoint_step(folder: Path) -> int:
    """The step of a `step-N` checkpoint folder."""
    return int(_STEP_FOLDER.fullmatch(folder.name).group(1))


def latest_resumable(folder: Path) -> Path | None:
    """The newest complete resumable checkpoint under `folder` (a run's checkpoints/), or None."""
    return next((p for p in reversed(complete_checkpoints(folder)) if is_resumable(p)), None)


class Checkpointer:
    """Saves and finds checkpoints of one run; every rank calls `save` (DCP is collective)."""

    def __init__(self, cfg: CheckpointConfig, dump_folder: str, rank: int, use_dist: bool):
        self.cfg, self.rank, self.use_dist = cfg, rank, use_dist
        self.folder = Path(dump_folder) / "checkpoints"
        self.pending = None  # (future, partial folder, final folder) of an async save
        self.last_saved_step = None
        # The background writer gets its own gloo group, so its collectives never interleave with
        # the training loop's on the default group (the one process group not from the mesh).
        self.async_group = dist.new_group(backend="gloo") if cfg.async_mode == "async" and use_dist else None

    @property
    def enabled(self) -> bool:
        return self.cfg.interval > 0

    def due(self, step: int) -> bool:
        return self.enabled and step % self.cfg.interval == 0

    def remove_partial(self) -> None:
        """Drop the folders of interrupted saves (rank 0), with a warning on every rank."""
        for partial in sorted(self.folder.glob(f"step-*{PARTIAL_SUFFIX}")):
            log.warning("ignoring incomplete checkpoint %s (a save was interrupted); removing it", partial)
            if self.rank == 0:
                shutil.rmtree(partial, ignore_errors=True)

    def save(self, step: int, state: dict[str, torch.Tensor], write_files=None) -> None:
        """Write `state` to step-<step> (atomically); with async_mode the write finishes in the
        background. `write_files(folder)`, run on rank 0, adds small files (model_args.json, ...)."""
        self._write(self.folder / f"step-{step}", state, write_files, self.cfg.async_mode == "async")
        self.last_saved_step = step

    def save_weights(self, folder: Path, state: dict[str, torch.Tensor], write_files) -> None:
        """The trained model alone into `folder` (atomically, replacing an older one), synchronously."""
        self._write(folder, state, write_files, background=False)

    def _write(self, final: Path, state: dict[str, torch.Tensor], write_files, background: bool) -> None:
        self.wait()
        partial = final.with_name(final.name + PARTIAL_SUFFIX)
        if self.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            if write_files is not None:
                write_files(partial)
        self._barrier()
        writer = FileSystemWriter(partial)
        with single_process_dcp():
            if background:
                future = dcp.async_save(state, storage_writer=writer, process_group=self.async_group,
                                        no_dist=not self.use_dist)
                self.pending = (future, partial, final)
            else:
                dcp.save(state, storage_writer=writer, no_dist=not self.use_dist)
                self._publish(partial, final)

    def wait(self) -> None:
        """Finish (and publish) an async save in flight."""
        if self.pending is None:
            return
        future, partial, final = self.pending
        self.pending = None
        future.result()
        self._publish(partial, final)

    def load(self, folder: Path, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Load `folder` into `state` in place (after checking every key and shape) and return it;
        `lr_scheduler` is read as stored (its size is the checkpoint's)."""
        shapes = checkpoint_shapes(read_checkpoint_metadata(folder))
        # Other pipeline stages' entries are in the checkpoint too: only this rank's must match.
        check_shapes(shapes, {name: tuple(t.shape) for name, t in state.items() if name != "lr_scheduler"},
                     f"checkpoint {folder}", allow_unexpected=True)
        state = {**state, "lr_scheduler": torch.empty(shapes["lr_scheduler"], dtype=torch.uint8)}
        with single_process_dcp():
            dcp.load(state, storage_reader=SafeFileSystemReader(folder), no_dist=not self.use_dist)
        return state

    def _publish(self, partial: Path, final: Path) -> None:
        """Make a complete checkpoint visible, then drop the oldest beyond keep_latest_k (rank 0)."""
        self._barrier()
        if self.rank == 0:
            shutil.rmtree(final, ignore_errors=True)
            partial.rename(final)
            keep = self.cfg.keep_latest_k
            for old in complete_checkpoints(self.folder)[:-keep] if keep else []:
                shutil.rmtree(old, ignore_errors=True)
        self._barrier()

    def _barrier(self) -> None:
        if self.use_dist:
            dist.barrier()


def weights_state(parts: list) -> dict[str, torch.Tensor]:
    """This rank's share of the whole model's weights, under their plain names (a weights folder)."""
    return {name: t for part in parts for name, t in model_state_dict(part).items()}


def training_state(trainer) -> dict[str, torch.Tensor]:
    """The flat tensor dict a checkpoint holds for this rank (see the module docstring)."""
    state = {**_prefixed("model", trainable_state(trainer.model.parts)),
             **_prefixed("optimizer", optimizer_state(trainer.optimizer, trainer.model.parts)),
             "lr_scheduler": json_tensor(trainer.scheduler.state_dict()),
             **_prefixed("dataloader", trainer.train_loader.position()),
             "rng.cpu": torch.get_rng_state(),
             STEP_KEY: torch.tensor(trainer.step)}
    if trainer.device.type == "cuda":
        state["rng.cuda"] = torch.cuda.get_rng_state(trainer.device)
    return state


def resume(trainer, folder: Path) -> None:
    """Continue `trainer` from `folder`: weights, optimizer state, LR schedule, data position, RNG, step."""
    init_optimizer_state(trainer.optimizer, [p for p in trainer.model.parameters() if p.requires_grad])
    state = trainer.checkpointer.load(folder, training_state(trainer))
    scaler = getattr(trainer.optimizer, "scaler", None)
    if scaler is not None:
        scaler.scale = float(state["optimizer.loss_scaler.scale"])
        scaler.clean_steps = int(state["optimizer.loss_scaler.clean_steps"])
    trainer.scheduler.load_state_dict(from_json_tensor(state["lr_scheduler"]))
    for group, lr in zip(trainer.optimizer.param_groups, trainer.scheduler.get_last_lr()):
        group["lr"] = lr
    trainer.train_loader.restore(_unprefixed("dataloader", state))
    torch.set_rng_state(state["rng.cpu"])
    if "rng.cuda" in state:
        torch.cuda.set_rng_state(state["rng.cuda"], trainer.device)
    trainer.step = int(state[STEP_KEY])
