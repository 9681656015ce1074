"""Evaluators: multiple-choice accuracy by log-likelihood and generation exact match.

Multiple choice (lm-eval's `acc` / `acc_norm`): a jsonl record {"question", "choices", "answer"}
(answer: the index of the right choice) scores each choice by the log-likelihood of " " + choice
after the question; `acc` counts questions whose right choice scores highest, `acc_norm` divides
each score by the choice's length in characters first. As lm-eval does, the continuation's tokens
are what encoding question + continuation adds after encoding the question alone (trailing
spaces of the question moved to the continuation), and a row longer than the model's context is
cut on the left. Texts are encoded as in training and as lm-eval's "hf" model encodes them, with
the tokenizer's prefix (BOS for Llama; `Tokenizer.encode_prompt`); an empty context is BOS, or EOS
for a tokenizer without one.

Generation exact match: a record {"prompt", "answer"}; the greedy completion (up to EOS or
`max_new_tokens`, EOS and surrounding whitespace stripped) must equal the answer stripped.

Both take `forward(tokens) -> logits` of a whole model (one process, FSDP or tensor-parallel),
spread questions over data-parallel ranks and sum the counts over them; every rank runs the same
number of forwards (FSDP gathers weights collectively).
"""

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from dtcollie.data.files import resolve_files
from dtcollie.data.records import convert_records, file_records
from dtcollie.errors import ConfigError, DataError
from dtcollie.generation import Sampling, generate


@dataclass
class ChoiceQuestion:
    question: str
    choices: list[str]
    answer: int


def _choice_record(record):
    if not isinstance(record, dict):
        return None, f"expected a JSON object, got {type(record).__name__}"
    question, choices, answer = record.get("question"), record.get("choices"), record.get("answer")
    if not isinstance(question, str):
        return None, "needs a string 'question'"
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        return None, "needs 'choices', a list of at least two strings"
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
        return None, f"needs 'answer', the index (0 to {len(choices) - 1}) of the right choice"
    return ChoiceQuestion(question, choices, answer), None


def _generation_record(record):
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or \
            not isinstance(record.get("answer"), str):
        return None, "needs string fields 'prompt' and 'answer'"
    return (record["prompt"], record["answer"]), None


def read_tasks(patterns: list[str], key: str, kind: str) -> list:
    """The multiple-choice questions (kind "choice") or (prompt, answer) pairs ("generation")."""
    convert = _choice_record if kind == "choice" else _generation_record
    records = (item for path in resolve_files(patterns, key, (".jsonl",)) for item in file_records(path))
    return [value for _, value in convert_records(records, convert, skip_bad_lines=False,
                                                  skip_fix="fix the record")]


def start_token(tokenizer) -> int:
    """What stands before a text with no context: BOS, else EOS (lm-eval's prefix_token_id)."""
    return tokenizer.eos_id if tokenizer.bos_id is None else tokenizer.bos_id


def continuation_tokens(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) split as lm-eval splits them."""
    if not context:  # nothing to condition on
        return [start_token(tokenizer)], tokenizer.encode(continuation)
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, alone = tokenizer.encode_prompt(context + continuation), tokenizer.encode_prompt(context)
    return whole[:len(alone)], whole[len(alone):]


def loglikelihood_rows(pairs: list[tuple[list[int], list[int]]], max_len: int,
                       pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (input_ids, targets) [n, width] for `pairs`; targets are -100 outside the continuation."""
    width = min(max_len, max(len(c) + len(x) for c, x in pairs))
    input_ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    targets = torch.full((len(pairs), width), -100, dtype=torch.long)
    for row, (context, continuation) in enumerate(pairs):
        tokens = (context + continuation)[-(width + 1):]  # cut on the left, keeping the continuation
        n = len(tokens) - 1
        input_ids[row, :n] = torch.tensor(tokens[:-1])
        scored = min(len(continuation), n)
        if scored:
            targets[row, n - scored:n] = torch.tensor(tokens[-scored:])
    return input_ids, targets


@torch.no_grad()
def loglikelihoods(forward, pairs: list[tuple[list[int], list[int]]], max_len: int, pad_id: int,
                   batch_size: int) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), whether greedy decoding gives the continuation) per pair."""
    results = []
    for start in range(0, len(pairs), batch_size):
        input_ids, targets = loglikelihood_rows(pairs[start:start + batch_size], max_len, pad_id)
        logits = forward(input_ids).double()
        logprobs = -F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
        scored = targets != -100
        greedy = (logits.argmax(dim=-1) == targets) | ~scored
        results += [(float(logprobs[i][scored[i]].sum()), bool(greedy[i].all())) for i in range(len(targets))]
    return results


def my_share(items: list, rank: int, world: int) -> list:
    """Rank `rank`'s items of `world`, padded with None so every rank holds the same number."""
    per_rank = math.ceil(len(items) / world)
    mine = items[rank * per_rank:(rank + 1) * per_rank]
    return mine + [None] * (per_rank - len(mine))


def summed(counts: list[float], group) -> list[float]:
    totals = torch.tensor(counts, dtype=torch.float64)
    if group is not None:
        dist.all_reduce(totals, group=group)
    return totals.tolist()


