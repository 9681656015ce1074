"""Pre-training sequences: documents joined by EOS and cut into fixed-length blocks.

A document is the tokenizer's prefix (BOS for Llama), the text and its suffix, and ends with EOS
(`Tokenizer.encode_documents`), so the model learns where text ends and never mistakes two
documents for one. The token stream is cut into non-overlapping blocks of seq_len + 1 tokens;
block[:-1] is the input and block[1:] the next-token labels, so no position needs masking.
The incomplete tail is dropped rather than padded: padding would waste compute on every epoch.

With `document_mask`, blocks also carry `positions` (see documents.py): attention and RoPE restart
after every EOS and the label after an EOS is ignored, so each document (or the piece of it a block
holds) is trained as if alone. Without, attention runs across documents, as most pre-training does.
"""

import torch

from dtcollie.data.documents import positions_after_eos, split_documents
from dtcollie.errors import DataError


def pack_documents(documents: list[list[int]], eos_id: int, seq_len: int, split: str,
                   document_mask: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(input_ids, labels, positions or None), each [num_blocks, seq_len], of `documents` (token lists
    each ending with EOS); DataError if not even one block fits."""
    stream = [token for tokens in documents for token in tokens]
    block = seq_len + 1
    num_blocks = len(stream) // block
    if num_blocks == 0:
        raise DataError(f"{split} data has {len(stream)} tokens ({len(documents)} documents incl. EOS), but one "
                        f"sequence needs seq_len + 1 = {block}; add data or lower training.seq_len")
    blocks = torch.tensor(stream[: num_blocks * block], dtype=torch.long).view(num_blocks, block)
    input_ids, labels = blocks[:, :-1].contiguous(), blocks[:, 1:].contiguous()
    if not document_mask:
        return input_ids, labels, None
    return input_ids, *split_documents(labels, positions_after_eos(blocks, eos_id))
