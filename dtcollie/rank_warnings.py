"""Which warnings each rank prints: a torch warning that every rank emits alike shows on rank 0 only."""

import os
import re
import warnings

# Warnings every rank of a layout emits with the same text for the same cause. Each stays visible on
# rank 0, once; no other rank adds anything to it.
SAME_ON_EVERY_RANK = (
    # A random op (init_weights) on a DTensor of a CPU mesh: torch keeps no RNG tracker for CPU, so
    # each rank draws its local shard from its own generator. True of the layout, not of one rank.
    "DTensor random operators may not have complete support on cpu device mesh",
)


def filter_rank_warnings() -> None:
    """On ranks other than 0 (the RANK torchrun sets), ignore the SAME_ON_EVERY_RANK warnings."""
    if int(os.environ.get("RANK", "0")) == 0:
        return
    for message in SAME_ON_EVERY_RANK:
        warnings.filterwarnings("ignore", message=re.escape(message) + "$", category=UserWarning)
