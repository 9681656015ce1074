"""The first hour, as a user gets it: the package installed (not the checkout), started from an
unrelated folder, trains its embedded default, keeps the weights, and the HF export of them loads
in transformers alone, computes dtcollie's logits and stops generating at EOS."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dtcollie.inference import build_inference_model, load_weights
from dtcollie.models.llama import FLAVORS

ROOT = Path(__file__).resolve().parents[1]


def install(tmp_path: Path) -> Path:
    """pip install a copy of the package into a target folder; the copy is removed afterwards."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "dtcollie", source / "dtcollie", ignore=shutil.ignore_patterns("__pycache__"))
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--target", str(site), str(source)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    shutil.rmtree(source)  # nothing may come from the copy that was installed
    return site


def test_the_installed_default_trains_anywhere_and_exports_a_folder_transformers_loads_alone(tmp_path):
    site = install(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}

    def run(*command: str) -> str:
        done = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=300,
                              cwd=elsewhere, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    assert run("-c", "import dtcollie; print(dtcollie.__file__)").strip() == str(site / "dtcollie" / "__init__.py")
    out = run("-m", "dtcollie.train", "--training.steps", "5", "--training.eval_interval", "0")
    assert "run finished: step 5 of 5" in out and f"weights      {Path('outputs/debug/weights')}" in out
    weights = elsewhere / "outputs" / "debug" / "weights"
    assert (weights / "tokenizer.json").read_bytes() == (site / "dtcollie/assets/tokenizer/tokenizer.json").read_bytes()
    run(str(ROOT / "tools/convert_dcp_to_hf.py"), "--dcp", "outputs/debug/weights", "--out", "hf")
    tokenizer = AutoTokenizer.from_pretrained(elsewhere / "hf")
    model = AutoModelForCausalLM.from_pretrained(elsewhere / "hf").eval()
    assert model.config.max_position_embeddings == FLAVORS["debug"].max_seq_len != 128  # the model's, not seq_len
    eos = tokenizer.eos_token_id
    assert eos == tokenizer.convert_tokens_to_ids("<|endoftext|>") == model.config.eos_token_id
    assert model.generation_config.eos_token_id == eos and model.config.pad_token_id == tokenizer.pad_token_id
    ids = tokenizer("It is a truth universally acknowledged", return_tensors="pt").input_ids
    ours = build_inference_model(*load_weights(weights), torch.device("cpu"))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ours(ids), rtol=1e-4, atol=1e-4)
        boost = torch.nn.functional.one_hot(torch.tensor(eos), model.config.vocab_size) * 1e4
        model.lm_head.register_forward_hook(lambda module, inputs, logits: logits + boost)  # EOS always wins
        generated = model.generate(ids, max_new_tokens=10, do_sample=False)
    assert generated[0, ids.shape[1]:].tolist() == [eos]  # generation stopped at the first EOS
