"""Shared initial weights for layout tests: random init depends on the layout, so every run of a
comparison starts from one saved DCP folder (which also exercises resharding on load)."""

from pathlib import Path

import torch

from dtcollie.dcp_weights import save_model_weights
from dtcollie.models.llama import FLAVORS, Transformer

# One novel of the shipped four: a layout test takes a few hundred sequences, and every rank of
# every job tokenizes its data at start (a second each for all four on this machine's cores).
ONE_NOVEL = ["--data.train_files", "dtcollie/assets/text/persuasion.txt"]


def save_debug_init(folder: Path, seq_len: int) -> Path:
    """The debug model (2048-token vocabulary), seeded random init, saved to `folder`."""
    args = FLAVORS["debug"]
    args = type(args)(**{**args.__dict__, "vocab_size": 2048, "max_seq_len": seq_len})
    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights()
    save_model_weights(model, folder)
    return folder