def choice_accuracy(forward, tokenizer, questions: list[ChoiceQuestion], max_len: int, batch_size: int,
                    rank: int = 0, world: int = 1, group=None) -> dict:
    """{"acc", "acc_norm"} over `questions`, this rank scoring its share."""
    mine = my_share(questions, rank, world)
    filler = questions[0]  # scored where a rank has no question left, and not counted: ranks run alike
    pairs, owners = [], []
    for index, question in enumerate(mine):
        for choice in (question or filler).choices:
            pairs.append(continuation_tokens(tokenizer, (question or filler).question, " " + choice))
            owners.append(index)
    scores = loglikelihoods(forward, pairs, max_len, tokenizer.pad_id, batch_size)
    correct = correct_norm = 0
    for index, question in enumerate(mine):
        if question is None:
            continue
        lls = [score for (score, _), owner in zip(scores, owners) if owner == index]
        normed = [ll / len(choice) for ll, choice in zip(lls, question.choices)]
        correct += int(max(range(len(lls)), key=lls.__getitem__) == question.answer)
        correct_norm += int(max(range(len(normed)), key=normed.__getitem__) == question.answer)
    correct, correct_norm, total = summed([correct, correct_norm, len([q for q in mine if q])], group)
    return {"acc": correct / total, "acc_norm": correct_norm / total}


def exact_match(model, tokenizer, tasks: list[tuple[str, str]], max_new_tokens: int, batch_size: int,
                rank: int = 0, world: int = 1, group=None) -> tuple[dict, list[tuple[str, str, str]]]:
    """({"exact_match"}, this rank's first (prompt, answer, completion) samples)."""
    mine = my_share(tasks, rank, world)
    matched, samples = 0, []
    for start in range(0, len(mine), batch_size):
        batch = [task or tasks[0] for task in mine[start:start + batch_size]]
        # A prompt too long for the model's context keeps its end, room left for the answer.
        room = model.args.max_seq_len - max_new_tokens
        prompts = [(tokenizer.encode_prompt(prompt) or [start_token(tokenizer)])[-room:] for prompt, _ in batch]
        # Every rank decodes all max_new_tokens steps (no early stop): FSDP forwards must pair up.
        outputs = generate(model, prompts, max_new_tokens, Sampling(), eos_id=tokenizer.eos_id,
                           pad_id=tokenizer.pad_id, stop_early=world == 1)
        for task, output in zip(mine[start:start + batch_size], outputs):
            if task is None:
                continue
            completion = tokenizer.decode(output, skip_special_tokens=True).strip()
            matched += int(completion == task[1].strip())
            samples.append((task[0], task[1], completion))
    matched, total = summed([matched, len([t for t in mine if t])], group)
    return {"exact_match": matched / total}, samples


class WholeLogits:
    """A model whose logits may be vocab-sharded (loss parallel), called for whole logits on every rank."""

    def __init__(self, model):
        self.model, self.args, self.rope_cos = model, model.args, model.rope_cos

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        logits = self.model(*args, **kwargs)
        return logits.full_tensor() if isinstance(logits, DTensor) else logits


class EvalTasks:
    """The [eval] section's tasks, read (and checked) when the trainer starts."""

    def __init__(self, eval_cfg, choices: list[ChoiceQuestion], generations: list[tuple[str, str]]):
        self.cfg, self.choices, self.generations = eval_cfg, choices, generations

    @classmethod
    def of(cls, cfg, pp: int) -> "EvalTasks | None":
        eval_cfg = cfg.eval
        if not eval_cfg.choice_files and not eval_cfg.generation_files:
            return None
        if cfg.training.eval_interval == 0:
            raise ConfigError("[eval] lists task files but training.eval_interval = 0 never runs them; set an "
                              "interval or remove the files")
        if pp > 1:
            raise ConfigError("[eval] tasks do not run under pipeline parallelism (parallelism.pp > 1) yet; "
                              "evaluate a checkpoint on a layout without pp")
        parallelism = cfg.parallelism
        if parallelism.tp > 1 and (parallelism.sequence_parallel or parallelism.loss_parallel):
            # Measured: a rank aborts in the first evaluation with either on (gloo, torch 2.13).
            raise ConfigError("[eval] tasks under tensor parallelism need parallelism.sequence_parallel = false and "
                              "parallelism.loss_parallel = false for now")
        if eval_cfg.max_new_tokens >= cfg.training.seq_len:
            raise ConfigError(f"eval.max_new_tokens ({eval_cfg.max_new_tokens}) leaves no room for a prompt in "
                              f"training.seq_len ({cfg.training.seq_len}); lower it")
        tasks = {}
        for kind, key, files in (("choice", "eval.choice_files", eval_cfg.choice_files),
                                 ("generation", "eval.generation_files", eval_cfg.generation_files)):
            tasks[kind] = read_tasks(files, key, kind) if files else []
            if files and not tasks[kind]:
                raise DataError(f"{key} hold no task records; add some or remove the files")
        return cls(eval_cfg, tasks["choice"], tasks["generation"])

    def run(self, model, tokenizer, max_len: int, rank: int, world: int, group) -> tuple[dict, list]:
        """({"eval_acc", "eval_acc_norm", "eval_exact_match"} as present, sample generations)."""
        result, samples = {}, []
        if self.choices:
            scores = choice_accuracy(model, tokenizer, self.choices, max_len, self.cfg.batch_size, rank, world, group)
            result.update({f"eval_{key}": value for key, value in scores.items()})
        if self.generations:
            scores, samples = exact_match(model, tokenizer, self.generations, self.cfg.max_new_tokens,
                                          self.cfg.batch_size, rank, world, group)
            result.update({f"eval_{key}": value for key, value in scores.items()})
        return result, samples[: self.cfg.samples]
