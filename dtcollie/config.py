"""Job configuration: one dataclass per TOML section, keys equal to field names.

`load(path, overrides)` reads a TOML file, applies command-line overrides (`--section.key=value` or
`--section.key value`, later wins) and checks every key, type and value. Every problem is a
`ConfigError` with a one-line message naming the key and what is allowed.
"""

import dataclasses
import difflib
import json
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from dtcollie.errors import ConfigError, shown
from dtcollie.optim.registry import OPTIMIZERS
from dtcollie.precision import BF16_COMPUTE

# Input paths starting with this name the files shipped inside the package, wherever it is installed.
ASSETS_PREFIX = "dtcollie/assets/"
PACKAGE_PARENT = Path(__file__).resolve().parent.parent
INT_LIMIT = 2**63  # every int is an int64 somewhere (a tensor, a generator seed)
# option(path=...): an input path; WEIGHTED: "PATH" or "PATH:WEIGHT" entries, whose PATH part is resolved.
PATH, WEIGHTED = "path", "weighted"


def option(default, doc: str, choices=(), minimum=None, below=None, path: str | None = None):
    """A config field with its one-line doc, allowed choices (of a list: of each item; a function
    for names defined in a module that imports this one), lower bound (inclusive), upper bound
    (exclusive; an int is below 2**63 anyway) and whether it holds input paths (resolved by `load`,
    see `resolve_path`). A float must also be finite."""
    meta = {"doc": doc, "choices": choices, "minimum": minimum, "below": below, "path": path}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def flavor_names() -> tuple:
    from dtcollie.models.llama import FLAVORS  # imported late: dtcollie.models.llama imports this module

    return tuple(FLAVORS)


def lora_target_names() -> tuple:
    from dtcollie.peft.lora import TARGETS  # imported late: reading a config needs no torch

    return tuple(TARGETS)


def field_choices(f: dataclasses.Field) -> tuple:
    """A field's choices; empty when any value of its type goes."""
    choices = f.metadata["choices"]
    return choices() if callable(choices) else choices


@dataclass
class Job:
    dump_folder: str = option("./outputs/debug", "run folder (one run each): config.toml, metrics.jsonl, tb/, "
                              "checkpoints/, weights/; a run started again there resumes from its latest "
                              "checkpoint")
    seed: int = option(42, "seed for the initial weights and the data order", minimum=0)
    overwrite: bool = option(False, "replace the run already in dump_folder (its config.toml, metrics, tb/, "
                             "checkpoints/ and weights/) instead of resuming it or refusing to start")


@dataclass
class Model:
    flavor: str = option("debug", "named model shape (dtcollie.models.llama.FLAVORS)", choices=flavor_names)
    args_path: str = option("", "model_args.json (from convert_hf_to_dcp) or HF config.json; overrides flavor",
                            path=PATH)
    attention: str = option("sdpa", "attention kernel: sdpa (any device) or flash (flash-attn, CUDA)",
                            choices=("sdpa", "flash"))


@dataclass
class Parallelism:
    dp_replicate: int = option(1, "data-parallel replicas (HSDP when > 1 together with dp_shard > 1)", minimum=1)
    dp_shard: int = option(-1, "FSDP shard group size; -1: whatever the world size leaves", minimum=-1)
    tp: int = option(1, "tensor-parallel size (must divide heads, kv heads, hidden and vocab)", minimum=1)
    pp: int = option(1, "pipeline-parallel size (ranks in a pipeline)", minimum=1)
    sequence_parallel: bool = option(True, "with tp > 1: norms and residual activations sharded on sequence")
    loss_parallel: bool = option(True, "with tp > 1: cross-entropy on vocab-sharded logits")
    pp_schedule: str = option("1F1B", "pipeline schedule", choices=(
        "GPipe", "1F1B", "Interleaved1F1B", "InterleavedZeroBubble", "ZBVZeroBubble"))
    pp_stages_per_rank: int = option(1, "pipeline stages per rank: 1 for GPipe/1F1B, >= 2 for interleaved, "
                                     "2 for ZBVZeroBubble", minimum=1)
    pp_microbatches: int = option(0, "micro-batches each micro_batch_size batch is split into in the "
                                  "pipeline; 0: one per pipeline stage", minimum=0)
    pp_partition: str = option("uniform", "layers per stage: uniform, parameters (balance parameter counts), "
                               "or a comma list of layer counts such as 3,5")
    fsdp_reshard_after_forward: bool = option(True, "free gathered parameters after forward (ZeRO-3); false "
                                              "keeps them until backward (ZeRO-2-like, more memory)")
    fsdp_cpu_offload: bool = option(False, "keep sharded parameters, gradients and optimizer state in CPU memory")


