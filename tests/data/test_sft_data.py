import logging

import pytest
import torch

from dtcollie.config import Data
from dtcollie.data import build_dataset
from dtcollie.loss import IGNORE_INDEX
from dtcollie.errors import DataError

PAIRS = [("Question: What is 2 plus 3?\nAnswer:", " 5."), ("Q: capital of Peru?\nA:", " Lima."),
         ("Say hi", " hi there, friend!"), ("Count:", " one two three four five six seven.")]


def sft_cfg(write, packing, pairs=PAIRS):
    rows = [{"input": i, "output": o} for i, o in pairs]
    return Data(kind="sft", train_files=[write("t.jsonl", rows)], val_fraction=0.0, sft_packing=packing)


def check_row(tok, inputs, labels, pairs):
    """The labelled positions are exactly each output + EOS, each predicted from the token before it."""
    expected = [t for i, o in pairs for t in (*tok.encode(o), tok.eos_id)]
    kept = labels != IGNORE_INDEX
    assert labels[kept].tolist() == expected
    # Next-token shift: a label equals the next input token wherever that token is real (not padding).
    real_next = kept[:-1] & (inputs[1:] != tok.pad_id)
    assert real_next.sum() >= len(expected) - len(pairs) - 1
    assert torch.equal(labels[:-1][real_next], inputs[1:][real_next])


def test_padding_mode_masks_prompts_and_padding(tok, write):
    ds = build_dataset(sft_cfg(write, packing=False), tok, seq_len=24, split="train")
    assert len(ds) == len(PAIRS)
    for row, (inp, out) in zip(ds, PAIRS):
        n_in, n_out = len(tok.encode(inp)), len(tok.encode(out))
        assert row["input_ids"][: n_in + n_out].tolist() == tok.encode(inp) + tok.encode(out)
        assert (row["input_ids"][n_in + n_out:] == tok.pad_id).all()
        assert (row["labels"][: n_in - 1] == IGNORE_INDEX).all()
        assert (row["labels"][n_in + n_out:] == IGNORE_INDEX).all()
        check_row(tok, row["input_ids"], row["labels"], [(inp, out)])


def test_packing_mode_keeps_masks_and_whole_examples(tok, write):
    pairs = PAIRS * 5
    ds = build_dataset(sft_cfg(write, packing=True, pairs=pairs), tok, seq_len=40, split="train")
    assert len(ds) < len(pairs)  # several examples share a row
    lengths = [len(tok.encode(i)) + len(tok.encode(o)) + 1 for i, o in pairs]
    start = 0
    for row in ds:  # replay the greedy fill to know which examples each row holds
        end, used = start, 0
        while end < len(pairs) and used + lengths[end] <= 41:
            used, end = used + lengths[end], end + 1
        check_row(tok, row["input_ids"], row["labels"], pairs[start:end])
        assert (row["input_ids"][used:] == tok.pad_id).all()
        # Each example counts its positions from 0, and so does the padding after them.
        expected = [p for n in [*lengths[start:end], 41 - used] for p in range(n)][:40]
        assert row["positions"].tolist() == expected
        start = end
    assert start == len(pairs)


def test_truncated_away_outputs_are_dropped_and_logged(tok, write, caplog):
    pairs = [("word " * 40, " lost."), ("short", " kept but cut " * 10), ("ok", " fine.")]
    with caplog.at_level(logging.WARNING, logger="dtcollie.data"):
        ds = build_dataset(sft_cfg(write, packing=False, pairs=pairs), tok, seq_len=12, split="train")
    assert len(ds) == 2 and "dropped 1 of 3 train examples" in caplog.text
    assert (ds[0]["labels"] != IGNORE_INDEX).sum() == 12 - len(tok.encode("short")) + 1
    with pytest.raises(DataError, match="no usable sft example"):
        build_dataset(sft_cfg(write, packing=True, pairs=pairs[:1]), tok, seq_len=12, split="train")
