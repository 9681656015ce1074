"""Values derived from a checked config, shared by the trainer and the layout planner."""

import copy
import os

import torch

from dtcollie.config import JobConfig
from dtcollie.errors import ConfigError
from dtcollie.models.hf import load_model_args
from dtcollie.models.llama import FLAVORS, ModelArgs


def model_args_for(cfg: JobConfig, vocab_size: int) -> ModelArgs:
    """The flavor (or the args file), with the tokenizer's vocabulary and this run's attention kernel.
    `max_seq_len` stays the model's own context (at least training.seq_len): it is what the saved
    model_args.json and an HF export say; the trainer builds its RoPE tables for seq_len only."""
    # config.load has checked the flavor's name.
    args = load_model_args(cfg.model.args_path) if cfg.model.args_path else copy.deepcopy(FLAVORS[cfg.model.flavor])
    if args.vocab_size == 0:
        args.vocab_size = vocab_size
    elif vocab_size > args.vocab_size:
        raise ConfigError(f"the tokenizer has {vocab_size} tokens but the model's vocabulary has only "
                          f"{args.vocab_size}; use the model's own tokenizer (data.tokenizer)")
    args.max_seq_len = max(args.max_seq_len, cfg.training.seq_len)
    args.attention = cfg.model.attention
    return args


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("training.device = 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
