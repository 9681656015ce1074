"""A fine-tuned HF model's export keeps the source's context length, RoPE settings, special-token
ids and generation config (the debug model's export: tests/test_installed.py)."""

import json
import subprocess
import sys
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer


ROOT = Path(__file__).resolve().parents[2]
QUICK = ["--training.steps", "2", "--training.seq_len", "32", "--training.eval_interval", "0",
         "--data.train_files", "dtcollie/assets/text/persuasion.txt"]


def run(*command: str, cwd: Path) -> str:
    result = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=600, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_an_hf_model_keeps_its_context_rope_and_tokens_through_fine_tuning(tmp_path):
    run(str(ROOT / "tools/make_tiny_hf_model.py"), "--family", "llama", "--tied", "--context", "4096", "--out",
        "hf_base", cwd=tmp_path)
    source = json.loads((tmp_path / "hf_base" / "config.json").read_text())
    source["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 1024}
    (tmp_path / "hf_base" / "config.json").write_text(json.dumps(source))
    run(str(ROOT / "tools/convert_hf_to_dcp.py"), "--hf", "hf_base", "--out", "dcp", cwd=tmp_path)
    run("-m", "dtcollie.train", *QUICK, "--model.args_path", "dcp/model_args.json", "--checkpoint.initial_load_path",
        "dcp", "--data.tokenizer", "dcp", "--job.dump_folder", "run", cwd=tmp_path)
    run(str(ROOT / "tools/convert_dcp_to_hf.py"), "--dcp", "run/weights", "--out", "hf", cwd=tmp_path)
    exported = json.loads((tmp_path / "hf" / "config.json").read_text())
    for key in ("max_position_embeddings", "rope_parameters", "bos_token_id", "eos_token_id", "pad_token_id",
                "tie_word_embeddings", "model_type"):
        assert exported.get(key) == source.get(key), key
    assert exported["max_position_embeddings"] == 4096 and source["eos_token_id"] is not None
    base_generation = json.loads((tmp_path / "hf_base" / "generation_config.json").read_text())
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text()) == base_generation
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert model.config.rope_parameters["factor"] == 32.0
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").eos_token_id == source["eos_token_id"]