@dataclass
class Training:
    steps: int = option(200, "optimizer steps to run", minimum=1)
    global_batch_size: int = option(8, "sequences per optimizer step, over all data-parallel ranks", minimum=1)
    micro_batch_size: int = option(8, "sequences per forward per data-parallel rank; accumulation is derived",
                                   minimum=1)
    seq_len: int = option(128, "tokens per training sequence", minimum=2, below=2**24)
    max_norm: float = option(1.0, "clip gradients to this global L2 norm; 0 disables clipping", minimum=0.0)
    mixed_precision: str = option("fp32", "bf16: bf16 compute, fp32 master weights (autocast or FSDP's policy); "
                                  "bf16_weights: the weights themselves in bf16, no fp32 copy (lomo and adalomo "
                                  "only, which update in float32 pieces); fp32: plain fp32; fp64: float64 "
                                  "weights, compute, reductions and updates (a reference for exactness checks)",
                                  choices=(*BF16_COMPUTE, "fp32", "fp64"))
    eval_interval: int = option(50, "validate every this many steps and at the end; 0 disables", minimum=0)
    eval_steps: int = option(4, "validation batches per evaluation", minimum=1)
    device: str = option("auto", "auto picks CUDA when available, else CPU", choices=("auto", "cpu", "cuda"))


def default_betas(index: int) -> str:
    """The registry's published defaults for decay rate `index`, for a key's one-line doc."""
    return ", ".join(f"{name} {spec.betas[index]}" for name, spec in OPTIMIZERS.items() if len(spec.betas) > index)


@dataclass
class Optimizer:
    name: str = option("adamw", "optimizer; lomo and adalomo update inside backward (no gradient accumulation)",
                       choices=tuple(OPTIMIZERS))
    lr: float = option(1e-3, "peak learning rate", minimum=0.0)
    weight_decay: float = option(0.1, "weight decay (decoupled; norms excluded for adamw/lion/adan/sophiag)",
                                 minimum=0.0)
    beta1: float = option(-1.0, f"first decay rate in [0, 1); -1: the optimizer's default ({default_betas(0)})",
                         minimum=-1.0, below=1.0)
    beta2: float = option(-1.0, f"second decay rate in [0, 1); -1: the optimizer's default ({default_betas(1)})",
                         minimum=-1.0, below=1.0)
    beta3: float = option(-1.0, f"third decay rate in [0, 1); -1: the optimizer's default ({default_betas(2)})",
                         minimum=-1.0, below=1.0)
    eps: float = option(1e-8, "adamw, adan: denominator epsilon", minimum=0.0)
    implementation: str = option("auto", "adamw kernel: auto (= fused, on CUDA and CPU), fused, foreach, for-loop",
                                 choices=("auto", "fused", "foreach", "for-loop"))
    no_prox: bool = option(False, "adan: decoupled weight decay before the step instead of the proximal form")
    rho: float = option(0.04, "sophiag: clipping scale of the Hessian-preconditioned step", minimum=0.0)
    hessian_interval: int = option(10, "sophiag: re-estimate the diagonal Hessian every this many steps", minimum=1)
    clip_grad_value: float = option(0.0, "lomo, adalomo: clip each gradient element to +-this; 0 disables",
                                    minimum=0.0)
    clip_threshold: float = option(1.0, "adalomo: update RMS above which the update is scaled down", minimum=0.0)
    decay_rate: float = option(-0.8, "adalomo: second-moment decay exponent, beta2_t = 1 - t^decay_rate",
                               below=0.0)

    def betas(self) -> tuple:
        """This optimizer's betas, with -1 entries replaced by its defaults."""
        chosen = (self.beta1, self.beta2, self.beta3)
        return tuple(default if value == -1.0 else value
                     for value, default in zip(chosen, OPTIMIZERS[self.name].betas))


