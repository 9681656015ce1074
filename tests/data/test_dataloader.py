import itertools
import time

import pytest
import torch

from dtcollie.config import Data
from dtcollie.data import build_dataloader, build_dataset
from dtcollie.data.dataset import holdout_count
from dtcollie.errors import DataError

SEQ, BATCH = 16, 4


@pytest.fixture
def cfg(write):
    docs = [" ".join(str(n) for n in range(i * 25, i * 25 + 25)) for i in range(60)]  # every 16-token row unique
    return Data(train_files=[write("a.txt", docs)], val_fraction=0.1)


def row_ids(dataset, batches) -> list[int]:
    """Dataset row index of every row in `batches` (rows are unique in these tests)."""
    index = {tuple(row.tolist()): i for i, row in enumerate(dataset.input_ids)}
    assert len(index) == len(dataset)
    return [index[tuple(row.tolist())] for b in batches for row in b["input_ids"]]


def test_batches_have_the_promised_shape(tok, cfg):
    batch = next(iter(build_dataloader(cfg, tok, SEQ, BATCH, 0, 1, "train", seed=0)))
    assert set(batch) == {"input_ids", "labels"}
    assert batch["input_ids"].shape == batch["labels"].shape == (BATCH, SEQ)
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long


@pytest.mark.parametrize("split", ["train", "val"])
def test_ranks_get_disjoint_rows_that_cover_the_split(tok, cfg, split):
    dataset = build_dataset(cfg, tok, SEQ, split)
    world, batch = 3, 2
    seen = [row_ids(dataset, build_dataloader(cfg, tok, SEQ, batch, rank, world, split, seed=5))
            for rank in range(world)]
    per_rank = len(dataset) // world // batch * batch
    assert all(len(ids) == per_rank for ids in seen)
    all_ids = [i for ids in seen for i in ids]
    assert len(set(all_ids)) == len(all_ids)  # disjoint
    assert len(dataset) - len(all_ids) < world * batch  # covering, up to the dropped tail
    if split == "val":  # val is in order: rank r gets rows r, r + world, ...
        assert seen[1][:3] == [1, 4, 7]


def test_train_order_depends_on_seed_and_epoch(tok, cfg):
    dataset = build_dataset(cfg, tok, SEQ, "train")
    loader = build_dataloader(cfg, tok, SEQ, BATCH, 0, 1, "train", seed=1)
    epoch0 = row_ids(dataset, loader)
    assert row_ids(dataset, loader) == epoch0  # same epoch number: same order
    loader.sampler.set_epoch(1)
    epoch1 = row_ids(dataset, loader)
    other_seed = row_ids(dataset, build_dataloader(cfg, tok, SEQ, BATCH, 0, 1, "train", seed=2))
    assert epoch1 != epoch0 and other_seed != epoch0 and len(epoch1) == len(epoch0)
    assert len(set(epoch1) & set(epoch0)) > len(epoch0) - BATCH  # a permutation, less the dropped tail batch
    assert epoch0 != sorted(epoch0)


def train_loop(loader, steps: int, save_at: int | None = None):
    """The epoch loop the docstring of build_dataloader recommends; returns batches and a saved state."""
    batches, state = [], None
    for epoch in itertools.count(loader.sampler.epoch):
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            batches.append(batch)
            if len(batches) == save_at:
                state = loader.state_dict()
            if len(batches) == steps:
                return batches, state


@pytest.mark.parametrize("num_workers", [0, 2])
def test_state_dict_resumes_exactly(tok, cfg, num_workers):
    cfg.num_workers = num_workers
    make = lambda: build_dataloader(cfg, tok, SEQ, BATCH, 1, 2, "train", seed=3)  # noqa: E731
    per_epoch = len(make())
    steps = 2 * per_epoch + 3
    reference, _ = train_loop(make(), steps)
    for save_at in (3, per_epoch, per_epoch + 2):  # mid-epoch, right after an epoch's last batch, next epoch
        _, state = train_loop(make(), save_at, save_at)
        resumed = make()
        resumed.load_state_dict(state)
        assert resumed.sampler.epoch == (save_at - 1) // per_epoch  # the epoch travels with the state
        rest, _ = train_loop(resumed, steps - save_at)
        for a, b in zip(reference[save_at:], rest, strict=True):
            assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])


def test_state_saved_after_an_epoch_ran_out_resumes_a_fresh_epoch(tok, cfg):
    loader = build_dataloader(cfg, tok, SEQ, BATCH, 0, 1, "train", seed=3)
    first = list(loader)
    loader.sampler.set_epoch(1)
    resumed = build_dataloader(cfg, tok, SEQ, BATCH, 0, 1, "train", seed=3)
    resumed.load_state_dict(loader.state_dict())
    second = list(resumed)
    assert resumed.sampler.epoch == 1 and len(second) == len(first)
    assert [b["input_ids"].tolist() for b in second] == [b["input_ids"].tolist() for b in loader]


def test_a_broken_off_iteration_restarts_from_the_beginning(tok, cfg):
    """The trainer evaluates on the first eval_steps val batches by breaking out of the loop."""
    val = build_dataloader(cfg, tok, SEQ, 2, 0, 1, "val", seed=0)
    first = [next(iter(val))["input_ids"] for _ in range(2)]
    assert torch.equal(first[0], first[1]) and len(val) > 1


def test_not_enough_rows_for_one_batch_per_rank(tok, cfg):
    with pytest.raises(DataError, match=r"val data gives \d+ sequences .* fewer than one batch of 64 on each of 8"):
        build_dataloader(cfg, tok, SEQ, 64, 0, 8, "val", seed=0)


def test_holdout_count():
    assert holdout_count(1, 0.5) == 0 and holdout_count(10, 0.0) == 0
    assert holdout_count(2, 0.02) == 1 and holdout_count(170, 0.02) == 3 and holdout_count(3, 0.9) == 2


def test_shipped_text_and_sft_sets_load_quickly(tok, monkeypatch, assets):
    monkeypatch.chdir(assets.parents[1])  # the config's default paths are relative to the repo root
    start = time.perf_counter()
    train = build_dataloader(Data(), tok, 128, 8, 0, 1, "train", seed=0)
    val = build_dataloader(Data(), tok, 128, 8, 0, 1, "val", seed=0)
    assert time.perf_counter() - start < 20
    assert len(train.dataset) > 4000 and len(val) >= 4
    sft = Data(kind="sft", train_files=["dtcollie/assets/sft/train.jsonl"],
               val_files=["dtcollie/assets/sft/val.jsonl"])
    batch = next(iter(build_dataloader(sft, tok, 64, 8, 0, 1, "val", seed=0)))
    assert ((batch["labels"] != -100).sum(dim=1) >= 2).all()  # every row trains on an answer and its EOS


def test_missing_files_fail_before_anything_else_with_one_line(tok, cfg, tmp_path):
    bad_val = Data(train_files=cfg.train_files, val_files=[str(tmp_path / "val/*.jsonl")])
    with pytest.raises(DataError, match=r"data.val_files entry '.*val/\*\.jsonl' matches no file") as err:
        build_dataloader(bad_val, tok, SEQ, BATCH, 0, 1, "val", seed=0)
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match=r"data.train_files entry '.*nope.txt' matches no file"):
        build_dataloader(Data(train_files=[str(tmp_path / "nope.txt")]), tok, SEQ, BATCH, 0, 1, "train", seed=0)
