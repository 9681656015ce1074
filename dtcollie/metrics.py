"""Training metrics: one console line, TensorBoard scalars and metrics.jsonl, written by rank 0.

The jsonl file is the machine-readable record (full float precision); TensorBoard gets the same
numbers under fixed tags so runs compare across versions.
"""

import json
import logging
import math
import resource
import sys
import time
from pathlib import Path

import torch

from dtcollie.precision import BF16_COMPUTE

logger = logging.getLogger("dtcollie")

# Dense bf16 tensor-core peak FLOP/s by CUDA device name fragment. MFU is only reported for these.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12,
                   "RTX 4090": 165e12}

TENSORBOARD_TAGS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
                    "tokens_per_sec": "perf/tokens_per_sec", "mfu_pct": "perf/mfu_pct",
                    "peak_memory_gib": "memory/peak_gib", "val_loss": "val/loss",
                    "val_perplexity": "val/perplexity", "eval_acc": "eval/acc", "eval_acc_norm": "eval/acc_norm",
                    "eval_exact_match": "eval/exact_match"}


def read_records(dump_folder: str | Path) -> list[dict]:
    """Every record of a run folder's metrics.jsonl, in the order written."""
    lines = (Path(dump_folder) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def read_losses(dump_folder: str | Path) -> dict[int, float]:
    """The training loss of every logged step of a run folder, by step."""
    return {record["step"]: record["loss"] for record in read_records(dump_folder) if "loss" in record}


def peak_flops(device: torch.device, mixed_precision: str) -> float | None:
    """Peak FLOP/s of the device for this run's math, or None when not known (CPU, fp32, unlisted GPU)."""
    if device.type != "cuda" or mixed_precision not in BF16_COMPUTE:
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for fragment, flops in PEAK_BF16_FLOPS.items() if fragment in name), None)


def peak_memory_gib(device: torch.device) -> float:
    """CUDA: peak allocated by torch. CPU: peak resident set size of this process."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class MetricsLogger:
    """Writes records on the logging rank; other ranks hold a logger that writes nothing."""

    def __init__(self, dump_folder: str, enable_tensorboard: bool, enabled: bool = True,
                 resumed_step: int | None = None):
        """`resumed_step`: the run continues after this step, so records of later steps (written
        after its checkpoint, before the run stopped) are dropped from both records, which then
        hold each step once."""
        self.enabled = enabled
        self.writer = None
        self.jsonl = None
        if not enabled:
            return
        folder = Path(dump_folder)
        folder.mkdir(parents=True, exist_ok=True)
        if resumed_step is not None and (folder / "metrics.jsonl").is_file():
            kept = [json.dumps(r) + "\n" for r in read_records(folder) if r["step"] <= resumed_step]
            (folder / "metrics.jsonl").write_text("".join(kept))
        self.jsonl = open(folder / "metrics.jsonl", "a")
        if enable_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resumed_step is None else resumed_step + 1
            self.writer = SummaryWriter(log_dir=str(folder / "tb"), purge_step=purge)

    def log(self, step: int, record: dict) -> None:
        """Append one record to metrics.jsonl and TensorBoard (keys in TENSORBOARD_TAGS)."""
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **record}) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key in TENSORBOARD_TAGS and value is not None and math.isfinite(value):
                    self.writer.add_scalar(TENSORBOARD_TAGS[key], value, step)
            self.writer.flush()

    def text(self, step: int, tag: str, text: str) -> None:
        """A block of text (sample generations) in TensorBoard's text tab."""
        if self.enabled and self.writer is not None:
            self.writer.add_text(tag, text, step)
            self.writer.flush()

    def console(self, line: str) -> None:
        if self.enabled:
            print(line, file=sys.stdout, flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()


class Throughput:
    """Tokens/s, MFU and ETA over the window since the last report."""

    def __init__(self, total_steps: int, flops_per_token: float, peak: float | None):
        self.total_steps = total_steps
        self.flops_per_token = flops_per_token
        self.peak = peak
        self.start = self.window_start = time.perf_counter()
        self.window_tokens = 0
        self.window_steps = 0

    def add(self, tokens: int) -> None:
        self.window_tokens += tokens
        self.window_steps += 1

    def report(self, step: int) -> dict:
        now = time.perf_counter()
        elapsed = now - self.window_start
        tokens_per_sec = self.window_tokens / elapsed
        step_time = elapsed / max(1, self.window_steps)
        mfu = 100.0 * tokens_per_sec * self.flops_per_token / self.peak if self.peak else None
        self.window_start, self.window_tokens, self.window_steps = now, 0, 0
        return {"tokens_per_sec": tokens_per_sec, "mfu_pct": mfu, "step_time_s": step_time,
                "eta_s": step_time * (self.total_steps - step), "elapsed_s": now - self.start}


def console_line(step: int, total: int, record: dict) -> str:
    mfu = f"{record['mfu_pct']:.1f}%" if record.get("mfu_pct") is not None else "n/a"
    return (f"step {step:>{len(str(total))}}/{total} | loss {record['loss']!r} | lr {record['lr']:.3e} | "
            f"grad_norm {record['grad_norm']:.4f} | tok/s {record['tokens_per_sec']:,.0f} | mfu {mfu} | "
            f"mem {record['peak_memory_gib']:.2f} GiB | eta {format_duration(record['eta_s'])}")
