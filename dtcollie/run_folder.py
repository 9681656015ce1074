"""One run per `job.dump_folder`: a new run, an explicit resume, or a refusal in one line.

A run folder holds one run's config.toml, metrics.jsonl, tb/, checkpoints/ and weights/. Starting
a run there again means continuing it: from its newest resumable checkpoint, with every key that
decides the model, the data order or the optimizer unchanged (`training.steps` may grow: the
schedule is then re-planned over the new total, and the console says so). Anything else (a folder
holding another run, a finished run, a run with nothing to resume from) is refused, naming the
way out: a new `job.dump_folder`, or `job.overwrite = true` to replace the old run. A fresh
sub-folder per run was the alternative; it was not chosen because resume, export and TensorBoard
all name the run by its folder, and a folder that silently changes per start breaks all three.
"""

import dataclasses
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from dtcollie import config as config_module
from dtcollie.checkpointer import checkpoint_step, latest_resumable
from dtcollie.config import ConfigError, JobConfig

RUN_CONFIG = "config.toml"
RUN_ENTRIES = (RUN_CONFIG, "metrics.jsonl", "tb", "checkpoints", "weights")
NOT_COMPARED = ("job.dump_folder", "job.overwrite")  # where the run is, and how this start treats it
# Keys a resumed run may change: they decide how the same computation is laid out, logged, saved or
# evaluated, not which model, data order or update rule it is.
CHANGEABLE_SECTIONS = ("parallelism", "metrics", "eval", "activation_checkpoint", "compile")
CHANGEABLE_KEYS = ("training.steps", "training.micro_batch_size",
                   "training.mixed_precision", "training.eval_interval", "training.eval_steps", "training.device",
                   "checkpoint.interval", "checkpoint.keep_latest_k", "checkpoint.async_mode",
                   "checkpoint.save_weights", "data.num_workers", "model.attention")


@dataclass
class RunStart:
    """What this start of the run does: `resume_from` a checkpoint (None: a new run), `changes` the
    keys that differ from the saved run as "key old -> new", and whether old run files go first."""
    resume_from: Path | None = None
    changes: list[str] = dataclasses.field(default_factory=list)
    replace_old: bool = False


def flat_config(config: JobConfig) -> dict:
    return {f"{section}.{key}": value for section, table in dataclasses.asdict(config).items()
            for key, value in table.items()}


def changed_keys(saved: JobConfig, config: JobConfig) -> list[tuple[str, object, object]]:
    old, new = flat_config(saved), flat_config(config)
    return [(key, old[key], new[key]) for key in new if old[key] != new[key] and key not in NOT_COMPARED]


def read_saved_config(path: Path) -> JobConfig:
    try:
        return config_module.load(str(path))
    except ConfigError as err:
        raise ConfigError(f"{path} (the config of the run in this folder) cannot be read ({err}); choose another "
                          f"job.dump_folder, or set job.overwrite = true to replace that run") from None


def plan_run_start(config: JobConfig) -> RunStart:
    """Decide, from the files alone (every rank decides the same), what this start does."""
    folder = Path(config.job.dump_folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"job.dump_folder {folder} is a file, not a folder; choose another job.dump_folder")
    existing = next(path for path in Path(os.path.abspath(folder)).parents if path.exists())
    if not folder.exists() and not existing.is_dir():
        raise ConfigError(f"job.dump_folder {folder} cannot be created: {existing} is a file; choose another "
                          f"job.dump_folder")
    present = [name for name in RUN_ENTRIES if (folder / name).exists()]
    way_out = "choose another job.dump_folder, or set job.overwrite = true to replace it"
    if config.job.overwrite:
        return RunStart(replace_old=bool(present))
    if not present:
        return RunStart()
    latest = latest_resumable(folder / "checkpoints")
    if latest is None and never_stepped(folder, present):
        return RunStart(replace_old=True)  # a start that failed before its first step: nothing to keep
    if latest is None and "weights" in present:
        raise ConfigError(f"{folder} holds a finished run (its weights are in {folder / 'weights'}); {way_out}")
    if latest is None:
        raise ConfigError(f"{folder} already holds a run ({', '.join(present)}) with no checkpoint to resume it "
                          f"from; {way_out}")
    start = RunStart(resume_from=latest)
    if (folder / RUN_CONFIG).is_file():
        changes = changed_keys(read_saved_config(folder / RUN_CONFIG), config)
        fixed = [change for change in changes if not changeable(change[0])]
        if fixed:
            key, old, new = fixed[0]
            raise ConfigError(f"{folder} holds a run with {key} = {old!r}, not {new!r}; a resumed run must keep it "
                              f"(it decides the model, the data order or the update); {way_out}")
        start.changes = [f"{key} {old!r} -> {new!r}" for key, old, new in changes]
    if checkpoint_step(latest) >= config.training.steps:
        raise ConfigError(f"the run in {folder} is finished ({latest.name} of training.steps = "
                          f"{config.training.steps}); raise training.steps to continue it, or {way_out}")
    return start


def never_stepped(folder: Path, present: list[str]) -> bool:
    """Whether the folder's run recorded no step and saved nothing (it stopped during start-up)."""
    metrics = folder / "metrics.jsonl"
    return ("checkpoints" not in present and "weights" not in present
            and (not metrics.is_file() or metrics.stat().st_size == 0))


def changeable(key: str) -> bool:
    return key in CHANGEABLE_KEYS or key.split(".")[0] in CHANGEABLE_SECTIONS


def remove_old_run(folder: Path) -> None:
    """job.overwrite: delete the previous run's files (only the names a run writes)."""
    for name in RUN_ENTRIES:
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def describe_run_start(start: RunStart, steps: int) -> str:
    """The console line saying what this start continues."""
    if start.resume_from is None:
        return ""
    line = f"resuming from {start.resume_from} (step {checkpoint_step(start.resume_from)} of {steps})"
    if any(change.startswith("training.steps ") for change in start.changes):
        line += "; training.steps changed, so the learning-rate schedule is re-planned over the new total from here"
    if start.changes:
        line += " | changed: " + ", ".join(start.changes)
    return line
