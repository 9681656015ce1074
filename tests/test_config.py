import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dtcollie import config
from dtcollie.errors import ConfigError
from dtcollie.models.llama import FLAVORS
from dtcollie.peft.lora import TARGETS


def write(tmp_path, text):
    path = tmp_path / "job.toml"
    path.write_text(text)
    return str(path)


def test_precedence_defaults_toml_cli(tmp_path):
    path = write(tmp_path, "[training]\nsteps = 7\nseq_len = 64\n[optimizer]\nlr = 1e-3\n")
    cfg = config.load(path, [("training.steps", "9"), ("training.steps", "11"), ("data.train_files", "a.txt,b/*.jsonl")])
    assert cfg.training.steps == 11  # later CLI wins over earlier CLI and over TOML
    assert cfg.training.seq_len == 64  # TOML over default
    assert cfg.optimizer.lr == 1e-3
    assert cfg.training.micro_batch_size == config.Training().micro_batch_size
    assert cfg.data.train_files == [str(Path.cwd() / "a.txt"), str(Path.cwd() / "b/*.jsonl")]


def test_input_paths_resolve_from_the_config_folder_the_working_directory_or_the_package(tmp_path, monkeypatch):
    folder = tmp_path / "configs"
    folder.mkdir()
    path = write(folder, '[data]\ntokenizer = "../tok"\nval_files = ["/abs/v.jsonl", "val/*.jsonl"]\n'
                         'sources = ["corpus:2.5", "other"]\n[checkpoint]\ninitial_load_path = "dcp"\n')
    monkeypatch.chdir(tmp_path / "configs")
    cfg = config.load(path, [("model.args_path", "args.json"), ("eval.choice_files", "dtcollie/assets/x.jsonl")])
    assert cfg.data.tokenizer == str(tmp_path / "tok")
    assert cfg.data.val_files == ["/abs/v.jsonl", str(folder / "val/*.jsonl")]
    assert cfg.data.sources == [f"{folder / 'corpus'}:2.5", str(folder / "other")]
    assert cfg.checkpoint.initial_load_path == str(folder / "dcp")
    assert cfg.model.args_path == str(folder / "args.json")  # command line: the working directory
    package = Path(config.__file__).resolve().parent
    assert cfg.eval.choice_files == [str(package / "assets/x.jsonl")]
    assert cfg.data.train_files == [str(package / "assets/text/*.txt")]  # the embedded default
    assert Path(cfg.data.tokenizer).is_absolute() and cfg.job.dump_folder == "./outputs/debug"  # outputs: as given
    assert config.load(None, []).data.tokenizer == str(package / "assets/tokenizer")


def test_cli_forms():
    path, overrides = config.parse_overrides(["--config", "x.toml", "--training.steps=5", "--job.seed", "3"])
    assert path == "x.toml"
    assert overrides == [("training.steps", "5"), ("job.seed", "3")]
    cfg = config.load(None, overrides + [("training.mixed_precision", "fp32"), ("metrics.enable_tensorboard", "false")])
    assert (cfg.training.steps, cfg.job.seed, cfg.metrics.enable_tensorboard) == (5, 3, False)


@pytest.mark.parametrize("toml,message", [
    ("[training]\nstpes = 5\n", "unknown key training.stpes; did you mean training.steps?"),
    ("[trainig]\nsteps = 5\n", "unknown section [trainig] in"),
    ("[training]\nsteps = 'five'\n", "training.steps must be int, got 'five'"),
    ("[training]\nsteps = 0\n", "training.steps = 0 is too small; it must be >= 1"),
    ("[training]\nmixed_precision = 'fp16'\n", "choose one of bf16, bf16_weights, fp32"),
    ("[training]\nglobal_batch_size = 6\nmicro_batch_size = 4\n", "not a multiple of training.micro_batch_size"),
    ("[optimizer]\nlr = 1e-4\n[lr_scheduler]\nmin_lr = 1e-3\n", "exceeds optimizer.lr"),
    ("[parallelism]\ntpp = 2\n", "unknown key parallelism.tpp; did you mean parallelism.tp?"),
    ("[training\nsteps = 5\n", "is not valid TOML"),
    ("[optimizer]\nname = 'lion'\neps = 1e-6\n", "optimizer.eps does not apply to optimizer.name = 'lion'; its keys are"),
    ("[optimizer]\nname = 'adalomo'\nbeta1 = 0.9\n", "optimizer.beta1 does not apply to optimizer.name = 'adalomo'"),
    ("[model]\nflavor = 'llama9'\n", "model.flavor = 'llama9' is not allowed; choose one of debug, llama2_7b,"),
    ("[peft]\ntarget_modules = ['wq', 'q_proj']\n",
     "peft.target_modules item 'q_proj' is not allowed; choose from wq, wk, wv, wo, w1, w2, w3, output"),
    # Out of range: each was accepted before (inf trained to NaN and exited 0; the seed overflowed in torch).
    ("[optimizer]\nlr = inf\n", "optimizer.lr = inf is not allowed; it must be a finite number"),
    ("[training]\nmax_norm = nan\n", "training.max_norm = nan is not allowed; it must be a finite number"),
    ("[job]\nseed = 36893488147419103232\n", "job.seed = 36893488147419103232 is too large; it must be < 2**63"),
    ("[training]\nsteps = 9223372036854775808\n", "training.steps = 9223372036854775808 is too large"),
    ("[optimizer]\nbeta1 = 1.5\n", "optimizer.beta1 = 1.5 is too large; it must be < 1.0"),
    ("[optimizer]\nbeta2 = -0.5\n", "optimizer.beta2 = -0.5 is not allowed; it must be -1 (the optimizer's default)"),
    ("[peft]\ndropout = 1.0\n", "peft.dropout = 1.0 is too large; it must be < 1.0"),
    ("[optimizer]\nname = 'adalomo'\ndecay_rate = 0.5\n", "optimizer.decay_rate = 0.5 is too large; it must be < 0.0"),
])
def test_errors_name_the_key(tmp_path, toml, message):
    with pytest.raises(ConfigError) as err:
        config.load(write(tmp_path, toml))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_unreadable_config_files_are_one_line(tmp_path):
    (tmp_path / "folder.toml").mkdir()
    (tmp_path / "latin1.toml").write_bytes(b"[job]\n# caf\xe9\nseed = 1\n")
    for name, message in (("folder.toml", "is a folder; give the .toml file in it"),
                          ("latin1.toml", "is not UTF-8 text (invalid continuation byte at byte 11)")):
        with pytest.raises(ConfigError, match=re.escape(f"config file {tmp_path / name} {message}")):
            config.load(str(tmp_path / name))


