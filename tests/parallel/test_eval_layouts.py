"""The [eval] evaluators give the one-process numbers under data and tensor parallelism.

A few steps of the debug model from one saved start, with multiple-choice and exact-match tasks
at step 2 and 4: under dp_shard 2 (questions spread over the ranks, FSDP forwards paired) and
tp 2 (without sequence or loss parallel, which the evaluators refuse for now) every evaluation
must equal the single-process one.
"""

import json
from pathlib import Path

import pytest
from debug_weights import ONE_NOVEL, save_debug_init
from train_jobs import launch_jobs

from dtcollie.metrics import read_records

LAYOUTS = {"one_process": (1, []), "dp_shard2": (2, ["--training.micro_batch_size", "4"]),
           "tp2": (2, ["--parallelism.tp", "2", "--parallelism.loss_parallel", "false",
                       "--parallelism.sequence_parallel", "false"])}


def job(folder: Path, weights: Path, tasks: Path, overrides: list[str]) -> list[str]:
    return ["--config", "train_configs/debug.toml", "--training.steps", "4", "--training.seq_len", "32",
            "--training.eval_interval", "2", "--training.eval_steps", "1", "--metrics.enable_tensorboard", "false",
            "--checkpoint.save_weights", "false", "--eval.choice_files", str(tasks / "mc.jsonl"), "--eval.generation_files", str(tasks / "gen.jsonl"),
            "--eval.max_new_tokens", "4", "--eval.batch_size", "3", "--checkpoint.initial_load_path", str(weights),
            "--job.dump_folder", str(folder), *ONE_NOVEL, *overrides]


@pytest.fixture(scope="module")
def evaluations(tmp_path_factory) -> dict[str, list[dict]]:
    root = tmp_path_factory.mktemp("evals")
    (root / "mc.jsonl").write_text("".join(json.dumps(
        {"question": f"What is {i} plus {i}?", "choices": [str(2 * i), str(2 * i + 1), "many"], "answer": 0}) + "\n"
        for i in range(7)))
    (root / "gen.jsonl").write_text("".join(json.dumps({"prompt": f"Chapter {i}", "answer": "x"}) + "\n"
                                            for i in range(5)))
    weights = save_debug_init(root / "weights", seq_len=32)
    for name, (nproc, overrides) in LAYOUTS.items():
        (root / name).mkdir()
        launch_jobs(root / name, nproc, [job(root / name / "run", weights, root, overrides)])
    return {name: [r for r in read_records(root / name / "run") if "eval_acc" in r] for name in LAYOUTS}


@pytest.mark.parametrize("layout", ["dp_shard2", "tp2"])
def test_evaluations_match_one_process(evaluations, layout):
    reference = evaluations["one_process"]
    assert [r["step"] for r in reference] == [2, 4]
    for found, expected in zip(evaluations[layout], reference):
        for key in ("eval_acc", "eval_acc_norm", "eval_exact_match"):
            assert found[key] == pytest.approx(expected[key], abs=1e-12), (layout, key)
