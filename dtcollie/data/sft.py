"""Instruction-tuning sequences: loss on the answer only.

An example is the tokenizer's prefix (BOS for Llama) + encode(input) + encode(output) + [EOS]. As
in pre-training, input_ids[t] predicts labels[t] = token[t + 1]; a label is kept only where
token[t + 1] belongs to the output or is the EOS, and is -100 (ignored by cross-entropy) elsewhere,
so the model is not trained to produce prompts. Input and output are encoded separately so that
generation from the prompt as `Tokenizer.encode_prompt` (and transformers' tokenizer) encodes it,
prefix + encode(input), sees exactly the tokens the model was trained on.

Padding mode gives each example its own row (truncated to seq_len + 1 tokens, padded with pad_id).
Packing mode places whole examples one after another in a row until the next does not fit, then
pads the rest: no example is split, so an answer is never separated from its prompt. Packed rows
carry `positions` (see documents.py), so each example is computed as if it had the row alone; the
padding tail is a document of its own.
"""

import logging

import torch

from dtcollie.data.documents import positions_from_starts, split_documents
from dtcollie.errors import DataError
from dtcollie.loss import IGNORE_INDEX

log = logging.getLogger("dtcollie.data")


def tokenize_examples(tokenizer, examples: list[tuple[str, str]], seq_len: int,
                      split: str) -> list[tuple[list[int], list[bool]]]:
    """(tokens, is_output) per example, truncated to seq_len + 1; examples left with no label dropped."""
    inputs = [tokenizer.prefix_ids + inp for inp in tokenizer.encode_batch([inp for inp, _ in examples])]
    outputs = tokenizer.encode_batch([out for _, out in examples])
    rows = [((inp + out + [tokenizer.eos_id])[: seq_len + 1], ([False] * len(inp) + [True] * (len(out) + 1))[: seq_len + 1])
            for inp, out in zip(inputs, outputs)]
    return drop_untrainable(rows, seq_len, split, "sft")


def drop_untrainable(rows: list[tuple[list[int], list[bool]]], seq_len: int, split: str,
                     kind: str) -> list[tuple[list[int], list[bool]]]:
    """The (tokens, is_trained) rows with a trained label left after truncation to seq_len + 1 (a
    prompt that fills the sequence truncates its answer away); the others dropped with a warning,
    and none left a DataError."""
    kept = [row for row in rows if any(row[1][1:])]
    dropped = len(rows) - len(kept)
    if dropped:
        log.warning("dropped %d of %d %s examples with nothing to train within the %d tokens of a sequence (%s data)",
                    dropped, len(rows), split, seq_len, kind)
    if not kept:
        raise DataError(f"{split} data has no usable {kind} example ({len(rows)} read, {dropped} with nothing to train "
                        f"within training.seq_len = {seq_len}); add data or raise training.seq_len")
    return kept


def _row(tokens: list[int], is_output: list[bool], pad_id: int, seq_len: int) -> tuple[list[int], list[int]]:
    """Shift by one and pad to seq_len: input_ids[t] predicts labels[t]."""
    input_ids = tokens[:-1] + [pad_id] * (seq_len + 1 - len(tokens))
    labels = [tok if keep else IGNORE_INDEX for tok, keep in zip(tokens[1:], is_output[1:])]
    return input_ids, labels + [IGNORE_INDEX] * (seq_len - len(labels))


def pad_examples(examples, pad_id: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One example per row; (input_ids, labels) each [num_examples, seq_len]."""
    rows = [_row(tokens, mask, pad_id, seq_len) for tokens, mask in examples]
    return (torch.tensor([r[0] for r in rows], dtype=torch.long),
            torch.tensor([r[1] for r in rows], dtype=torch.long))


def pack_examples(examples, pad_id: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Whole examples greedily filled into rows of seq_len + 1 tokens, in order; (input_ids, labels,
    positions) each [num_rows, seq_len]."""
    rows, row = [], []
    for example in examples:
        if row and sum(len(tokens) for tokens, _ in row) + len(example[0]) > seq_len + 1:
            rows.append(row)
            row = []
        row.append(example)
    rows.append(row)
    joined = [([t for tokens, _ in row for t in tokens], [m for _, mask in row for m in mask]) for row in rows]
    input_ids, labels = pad_examples(joined, pad_id, seq_len)
    starts = torch.zeros(len(rows), seq_len + 1, dtype=torch.bool)
    for index, row in enumerate(rows):
        lengths = torch.tensor([len(tokens) for tokens, _ in row])
        boundaries = torch.cumsum(lengths, 0)  # the next example starts here; the last one, the padding
        starts[index, boundaries[boundaries <= seq_len]] = True
    labels, positions = split_documents(labels, positions_from_starts(starts))
    return input_ids, labels, positions
