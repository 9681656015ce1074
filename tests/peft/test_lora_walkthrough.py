"""The README's LoRA walk-through, shortened: base weights -> HF -> DCP -> LoRA training ->
export_lora -> `peft` loads the adapter; the logits agree with the trained dtcollie model."""

import subprocess
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from dtcollie.dcp_weights import load_weights_as_stored
from dtcollie.models.hf import load_model_args
from dtcollie.models.llama import Transformer
from dtcollie.peft import apply_lora, load_lora_config


def run(*command: str) -> None:
    result = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_lora_walkthrough(tmp_path):
    run("-m", "dtcollie.train", "--training.steps", "2", "--training.seq_len", "32", "--training.eval_interval", "0",
        "--job.dump_folder", str(tmp_path / "base_run"))
    run("tools/convert_dcp_to_hf.py", "--dcp", str(tmp_path / "base_run/weights"), "--out",
        str(tmp_path / "hf_base"))
    run("tools/convert_hf_to_dcp.py", "--hf", str(tmp_path / "hf_base"), "--out", str(tmp_path / "base_dcp"))
    run("-m", "dtcollie.train", "--config", "train_configs/debug_lora.toml", "--checkpoint.initial_load_path",
        str(tmp_path / "base_dcp"), "--job.dump_folder", str(tmp_path / "lora"), "--training.steps", "3",
        "--checkpoint.interval", "3", "--training.eval_interval", "0")
    step = tmp_path / "lora/checkpoints/step-3"
    # The run's weights folder holds base and adapters: it merges alone (no --base).
    run("tools/export_lora.py", "--checkpoint", str(tmp_path / "lora/weights"), "--out", str(tmp_path / "adapter"),
        "--merge-into", str(tmp_path / "merged"))
    assert_peft_gives_our_logits(step, tmp_path / "base_dcp", tmp_path / "hf_base", tmp_path / "adapter",
                                 tmp_path / "merged")


def test_qwen2_lora_walkthrough_under_tensor_parallel(tmp_path):
    """The README's Qwen2.5 walk-through: an HF Qwen2 folder -> DCP -> LoRA under tp 2 (torchrun) ->
    export_lora -> `peft` on transformers' Qwen2ForCausalLM gives the trained model's logits."""
    run("tools/make_tiny_hf_model.py", "--family", "qwen2", "--out", str(tmp_path / "hf_base"))
    run("tools/convert_hf_to_dcp.py", "--hf", str(tmp_path / "hf_base"), "--out", str(tmp_path / "base_dcp"))
    run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "dtcollie.train", "--config",
        "train_configs/debug_qwen2_lora.toml", "--model.args_path", str(tmp_path / "base_dcp/model_args.json"),
        "--checkpoint.initial_load_path", str(tmp_path / "base_dcp"), "--data.tokenizer", str(tmp_path / "base_dcp"),
        "--job.dump_folder", str(tmp_path / "lora"), "--training.steps", "3", "--checkpoint.interval", "3",
        "--training.eval_interval", "0")
    step = tmp_path / "lora/checkpoints/step-3"
    run("tools/export_lora.py", "--checkpoint", str(step), "--out", str(tmp_path / "adapter"), "--merge-into",
        str(tmp_path / "merged"), "--base", str(tmp_path / "base_dcp"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert type(merged).__name__ == "Qwen2ForCausalLM"
    base_config = AutoModelForCausalLM.from_pretrained(tmp_path / "hf_base").config
    assert merged.config.max_position_embeddings == base_config.max_position_embeddings == 2048  # not seq_len
    for folder in ("adapter", "merged"):  # each loads its tokenizer alone
        assert AutoTokenizer.from_pretrained(tmp_path / folder).eos_token_id == base_config.eos_token_id == 0
    assert merged.generation_config.eos_token_id == 0
    assert_peft_gives_our_logits(step, tmp_path / "base_dcp", tmp_path / "hf_base", tmp_path / "adapter",
                                 tmp_path / "merged")


def assert_peft_gives_our_logits(step, base_dcp, hf_base, adapter, merged) -> None:
    """The trained dtcollie model (base weights plus the checkpoint's adapters, all it stores) and
    transformers + peft on the exported adapter, and the merged export, give the same logits."""
    adapters = load_weights_as_stored(step)
    assert adapters and all("lora_" in name for name in adapters)
    assert all(t.abs().max() > 0 for name, t in adapters.items() if name.endswith("lora_b"))  # B left zero
    model = Transformer(load_model_args(step))
    config = load_lora_config(step)
    apply_lora(model, config.rank, config.alpha, config.target_modules)
    missing, unexpected = model.load_state_dict({**load_weights_as_stored(base_dcp), **adapters}, strict=False)
    assert not unexpected and not missing
    tokens = torch.randint(0, 2048, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(tokens)
        base = AutoModelForCausalLM.from_pretrained(hf_base, dtype=torch.float32)
        plain = base(input_ids=tokens).logits
        with_adapter = PeftModel.from_pretrained(base, adapter)(input_ids=tokens).logits
        merged_logits = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)(input_ids=tokens).logits
    assert (ours - plain).abs().max() > 1e-2  # the adapters matter
    torch.testing.assert_close(with_adapter, ours, rtol=0, atol=1e-4)
    torch.testing.assert_close(merged_logits, ours, rtol=0, atol=1e-4)
