"""Per-rank parameter, gradient and AdamW memory of a config's parallel layout, without GPUs.

    python tools/plan_memory.py --config train_configs/7b.toml --world-size 8
    python tools/plan_memory.py --config train_configs/7b.toml --world-size 8 --parallelism.tp 4 \\
        --parallelism.pp 2 --parallelism.dp_shard 1 --training.micro_batch_size 2

Each pipeline rank is simulated in this one process under a fake process group on the meta device,
through the trainer's own layout checks and `parallelize_model` (see dtcollie.parallel.plan).
"""

import sys

from dtcollie import config as config_module
from dtcollie.cli import run_main
from dtcollie.errors import ConfigError
from dtcollie.parallel.plan import format_plan, plan

USAGE = "usage: python tools/plan_memory.py --config FILE --world-size N [--section.key value ...]"


def split_world_size(argv: list[str]) -> tuple[int, list[str]]:
    """Take `--world-size N` (or `--world-size=N`) out of argv; the rest are config arguments."""
    rest, world_size, i = [], None, 0
    while i < len(argv):
        name, has_value, value = argv[i].partition("=")
        if name == "--world-size":
            if not has_value:
                if i + 1 >= len(argv):
                    raise ConfigError("--world-size needs a value")
                value, i = argv[i + 1], i + 1
            world_size = value
        else:
            rest.append(argv[i])
        i += 1
    if world_size is None:
        raise ConfigError(f"--world-size is required; {USAGE}")
    try:
        return int(world_size), rest
    except ValueError:
        raise ConfigError(f"--world-size must be a whole number of ranks, got {world_size!r}") from None


def main(argv: list[str]) -> None:
    if "--help" in argv or "-h" in argv:
        print(__doc__.strip() + "\n\n" + USAGE)
        return
    world_size, rest = split_world_size(argv)
    config_path, overrides = config_module.parse_overrides(rest)
    cfg = config_module.load(config_path, overrides)
    print(format_plan(plan(cfg, world_size), cfg))


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
