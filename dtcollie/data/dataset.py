"""In-memory datasets: the documents, examples or conversations of a split, tokenized and packed or
padded into fixed-length rows.

Records come from data files (`data.train_files` / `data.val_files`: .txt, .jsonl, .parquet) or a
local Hugging Face dataset (`data.hf_dataset`, with `data.hf_split` / `data.hf_val_split`); without
a separate validation source, the last `data.val_fraction` of the training items is held out.
"""

import functools
import hashlib
import logging

import torch
from torch.utils.data import Dataset

from dtcollie.data.chat import conversations_of, load_chat_tokenizer, tokenize_conversations
from dtcollie.data.files import documents_of, examples_of, records_of, require_records, resolve_files
from dtcollie.data.pretrain import pack_documents
from dtcollie.data.records import hf_dataset_records
from dtcollie.data.sft import pack_examples, pad_examples, tokenize_examples
from dtcollie.errors import DataError

log = logging.getLogger("dtcollie.data")


class SequenceDataset(Dataset):
    """Rows of pre-computed input_ids and labels ([N, seq_len] each), and the positions of packed
    rows' documents where rows hold several (see documents.py)."""

    def __init__(self, input_ids: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None = None):
        self.input_ids, self.labels, self.positions = input_ids, labels, positions

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @functools.cached_property
    def fingerprint(self) -> int:
        """A 63-bit digest of every row (tokens, labels, positions): resume checks that the data is
        the data the checkpoint was trained on."""
        digest = hashlib.blake2b(digest_size=8)
        for tensor in (self.input_ids, self.labels, self.positions):
            if tensor is not None:
                digest.update(tensor.contiguous().numpy().tobytes())
        return int.from_bytes(digest.digest(), "little") >> 1

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = {"input_ids": self.input_ids[index], "labels": self.labels[index]}
        if self.positions is not None:
            row["positions"] = self.positions[index]
        return row


def holdout_count(num_items: int, val_fraction: float) -> int:
    """How many trailing documents/examples form the validation split when no val_files are given."""
    if val_fraction <= 0 or num_items < 2:
        return 0
    return min(num_items - 1, max(1, int(num_items * val_fraction)))


def items_of(data_cfg, records) -> list:
    """The documents (pretrain), (input, output) pairs (sft) or (where, messages) conversations (chat)."""
    skip = data_cfg.skip_bad_lines
    if data_cfg.kind == "pretrain":
        return documents_of(records, data_cfg.text_field, skip)
    if data_cfg.kind == "sft":
        return examples_of(records, data_cfg.input_field, data_cfg.output_field, skip)
    return conversations_of(records, skip)


def file_records(data_cfg, patterns: list[str], key: str):
    files = resolve_files(patterns, key)
    if data_cfg.kind != "pretrain":
        require_records(files, data_cfg.kind)
    return records_of(files, data_cfg.text_field)


def split_items(data_cfg, split: str) -> list:
    """The items of `split` ("train" or "val"), from their own source or held out of train's."""
    if data_cfg.hf_dataset:
        sources = {"train": data_cfg.hf_split, "val": data_cfg.hf_val_split}
        missing = "data.hf_val_split is empty"
        read = lambda which: items_of(data_cfg, hf_dataset_records(data_cfg.hf_dataset, sources[which]))
    else:
        sources = {"train": data_cfg.train_files, "val": data_cfg.val_files}
        missing = "data.val_files is empty"
        read = lambda which: items_of(data_cfg, file_records(data_cfg, sources[which], f"data.{which}_files"))
    if sources["val"]:
        return read(split)
    items = read("train")
    num_val = holdout_count(len(items), data_cfg.val_fraction)
    if split == "val" and num_val == 0:
        raise DataError(f"no validation data: {missing} and data.val_fraction = {data_cfg.val_fraction} "
                        f"of {len(items)} documents holds none out; set either, or training.eval_interval = 0")
    return items[len(items) - num_val:] if split == "val" else items[: len(items) - num_val]


def build_dataset(data_cfg, tokenizer, seq_len: int, split: str) -> SequenceDataset:
    """All rows of `split` (before sharding), tokenized and packed or padded."""
    if data_cfg.kind not in ("pretrain", "sft", "chat"):
        raise DataError(f"data.kind = {data_cfg.kind!r} has no in-memory dataset; use pretrain, sft or chat")
    items = split_items(data_cfg, split)
    if data_cfg.kind == "pretrain":
        input_ids, labels, positions = pack_documents(tokenizer.encode_documents(items), tokenizer.eos_id, seq_len,
                                                      split, data_cfg.document_mask)
        log.info("%s: %d documents -> %d sequences of %d tokens", split, len(items), len(input_ids), seq_len)
        return SequenceDataset(input_ids, labels, positions)
    if data_cfg.kind == "sft":
        examples = tokenize_examples(tokenizer, items, seq_len, split)
    else:
        examples = tokenize_conversations(load_chat_tokenizer(tokenizer.folder, data_cfg.chat_template), items,
                                          seq_len, split, data_cfg.chat_last_turn_only, data_cfg.skip_bad_lines)
    if data_cfg.sft_packing:
        input_ids, labels, positions = pack_examples(examples, tokenizer.pad_id, seq_len)
    else:
        (input_ids, labels), positions = pad_examples(examples, tokenizer.pad_id, seq_len), None
    log.info("%s: %d examples -> %d sequences of %d tokens", split, len(examples), len(input_ids), seq_len)
    return SequenceDataset(input_ids, labels, positions)
