"""The package installed (not the checkout), started from an unrelated folder: the embedded
default finds its shipped tokenizer and text inside the package."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_installed_package_trains_its_default_from_any_folder(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "dtcollie", source / "dtcollie", ignore=shutil.ignore_patterns("__pycache__"))
    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                              "--target", str(site), str(source)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    shutil.rmtree(source)  # nothing may come from the copy that was installed
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", "import dtcollie; print(dtcollie.__file__)"], capture_output=True,
                           text=True, cwd=elsewhere, env=env)
    assert where.stdout.strip() == str(site / "dtcollie" / "__init__.py")
    run = subprocess.run([sys.executable, "-m", "dtcollie.train", "--training.steps", "5"], capture_output=True,
                         text=True, timeout=300, cwd=elsewhere, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "run finished: step 5 of 5" in run.stdout
    assert (elsewhere / "outputs" / "debug" / "weights" / "tokenizer.json").read_bytes() == \
        (site / "dtcollie" / "assets" / "tokenizer" / "tokenizer.json").read_bytes()
