"""Run several training jobs in one launch, so a multi-process test pays process start-up once.

    torchrun --nproc_per_node=N tests/parallel/train_jobs.py JOBS.json

JOBS.json holds a list of argument lists, each what `python -m dtcollie.train` would take; the
jobs run one after another in every process, sharing the process group.
"""

import json
import sys

import torch.distributed as dist

from dtcollie import config
from dtcollie.cli import run_main
from dtcollie.train import Trainer


def main(argv: list[str]) -> None:
    (jobs_file,) = argv
    try:
        for arguments in json.loads(open(jobs_file).read()):
            Trainer(config.load(*config.parse_overrides(arguments))).train()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
