"""tools/plan.py as a user runs it: the ranked table and the winner's fragment, and its one-line refusals."""

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from dtcollie import config
from dtcollie.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
import plan  # noqa: E402

DEBUG = ["--config", "train_configs/debug.toml"]


def test_the_table_ranks_layouts_and_the_fragment_configures_the_winner():
    done = subprocess.run([sys.executable, "tools/plan.py", *DEBUG, "--gpus", "4", "--gpus-per-node", "4",
                           "--hardware", "a100_80g_nvlink", "--top", "50"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("layout "))
    end = lines.index("", start)
    tgs = [float(line.split()[-2].replace(",", "")) for line in lines[start + 1:end]]
    assert len(tgs) > 10 and tgs == sorted(tgs, reverse=True)
    # The debug model has 2 kv heads: tp 4 cannot exist, and says why.
    assert "tp 4: parallelism.tp = 4 does not divide the model's kv heads (2)" in done.stdout
    fragment = done.stdout.split("the winner, as a config fragment:\n", 1)[1]
    values = tomllib.loads(fragment)
    overrides = [f"--{section}.{key}={value}" for section, table in values.items() for key, value in table.items()]
    cfg = config.load(*config.parse_overrides([*DEBUG, *overrides]))
    sizes = cfg.parallelism
    assert sizes.dp_replicate * sizes.dp_shard * sizes.tp * sizes.pp == 4


def test_a_profile_too_small_for_every_layout_names_the_smallest_need(tmp_path):
    profile = (REPO / "dtcollie/planner/hardware/a100_80g_nvlink.toml").read_text()
    profile = profile.replace("memory_gib = 80.0", "memory_gib = 0.02").replace("reserved_gib = 2.0", "reserved_gib = 0.01")
    (tmp_path / "tiny.toml").write_text(profile)
    with pytest.raises(ConfigError, match=r"no layout fits in 0\.0 GiB per GPU; the smallest needs 0\.\d GiB \("):
        plan.main([*DEBUG, "--gpus", "2", "--gpus-per-node", "2", "--hardware", str(tmp_path / "tiny.toml")])


@pytest.mark.parametrize("arguments, message", [
    (["--gpus", "4", "--gpus-per-node", "4", "--hardware", "nope"], "unknown hardware profile 'nope'"),
    (["--gpus", "6", "--gpus-per-node", "4", "--hardware", "h100_sxm"], "not a whole number of nodes of 4"),
    (["--gpus", "0", "--gpus-per-node", "4", "--hardware", "h100_sxm"], "--gpus must be at least 1"),
    (["--gpus-per-node", "4", "--hardware", "h100_sxm"], "--gpus is required"),
    (["--gpus", "two", "--gpus-per-node", "4", "--hardware", "h100_sxm"], "--gpus must be a whole number"),
])
def test_impossible_requests_are_one_line_errors(arguments, message):
    with pytest.raises(ConfigError, match=message):
        plan.main([*DEBUG, *arguments])
