"""Resumable training checkpoints: DCP folders `<dump_folder>/checkpoints/step-N`.

A checkpoint is one flat dict of tensors collected from the trainer's stateful components
(`dtcollie.train_state`), so that loading unpickles nothing but the allow-listed DCP metadata (DCP
would `torch.load(weights_only=False)` any non-tensor entry):

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
loads under any other. DCP writes into `step-N.partial`, renamed to `step-N` only once complete
(with its `files.json`, see dtcollie.dcp_weights): a crash during a save leaves the previous
checkpoint intact, and the next start removes the partial folder with a warning. A save that fails
(disk full, no permission) removes its partial folder and stops the run with one line; the older
checkpoints are untouched. A resume takes the newest checkpoint whose files are complete (an
older one, with a warning, when the newest is truncated or unreadable) and refuses one whose
entries are not exactly this run's: another optimizer, LoRA setting or model shape. At the end of
a run the trained model alone goes to `<dump_folder>/weights` (`checkpoint.save_weights`): the
weights under their plain names, the format `checkpoint.initial_load_path`, the converters and
`dtcollie.generate` take. Every checkpoint and
weights folder also holds `model_args.json` (and `lora.json` for LoRA runs) and the run's tokenizer
files, so the tools can read it alone.
"""

import contextlib
import errno
import logging
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException

from dtcollie.dcp_weights import (check_shapes, checkpoint_shapes, dcp_load, first_failure, first_names,
                                  model_state_dict, one_line, read_checkpoint_metadata, single_process_dcp,
                                  write_manifest)
from dtcollie.config import Checkpoint as CheckpointConfig
from dtcollie.errors import CheckpointError, describe_os_error

log = logging.getLogger("dtcollie")

STEP_KEY = "step"  # present in resumable checkpoints only
PARTIAL_SUFFIX = ".partial"
_STEP_FOLDER = re.compile(r"step-(\d+)")


def is_resumable(folder: str | Path) -> bool:
    return STEP_KEY in read_checkpoint_metadata(folder).state_dict_metadata


