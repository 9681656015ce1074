"""`TokenStream`: pre-training batches streamed from token-shard corpora in bounded memory.

    stream = TokenStream([("corpora/web", 3.0), ("corpora/books", 1.0)], seq_len=2048, batch_size=8,
                         dp_rank=rank, dp_world=world, seed=0, document_mask=True)
    batch = next(stream)    # input_ids, labels (and positions) [batch_size, seq_len], torch.long
    state = stream.state_dict(); ...; stream.load_state_dict(state)   # exact resume
    val = TokenStream([("corpora/val", 1.0)], 2048, 8, rank, world, shuffle=False, infinite=False)

Blocks. Each shard (see `shards.py`) is cut into non-overlapping blocks of seq_len + 1 tokens;
block[:-1] is the input and block[1:] the labels, as in `pack_documents`. A block never spans two
shards: each shard's tail of fewer than seq_len + 1 tokens is dropped (with shards of 2**27 tokens,
a loss of about one block in 65,000). A block is read from disk when it is used, never mapped, so
memory does not grow with the corpus (mapped pages would count in the process's resident size).

Order. Global slots 0, 1, 2, ... each take one block. Slot i goes to the source j that maximises
(i + 1) * w_j - W * taken_j (smooth weighted round-robin; W is the sum of the weights, taken_j the
blocks source j has given so far; ties go to the first source), so after any i slots each source
has given its share up to less than one block for two sources, exactly after every W slots for
integer weights. The c-th block a source gives is position c % n of a permutation of its n blocks
seeded by (seed, source number, epoch = c // n): a source that runs out reshuffles and starts its
next epoch, independently of the others.

Ranks. Micro-step k covers global slots [k * B * D, (k + 1) * B * D) (B = batch_size, D = dp_world);
rank r takes the B slots from k * B * D + r * B. A global batch of G = B * D * accumulation steps is
therefore the next G slots whatever D is. Every rank follows all slots (counting only) and reads just
its own blocks.

State. `state_dict()` is {"taken": [blocks taken from each source, all ranks together], "blocks":
[the block count of each source]}. The slot, every source's epoch and position and the round-robin
state follow from "taken", so a state saved after a micro-step is the same on every rank and resumes
the same global order under any dp_world or batch size; "blocks" refuses a resume against changed
corpora or another seq_len.

Document masks (`document_mask=True`). Every document ends with EOS, so the token after an EOS
starts a new document. Each row then has `positions` restarting at 0 there (and at the row's first
token), and the label of every input EOS, the first token of the next document, is IGNORE_INDEX (-100):
nothing is trained to predict across a document boundary. Without it, rows are input_ids and labels.

Validation (`shuffle=False, infinite=False`): each source's blocks in order, one pass; the round
robin passes over sources that are used up, and the stream stops when fewer than B * D blocks are
left, so every rank sees the same number of batches. `restart()` begins the pass again.
"""

import math

import numpy as np
import torch

from dtcollie.data.documents import positions_after_eos, split_documents
from dtcollie.data.shards import open_corpus
from dtcollie.errors import DataError


