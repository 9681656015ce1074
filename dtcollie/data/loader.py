"""`build_dataloader`: the data of a config as a resumable, rank-sharded loader.

Text, sft and chat data are tokenized once at start-up and held as tensors (dataset.py): a
map-style dataset plus a stateful sampler is what makes an exact mid-epoch resume cheap (the
sampler stores a count, not a buffer of pending tokens). Token-shard corpora (`data.kind =
"tokens"`) are streamed from disk instead (stream.py).

Both loaders offer the trainer the same three things: `batches()`, training batches forever from
where the loader stands; `iter(loader)`, one pass from the start (validation); and `position()` /
`restore(position)`, the loader's place in the global data order as a few integer tensors, the
same on every rank and under every data-parallel layout, which the checkpointer saves as they are.
"""

import itertools
import warnings

import torch
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

from dtcollie.data.dataset import build_dataset
from dtcollie.data.stream import TokenStream
from dtcollie.errors import DataError
from dtcollie.torch_private import loader_batches_yielded, loader_finished

# torchdata 0.11 calls torch.set_vital, which torch 2.13 deprecates: noise on every run, not ours to fix.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)


class ResumableLoader(StatefulDataLoader):
    """torchdata's loader, with the sampler's epoch saved in its state as well.

    torchdata's state holds only the position within the epoch; without the epoch a resumed run
    would replay the order of whatever epoch the new sampler happens to be set to. A state saved
    after an epoch ran out resumes as a fresh epoch, as the saved loader would have continued:
    torchdata itself does so only with workers (without, its sampler keeps "all yielded").
    """

    def state_dict(self) -> dict:
        return {**super().state_dict(), "epoch": self.sampler.epoch}

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        self.sampler.set_epoch(state_dict.pop("epoch", 0))
        super().load_state_dict({} if loader_finished(state_dict) else state_dict)

    def seek(self, epoch: int, batches: int) -> None:
        """Continue at batch `batches` of `epoch`, as if this loader had drawn that many (a resume
        whose position was saved under another data-parallel layout)."""
        self.sampler.set_epoch(epoch)
        iterator = iter(self)
        for _ in range(batches):
            next(iterator)
        self.load_state_dict(self.state_dict())

    def batches(self):
        """Batches forever, one epoch after another, each reshuffled by the sampler, from this
        loader's own epoch and place in it."""
        for epoch in itertools.count(self.sampler.epoch):
            self.sampler.set_epoch(epoch)
            yield from self

    def position(self) -> dict[str, torch.Tensor]:
        """The epoch and the sequences of its global order consumed by all ranks together, and the
        data's fingerprint."""
        per_batch = self.batch_size * self.sampler.num_replicas
        return {"epoch": torch.tensor(self.sampler.epoch),
                "sequences": torch.tensor(loader_batches_yielded(self.state_dict()) * per_batch),
                "fingerprint": torch.tensor(self.dataset.fingerprint)}

    def restore(self, position: dict[str, torch.Tensor]) -> None:
        """Continue where `position` stood; the data must be what it was (checkpoints from before the
        fingerprint have none, and are taken on trust)."""
        if "fingerprint" in position and int(position["fingerprint"]) != self.dataset.fingerprint:
            raise DataError(f"the training data differs from the data the checkpoint was trained on (now "
                            f"{len(self.dataset):,} sequences); a resume needs the same files, tokenizer and "
                            f"seq_len: restore them, or start a new run in another job.dump_folder")
        self.seek(int(position["epoch"]), int(position["sequences"]) // (self.batch_size * self.sampler.num_replicas))


class StreamLoader:
    """A `TokenStream` behind the loader protocol: its state is the blocks each source has given."""

    def __init__(self, stream: TokenStream):
        self.stream = stream

    def batches(self) -> TokenStream:
        return self.stream

    def __iter__(self) -> TokenStream:
        self.stream.restart()
        return self.stream

    def position(self) -> dict[str, torch.Tensor]:
        return {key: torch.tensor(value) for key, value in self.stream.state_dict().items()}

    def restore(self, position: dict[str, torch.Tensor]) -> None:
        self.stream.load_state_dict({key: value.tolist() for key, value in position.items()})


def parse_sources(entries: list[str], key: str) -> list[tuple[str, float]]:
    """(folder, weight) of each "FOLDER" or "FOLDER:WEIGHT" entry (weight 1 when not given)."""
    sources = []
    for entry in entries:
        folder, _, weight = entry.rpartition(":")
        try:
            sources.append((folder, float(weight)) if folder else (entry, 1.0))
        except ValueError:
            raise DataError(f"{key} entry {entry!r}: the weight after the last ':' is not a number; write "
                            f"FOLDER or FOLDER:WEIGHT") from None
    return sources


def build_token_loader(data_cfg, tokenizer, seq_len: int, batch_size: int, dp_rank: int, dp_world: int,
                       split: str, seed: int) -> StreamLoader:
    """Token-shard corpora: data.sources for train (shuffled, endless), data.val_sources for val."""
    key = "data.sources" if split == "train" else "data.val_sources"
    entries = data_cfg.sources if split == "train" else data_cfg.val_sources
    if not entries:
        raise DataError(f"{key} is empty; list token-shard corpus folders (made by tools/tokenize_corpus.py) there"
                        + ("" if split == "train" else ", or set training.eval_interval = 0"))
    stream = TokenStream(parse_sources(entries, key), seq_len, batch_size, dp_rank, dp_world, seed,
                         data_cfg.document_mask, shuffle=split == "train", infinite=split == "train",
                         tokenizer=tokenizer)
    return StreamLoader(stream)


def build_dataloader(data_cfg, tokenizer, seq_len: int, batch_size: int, dp_rank: int, dp_world: int,
                     split: str, seed: int) -> "ResumableLoader | StreamLoader":
    """A loader over this data-parallel rank's share of `split` ("train" or "val").

    Each batch is {"input_ids", "labels"}, LongTensors [batch_size, seq_len]; labels are -100 where
    there is no loss. Packed rows with document boundaries (packed sft/chat, pretrain with
    data.document_mask) add "positions", each token's position within its document. Ranks see
    disjoint rows (a few tail rows are dropped so that every rank gets the same number of full
    batches). Train is shuffled with `seed` + epoch; val is in file order.

    Epochs: `iter(loader)` runs one epoch; call `loader.sampler.set_epoch(e)` before each to get a
    new order. Resume: `loader.state_dict()` holds the position within the epoch and the epoch
    number; a new loader built with the same arguments and given `load_state_dict(state)` yields
    exactly the batches the old one would have yielded next, with or without workers. After
    loading, `loader.sampler.epoch` is the epoch to continue (set_epoch with another number would
    change the order of the rest of it). So a loop of the form
        for epoch in itertools.count(loader.sampler.epoch):
            loader.sampler.set_epoch(epoch)
            for batch in loader: ...
    resumes exactly, also from a state saved after the last batch of an epoch (the resumed
    iteration is then empty and the loop moves on) or after the epoch ran out.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if data_cfg.kind == "tokens":
        return build_token_loader(data_cfg, tokenizer, seq_len, batch_size, dp_rank, dp_world, split, seed)
    dataset = build_dataset(data_cfg, tokenizer, seq_len, split)
    per_rank = len(dataset) // dp_world
    if per_rank < batch_size:
        raise DataError(f"{split} data gives {len(dataset)} sequences of {seq_len} tokens, fewer than one batch of "
                        f"{batch_size} on each of {dp_world} data-parallel ranks ({batch_size * dp_world}); add data "
                        f"or lower training.micro_batch_size or training.seq_len")
    sampler = StatefulDistributedSampler(dataset, num_replicas=dp_world, rank=dp_rank, shuffle=split == "train",
                                         seed=seed, drop_last=True)
    return ResumableLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                           num_workers=data_cfg.num_workers)
