"""The conversion scripts, run as a user would: separate processes, exit codes, stderr."""

import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

REPO = Path(__file__).resolve().parents[2]


def run_tool(script: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / script), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def save_tiny_hf(folder: Path) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


def test_tools_round_trip_with_cast_and_shards(tmp_path):
    source = save_tiny_hf(tmp_path / "hf")
    done = run_tool("convert_hf_to_dcp.py", "--hf", source, "--out", tmp_path / "dcp")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "dcp" / "model_args.json").is_file()
    done = run_tool("convert_dcp_to_hf.py", "--dcp", tmp_path / "dcp", "--out", tmp_path / "out",
                    "--dtype", "float32", "--max-shard-size", "10KB")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()

    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.dtype == torch.float32
    original = load_file(source / "model.safetensors")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, original[name].float()), name


def test_tools_report_bad_input_in_one_line(tmp_path):
    done = run_tool("convert_hf_to_dcp.py", "--hf", tmp_path / "nowhere", "--out", tmp_path / "dcp")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ") and "nowhere" in done.stderr

    assert not (tmp_path / "dcp").exists()  # nothing written before the input is known to be good
