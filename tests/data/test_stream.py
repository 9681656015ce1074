"""TokenStream: blocks, shuffling, mixtures, rank sharding, document masks and exact resume."""

import numpy as np
import pytest
import torch

from dtcollie.data.stream import TokenStream
from dtcollie.errors import DataError

from shard_corpus import write_corpus

EOS = 0
SEQ = 7  # blocks of 8 tokens


def random_shards(seed: int, shards: int, docs: int) -> list[list[list[int]]]:
    rng = np.random.default_rng(seed)
    return [[rng.integers(1, 100, rng.integers(1, 12)).tolist() for _ in range(docs)] for _ in range(shards)]


@pytest.fixture
def corpora(tmp_path):
    """Two corpora: a (3 shards) and b (2 shards), with their shard documents."""
    a, b = random_shards(1, 3, 20), random_shards(2, 2, 15)
    return {"a": (str(write_corpus(tmp_path / "a", a)), a), "b": (str(write_corpus(tmp_path / "b", b)), b)}


def blocks_of(shards) -> list[list[int]]:
    """Each shard's EOS-joined stream cut into blocks of SEQ + 1, the tail of every shard dropped."""
    out = []
    for docs in shards:
        stream = [t for doc in docs for t in (*doc, EOS)]
        out += [stream[i:i + SEQ + 1] for i in range(0, len(stream) - SEQ, SEQ + 1)]
    return out


def rows(batch) -> list[list[int]]:
    """The full blocks of a batch: inputs plus the last label."""
    return torch.cat([batch["input_ids"], batch["labels"][:, -1:]], dim=1).tolist()


def take(stream, n) -> list[dict]:
    return [next(stream) for _ in range(n)]


def test_unshuffled_one_pass_reads_the_blocks_in_order(corpora):
    folder, shards = corpora["a"]
    expected = blocks_of(shards)
    stream = TokenStream([(folder, 1.0)], SEQ, batch_size=2, shuffle=False, infinite=False)
    got = [row for batch in stream for row in rows(batch)]
    assert len(expected) > 20 and got == expected[: len(expected) // 2 * 2]
    assert stream.batches_per_pass == len(expected) // 2
    batch = TokenStream([(folder, 1.0)], SEQ, batch_size=2, shuffle=False).__next__()
    assert batch["input_ids"].shape == batch["labels"].shape == (2, SEQ) and batch["input_ids"].dtype == torch.long
    assert "positions" not in batch


def test_each_epoch_is_a_new_permutation_of_all_blocks(corpora):
    folder, shards = corpora["a"]
    expected = sorted(blocks_of(shards))
    n = len(expected)
    stream = TokenStream([(folder, 1.0)], SEQ, batch_size=1, seed=3)
    first, second = ([rows(b)[0] for b in take(stream, n)] for _ in range(2))
    assert sorted(first) == sorted(second) == expected
    assert first != second and first != blocks_of(shards)
    other_seed = TokenStream([(folder, 1.0)], SEQ, batch_size=1, seed=4)
    assert [rows(b)[0] for b in take(other_seed, n)] != first


def test_resume_gives_exactly_the_batches_that_would_have_come(corpora):
    sources = [(corpora["a"][0], 2.0), (corpora["b"][0], 1.0)]
    reference = [rows(b) for b in take(TokenStream(sources, SEQ, 3, seed=1, document_mask=True), 40)]
    for stop, b_epoch in ((5, 0), (30, 1)):  # mid-epoch; in b's second epoch
        stream = TokenStream(sources, SEQ, 3, seed=1, document_mask=True)
        take(stream, stop)
        state = stream.state_dict()
        assert sum(state["taken"]) == 3 * stop and set(state) == {"taken", "blocks"}
        assert state["taken"][1] // state["blocks"][1] == b_epoch
        resumed = TokenStream(sources, SEQ, 3, seed=1, document_mask=True)
        resumed.load_state_dict(state)
        assert [rows(b) for b in take(resumed, 40 - stop)] == reference[stop:]


def test_resume_against_other_data_is_refused(corpora):
    stream = TokenStream([(corpora["a"][0], 1.0)], SEQ, 2)
    with pytest.raises(DataError, match=r"saved for sources with \[\d+\] blocks, but these have \[\d+\]"):
        TokenStream([(corpora["a"][0], 1.0)], SEQ + 1, 2).load_state_dict(stream.state_dict())


def test_integer_weights_give_exact_shares_and_float_weights_stay_within_one_block(corpora):
    stream = TokenStream([(corpora["a"][0], 3), (corpora["b"][0], 1)], SEQ, 4)
    for step in range(1, 31):
        next(stream)
        assert stream.state_dict()["taken"] == [3 * step, step]
    stream = TokenStream([(corpora["a"][0], 0.7), (corpora["b"][0], 0.3)], SEQ, 1)
    for slot in range(1, 301):
        next(stream)
        taken_a, taken_b = stream.state_dict()["taken"]
        assert abs(taken_a - 0.7 * slot) < 1 and taken_a + taken_b == slot


def test_the_global_block_stream_does_not_depend_on_dp_world(corpora):
    sources = [(corpora["a"][0], 2.0), (corpora["b"][0], 1.0)]
    single = [rows(b) for b in take(TokenStream(sources, SEQ, 4, seed=5), 12)]
    ranks = [TokenStream(sources, SEQ, 2, dp_rank=r, dp_world=2, seed=5) for r in range(2)]
    for step in range(12):
        assert rows(next(ranks[0])) + rows(next(ranks[1])) == single[step]
    # Saved under dp_world 1, resumed under dp_world 2: the same global order continues.
    first = TokenStream(sources, SEQ, 4, seed=5)
    take(first, 5)
    resumed = [TokenStream(sources, SEQ, 2, dp_rank=r, dp_world=2, seed=5) for r in range(2)]
    for stream in resumed:
        stream.load_state_dict(first.state_dict())
    for step in range(5, 12):
        assert rows(next(resumed[0])) + rows(next(resumed[1])) == single[step]


def test_document_mask_positions_and_labels_match_a_split_at_eos(corpora):
    folder, _ = corpora["a"]
    for batch in take(TokenStream([(folder, 1.0)], SEQ, 4, document_mask=True, seed=2), 6):
        for inputs, labels, positions in zip(batch["input_ids"].tolist(), batch["labels"].tolist(),
                                             batch["positions"].tolist()):
            expected_positions, expected_labels, position = [], [], 0
            for i, token in enumerate(inputs):
                expected_positions.append(position)
                position = 0 if token == EOS else position + 1
                expected_labels.append(-100 if token == EOS else labels[i])
            assert positions == expected_positions and labels == expected_labels
    masked = TokenStream([(folder, 1.0)], SEQ, 50, document_mask=True, shuffle=False).__next__()
    assert int((masked["labels"] == -100).sum()) == int((masked["input_ids"] == EOS).sum()) > 10
    assert int((masked["positions"] == 0).sum()) == 50 + int((masked["input_ids"][:, :-1] == EOS).sum())


def test_a_corpus_smaller_than_one_global_batch_says_the_counts(corpora):
    folder, shards = corpora["b"]
    n = len(blocks_of(shards))
    with pytest.raises(DataError, match=rf"corpus .*b has {n} blocks of seq_len \+ 1 = 8 tokens .* fewer than one "
                                        rf"global batch of {n} rows x 2 ranks = {2 * n}; add data or lower"):
        TokenStream([(folder, 1.0)], SEQ, n, dp_rank=0, dp_world=2)
