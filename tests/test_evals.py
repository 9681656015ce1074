"""Evaluators against EleutherAI's lm-evaluation-harness, offline, on a tiny local task.

One debug-shaped model (float64, so no near-tie between choices can flip on rounding) is exported
as an HF folder. lm-eval's own `hf` model scores the task with transformers; dtcollie's evaluator
and dtcollie's lm-eval model class must give the same per-choice log-likelihoods and the same
acc / acc_norm. The trainer's [eval] section then logs them, and exact match, as it trains.
"""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from dtcollie import config
from dtcollie.data import load_tokenizer
from dtcollie.evals import choice_accuracy, exact_match, read_tasks
from dtcollie.errors import DataError
from dtcollie.generation import generate
from dtcollie.metrics import read_records
from dtcollie.models.hf import save_hf
from dtcollie.models.llama import FLAVORS, Transformer
from dtcollie.train import Trainer

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "dtcollie/assets/tokenizer"
QUESTIONS = [{"question": f"Question: What is {a} plus {b}?\nAnswer:",
              "choices": [str(a + b + d) for d in (3, 0, -2, 7)], "answer": 1} for a, b in
             [(3, 14), (28, 6), (19, 0), (14, 37), (27, 39), (6, 11), (40, 2), (5, 5), (12, 30), (8, 9)]]
TASK_YAML = """task: dtcollie_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("task")
    (folder / "mc.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (folder / "tasks").mkdir()
    (folder / "tasks" / "tiny_mc.yaml").write_text(TASK_YAML.format(path=folder / "mc.jsonl"))
    args = dataclasses.replace(FLAVORS["debug"], vocab_size=2048, max_seq_len=64)
    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights()
    save_hf(model.state_dict(), args, folder / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / name, folder / "hf" / name)
    return {"folder": folder, "model": model.double().eval()}


def lm_eval_scores(model: str, model_args: str, folder: Path) -> tuple[dict, list[list[float]]]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    import dtcollie.lm_eval  # noqa: F401  (registers the "dtcollie" model)

    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["dtcollie_tiny_mc"], batch_size=4,
                                  task_manager=TaskManager(include_path=str(folder / "tasks")), log_samples=True)
    metrics = out["results"]["dtcollie_tiny_mc"]
    samples = sorted(out["samples"]["dtcollie_tiny_mc"], key=lambda sample: sample["doc_id"])
    lls = [[response[0] for response in sample["filtered_resps"]] for sample in samples]
    return {"acc": metrics["acc,none"], "acc_norm": metrics["acc_norm,none"]}, lls


def test_choice_accuracy_equals_lm_eval_with_transformers_and_with_dtcollie(task):
    folder, model = task["folder"], task["model"]
    tokenizer = load_tokenizer(str(TOKENIZER))
    questions = read_tasks([str(folder / "mc.jsonl")], "eval.choice_files", "choice")
    ours = choice_accuracy(model, tokenizer, questions, 64, batch_size=3)
    theirs, their_lls = lm_eval_scores("hf", f"pretrained={folder / 'hf'},dtype=float64,device=cpu", folder)
    assert ours == theirs
    ours_in_lm_eval, our_lls = lm_eval_scores("dtcollie", f"checkpoint={folder / 'hf'},dtype=fp64", folder)
    assert ours_in_lm_eval == theirs
    # Both in float64 but for the RoPE tables, float32 in both libraries and computed differently (~2e-6).
    assert torch.allclose(torch.tensor(our_lls), torch.tensor(their_lls), rtol=0, atol=1e-5)
    assert len({tuple(row) for row in our_lls}) == len(QUESTIONS)  # the scores depend on the question


def test_exact_match_counts_the_greedy_completions(task, tmp_path):
    model, tokenizer = task["model"], load_tokenizer(str(TOKENIZER))
    prompts = ["It is a truth", "Emma Woodhouse", "The family"]
    completions = [tokenizer.decode(tokens, skip_special_tokens=True).strip()
                   for tokens in generate(model, [tokenizer.encode(p) for p in prompts], 6,
                                          eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)]
    tasks = [(prompts[0], completions[0]), (prompts[1], completions[1]), (prompts[2], "not this")]
    scores, samples = exact_match(model, tokenizer, tasks, 6, batch_size=2)
    assert scores == {"exact_match": 2 / 3}
    assert [completion for _, _, completion in samples] == completions


def test_trainer_logs_the_evaluations(task, tmp_path):
    folder = tmp_path / "run"
    generations = tmp_path / "gen.jsonl"
    generations.write_text("".join(json.dumps({"prompt": f"Question: What is {i} plus 1?\nAnswer:",
                                               "answer": str(i + 1)}) + "\n" for i in range(5)))
    cfg = config.load("train_configs/debug.toml", [
        ("training.steps", "4"), ("training.eval_interval", "2"), ("training.seq_len", "32"),
        ("eval.choice_files", str(task["folder"] / "mc.jsonl")), ("eval.generation_files", str(generations)),
        ("eval.max_new_tokens", "4"), ("job.dump_folder", str(folder))])
    Trainer(cfg).train()
    evaluations = [r for r in read_records(folder) if "eval_acc" in r]
    assert [r["step"] for r in evaluations] == [2, 4]
    assert all(0 <= r["eval_acc"] <= 1 and 0 <= r["eval_exact_match"] <= 1 and "eval_acc_norm" in r
               for r in evaluations)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder / "tb"), size_guidance={"tensors": 0}).Reload()
    assert {"eval/acc", "eval/acc_norm", "eval/exact_match"} <= set(events.Tags()["scalars"])
    assert "eval/samples/text_summary" in events.Tags()["tensors"]


@pytest.mark.parametrize("record, message", [
    ({"question": "q", "choices": ["a"], "answer": 0}, "needs 'choices', a list of at least two strings"),
    ({"question": "q", "choices": ["a", "b"], "answer": 2}, r"needs 'answer', the index \(0 to 1\)"),
    ({"choices": ["a", "b"], "answer": 0}, "needs a string 'question'"),
])
def test_a_malformed_task_record_is_one_line(tmp_path, record, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(QUESTIONS[0]) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError, match=rf"bad.jsonl line 2: {message}"):
        read_tasks([str(path)], "eval.choice_files", "choice")