class _Source:
    """One corpus as a sequence of blocks: block b -> (shard, token offset)."""

    def __init__(self, folder: str, weight: float, block: int, tokenizer):
        if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight > 0):
            raise DataError(f"source {folder} has weight {weight!r}; weights must be positive numbers")
        self.corpus = open_corpus(folder, tokenizer)
        self.folder, self.weight, self.block = folder, float(weight), block
        self.ends = np.cumsum([shard.tokens // block for shard in self.corpus.shards])
        self.blocks = int(self.ends[-1])
        self._epoch, self._order = None, None

    def block_id(self, taken: int, seed: int, index: int, shuffle: bool) -> int:
        """The block this source gives as its `taken`-th (counting from 0 over all epochs)."""
        epoch, position = divmod(taken, self.blocks)
        if not shuffle:
            return position
        if epoch != self._epoch:  # one permutation held at a time: 8 bytes per block
            self._epoch, self._order = epoch, np.random.default_rng([seed, index, epoch]).permutation(self.blocks)
        return int(self._order[position])

    def read(self, block_id: int) -> np.ndarray:
        shard = int(np.searchsorted(self.ends, block_id, side="right"))
        first = block_id - (int(self.ends[shard - 1]) if shard else 0)
        return self.corpus.read(shard, first * self.block, self.block)


class TokenStream:
    """Batches of seq_len-token rows for rank `dp_rank` of `dp_world`, from weighted token corpora."""

    def __init__(self, sources: list[tuple[str, float]], seq_len: int, batch_size: int, dp_rank: int = 0,
                 dp_world: int = 1, seed: int = 0, document_mask: bool = False, shuffle: bool = True,
                 infinite: bool = True, tokenizer=None):
        if not sources:
            raise DataError("no token corpora given; list (folder, weight) pairs in data.sources")
        if not 0 <= dp_rank < dp_world:
            raise ValueError(f"dp_rank {dp_rank} is outside dp_world {dp_world}")
        self.sources = [_Source(folder, weight, seq_len + 1, tokenizer) for folder, weight in sources]
        self._check_same_vocabulary()
        self.seq_len, self.batch_size, self.dp_rank, self.dp_world = seq_len, batch_size, dp_rank, dp_world
        self.seed, self.document_mask, self.shuffle, self.infinite = seed, document_mask, shuffle, infinite
        self.eos_id = self.sources[0].corpus.eos_id
        self.total_weight = sum(source.weight for source in self.sources)
        step = batch_size * dp_world
        for source in self.sources:
            if source.blocks < step:
                raise DataError(f"corpus {source.folder} has {source.blocks} blocks of seq_len + 1 = {seq_len + 1} "
                                f"tokens ({source.corpus.tokens:,} tokens in {len(source.corpus.shards)} shards, "
                                f"each shard's shorter tail dropped), fewer than one global batch of {batch_size} "
                                f"rows x {dp_world} ranks = {step}; add data or lower seq_len or the batch size")
        self.taken = [0] * len(self.sources)

    def _check_same_vocabulary(self) -> None:
        first = self.sources[0]
        for source in self.sources[1:]:
            if (source.corpus.vocab_size, source.corpus.eos_id) != (first.corpus.vocab_size, first.corpus.eos_id):
                raise DataError(f"corpus {source.folder} (vocab_size {source.corpus.vocab_size}, eos_id "
                                f"{source.corpus.eos_id}) and corpus {first.folder} (vocab_size "
                                f"{first.corpus.vocab_size}, eos_id {first.corpus.eos_id}) were made with different "
                                f"tokenizers; re-tokenize them with one")

    @property
    def batches_per_pass(self) -> int:
        """Batches per rank in one pass over all sources (what a finite stream yields)."""
        return sum(source.blocks for source in self.sources) // (self.batch_size * self.dp_world)

    def __iter__(self) -> "TokenStream":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        step = self.batch_size * self.dp_world
        if not self.infinite and sum(self.taken) + step > sum(source.blocks for source in self.sources):
            raise StopIteration
        slots = [self._take_slot() for _ in range(step)]
        mine = slots[self.dp_rank * self.batch_size:(self.dp_rank + 1) * self.batch_size]
        return self._batch([self.sources[j].read(block_id) for j, block_id in mine])

    def _take_slot(self) -> tuple[int, int]:
        """(source, block id) of the next global slot, and count it as taken."""
        slot = sum(self.taken) + 1
        best, best_score = None, -math.inf
        for j, source in enumerate(self.sources):
            if not self.infinite and self.taken[j] == source.blocks:
                continue  # used up in a one-pass stream
            score = slot * source.weight - self.total_weight * self.taken[j]
            if score > best_score:
                best, best_score = j, score
        block_id = self.sources[best].block_id(self.taken[best], self.seed, best, self.shuffle)
        self.taken[best] += 1
        return best, block_id

    def _batch(self, blocks: list[np.ndarray]) -> dict[str, torch.Tensor]:
        tokens = torch.from_numpy(np.stack(blocks).astype(np.int64))
        batch = {"input_ids": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()}
        if self.document_mask:
            positions = positions_after_eos(tokens, self.eos_id)
            batch["labels"], batch["positions"] = split_documents(batch["labels"], positions)
        return batch

    def state_dict(self) -> dict:
        return {"taken": list(self.taken), "blocks": [source.blocks for source in self.sources]}

    def load_state_dict(self, state: dict) -> None:
        blocks = [source.blocks for source in self.sources]
        if state.get("blocks") != blocks:
            raise DataError(f"the data state was saved for sources with {state.get('blocks')} blocks, but these have "
                            f"{blocks} (other corpora, order or seq_len); resume with the same data.sources and "
                            f"seq_len, or start the data afresh")
        self.taken = [int(count) for count in state["taken"]]

    def restart(self) -> None:
        """Back to the first batch (a validation pass begins again)."""
        self.taken = [0] * len(self.sources)

