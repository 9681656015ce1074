"""The README's worked example of adding an optimizer, applied as written: its two blocks go into a
copy of the package, and the copy trains with the new optimizer and checks its keys."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from dtcollie.metrics import read_losses

ROOT = Path(__file__).resolve().parents[1]
REGISTRY_IMPORT = "from dtcollie.optim import adalomo, adamw, adan, lion, lomo, sophia\n"


def readme_blocks() -> tuple[str, str]:
    """(the new optimizer's file, the registry lines) from the README's Optimizers section."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    new_file = next(b for b in blocks if b.startswith("# dtcollie/optim/sgd.py\n"))
    registry = next(b for b in blocks if b.startswith("# dtcollie/optim/registry.py"))
    return new_file, registry


def package_with_sgd(folder: Path) -> Path:
    new_file, registry_lines = readme_blocks()
    package = folder / "dtcollie"
    shutil.copytree(ROOT / "dtcollie", package, ignore=shutil.ignore_patterns("__pycache__"))
    (package / "optim" / "sgd.py").write_text(new_file)
    _, import_line, entry = registry_lines.split("\n", 2)
    registry = (package / "optim" / "registry.py").read_text()
    assert REGISTRY_IMPORT in registry and "\n}\n" in registry
    registry = registry.replace(REGISTRY_IMPORT, REGISTRY_IMPORT + import_line + "\n")
    start = registry.index("OPTIMIZERS = {")
    end = registry.index("\n}\n", start)
    (package / "optim" / "registry.py").write_text(registry[:end] + "\n" + entry.rstrip("\n") + registry[end:])
    return folder


def train(site: Path, dump: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "dtcollie.train", "--config", str(ROOT / "train_configs/debug.toml"),
               "--optimizer.name", "sgd", "--optimizer.lr", "1.0", "--lr_scheduler.warmup_steps", "0",
               "--lr_scheduler.min_lr", "0", "--training.steps", "3",
               "--training.seq_len", "32", "--training.eval_interval", "0", "--metrics.log_freq", "1",
               "--metrics.enable_tensorboard", "false", "--checkpoint.save_weights", "false",
               "--job.dump_folder", str(dump), *overrides]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=site,
                          env={**os.environ, "PYTHONPATH": str(site)})


def test_the_readme_example_adds_an_optimizer_in_one_file_and_one_entry(tmp_path):
    site = package_with_sgd(tmp_path / "site")
    done = train(site, tmp_path / "run")
    assert done.returncode == 0, done.stderr[-3000:]
    losses = read_losses(tmp_path / "run")
    assert sorted(losses) == [1, 2, 3] and losses[3] < losses[1]
    # Its registry entry decides its keys: one it does not read is refused in one line.
    refused = train(site, tmp_path / "refused", "--optimizer.eps", "1e-6")
    assert refused.returncode == 2
    assert "optimizer.eps does not apply to optimizer.name = 'sgd'; its keys are beta1, lr, name, weight_decay" \
        in refused.stderr