@dataclass
class LRScheduler:
    warmup_steps: int = option(20, "linear warmup steps from 0 to optimizer.lr", minimum=0)
    decay_type: str = option("cosine", "decay after warmup down to min_lr at the last step",
                             choices=("cosine", "linear", "constant"))
    min_lr: float = option(1e-4, "learning rate at the last step (must not exceed optimizer.lr)", minimum=0.0)


@dataclass
class Data:
    tokenizer: str = option("dtcollie/assets/tokenizer", "folder with tokenizer.json", path=PATH)
    kind: str = option("pretrain", "pretrain: packed text; sft: input/output pairs, loss on outputs; chat: "
                       "conversations (messages or ShareGPT conversations) rendered with the tokenizer's chat "
                       "template, loss on assistant turns; tokens: pre-training streamed from token-shard corpora "
                       "(tools/tokenize_corpus.py)", choices=("pretrain", "sft", "chat", "tokens"))
    train_files: list = option(["dtcollie/assets/text/*.txt"], "files or globs (.txt, .jsonl, .parquet)",
                              path=PATH)
    val_files: list = option([], "validation files or globs; empty: hold out val_fraction of train documents",
                            path=PATH)
    hf_dataset: str = option("", "a local Hugging Face dataset instead of train_files/val_files: a save_to_disk "
                             "folder, a dataset folder, or .parquet/.arrow/.json/.jsonl/.csv files or a glob",
                             path=PATH)
    hf_split: str = option("train", "hf_dataset: the split to train on")
    hf_val_split: str = option("", "hf_dataset: the validation split; empty: hold out val_fraction of hf_split")
    val_fraction: float = option(0.02, "documents held out for validation when val_files is empty",
                                 minimum=0.0, below=1.0)
    sources: list = option([], "tokens: corpus folders, each FOLDER or FOLDER:WEIGHT (a weighted mixture; "
                           "default weight 1)", path=WEIGHTED)
    val_sources: list = option([], "tokens: validation corpus folders (FOLDER or FOLDER:WEIGHT), read in order",
                               path=WEIGHTED)
    text_field: str = option("text", "jsonl field with the document text (pretrain)")
    input_field: str = option("input", "jsonl field with the prompt (sft)")
    output_field: str = option("output", "jsonl field with the answer (sft)")
    sft_packing: bool = option(False, "sft, chat: pack several examples per sequence instead of padding each "
                               "(each example attends only to itself, positions restart per example)")
    document_mask: bool = option(False, "pretrain, tokens: attention and RoPE positions restart at every document "
                                 "(after each EOS) in a sequence; false: attend across documents")
    chat_template: str = option("", "chat: a Jinja chat template file to use instead of the tokenizer's own",
                                path=PATH)
    chat_last_turn_only: bool = option(False, "chat: train on the last assistant turn only (default: on every one)")
    skip_bad_lines: bool = option(False, "skip malformed jsonl lines (and log their count) instead of failing")
    num_workers: int = option(0, "data-loader worker processes", minimum=0)


@dataclass
class Eval:
    choice_files: list = option([], "jsonl files {question, choices, answer}: multiple-choice accuracy (acc, "
                                "acc_norm, by log-likelihood as lm-eval), at every training.eval_interval",
                                path=PATH)
    generation_files: list = option([], "jsonl files {prompt, answer}: greedy generation exact match, at every "
                                    "training.eval_interval", path=PATH)
    max_new_tokens: int = option(32, "generation_files: tokens generated per prompt at most", minimum=1)
    batch_size: int = option(8, "rows per evaluation forward on each data-parallel rank", minimum=1)
    samples: int = option(3, "generations logged as TensorBoard text (eval/samples) at each evaluation", minimum=0)


