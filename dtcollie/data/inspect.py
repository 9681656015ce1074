"""What the model will be trained on: the first rows of a dataset decoded, trained tokens marked.

A row's input_ids[t] predicts labels[t] = token t + 1, so token t + 1 is trained where labels[t]
is not ignored. `describe_rows` shows each row's tokens as text with every trained run inside
«...» (the padding tail left out) and, in packed rows with document positions, ¦ where a new
document starts; then counts over the whole split: rows, documents, tokens, the share of trained
tokens and of padding. `describe_stream` does the same for token-shard corpora: the first rows a
stream gives, then each corpus's counts.
"""

import torch

from dtcollie.loss import IGNORE_INDEX

OPEN, CLOSE, DOCUMENT = "«", "»", "¦"


def row_text(tokenizer, input_ids: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None = None) -> str:
    """The row's tokens decoded, trained runs inside «...», ¦ before each document after the first,
    trailing untrained padding dropped."""
    # Token t + 1 is labels[t] where trained (padding may have replaced it in input_ids, as the
    # final EOS of a padded example), else input_ids[t + 1]; the row's last label has no input.
    ids, targets = input_ids.tolist(), labels.tolist()
    tokens, trained = ids[:1], [False]
    for t, target in enumerate(targets):
        if target != IGNORE_INDEX or t + 1 < len(ids):
            tokens.append(target if target != IGNORE_INDEX else ids[t + 1])
            trained.append(target != IGNORE_INDEX)
    while tokens and tokens[-1] == tokenizer.pad_id and not trained[-1]:
        tokens, trained = tokens[:-1], trained[:-1]
    starts = set() if positions is None else {t for t, p in enumerate(positions.tolist()) if p == 0 and t > 0}
    parts, start = [], 0
    for end in range(1, len(tokens) + 1):
        if end == len(tokens) or trained[end] != trained[start] or end in starts:
            text = tokenizer.decode(tokens[start:end])
            parts.append(f"{OPEN}{text}{CLOSE}" if trained[start] else text)
            parts.append(DOCUMENT if end in starts else "")
            start = end
    return "".join(parts)


def describe_rows(dataset, tokenizer, n: int) -> str:
    """The first `n` rows as text, then the counts over every row of `dataset`."""
    input_ids, labels = dataset.input_ids, dataset.labels
    positions = dataset.positions
    rows = [f"--- row {i} ---\n{row_text(tokenizer, input_ids[i], labels[i], dataset[i].get('positions'))}"
            for i in range(min(n, len(dataset)))]
    total = input_ids.numel()
    trained = int((labels != IGNORE_INDEX).sum())
    is_padding = (input_ids == tokenizer.pad_id) & (labels == IGNORE_INDEX)
    padding = int(is_padding.sum())
    # A packed row's padding tail is a segment of its own: the others are documents (or pieces).
    documents = "" if positions is None else f"; {int(((positions == 0) & ~is_padding).sum()):,} documents"
    counts = (f"{len(dataset):,} rows of {input_ids.shape[1]} tokens = {total:,} tokens{documents}; trained "
              f"{trained:,} ({100 * trained / total:.1f}%); padding {padding:,} ({100 * padding / total:.1f}%)")
    return "\n".join([*rows, counts])


def describe_stream(stream, tokenizer, n: int) -> str:
    """The first `n` rows `stream` (a TokenStream) gives, then the tokens, documents and blocks of
    each of its corpora."""
    rows = []
    while len(rows) < n:
        batch = next(stream)
        rows += [{key: value[i] for key, value in batch.items()} for i in range(len(batch["input_ids"]))]
    shown = [f"--- row {i} ---\n{row_text(tokenizer, row['input_ids'], row['labels'], row.get('positions'))}"
             for i, row in enumerate(rows[:n])]
    counts = [f"{source.folder} (weight {source.weight:g}): {source.corpus.tokens:,} tokens, "
              f"{sum(shard.documents for shard in source.corpus.shards):,} documents in "
              f"{len(source.corpus.shards)} shards -> {source.blocks:,} rows of {stream.seq_len} tokens"
              for source in stream.sources]
    return "\n".join([*shown, *counts])