def test_effective_config_round_trips(tmp_path):
    for optimizer in ("adamw", "adalomo"):
        cfg = config.load(None, [("training.steps", "3"), ("data.val_files", "[\"v.txt\"]"),
                                 ("job.dump_folder", "a b/c"), ("optimizer.name", optimizer)])
        again = config.load(write(tmp_path, config.to_toml(cfg)))
        assert again == cfg


def test_entry_point_reports_one_line_and_exit_2(tmp_path):
    path = write(tmp_path, "[training]\nstpes = 5\n")
    result = subprocess.run([sys.executable, "-m", "dtcollie.train", "--config", path], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr == "error: unknown key training.stpes; did you mean training.steps?\n"
    missing = subprocess.run([sys.executable, "-m", "dtcollie.train", "--config", str(tmp_path / "no.toml")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "does not exist" in missing.stderr


def test_help_lists_every_keys_choices():
    result = subprocess.run([sys.executable, "-m", "dtcollie.train", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr == ""
    lines = result.stdout.splitlines()

    def allowed_line(key: str) -> str:
        return lines[lines.index(next(line for line in lines if line.startswith(f"  {key} = "))) + 1]

    assert allowed_line("flavor") == "      choices: " + ", ".join(FLAVORS)
    assert allowed_line("name") == "      choices: adamw, lion, adan, sophiag, lomo, adalomo"
    assert allowed_line("pp_schedule") == ("      choices: GPipe, 1F1B, Interleaved1F1B, InterleavedZeroBubble, "
                                           "ZBVZeroBubble")
    assert allowed_line("target_modules") == "      items from: " + ", ".join(TARGETS)
    assert "or a comma list of layer counts" in next(line for line in lines if line.startswith("  pp_partition = "))
    assert allowed_line("lr").startswith("  weight_decay = ")  # no choices line for a free value
    with_choices = [f for section in dataclasses.fields(config.JobConfig) for f in dataclasses.fields(section.type)
                    if config.field_choices(f)]
    assert len(with_choices) == sum(line.startswith(("      choices: ", "      items from: ")) for line in lines) == 13


def test_shipped_configs_load_and_debug_is_the_default():
    assert config.load("train_configs/debug.toml") == config.load()
    assert config.load("train_configs/7b.toml").model.flavor == "llama2_7b"
    assert config.load("train_configs/debug_sft.toml").data.kind == "sft"
    layouts = {name: config.load(f"train_configs/{name}.toml").parallelism for name in ("13b", "llama3_8b", "70b")}
    assert (layouts["70b"].tp, layouts["70b"].pp, layouts["70b"].dp_shard) == (8, 4, 2)
    assert layouts["llama3_8b"].dp_shard == 8 and layouts["13b"].tp == 2


def test_optimizer_betas_default_per_optimizer(tmp_path):
    assert config.load(None, [("optimizer.name", "lion")]).optimizer.betas() == (0.9, 0.99)
    assert config.load(None, [("optimizer.name", "adan"), ("optimizer.beta2", "0.9")]).optimizer.betas() == (0.98, 0.9, 0.99)
    assert config.load(None, []).optimizer.betas() == (0.9, 0.95)
