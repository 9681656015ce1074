"""Run several training jobs in one launch, so a multi-process test pays process start-up once.

    torchrun --nproc_per_node=N tests/parallel/train_jobs.py JOBS.json

JOBS.json holds a list of argument lists, each what `python -m dtcollie.train` would take; the
jobs run one after another in every process, sharing the process group.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch.distributed as dist

from dtcollie import config
from dtcollie.cli import run_main
from dtcollie.train import Trainer


def launch_jobs(folder: Path, nproc: int, jobs: list[list[str]], threads: int = 1) -> None:
    """Run `jobs` in one launch of `nproc` processes (plain Python for 1), each with `threads` OpenMP
    threads (another count sums matmuls and reductions in another order); fails with the stderr tail."""
    (folder / "jobs.json").write_text(json.dumps(jobs))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command = (launcher if nproc > 1 else [sys.executable]) + [__file__, str(folder / "jobs.json")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900,
                            env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    assert result.returncode == 0, result.stderr[-3000:]


def main(argv: list[str]) -> None:
    (jobs_file,) = argv
    try:
        for arguments in json.loads(open(jobs_file).read()):
            Trainer(config.load(*config.parse_overrides(arguments))).train()
        if dist.is_initialized():
            dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # Every job has finished and written its files. Leave without interpreter finalization: with the
    # process groups of several jobs made in one process, a gloo worker thread can still hold a work
    # object whose teardown then aborts the process ("terminate called without an active exception",
    # SIGABRT; seen twice in about 25 family launches here, both after the last job had finished;
    # pytorch/pytorch#179291 describes the mechanism).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
