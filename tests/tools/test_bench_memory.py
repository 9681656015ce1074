"""tools/bench_memory.py run as a user would, on a tiny model: the table, the JSON, bad input; and
the allocator meter on a known allocation."""

import json
import subprocess
import sys
from pathlib import Path

import torch

from dtcollie.bench.memory import MemoryMeter

REPO = Path(__file__).resolve().parents[2]
TINY = ["--dim", "64", "--n-layers", "2", "--vocab-size", "256", "--seq-len", "32", "--steps", "1"]


def run_bench(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "bench_memory.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_table_and_json_have_a_positive_peak_per_row(tmp_path):
    out = tmp_path / "memory.json"
    done = run_bench(*TINY, "--optimizers", "forward-only,lomo", "--json", out)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert [row.split("|")[1].strip() for row in rows] == ["optimizer", "forward-only", "lomo"]
    assert done.stdout.startswith("131,392 parameters (dim 64, 2 layers")
    result = json.loads(out.read_text())
    assert result["parameters"] == 131_392
    assert [row["row"] for row in result["rows"]] == ["forward-only", "lomo"]
    for row, line in zip(result["rows"], rows[1:]):
        # Both rows at least hold the weights (bf16: 2 bytes each); the table prints the same number.
        assert row["peak_bytes"] >= 2 * result["parameters"]
        assert row["method"] == "torch's CPU allocator (profiler memory records)"
        assert float(line.split("|")[3]) == round(row["peak_bytes"] / result["parameters"], 2)
        assert row["rss_peak_bytes"] is None or float(line.split("|")[4]) == round(
            row["rss_peak_bytes"] / result["parameters"], 2)


def test_allocator_meter_counts_what_lives_during_the_steps_only():
    with MemoryMeter("allocator") as meter:
        kept = torch.ones(2**20)  # 4 MiB, allocated before the counted part: still counted while alive
        transient = torch.ones(2**19)  # 2 MiB, freed before the counted part: not counted
        del transient
        with meter.counted():
            for _ in range(3):  # a 1 MiB temporary, three times: counted once
                temporary = torch.ones(2**18)
                del temporary
    assert 5 * 2**20 <= meter.peak_bytes < 5 * 2**20 + 2**16
    assert float(kept.sum()) == 2**20


def test_unknown_optimizer_is_one_error_line():
    done = run_bench(*TINY, "--optimizers", "adamw,adamm")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ") and "adamm" in done.stderr
    assert done.stdout == ""
