"""Checkpoints that are not what the run needs: truncated, corrupt, from another optimizer, missing an
entry, trained on other data, or a save that runs out of disk. Each is one CheckpointError / DataError
line, or an explicit fallback to the newest good checkpoint; a failed save leaves the previous ones."""

import errno
import os
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest
from torch.distributed.checkpoint import FileSystemWriter

from dtcollie import checkpointer
from dtcollie.dcp_weights import load_weights_as_stored, write_manifest
from dtcollie.errors import CheckpointError, DataError
from dtcollie.train import Trainer

from test_resume import job

STEPS = [("training.steps", "2"), ("checkpoint.interval", "1"), ("checkpoint.save_weights", "false")]


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory) -> Path:
    """A 2-step AdamW run with checkpoints step-1 and step-2, trained on a copy of the shipped text."""
    folder = tmp_path_factory.mktemp("saved_run")
    text = folder / "text.txt"
    text.write_text(next(Path("dtcollie/assets/text").glob("*.txt")).read_text())
    Trainer(job(folder / "run", STEPS + [("data.train_files", str(text))])).train()
    return folder


def copy_run(saved_run: Path, tmp_path: Path, keep_config: bool = True) -> Path:
    run = tmp_path / "run"
    shutil.copytree(saved_run / "run", run)
    if not keep_config:
        (run / "config.toml").unlink()
    return run


def restart(run: Path, saved_run: Path, *overrides):
    return Trainer(job(run, [("training.steps", "3"), ("checkpoint.interval", "1"),
                             ("data.train_files", str(saved_run / "text.txt")), *overrides]))


def distcp(folder: Path) -> Path:
    return sorted(folder.glob("*.distcp"))[0]


def test_a_truncated_newest_checkpoint_falls_back_to_the_one_before(saved_run, tmp_path, caplog):
    run = copy_run(saved_run, tmp_path)
    data = distcp(run / "checkpoints/step-2")
    data.write_bytes(data.read_bytes()[:1000])
    trainer = restart(run, saved_run)
    assert trainer.step == 1
    assert "passing over" in caplog.text and "has 1,000 bytes, but files.json says" in caplog.text


def test_a_newest_checkpoint_missing_a_file_falls_back(saved_run, tmp_path, caplog):
    run = copy_run(saved_run, tmp_path)
    distcp(run / "checkpoints/step-2").unlink()
    assert restart(run, saved_run).step == 1
    assert "is incomplete: __0_0.distcp is missing" in caplog.text


def test_corrupt_data_of_the_only_checkpoint_is_one_line(saved_run, tmp_path):
    run = copy_run(saved_run, tmp_path)
    shutil.rmtree(run / "checkpoints/step-1")
    data = distcp(run / "checkpoints/step-2")
    data.write_bytes(os.urandom(data.stat().st_size))  # same size: only reading it finds the damage
    with pytest.raises(CheckpointError, match=r"step-2 has a corrupt or truncated data file \(.*\); restore") as err:
        restart(run, saved_run)
    assert "\n" not in str(err.value)


def test_unreadable_metadata_of_the_newest_falls_back(saved_run, tmp_path, caplog):
    run = copy_run(saved_run, tmp_path)
    metadata = run / "checkpoints/step-2/.metadata"
    metadata.write_bytes(os.urandom(metadata.stat().st_size))
    assert restart(run, saved_run).step == 1
    assert "step-2/.metadata is unreadable" in caplog.text


def test_adamw_state_is_refused_by_lion(saved_run, tmp_path):
    """A copied checkpoints/ folder without its config.toml (nothing else stops it) holds AdamW's
    exp_avg_sq and step, which Lion does not have; before, Lion took its exp_avg and went on."""
    run = copy_run(saved_run, tmp_path, keep_config=False)
    with pytest.raises(CheckpointError, match=r"holds entries this run has no place for: optimizer\..*exp_avg"
                                              r".*saved with another optimizer"):
        restart(run, saved_run, ("optimizer.name", "lion"))


def test_a_checkpoint_missing_an_entry_is_refused(saved_run, tmp_path):
    run = copy_run(saved_run, tmp_path)
    shutil.rmtree(run / "checkpoints/step-1")
    folder = run / "checkpoints/step-2"
    metadata = pickle.loads((folder / ".metadata").read_bytes())
    del metadata.state_dict_metadata["lr_scheduler"]
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    write_manifest(folder)  # consistent files: only the entry is missing
    with pytest.raises(CheckpointError, match=r"does not match the model; missing: lr_scheduler"):
        restart(run, saved_run)


def test_changed_training_data_is_refused_on_resume(saved_run, tmp_path):
    run = copy_run(saved_run, tmp_path)
    text = tmp_path / "text.txt"  # the run's own file, edited: the copied run's config names this copy
    text.write_text((saved_run / "text.txt").read_text().replace("the", "a"))
    config_toml = run / "config.toml"
    config_toml.write_text(config_toml.read_text().replace(str(saved_run / "text.txt"), str(text)))
    with pytest.raises(DataError, match=r"the training data differs from the data the checkpoint was trained on"):
        Trainer(job(run, [("training.steps", "3"), ("checkpoint.interval", "1"), ("data.train_files", str(text))]))


def full_disk_trainer(run: Path, monkeypatch):
    """A trainer whose second checkpoint cannot fit: on a real 40 MB tmpfs where mounting is allowed
    (one checkpoint takes 25 MB), else through a writer that fails as a full disk does."""
    run.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(run)],
                             capture_output=True).returncode == 0

    if not mounted:
        class FullDiskWriter(FileSystemWriter):
            def write_data(self, plan, planner):
                if "step-2" in str(self.path):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path / "__0_0.distcp"))
                return super().write_data(plan, planner)

        monkeypatch.setattr(checkpointer, "FileSystemWriter", FullDiskWriter)
    return mounted


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "small_disk"
    mounted = full_disk_trainer(run, monkeypatch)
    try:
        trainer = Trainer(job(run / "out", STEPS))
        with pytest.raises(CheckpointError, match=r"saving .*step-2 failed \(.*No space left on device; free disk "
                                                  r"space there or choose another folder\); the checkpoints saved "
                                                  r"before it are intact") as err:
            trainer.train()
        assert "\n" not in str(err.value)
        checkpoints = run / "out/checkpoints"
        assert sorted(p.name for p in checkpoints.iterdir()) == ["step-1"]  # the partial folder was removed
        weights = load_weights_as_stored(checkpoints / "step-1")  # the previous checkpoint reads whole
        assert weights["tok_embeddings.weight"].shape == (2048, 128) and len(weights) == 75
    finally:
        if mounted:
            subprocess.run(["umount", "--lazy", str(run)], check=True)  # the failed run still holds its log files
