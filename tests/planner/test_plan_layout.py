"""tools/plan.py --layout run as a user would: a separate process, its tables, its exit codes."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LLAMA2_7B_PARAMS = 6_738_415_616  # the published count
NORM_PARAMS_7B = 65 * 4096  # 2 norms in each of 32 blocks + the final norm, dim 4096
GIB = 1024 ** 3


def run_plan(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "plan.py"), "--layout", *map(str, args)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)


def table(stdout: str, first_column: str = "rank  pp") -> list[dict]:
    """The rows of the table whose header starts with `first_column` as dicts keyed by the header
    (columns are separated by two or more spaces)."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(first_column))
    header = [cell for cell in lines[start].split("  ") if cell.strip()]
    header = [cell.strip() for cell in header]
    rows = []
    for line in lines[start + 1:]:
        cells = [cell.strip() for cell in line.split("  ") if cell.strip()]
        if not cells or not cells[0].isdigit():
            break
        rows.append(dict(zip(header, cells)))
    return rows


def test_7b_on_8_ranks_holds_an_eighth_of_the_model():
    # Every layout key given, so the test does not follow edits of 7b.toml's own layout.
    done = run_plan("--config", "train_configs/7b.toml", "--gpus", "8", "--parallelism.tp", "2",
                    "--parallelism.dp_shard", "-1", "--parallelism.pp", "1", "--parallelism.dp_replicate", "1")
    assert done.returncode == 0, done.stderr
    assert f"{LLAMA2_7B_PARAMS:,} parameters" in done.stdout
    rows = table(done.stdout)
    assert len(rows) == 1  # one pipeline rank: every rank holds equal shards
    row = rows[0]
    assert (row["rank"], row["layers"], row["emb/out"]) == ("0", "0-31", "emb+out")
    params = int(row["params"].replace(",", ""))
    # An eighth of the model, except that the norms are replicated over tp 2 (so split 4 ways);
    # 8 and 4 divide every row count here, so there is no FSDP padding.
    assert abs(params - LLAMA2_7B_PARAMS / 8) <= NORM_PARAMS_7B / 8
    assert params == (LLAMA2_7B_PARAMS - NORM_PARAMS_7B) // 8 + NORM_PARAMS_7B // 4
    # fp32 master weights and gradients, two fp32 AdamW states.
    for column, bytes_per_param in (("params GiB", 4), ("grads GiB", 4), ("state GiB", 8)):
        assert abs(float(row[column]) - params * bytes_per_param / GIB) < 0.006, column
    # The largest gathered unit is the root: embedding + output (vocab 32000 / tp 2 rows of 4096) and
    # the final norm, in bf16.
    assert abs(float(row["gathered GiB"]) - (2 * 16000 * 4096 + 4096) * 2 / GIB) < 0.006
    assert abs(float(row["total GiB"]) - (16 * params + (2 * 16000 * 4096 + 4096) * 2) / GIB) < 0.006
    # The second table adds activations: 7b.toml's micro-batch of 2 x 4096 tokens, selective AC.
    (peak,) = table(done.stdout, "rank  acts")
    assert peak["rank"] == "0" and float(peak["acts GiB"]) > 1.0
    assert float(peak["peak GiB"]) > float(row["total GiB"]) + 1.0


def test_lomo_with_bf16_weights_holds_two_bytes_per_parameter():
    layout = ["--gpus", "8", "--parallelism.tp", "2", "--parallelism.dp_shard", "-1", "--parallelism.pp", "1",
              "--parallelism.dp_replicate", "1"]
    master, bf16 = (run_plan("--config", "train_configs/7b_lomo.toml", *layout, "--training.mixed_precision", precision)
                    for precision in ("bf16", "bf16_weights"))
    assert master.returncode == 0 and bf16.returncode == 0, master.stderr + bf16.stderr
    (master_row,), (bf16_row,) = table(master.stdout), table(bf16.stdout)
    params = int(bf16_row["params"].replace(",", ""))
    assert abs(float(master_row["params GiB"]) - params * 4 / GIB) < 0.006
    assert abs(float(bf16_row["params GiB"]) - params * 2 / GIB) < 0.006
    assert float(bf16_row["state GiB"]) == 0.0
    assert "bf16 weights (no master copy)" in bf16.stdout


def test_pipeline_layout_has_one_row_per_pipeline_rank():
    done = run_plan("--config", "train_configs/7b.toml", "--gpus", "8", "--parallelism.tp", "4",
                    "--parallelism.pp", "2", "--parallelism.dp_shard", "1", "--parallelism.dp_replicate", "1",
                    "--training.micro_batch_size", "2")
    assert done.returncode == 0, done.stderr
    rows = table(done.stdout)
    assert [(r["rank"], r["pp"], r["layers"], r["emb/out"]) for r in rows] == [("0", "0", "0-15", "emb"),
                                                                                 ("4", "1", "16-31", "out")]
    held = sum(int(r["params"].replace(",", "")) for r in rows)
    # Two stages of a quarter each (tp 4), norms replicated over tp: the whole model once per tp rank.
    assert held == (LLAMA2_7B_PARAMS - NORM_PARAMS_7B) // 4 + NORM_PARAMS_7B


def test_bad_world_size_is_one_error_line():
    done = run_plan("--config", "train_configs/7b.toml", "--gpus", "6", "--parallelism.tp", "2",
                    "--parallelism.dp_shard", "4")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ") and "world size is 6" in done.stderr
    assert done.stdout == ""


def test_lomo_plan_has_no_state_and_one_gradient():
    result = run_plan("--config", "train_configs/7b_lomo.toml", "--gpus", "8")
    assert result.returncode == 0, result.stderr
    row = result.stdout.splitlines()[2].split()  # the rank-0 row; its last 5 cells are the GiB columns
    params_gib, grads_gib, state_gib, _, total_gib = map(float, row[-5:])
    assert state_gib == 0.0
    assert 0 < grads_gib < params_gib / 30  # the largest single gradient, not all of them
    assert total_gib < params_gib + 1.0


def test_lora_plan_counts_gradients_and_state_of_the_adapters_only():
    """llama3_2_1b_lora (tp 2, tied embeddings): the whole fp32 base per tp shard, but gradients and
    AdamW state only for the rank-16 adapters, a small fraction of it."""
    done = run_plan("--config", "train_configs/llama3_2_1b_lora.toml", "--gpus", "2")
    assert done.returncode == 0, done.stderr
    (row,) = table(done.stdout)
    params, grads, state = (float(row[key]) for key in ("params GiB", "grads GiB", "state GiB"))
    base_shard = 1_235_814_400 / 2 * 4 / GIB  # the published count, fp32, halved by tp
    assert base_shard < params < base_shard * 1.02  # plus the adapters' shards
    assert 0 < grads < params / 50 and state == pytest.approx(2 * grads, abs=0.01)
