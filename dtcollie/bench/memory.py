"""Peak memory of one benchmark row, each in a fresh process, and the table of all rows.

`measure_in_fresh_process(spec)` runs `python -m dtcollie.bench.memory SPEC_JSON`, which imports
everything, runs the row's step once on a tiny model (allocator, kernels and autograd set up, the
model-independent part), records the memory in use as the baseline, builds the real model and
runs the steps. The peak during the steps minus the baseline counts the model, its optimizer state
and everything the steps allocate (building is a one-off, so highs while building do not count):

- CUDA: `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()`, minus
  `memory_allocated()` at the baseline.
- CPU: torch's own allocations, as the profiler's memory records report every allocation and free
  of the CPU allocator from the baseline on: the running sum of those, at its highest during the
  steps. This counts what torch allocates whatever the operating system does with pages, so it is
  the same on every machine.
- CPU, beside it: the process's resident high-water mark (VmHWM, reset to the current size after
  the build by writing "5" to /proc/self/clear_refs) minus its resident size at the baseline. The
  OS decides what is resident (on some machines less than the weights, on others the allocator's
  cached pages too), so this figure is reported, not used for bytes/param. glibc would keep freed
  heap memory, so the child runs with a fixed MALLOC_MMAP_THRESHOLD_.
"""

import contextlib
import dataclasses
import gc
import json
import os
import re
import subprocess
import sys

import torch
from torch.autograd import DeviceType

from dtcollie.bench.memory_rows import BenchSpec, build_step, row_notes

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
TINY_MODEL = dict(dim=64, n_layers=1, hidden_dim=64, vocab_size=256)


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE).group(1))


STEPS_LABEL = "dtcollie.bench.steps"  # the profiler annotation around the counted steps
METHODS = {"allocator": "torch's CPU allocator (profiler memory records)", "resident": "resident high-water mark",
           "cuda": "cuda max_memory_allocated"}


class MemoryMeter:
    """Peak memory above the memory in use when the meter was entered, in bytes, by `method`
    ("allocator" or "resident" on CPU, "cuda" on CUDA):

        with MemoryMeter(method) as meter:   # the baseline
            ...                              # not counted (building the model)
            with meter.counted():
                ...                          # its peak is then `meter.peak_bytes`

    `peak_bytes` stays None where the resident high-water mark cannot be reset.
    """

    def __init__(self, method: str):
        self.method = method
        self.peak_bytes = None
        self.start_bytes = None  # allocator method: in use when the counted part began
        self._profiler = None

    def __enter__(self) -> "MemoryMeter":
        if self.method == "cuda":
            torch.cuda.synchronize()
            self._baseline = torch.cuda.memory_allocated()
        elif self.method == "resident":
            self._baseline = _proc_status_kib("VmRSS") * 1024
        else:
            self._profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                    profile_memory=True)
            self._profiler.__enter__()
        return self

    @contextlib.contextmanager
    def counted(self):
        if self.method == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            yield
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated() - self._baseline
        elif self.method == "resident":
            resettable = _reset_resident_high_water_mark()
            yield
            if resettable:
                self.peak_bytes = _proc_status_kib("VmHWM") * 1024 - self._baseline
        else:
            with torch.profiler.record_function(STEPS_LABEL):
                yield

    def __exit__(self, *exc) -> None:
        if self._profiler is not None:
            self._profiler.__exit__(*exc)
            if exc[0] is None:
                self.start_bytes, self.peak_bytes = allocator_window(self._profiler.profiler.kineto_results.events(),
                                                                     STEPS_LABEL)


def _reset_resident_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # resets VmHWM to the current resident size
        return True
    except OSError:
        return False


def allocator_window(events, label: str) -> tuple[int, int]:
    """(running sum when the `label` annotation began, its highest while it ran) of the CPU
    allocator's allocations (+) and frees (-), counted from the first recorded event (the baseline)."""
    window = next(event for event in events if event.name() == label)
    changes = sorted((event.start_ns(), event.nbytes()) for event in events
                     if event.name() == "[memory]" and event.device_type() == DeviceType.CPU)
    in_use, peak = 0, None
    for time_ns, nbytes in changes:
        if time_ns > window.end_ns():
            break
        if time_ns >= window.start_ns() and peak is None:
            start = peak = in_use  # in use when the steps began
        in_use += nbytes
        if peak is not None:
            peak = max(peak, in_use)
    return (in_use, in_use) if peak is None else (start, peak)


def measure(spec: BenchSpec, method: str) -> int | None:
    """In this (fresh) process: warm up on a tiny model, take the baseline, build the row's model,
    then measure the peak of its steps by `method` (building it is not counted: a one-off)."""
    torch.manual_seed(0)
    tiny = dataclasses.replace(spec, model_args={**spec.model_args, **TINY_MODEL}, batch=1,
                               seq_len=min(spec.seq_len, 16), steps=1, loss_chunk=min(spec.loss_chunk, 8))
    build_step(tiny)()
    gc.collect()  # the tiny optimizer's hooks make reference cycles
    with MemoryMeter(method) as meter:
        step = build_step(spec)
        with meter.counted():
            for _ in range(spec.steps):
                step()
    return meter.peak_bytes


def measure_in_fresh_process(spec: BenchSpec) -> dict:
    """The row's peak from torch's allocator accounting (`peak_bytes`; CUDA: max_memory_allocated)
    and, on CPU, the resident figure (`rss_peak_bytes`), each from `measure` in a new Python
    process (the profiler's own buffers would inflate a resident figure taken beside it). A failed
    child raises with its stderr."""
    method = "cuda" if torch.device(spec.device).type == "cuda" else "allocator"
    return {"row": spec.row, "method": METHODS[method], "notes": row_notes(spec.row, spec.dtype),
            "peak_bytes": _measure_in_child(spec, method),
            "rss_peak_bytes": None if method == "cuda" else _measure_in_child(spec, "resident")}


def _measure_in_child(spec: BenchSpec, method: str) -> int | None:
    env = {**os.environ, **MALLOC_ENV}
    done = subprocess.run([sys.executable, "-m", "dtcollie.bench.memory", json.dumps(dataclasses.asdict(spec)), method],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"the {spec.row} row failed (exit code {done.returncode}):\n{done.stderr}")
    return json.loads(done.stdout.splitlines()[-1])


def format_table(results: list[dict], n_params: int, header: str, footer: list[str]) -> str:
    """Markdown: optimizer | peak MiB | bytes/param | resident bytes/param | notes, between a header
    and footer lines (resident: the CPU's RSS figure, n/a on CUDA or where it cannot be reset)."""
    lines = [header, "", "| optimizer | peak MiB | bytes/param | resident bytes/param | notes |",
             "| --- | ---: | ---: | ---: | --- |"]
    for result in results:
        rss = result["rss_peak_bytes"]
        lines.append(f"| {result['row']} | {result['peak_bytes'] / 2**20:,.0f} | "
                     f"{result['peak_bytes'] / n_params:.2f} | {'n/a' if rss is None else f'{rss / n_params:.2f}'} | "
                     f"{result['notes']} |")
    return "\n".join([*lines, "", *footer])


if __name__ == "__main__":
    print(json.dumps(measure(BenchSpec(**json.loads(sys.argv[1])), sys.argv[2])))
