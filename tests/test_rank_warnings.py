import warnings
from types import SimpleNamespace

import pytest
from torch.distributed.tensor._random import is_rng_supported_mesh

from dtcollie.rank_warnings import filter_rank_warnings


def shown(rank: str, monkeypatch) -> list[str]:
    """The warnings that get through on `rank`: torch's own CPU-mesh RNG warning and one of ours."""
    monkeypatch.setenv("RANK", rank)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        filter_rank_warnings()
        is_rng_supported_mesh(SimpleNamespace(device_type="cpu"))  # torch's text, as init_weights meets it
        warnings.warn("DTensor random operators may not have complete support on cpu device mesh, and more")
        warnings.warn("rank-specific: shard 3 of the data is empty")
    return [str(warning.message) for warning in caught]


@pytest.mark.parametrize("rank", ["0", "1"])
def test_every_rank_warning_shows_on_rank_0_only(rank, monkeypatch):
    rng = "DTensor random operators may not have complete support on cpu device mesh"
    others = [f"{rng}, and more", "rank-specific: shard 3 of the data is empty"]  # not the exact text: kept
    assert shown(rank, monkeypatch) == ([rng] if rank == "0" else []) + others
