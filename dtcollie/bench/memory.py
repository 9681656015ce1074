"""Peak memory of one benchmark row, each in a fresh process, and the table of all rows.

`measure_in_fresh_process(spec)` runs `python -m dtcollie.bench.memory SPEC_JSON`, which imports
everything, runs the row's step once on a tiny model (allocator, kernels and autograd set up, the
model-independent part), records the memory in use as the baseline, builds the real model,
forgets the highs so far (building is a one-off) and runs the steps. The peak minus the baseline
counts the model, its optimizer state and everything the steps allocate:

- CUDA: `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()`, minus
  `memory_allocated()` at the baseline.
- CPU: the process's resident high-water mark (VmHWM) minus its resident size at the baseline.
  The mark is reset to the current size after the build by writing "5" to /proc/self/clear_refs;
  where that is not permitted the peak is `ru_maxrss`, which then includes the build (the
  `method` field says which). glibc would keep freed heap memory and raise its mmap threshold as
  tensors are freed, so the child runs with a fixed MALLOC_MMAP_THRESHOLD_: every large tensor is
  its own mapping, returned to the system when freed, and resident memory follows live tensors.
"""

import dataclasses
import gc
import json
import os
import re
import resource
import subprocess
import sys

import torch

from dtcollie.bench.memory_rows import BenchSpec, build_step, row_notes

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
TINY_MODEL = dict(dim=64, n_layers=1, hidden_dim=64, vocab_size=256)


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE).group(1))


class PeakMeter:
    """Peak memory above the memory in use when the meter was made, in bytes."""

    def __init__(self, device: torch.device):
        self.device = device
        self.method = ""
        self.baseline = self._in_use()

    def _in_use(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.memory_allocated(self.device)
        return _proc_status_kib("VmRSS") * 1024

    def reset_peak(self) -> None:
        """Forget highs before now (the baseline stays)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method = "cuda max_memory_allocated"
            return
        try:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")  # resets the resident high-water mark to the current size
            self.method = "VmHWM after clear_refs"
        except OSError:
            self.method = "ru_maxrss (high-water mark not resettable: includes building the model)"

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.baseline
        if self.method.startswith("VmHWM"):
            return _proc_status_kib("VmHWM") * 1024 - self.baseline
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.baseline


def measure(spec: BenchSpec) -> dict:
    """In this (fresh) process: warm up on a tiny model, take the baseline, build the row's model,
    then measure the peak of its steps (building it is not counted: initialisation is a one-off)."""
    torch.manual_seed(0)
    tiny = dataclasses.replace(spec, model_args={**spec.model_args, **TINY_MODEL}, batch=1,
                               seq_len=min(spec.seq_len, 16), steps=1, loss_chunk=min(spec.loss_chunk, 8))
    build_step(tiny)()
    gc.collect()  # the tiny optimizer's hooks make reference cycles
    meter = PeakMeter(torch.device(spec.device))
    step = build_step(spec)
    meter.reset_peak()
    for _ in range(spec.steps):
        step()
    return {"row": spec.row, "peak_bytes": meter.peak(), "baseline_bytes": meter.baseline, "method": meter.method,
            "notes": row_notes(spec.row, spec.dtype)}


def measure_in_fresh_process(spec: BenchSpec) -> dict:
    """`measure(spec)` in a new Python process; its result dict. A failed child raises with its stderr."""
    env = {**os.environ, **MALLOC_ENV}
    done = subprocess.run([sys.executable, "-m", "dtcollie.bench.memory", json.dumps(dataclasses.asdict(spec))],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"the {spec.row} row failed (exit code {done.returncode}):\n{done.stderr}")
    return json.loads(done.stdout.splitlines()[-1])


def format_table(results: list[dict], n_params: int, header: str, footer: list[str]) -> str:
    """Markdown: optimizer | peak MiB | bytes/param | notes, between a header and footer lines."""
    lines = [header, "", "| optimizer | peak MiB | bytes/param | notes |", "| --- | ---: | ---: | --- |"]
    for result in results:
        lines.append(f"| {result['row']} | {result['peak_bytes'] / 2**20:,.0f} | "
                     f"{result['peak_bytes'] / n_params:.2f} | {result['notes']} |")
    return "\n".join([*lines, "", *footer])


if __name__ == "__main__":
    print(json.dumps(measure(BenchSpec(**json.loads(sys.argv[1])))))
