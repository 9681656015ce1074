"""PEFT-format export checked against the peft package itself, and the export_lora tool."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from dtcollie.dcp_weights import model_state_dict, save_model_weights
from dtcollie.errors import CheckpointError, ConfigError
from dtcollie.models.hf import save_hf, save_model_args
from dtcollie.peft import (export_lora, is_lora_key, lora_config, merge_lora, save_lora_config,
                           save_peft_adapter)
from lora_models import ALL_TARGETS, base_logits, lora_model, random_tokens

REPO = Path(__file__).resolve().parents[2]
TOLERANCE = 1e-4


def our_logits(model, tokens) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(tokens)


def save_base_hf(model, folder: Path) -> Path:
    """The model's frozen base weights as an HF folder (config.json from hf_config_from_args)."""
    save_hf({name: t for name, t in model_state_dict(model).items() if not is_lora_key(name)}, model.args, folder)
    return folder


def peft_logits(base_folder: Path, adapter_folder: Path, tokens) -> torch.Tensor:
    base = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_folder)
    with torch.no_grad():
        return model.eval()(input_ids=tokens).logits


def hf_logits(folder: Path, tokens) -> torch.Tensor:
    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        return model.eval()(tokens).logits


def save_lora_checkpoint(model, folder: Path) -> Path:
    """What the trainer writes for a LoRA run: weights (base + adapters), model_args.json, lora.json."""
    save_model_weights(model, folder)
    save_model_args(model.args, folder / "model_args.json")
    save_lora_config(folder, lora_config(model))
    return folder


@pytest.mark.parametrize("targets,use_rslora", [(ALL_TARGETS, False), (["wq", "wv", "w2"], True)])
def test_peft_loads_our_adapter_and_gives_our_logits(tmp_path, targets, use_rslora):
    model = lora_model(targets, rank=4, alpha=6.0, use_rslora=use_rslora, dropout=0.1)
    tokens = random_tokens()
    ours = our_logits(model, tokens)
    assert (ours - base_logits(model, tokens)).abs().max() > 100 * TOLERANCE
    save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path="tiny-llama")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    hf_names = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj", "w1": "gate_proj",
                "w2": "down_proj", "w3": "up_proj", "output": "lm_head"}
    assert config | {"target_modules": None} == {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "tiny-llama", "r": 4,
        "lora_alpha": 6.0, "lora_dropout": 0.1, "target_modules": None, "use_rslora": use_rslora, "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True}
    assert config["target_modules"] == [hf_names[t] for t in targets]
    theirs = peft_logits(save_base_hf(model, tmp_path / "base"), tmp_path / "adapter", tokens)
    assert (ours - theirs).abs().max() <= TOLERANCE

    merge_lora(model)
    save_hf(model_state_dict(model), model.args, tmp_path / "merged")
    assert (ours - hf_logits(tmp_path / "merged", tokens)).abs().max() <= TOLERANCE


FAMILIES = {  # name: ModelArgs options
    "qwen2": dict(qkv_bias=True, family="qwen2"),
    "qwen3": dict(qk_norm=True, head_dim=24, family="qwen3"),
    "mistral_window": dict(sliding_window=5, family="mistral"),
    "llama_tied": dict(tie_embeddings=True),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_exports_an_adapter_peft_applies(tmp_path, family):
    """The family's HF base plus our PEFT adapter, through transformers and peft, give our logits;
    so does the merged export (the biases stay in the base)."""
    targets = [t for t in ALL_TARGETS if not (t == "output" and family == "llama_tied")]
    model = lora_model(targets, **FAMILIES[family])
    tokens = random_tokens()
    ours = our_logits(model, tokens)
    assert (ours - base_logits(model, tokens)).abs().max() > 100 * TOLERANCE
    save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=f"tiny-{family}")
    base = save_base_hf(model, tmp_path / "base")
    assert json.loads((base / "config.json").read_text())["model_type"] == model.args.family
    assert (ours - peft_logits(base, tmp_path / "adapter", tokens)).abs().max() <= TOLERANCE
    merge_lora(model)
    save_hf(model_state_dict(model), model.args, tmp_path / "merged")
    assert (ours - hf_logits(tmp_path / "merged", tokens)).abs().max() <= TOLERANCE


def run_tool(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "export_lora.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_export_tool_end_to_end(tmp_path):
    model = lora_model(["wq", "wk", "wo", "w3", "output"], use_rslora=True)
    tokens = random_tokens()
    ours = our_logits(model, tokens)
    checkpoint = save_lora_checkpoint(model, tmp_path / "step-10")
    done = run_tool("--checkpoint", checkpoint, "--out", tmp_path / "adapter", "--merge-into", tmp_path / "merged",
                    "--base-model", "tiny-llama")
    assert done.returncode == 0, done.stderr
    assert "LoRA rank 4 on wq, wk, wo, w3, output" in done.stdout
    theirs = peft_logits(save_base_hf(model, tmp_path / "base"), tmp_path / "adapter", tokens)
    assert (ours - theirs).abs().max() <= TOLERANCE
    assert (ours - hf_logits(tmp_path / "merged", tokens)).abs().max() <= TOLERANCE


def test_export_tool_bad_input_is_one_line_exit_2(tmp_path):
    done = run_tool("--checkpoint", tmp_path / "nowhere", "--out", tmp_path / "adapter")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ") and "nowhere" in done.stderr
    base_only = tmp_path / "base_only"
    save_model_weights({n: t for n, t in lora_model(["wq"]).state_dict().items() if not is_lora_key(n)}, base_only)
    done = run_tool("--checkpoint", base_only, "--out", tmp_path / "adapter")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "holds no LoRA weights" in done.stderr
    assert not (tmp_path / "adapter").exists()


def test_export_checks_everything_before_writing(tmp_path):
    model = lora_model(["wq", "wv"])
    checkpoint = save_lora_checkpoint(model, tmp_path / "ckpt")
    (checkpoint / "lora.json").unlink()
    with pytest.raises(CheckpointError, match="has no lora.json"):
        export_lora(checkpoint, tmp_path / "out")
    (checkpoint / "lora.json").write_text(json.dumps({"rank": 8, "alpha": 16.0, "target_modules": ["wq", "wv"],
                                                      "dropout": 0.0, "use_rslora": False}))
    with pytest.raises(CheckpointError, match="shape mismatch: layers.0.attention.wq.lora_a"):
        export_lora(checkpoint, tmp_path / "out")
    (checkpoint / "lora.json").write_text(json.dumps({"rank": 4, "alpha": 16.0, "targets": ["wq"]}))
    with pytest.raises(ConfigError, match="not a valid LoRA config"):
        export_lora(checkpoint, tmp_path / "out")
    save_lora_config(checkpoint, lora_config(model))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    with pytest.raises(CheckpointError, match="is not empty"):
        export_lora(checkpoint, tmp_path / "out", merge_into=tmp_path / "busy")
    assert not any((tmp_path / "out").iterdir())
