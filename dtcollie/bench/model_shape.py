"""The benchmark model: a flavor with width, depth and vocabulary overridden from the command line."""

import copy

from dtcollie.models.llama import FLAVORS, ModelArgs


def bench_model_args(flavor: str, dim: int | None, n_layers: int | None, vocab_size: int | None,
                     seq_len: int) -> ModelArgs:
    """`flavor`'s shape; a new `dim` also sets the FFN width to 3 * dim (heads are the flavor's).
    A vocabulary the flavor leaves to the tokenizer (debug) defaults to 2048."""
    args = copy.deepcopy(FLAVORS[flavor])
    if dim:
        args.dim = dim
        args.hidden_dim = 3 * dim
    args.n_layers = n_layers or args.n_layers
    args.vocab_size = vocab_size or args.vocab_size or 2048
    args.max_seq_len = seq_len
    return args
