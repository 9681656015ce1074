"""Run a function on N local processes joined by a gloo process group, for multi-process tests.

`run_ranks(world_size, fn, *args)` starts `world_size` spawned processes, each calling
`fn(rank, world_size, *args)` after `init_process_group("gloo")`, and returns their return values
in rank order. A child's exception fails the caller with the child's traceback; a hang fails with a
TimeoutError; every process is ended before returning. `fn` must be importable by the children
(a module-level function) and its return value picklable.

The rendezvous is a FileStore in a fresh temporary folder, so there are no port races between
tests running at the same time. Each child uses one intra-op thread: several ranks share few cores.
Children are not daemonic, so a rank may start its own workers (a DataLoader with num_workers > 0);
they are terminated, then killed, in a `finally` instead.
"""

import os
import queue
import shutil
import tempfile
import time
import traceback

import torch.multiprocessing as mp


def _run_rank(rank: int, world_size: int, store_path: str, results, fn, args) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size)
        value = fn(rank, world_size, *args)
        results.put((rank, True, value))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(world_size: int, fn, *args, timeout: float = 120) -> list:
    """fn(rank, world_size, *args) on `world_size` gloo ranks; their return values in rank order."""
    context = mp.get_context("spawn")
    results = context.Queue()
    folder = tempfile.mkdtemp(prefix="dtcollie_ranks_")
    processes = [context.Process(target=_run_rank, args=(rank, world_size, os.path.join(folder, "store"),
                                                        results, fn, args))
                 for rank in range(world_size)]
    try:
        for process in processes:
            process.start()
        return _collect(processes, results, world_size, timeout)
    finally:
        _stop(processes)
        results.close()
        shutil.rmtree(folder, ignore_errors=True)


def _collect(processes, results, world_size: int, timeout: float) -> list:
    """Wait for every rank's report; fail fast on the first error, a silent death or the deadline."""
    values, deadline = {}, time.monotonic() + timeout
    while len(values) < world_size:
        try:
            rank, ok, value = results.get(timeout=0.2)
        except queue.Empty:
            for rank, process in enumerate(processes):
                if rank not in values and not process.is_alive() and process.exitcode != 0:
                    _drain_errors(results)
                    raise RuntimeError(f"rank {rank} died with exit code {process.exitcode} without reporting")
            if time.monotonic() > deadline:
                missing = sorted(set(range(world_size)) - set(values))
                raise TimeoutError(f"ranks {missing} did not finish within {timeout} s (a hang?)")
            continue
        if not ok:
            raise RuntimeError(f"rank {rank} failed:\n{value}")
        values[rank] = value
    return [values[rank] for rank in range(world_size)]


def _drain_errors(results) -> None:
    """A rank that died may have been killed for a peer's error: report the error if one came."""
    try:
        while True:
            rank, ok, value = results.get(timeout=0.5)
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{value}")
    except queue.Empty:
        pass


def _stop(processes) -> None:
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout=5)
        if process.is_alive():
            process.kill()
            process.join(timeout=5)
