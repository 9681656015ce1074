import dataclasses

import pytest
import torch

from dtcollie.config import Data
from dtcollie.data import build_dataset
from dtcollie.data.pretrain import pack_documents
from dtcollie.errors import DataError


def test_pack_shifts_labels_and_puts_eos_between_documents():
    docs = [[5, 6, 7, 0], [8, 9, 0], [10, 11, 12, 13, 0]]  # stream: 5 6 7 E 8 9 E 10 11 12 13 E  (12 tokens)
    inputs, labels, positions = pack_documents(docs, eos_id=0, seq_len=4, split="train")
    assert inputs.tolist() == [[5, 6, 7, 0], [9, 0, 10, 11]]  # blocks of 5; the tail [13, 0] is dropped
    assert labels.tolist() == [[6, 7, 0, 8], [0, 10, 11, 12]]
    assert inputs.dtype == labels.dtype == torch.long
    assert positions is None


def test_document_mask_restarts_positions_after_eos_and_ignores_the_crossing_label():
    docs = [[5, 6, 7, 0], [8, 9, 0], [10, 11, 12, 13, 0]]  # blocks 5 6 7 E 8 | 9 E 10 11 12
    inputs, labels, positions = pack_documents(docs, eos_id=0, seq_len=4, split="train", document_mask=True)
    assert inputs.tolist() == [[5, 6, 7, 0], [9, 0, 10, 11]]
    assert positions.tolist() == [[0, 1, 2, 3], [0, 1, 0, 1]]  # a block's first token starts a document
    assert labels.tolist() == [[6, 7, 0, -100], [0, -100, 11, 12]]  # E predicts nothing of the next


def test_too_little_data_says_how_much_is_needed():
    with pytest.raises(DataError, match=r"val data has 5 tokens \(2 documents incl. EOS\).*seq_len \+ 1 = 9"):
        pack_documents([[1, 2, 0], [3, 0]], eos_id=0, seq_len=8, split="val")


def test_dataset_rows_reproduce_the_encoded_documents(tok, write):
    docs = [f"Document number {i} says hello {'again ' * i}." for i in range(40)]
    cfg = Data(train_files=[write("a.txt", docs[:25]), write("b.jsonl", [{"text": d} for d in docs[25:]])],
               val_fraction=0.0)
    ds = build_dataset(cfg, tok, seq_len=16, split="train")
    stream = [t for d in docs for t in (*tok.encode(d), tok.eos_id)]
    assert len(ds) == len(stream) // 17
    for i in range(len(ds)):
        row = ds[i]
        assert row["input_ids"].tolist() == stream[i * 17: i * 17 + 16]
        assert row["labels"].tolist() == stream[i * 17 + 1: i * 17 + 17]


def documents(tok, ds) -> list[str]:
    """The documents a packed dataset holds, rebuilt from inputs plus each row's last label."""
    stream = torch.cat([ds.input_ids, ds.labels[:, -1:]], dim=1).flatten().tolist()
    return tok.decode(stream).split("<|endoftext|>")


def assert_holds(rebuilt: list[str], docs: list[str]) -> None:
    """`rebuilt` is `docs` in order, except that the dropped tail may cut off the end."""
    docs = [d.strip() for d in docs]
    assert rebuilt[:-1] == docs[: len(rebuilt) - 1] and docs[len(rebuilt) - 1].startswith(rebuilt[-1])
    assert len(rebuilt) >= len(docs) - 1


def test_val_holdout_is_the_last_documents_and_disjoint_from_train(tok, write):
    docs = [f"alpha{i} " * 30 for i in range(50)]
    cfg = Data(train_files=[write("a.txt", docs)], val_fraction=0.1)
    assert_holds(documents(tok, build_dataset(cfg, tok, seq_len=16, split="train")), docs[:45])
    assert_holds(documents(tok, build_dataset(cfg, tok, seq_len=16, split="val")), docs[45:])
    # With val_files set, train keeps every document and val reads only those files.
    with_val = dataclasses.replace(cfg, val_files=[write("v.txt", ["beta " * 40])])
    assert_holds(documents(tok, build_dataset(with_val, tok, 16, "train")), docs)
    assert_holds(documents(tok, build_dataset(with_val, tok, 16, "val")), ["beta " * 40])


def test_no_holdout_is_an_error_only_for_val(tok, write):
    cfg = Data(train_files=[write("a.txt", ["word " * 100])], val_fraction=0.5)  # one document: nothing to hold out
    assert len(build_dataset(cfg, tok, 16, "train")) > 0
    with pytest.raises(DataError, match="no validation data"):
        build_dataset(cfg, tok, 16, "val")
