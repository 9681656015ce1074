"""One run per dump folder: a second start resumes explicitly, or is refused in one line; the
records of a folder never mix two runs."""

import shutil

import pytest

from dtcollie import config
from dtcollie.errors import ConfigError
from dtcollie.metrics import read_records
from dtcollie.train import Trainer

FAST = [("training.seq_len", "32"), ("training.eval_interval", "0"), ("metrics.log_freq", "1")]


def job(folder, *overrides) -> config.JobConfig:
    return config.load("train_configs/debug.toml", FAST + [("job.dump_folder", str(folder)), *overrides])


def logged_steps(folder) -> list[int]:
    return [record["step"] for record in read_records(folder) if "loss" in record]


def test_the_same_config_twice_is_refused_and_overwrite_replaces_the_run(tmp_path):
    Trainer(job(tmp_path, ("training.steps", "2"))).train()
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match=r"holds a finished run .* choose another job.dump_folder, or set "
                                          r"job.overwrite = true to replace it$"):
        Trainer(job(tmp_path, ("training.steps", "2")))
    assert (tmp_path / "metrics.jsonl").read_text() == before
    Trainer(job(tmp_path, ("training.steps", "3"), ("job.overwrite", "true"))).train()
    assert logged_steps(tmp_path) == [1, 2, 3]
    assert len(list((tmp_path / "tb").iterdir())) == 1  # the old run's event file went with it


def test_a_finished_run_continues_only_with_more_steps_and_says_so(tmp_path, capsys):
    Trainer(job(tmp_path, ("training.steps", "2"), ("checkpoint.interval", "2"))).train()
    with pytest.raises(ConfigError, match=r"is finished \(step-2 of training.steps = 2\); raise training.steps"):
        Trainer(job(tmp_path, ("training.steps", "2"), ("checkpoint.interval", "2")))
    trainer = Trainer(job(tmp_path, ("training.steps", "4"), ("checkpoint.interval", "2")))
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith(f"resuming from {tmp_path / 'checkpoints' / 'step-2'} (step 2 of 4)")
    assert "learning-rate schedule is re-planned" in line and "training.steps 2 -> 4" in line
    trainer.train()
    assert logged_steps(tmp_path) == [1, 2, 3, 4]


def test_a_resume_that_would_change_the_run_is_refused(tmp_path):
    Trainer(job(tmp_path, ("training.steps", "2"), ("checkpoint.interval", "1"))).train()
    with pytest.raises(ConfigError, match=r"holds a run with optimizer.lr = 0.001, not 0.002; a resumed run must "
                                          r"keep it"):
        Trainer(job(tmp_path, ("training.steps", "4"), ("optimizer.lr", "0.002")))
    with pytest.raises(ConfigError, match=r"holds a run with job.seed = 42, not 7"):
        Trainer(job(tmp_path, ("training.steps", "4"), ("job.seed", "7")))
    # How the same run is laid out, logged and saved may change.
    resumed = Trainer(job(tmp_path, ("training.steps", "4"), ("checkpoint.keep_latest_k", "1"),
                          ("metrics.log_freq", "2"), ("training.micro_batch_size", "4")))
    assert resumed.step == 2


def test_steps_logged_after_the_last_checkpoint_are_dropped_on_resume(tmp_path):
    """A run that died after step 3 but whose last checkpoint is step 2 logs steps 3.. again: the
    records keep only the resumed run's."""
    first = Trainer(job(tmp_path, ("training.steps", "5"), ("checkpoint.interval", "2")))
    first.cfg.training.steps = 3  # stop the loop early (the end-of-loop save is step 3)
    first.train()
    shutil.rmtree(tmp_path / "checkpoints" / "step-3")  # as if killed before saving it
    Trainer(job(tmp_path, ("training.steps", "5"), ("checkpoint.interval", "2"))).train()
    assert logged_steps(tmp_path) == [1, 2, 3, 4, 5]


def test_a_start_that_failed_before_its_first_step_is_simply_replaced(tmp_path):
    (tmp_path / "config.toml").write_text("[training]\nsteps = 99\n")
    (tmp_path / "metrics.jsonl").write_text("")
    Trainer(job(tmp_path, ("training.steps", "1"))).train()
    assert logged_steps(tmp_path) == [1] and "steps = 1\n" in (tmp_path / "config.toml").read_text()


def test_a_folder_with_files_but_no_checkpoint_is_refused(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    with pytest.raises(ConfigError, match=r"already holds a run \(metrics.jsonl\) with no checkpoint to resume"):
        Trainer(job(tmp_path))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"job.dump_folder .*file is a file, not a folder"):
        Trainer(job(tmp_path / "file"))