@dataclass
class Checkpoint:
    initial_load_path: str = option("", "DCP folder with model weights to start from (convert_hf_to_dcp output)",
                                    path=PATH)
    interval: int = option(0, "save a resumable checkpoint to <dump_folder>/checkpoints/step-N every this many "
                           "steps and at the end (0: never); a run started again with the same dump_folder "
                           "resumes from the latest one", minimum=0)
    keep_latest_k: int = option(3, "keep only this many latest checkpoints (0: keep all)", minimum=0)
    save_weights: bool = option(True, "at the end, save the trained model alone to <dump_folder>/weights (with "
                                "model_args.json and the tokenizer files): what tools/convert_dcp_to_hf.py, "
                                "dtcollie.generate and initial_load_path take")
    async_mode: str = option("disabled", "disabled: the loop waits for each save; async: DCP writes in a background "
                             "thread while training goes on", choices=("disabled", "async"))


@dataclass
class Metrics:
    log_freq: int = option(10, "console line and metrics record every this many steps", minimum=1)
    enable_tensorboard: bool = option(True, "write TensorBoard events under <dump_folder>/tb/")


@dataclass
class Peft:
    method: str = option("none", "parameter-efficient fine-tuning: none (train every weight) or lora (train only "
                         "low-rank adapters; every other weight frozen)", choices=("none", "lora"))
    rank: int = option(8, "lora: rank r of each adapter (A is r x in, B is out x r)", minimum=1)
    alpha: float = option(16.0, "lora: the adapter output is scaled by alpha / rank (alpha / sqrt(rank) with "
                          "use_rslora)", minimum=0.0)
    dropout: float = option(0.0, "lora: dropout probability on the adapter input", minimum=0.0,
                          below=1.0)
    use_rslora: bool = option(False, "lora: rank-stabilised scale alpha / sqrt(rank) instead of alpha / rank")
    target_modules: list = option(["wq", "wk", "wv", "wo"], "lora: projections to adapt",
                                  choices=lora_target_names)


@dataclass
class ActivationCheckpoint:
    mode: str = option("none", "recompute activations in backward: none, full (every block) or selective "
                       "(every selective_every-th block)", choices=("none", "full", "selective"))
    selective_every: int = option(2, "with mode = selective: checkpoint every this many blocks", minimum=1)


@dataclass
class Compile:
    enable: bool = option(False, "torch.compile each transformer block and the loss")


# The TOML sections, each a dataclass whose fields are its keys.
SECTIONS = {"job": Job, "model": Model, "parallelism": Parallelism, "training": Training, "optimizer": Optimizer,
            "lr_scheduler": LRScheduler, "data": Data, "eval": Eval, "checkpoint": Checkpoint, "metrics": Metrics,
            "peft": Peft, "activation_checkpoint": ActivationCheckpoint, "compile": Compile}
# One job: an attribute per section (cfg.training.seq_len, ...), each with its defaults.
JobConfig = dataclasses.make_dataclass(
    "JobConfig", [(name, section, field(default_factory=section)) for name, section in SECTIONS.items()])
JobConfig.__module__ = __name__  # where pickle finds it


