"""Data: tokenizer, pre-training and instruction datasets, and the resumable data-parallel loader.

    tok = load_tokenizer(folder)
    loader = build_dataloader(data_cfg, tok, seq_len, batch_size, dp_rank, dp_world, split, seed)
"""

from dtcollie.data.dataset import build_dataset
from dtcollie.data.loader import build_dataloader
from dtcollie.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

__all__ = ["Tokenizer", "build_dataloader", "build_dataset", "load_tokenizer", "train_tokenizer"]
