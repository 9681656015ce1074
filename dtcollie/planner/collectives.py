"""One collective a training step issues, the unit both the closed-form communication model
(`dtcollie.planner.comm_model`) and the counter of a real step (`dtcollie.planner.comm_count`) speak."""

from collections import Counter
from dataclasses import dataclass

KINDS = ("all_gather", "reduce_scatter", "all_reduce", "send", "recv")


@dataclass(frozen=True)
class Collective:
    """`dim`: the mesh dim whose process group runs it ("pp", "dp_replicate", "dp_shard", "tp", or
    "dp" for dp_replicate x dp_shard flattened). `kind`: one of KINDS. `nbytes`: the full buffer: an
    all-gather's output, a reduce-scatter's input, an all-reduce's tensor, a send's or recv's tensor.
    `group_size`: ranks in that group."""

    dim: str
    kind: str
    nbytes: int
    group_size: int


def totals(collectives: list[Collective]) -> dict[tuple[str, str], tuple[int, int]]:
    """(dim, kind) -> (how many, bytes summed): what a test compares and a report prints."""
    counts, sizes = Counter(), Counter()
    for collective in collectives:
        key = (collective.dim, collective.kind)
        counts[key] += 1
        sizes[key] += collective.nbytes
    return {key: (counts[key], sizes[key]) for key in sorted(counts)}