def _suggest(name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f"; did you mean {close[0]}?" if close else f"; known: {', '.join(sorted(known))}"


def _section_fields(section) -> dict:
    return {f.name: f for f in dataclasses.fields(section)}


def _coerce(key: str, value: Any, kind: type):
    """Check `value` against the field type, returning it (ints widen to float)."""
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        try:
            value = float(value) if ok else value
        except OverflowError:  # an integer past float's range
            raise ConfigError(f"{key} = an integer of {value.bit_length()} bits is not allowed; it must be a finite "
                              f"number") from None
    elif kind is list:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    else:
        ok = isinstance(value, kind)
    if not ok:
        expected = "a list of strings" if kind is list else kind.__name__
        raise ConfigError(f"{key} must be {expected}, got {shown(value)}")
    return value


def _parse_cli_value(text: str, kind: type):
    """Read a command-line value: TOML literal syntax, or a bare string / comma list."""
    if kind is str:
        return text
    if kind is list and not text.startswith("["):
        return [part for part in text.split(",") if part]
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except (ValueError, RecursionError):  # not a TOML literal (or one too deep or long to read): a string
        return text


def resolve_path(value: str, base: Path) -> str:
    """An input path as the run uses it: `dtcollie/assets/...` inside the package; a relative path
    from `base` (the config file's folder, or the working directory for command-line values); made
    absolute, so the run's saved config.toml means the same files from anywhere."""
    if not value:
        return value
    if value.startswith(ASSETS_PREFIX):
        return str(PACKAGE_PARENT / value)
    return os.path.normpath(base / Path(value).expanduser())


def _resolve_weighted(entry: str, base: Path) -> str:
    """"PATH:WEIGHT" keeps its weight; anything else is all path (a bad weight is the data's error)."""
    path, sep, weight = entry.rpartition(":")
    try:
        float(weight)
    except ValueError:
        return resolve_path(entry, base)
    return resolve_path(path, base) + sep + weight if path else resolve_path(entry, base)


def _resolved(value, kind: str | None, base: Path):
    if kind is None:
        return value
    resolve = _resolve_weighted if kind == WEIGHTED else resolve_path
    return [resolve(v, base) for v in value] if isinstance(value, list) else resolve(value, base)


def _set(config: JobConfig, dotted: str, value, base: Path, from_cli: bool) -> None:
    section_name, _, key = dotted.partition(".")
    sections = _section_fields(config)
    if section_name not in sections:
        raise ConfigError(f"unknown section [{section_name}]{_suggest(section_name, sections)}")
    section = getattr(config, section_name)
    fields = _section_fields(section)
    if key not in fields:
        known = [f"{section_name}.{k}" for k in fields] or ["(none: this section has no keys yet)"]
        raise ConfigError(f"unknown key {dotted}{_suggest(dotted, known)}")
    kind = get_type_hints(type(section))[key]
    if from_cli:
        value = _parse_cli_value(value, kind)
    setattr(section, key, _resolved(_coerce(dotted, value, kind), fields[key].metadata["path"], base))


def _check_values(config: JobConfig) -> None:
    for section_name in _section_fields(config):
        section = getattr(config, section_name)
        for f in dataclasses.fields(section):
            value, key = getattr(section, f.name), f"{section_name}.{f.name}"
            choices, minimum = field_choices(f), f.metadata["minimum"]
            unknown = [item for item in value if item not in choices] if isinstance(value, list) else []
            if choices and unknown:
                raise ConfigError(f"{key} item {unknown[0]!r} is not allowed; choose from {', '.join(choices)}")
            if choices and not isinstance(value, list) and value not in choices:
                raise ConfigError(f"{key} = {shown(value)} is not allowed; choose one of {', '.join(choices)}")
            is_int = isinstance(value, int) and not isinstance(value, bool)
            below = INT_LIMIT if is_int and f.metadata["below"] is None else f.metadata["below"]
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{key} = {shown(value)} is not allowed; it must be a finite number")
            if minimum is not None and value < minimum:
                raise ConfigError(f"{key} = {shown(value)} is too small; it must be >= {minimum}")
            if below is not None and value >= below:
                bound = "2**63" if below == INT_LIMIT else below
                raise ConfigError(f"{key} = {shown(value)} is too large; it must be < {bound}")
    for index, beta in enumerate(config.optimizer.betas()):
        if beta < 0.0:
            raise ConfigError(f"optimizer.beta{index + 1} = {beta!r} is not allowed; it must be -1 (the optimizer's "
                              f"default) or in [0, 1)")
    # A key of another optimizer set away from its default would be silently ignored: refuse it.
    # (Defaults are allowed, so an effective config.toml, which lists every key, loads again.)
    optimizer = config.optimizer
    allowed = OPTIMIZERS[optimizer.name].keys | {"name", "lr", "weight_decay"}
    foreign = [f"optimizer.{f.name}" for f in dataclasses.fields(optimizer)
               if f.name not in allowed and getattr(optimizer, f.name) != f.default]
    if foreign:
        raise ConfigError(f"{foreign[0]} does not apply to optimizer.name = {optimizer.name!r}; its keys are "
                          f"{', '.join(sorted(allowed))}")
    training, scheduler = config.training, config.lr_scheduler
    if config.lr_scheduler.min_lr > config.optimizer.lr:
        raise ConfigError(f"lr_scheduler.min_lr = {scheduler.min_lr} exceeds optimizer.lr = {config.optimizer.lr}")
    if training.global_batch_size % training.micro_batch_size:
        raise ConfigError(f"training.global_batch_size = {training.global_batch_size} is not a multiple of "
                          f"training.micro_batch_size = {training.micro_batch_size}")


def parse_overrides(argv: list[str]) -> tuple[str | None, list[tuple[str, str]]]:
    """Split `--config F --a.b=v --c.d v` into the config path and (key, value) overrides."""
    config_path, overrides, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; use --config FILE and --section.key value")
        name, has_value, value = arg[2:].partition("=")
        if not has_value:
            if i + 1 >= len(argv):
                raise ConfigError(f"{arg} needs a value")
            value, i = argv[i + 1], i + 1
        if name == "config":
            config_path = value
        elif "." in name:
            overrides.append((name, value))
        else:
            raise ConfigError(f"unknown option --{name}; use --config FILE or --section.key value")
        i += 1
    return config_path, overrides


def read_toml_file(path: Path, what: str) -> dict:
    """The TOML table in `path`; anything unreadable is one ConfigError naming `what` and the path."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path} is a folder; give the .toml file in it") from None
    except OSError as err:
        raise ConfigError(f"{what} {path} cannot be read ({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{what} {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{what} {path} is not valid TOML: {err}") from None
    except (ValueError, RecursionError) as err:  # an integer past 4300 digits, nesting past the stack
        raise ConfigError(f"{what} {path} cannot be read: {str(err).split(':')[0] or 'nested too deeply'}") from None


def load(path: str | None = None, overrides: list[tuple[str, str]] = ()) -> JobConfig:
    """Defaults, then the TOML file, then command-line overrides; checked. Input paths are resolved
    (see `resolve_path`): the file's from its folder, the overrides' from the working directory."""
    config = JobConfig()
    for section_name in _section_fields(config):
        section = getattr(config, section_name)
        for f in dataclasses.fields(section):
            setattr(section, f.name, _resolved(getattr(section, f.name), f.metadata["path"], Path.cwd()))
    if path:
        data = read_toml_file(Path(path), "config file")
        for section_name, table in data.items():
            if not isinstance(table, dict):
                raise ConfigError(f"top-level key {section_name} in {path} must be a [section]")
            if section_name not in _section_fields(config):
                raise ConfigError(f"unknown section [{section_name}] in {path}"
                                  f"{_suggest(section_name, _section_fields(config))}")
            for key, value in table.items():
                _set(config, f"{section_name}.{key}", value, Path(os.path.abspath(path)).parent, False)
    for dotted, value in overrides:
        _set(config, dotted, value, Path.cwd(), True)
    _check_values(config)
    return config


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def to_toml(config: JobConfig) -> str:
    """The effective config as TOML that `load` reads back to an equal JobConfig."""
    lines = []
    for section_name in _section_fields(config):
        lines.append(f"[{section_name}]")
        section = getattr(config, section_name)
        lines += [f"{f.name} = {_toml_value(getattr(section, f.name))}" for f in dataclasses.fields(section)]
        lines.append("")
    return "\n".join(lines)


def reference() -> str:
    """Every section and key with its default, doc and allowed values, for --help."""
    lines = []
    config = JobConfig()
    for section_name in _section_fields(config):
        lines.append(f"\n[{section_name}]")
        section = getattr(config, section_name)
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            lines.append(f"  {f.name} = {_toml_value(value)}    # {f.metadata['doc']}")
            if field_choices(f):
                label = "items from" if isinstance(value, list) else "choices"
                lines.append(f"      {label}: {', '.join(field_choices(f))}")
    return "\n".join(lines).lstrip("\n")
