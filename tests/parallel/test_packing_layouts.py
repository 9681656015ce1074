"""Packed rows with document masks give every token the loss it has when its document is alone.

For pretrain (data.document_mask), sft and chat data, the first packed rows of each are cut back
into their documents, one padded row each (no positions: the plain causal path), and both run
through the trainer's own forward and loss on one process, under tp 2 with sequence parallel,
under pp 2 and with compiled blocks. Every trained token's loss must agree, in fp64 to 1e-10 and
in fp32 (one process) to 1e-5. A control runs the packed rows without their positions: attention then crosses documents and
the losses must move by far more than the bar, so the comparison can fail.
"""


import pytest
import torch
import torch.nn.functional as F
from spawn import run_ranks

from dtcollie import config
from dtcollie.data import build_dataset
from dtcollie.loss import IGNORE_INDEX, cross_entropy_sum
from dtcollie.model_runner import plain
from dtcollie.train import Trainer

ROWS = 4  # packed rows taken from each dataset
SEQ_LEN = 128
CASES = {  # name: data overrides, as on the command line
    # The sample answers as short documents, several to a row.
    "pretrain": {"data.document_mask": "true", "data.train_files": "dtcollie/assets/sft/train.jsonl",
                 "data.text_field": "output"},
    "sft": {"data.kind": "sft", "data.train_files": "dtcollie/assets/sft/train.jsonl", "data.sft_packing": "true"},
    "chat": {"data.kind": "chat", "data.tokenizer": "dtcollie/assets/chat_tokenizer", "data.sft_packing": "true",
             "data.train_files": "dtcollie/assets/chat/train.jsonl"},
}
LAYOUTS = {"one_process": (1, {}), "tp2_sp": (2, {"parallelism.tp": "2", "parallelism.sequence_parallel": "true"}),
           "pp2": (2, {"parallelism.pp": "2"}), "compiled": (1, {"compile.enable": "true"})}


def unpack(rows: dict) -> dict:
    """Each document of the packed rows on a row of its own, padded, without positions."""
    input_ids, labels = [], []
    for ids, targets, positions in zip(rows["input_ids"], rows["labels"], rows["positions"]):
        starts = [*torch.nonzero(positions == 0).flatten().tolist(), len(positions)]
        for start, end in zip(starts, starts[1:]):
            input_ids.append(F.pad(ids[start:end], (0, SEQ_LEN - (end - start))))
            labels.append(F.pad(targets[start:end], (0, SEQ_LEN - (end - start)), value=IGNORE_INDEX))
    return {"input_ids": torch.stack(input_ids), "labels": torch.stack(labels)}


def trained_token_losses(trainer: Trainer, rows: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels, losses) of every trained token of `rows`, in row order, through the trainer's forward
    (an empty pair on ranks without the last pipeline stage)."""
    records = []

    def recording_loss(logits, labels):
        losses = F.cross_entropy(plain(logits).flatten(0, 1), labels.flatten(), reduction="none")
        records.append((labels.flatten(), losses))
        return cross_entropy_sum(logits, labels)

    trainer.runner.loss_fn, batch = recording_loss, trainer.cfg.training.micro_batch_size
    if len(rows["input_ids"]) % batch:  # fill the last batch with a row that trains nothing
        rows = {key: torch.cat([value, value[-1:]]) for key, value in rows.items()}
        rows["labels"][-1] = IGNORE_INDEX
    with torch.no_grad():
        for start in range(0, len(rows["input_ids"]), batch):
            trainer.runner.run({key: value[start:start + batch] for key, value in rows.items()}, backward=False)
    if not records:
        return torch.empty(0), torch.empty(0)
    labels, losses = (torch.cat(parts) for parts in zip(*records))
    trained = labels != IGNORE_INDEX
    return labels[trained], losses[trained]


def packing_worker(rank: int, world: int, layout: dict, dump_folder: str) -> dict:
    """For each case: (labels, losses) packed, unpacked, and packed without positions (control)."""
    results = {}
    for name, data in CASES.items():
        overrides = {"training.seq_len": str(SEQ_LEN), "training.micro_batch_size": "2",
                     "training.global_batch_size": "2", "training.eval_interval": "0",
                     "training.mixed_precision": layout["precision"], "metrics.enable_tensorboard": "false",
                     "job.dump_folder": f"{dump_folder}/{name}", **data, **layout["overrides"]}
        cfg = config.load("train_configs/debug.toml", list(overrides.items()))
        trainer = Trainer(cfg)
        trainer.model.train(False)
        dataset = build_dataset(cfg.data, trainer.tokenizer, SEQ_LEN, "train")
        packed = {"input_ids": dataset.input_ids[:ROWS], "labels": dataset.labels[:ROWS],
                  "positions": dataset.positions[:ROWS]}
        without_positions = {key: packed[key] for key in ("input_ids", "labels")}
        runs = {"packed": packed, "unpacked": unpack(packed), "control": without_positions}
        # Plain lists: tensors would travel between processes as shared memory that dies with the rank.
        results[name] = {run: [values.tolist() for values in trained_token_losses(trainer, rows)]
                         for run, rows in runs.items()}
    return results


def run_layout(layout_name: str, precision: str, tmp_path) -> dict:
    world, overrides = LAYOUTS[layout_name]
    layout = {"precision": precision, "overrides": overrides}
    per_rank = run_ranks(world, packing_worker, layout, str(tmp_path), timeout=600) if world > 1 else \
        [packing_worker(0, 1, layout, str(tmp_path))]
    result = next(result for result in per_rank if len(result["pretrain"]["packed"][0]))
    return {name: {run: tuple(torch.tensor(values) for values in pair) for run, pair in runs.items()}
            for name, runs in result.items()}


def assert_packed_equals_unpacked(results: dict, bar: float) -> None:
    for name, result in results.items():
        (packed_labels, packed), (unpacked_labels, unpacked) = result["packed"], result["unpacked"]
        assert len(packed) > 30 and torch.equal(packed_labels, unpacked_labels), name
        assert (packed - unpacked).abs().max().item() <= bar, name
        # The documents must matter: attending across them moves the losses well past the bar.
        control_labels, control = result["control"]
        assert torch.equal(control_labels, packed_labels)
        assert (control - packed).abs().max().item() > 1e3 * bar, name


@pytest.mark.parametrize("layout_name", ["tp2_sp", "pp2", "compiled"])  # one process: fp32 below, and compiled
def test_packed_rows_give_each_token_its_loss_alone_fp64(layout_name, tmp_path):
    assert_packed_equals_unpacked(run_layout(layout_name, "fp64", tmp_path), bar=1e-10)


def test_packed_rows_give_each_token_its_loss_alone_fp32(tmp_path):
    assert_packed_equals_unpacked(run_layout("one_process", "fp32", tmp_path), bar=1e-5)