def complete_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoint folders under `folder`, oldest first."""
    found = [(int(m.group(1)), p) for p in folder.glob("step-*")
             if (m := _STEP_FOLDER.fullmatch(p.name)) and (p / ".metadata").is_file()]
    return [p for _, p in sorted(found)]


def checkpoint_step(folder: Path) -> int:
    """The step of a `step-N` checkpoint folder."""
    return int(_STEP_FOLDER.fullmatch(folder.name).group(1))


def latest_resumable(folder: Path) -> Path | None:
    """The newest complete resumable checkpoint under `folder` (a run's checkpoints/), or None; a
    newer one that is truncated or unreadable is passed over with a warning."""
    for checkpoint in reversed(complete_checkpoints(folder)):
        try:
            if is_resumable(checkpoint):
                return checkpoint
        except CheckpointError as err:
            log.warning("passing over %s, which cannot be resumed (%s); trying the one before it", checkpoint, err)
    return None


class Checkpointer:
    """Saves and finds checkpoints of one run; every rank calls `save` (DCP is collective)."""

    def __init__(self, cfg: CheckpointConfig, dump_folder: str, rank: int, use_dist: bool):
        self.cfg, self.rank, self.use_dist = cfg, rank, use_dist
        self.folder = Path(dump_folder) / "checkpoints"
        self.pending = None  # (future, partial folder, final folder, bytes) of an async save
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

    def save(self, step: int, components: dict, write_files=None) -> None:
        """Write the components' state to step-<step> (atomically); with async_mode the write finishes
        in the background. `write_files(folder)`, run on rank 0, adds small files (model_args.json, ...)."""
        self._write(self.folder / f"step-{step}", flat_state(components), write_files, self.cfg.async_mode == "async")
        self.last_saved_step = step

    def save_weights(self, folder: Path, state: dict[str, torch.Tensor], write_files) -> None:
        """The trained model alone into `folder` (atomically, replacing an older one), synchronously."""
        self._write(folder, state, write_files, background=False)

    def _write(self, final: Path, state: dict[str, torch.Tensor], write_files, background: bool) -> None:
        self.wait()
        partial = final.with_name(final.name + PARTIAL_SUFFIX)
        with self._failing_save(partial, final):
            if self.rank == 0:
                shutil.rmtree(partial, ignore_errors=True)
                partial.mkdir(parents=True)
                if write_files is not None:
                    write_files(partial)
        self._barrier()
        writer = FileSystemWriter(partial)
        needed = sum(t.nbytes for t in state.values())
        with self._failing_save(partial, final, needed), single_process_dcp():
            if background:
                future = dcp.async_save(state, storage_writer=writer, process_group=self.async_group,
                                        no_dist=not self.use_dist)
                self.pending = (future, partial, final, needed)
            else:
                dcp.save(state, storage_writer=writer, no_dist=not self.use_dist)
        if not background:
            self._publish(partial, final)

    def wait(self) -> None:
        """Finish (and publish) an async save in flight."""
        if self.pending is None:
            return
        future, partial, final, needed = self.pending
        self.pending = None
        with self._failing_save(partial, final, needed):
            future.result()
        self._publish(partial, final)

    @contextlib.contextmanager
    def _failing_save(self, partial: Path, final: Path, needed: int = 0):
        """A save that fails leaves nothing half-written behind and says why in one line. (DCP gathers
        every rank's write errors and raises them on all ranks, so every rank stops here together.)
        A full disk often surfaces as torch.save's own error ("unexpected pos"), so the free space
        is checked against the `needed` bytes of this rank's state before the partial folder goes."""
        try:
            yield
        except (OSError, RuntimeError, CheckpointException) as err:
            _, inner = first_failure(err)
            if isinstance(inner, OSError):
                reason = describe_os_error(inner)
            elif shutil.disk_usage(partial.parent).free < needed:
                reason = describe_os_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(partial.parent)))
            else:
                reason = one_line(inner)
            if self.rank == 0:
                shutil.rmtree(partial, ignore_errors=True)
            raise CheckpointError(f"saving {final} failed ({reason}); the checkpoints saved before it are intact"
                                  ) from None

    def load(self, folder: Path, components: dict) -> None:
        """Load `folder` into the components (after checking every key and shape). Byte entries
        (JSON, RNG states) are read at their stored size."""
        for component in components.values():
            if hasattr(component, "prepare_to_load"):
                component.prepare_to_load()
        state = flat_state(components)
        shapes = checkpoint_shapes(read_checkpoint_metadata(folder))
        # Entries newer than the checkpoint's format are read when present (see `added_later`).
        later = {f"{name}.{key}" for name, component in components.items()
                 for key in getattr(component, "added_later", ())}
        state = {name: t for name, t in state.items() if name in shapes or name not in later}
        sized = {name for name, t in state.items() if t.dtype == torch.uint8 and name in shapes}
        # Other pipeline stages' entries are in the checkpoint too: only this rank's must match here,
        # and all ranks' together must be exactly the checkpoint's (below).
        check_shapes(shapes, {name: tuple(t.shape) for name, t in state.items() if name not in sized},
                     f"checkpoint {folder}", allow_unexpected=True)
        self._check_no_foreign_entries(folder, shapes, set(state))
        state.update({name: torch.empty(shapes[name], dtype=torch.uint8) for name in sized})
        dcp_load(state, folder, no_dist=not self.use_dist)
        for name, component in components.items():
            component.load_state_dict(entries_of(state, name))

    def _check_no_foreign_entries(self, folder: Path, shapes: dict, names: set[str]) -> None:
        """Refuse entries no rank of this run has: the state of another optimizer (AdamW's exp_avg_sq
        under Lion), the base weights of a full run under LoRA. The RNG's may differ (a GPU run's
        CUDA generator resumed on CPU)."""
        if self.use_dist:
            every_rank = [None] * dist.get_world_size()
            dist.all_gather_object(every_rank, sorted(names))
            names = set().union(*every_rank)
        foreign = [name for name in shapes if name not in names and not name.startswith("rng.")]
        if foreign:
            raise CheckpointError(f"checkpoint {folder} holds entries this run has no place for: "
                                  f"{first_names(foreign)}; it was saved with another optimizer, LoRA setting or "
                                  f"model, which a resume must keep")

    def _publish(self, partial: Path, final: Path) -> None:
        """Make a complete checkpoint visible, then drop the oldest beyond keep_latest_k (rank 0)."""
        self._barrier()
        if self.rank == 0:
            with self._failing_save(partial, final):
                write_manifest(partial)
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


def flat_state(components: dict) -> dict[str, torch.Tensor]:
    """One flat dict of the components' tensors: component `name`'s key `k` as `name.k`, "" as `name`."""
    return {f"{name}.{key}" if key else name: value
            for name, component in components.items() for key, value in component.state_dict().items()}


def entries_of(state: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """Component `name`'s entries of a flat state, under its own keys (the inverse of flat_state)."""
    entries = {key[len(name) + 1:]: value for key, value in state.items() if key.startswith(f"{name}.")}
    if name in state:
        entries[""] = state[name]
    return entries
