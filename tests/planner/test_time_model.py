"""The planner's hardware profiles and step-time model, against numbers worked out by hand."""

import ast
import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from dtcollie.errors import ConfigError
from dtcollie.planner.collectives import Collective
from dtcollie.planner.hardware import KEYS, PROFILE_FOLDER, Hardware, bundled_names, load_hardware
from dtcollie.planner.time_model import (MESH_ORDER, bubble_fraction, collective_seconds, dim_links, mfu, step_time,
                                         tokens_per_gpu_per_second)

ROOT = Path(__file__).resolve().parents[2]

# Round numbers so every expected value below is easy to check by hand.
HW = Hardware(name="test", description="round numbers", peak_tflops=100.0, efficiency=0.5, memory_gib=80.0,
              reserved_gib=2.0, intra_node_gbps=100.0, inter_node_gbps=25.0, intra_node_latency_us=2.0,
              inter_node_latency_us=5.0)
ALL_INTRA = {name: "intra" for name in (*MESH_ORDER, "dp")}


def layout(pp=1, dp_replicate=1, dp_shard=1, tp=1):
    """ParallelDims' four sizes, without importing torch (dim_links reads only the sizes)."""
    return SimpleNamespace(pp=pp, dp_replicate=dp_replicate, dp_shard=dp_shard, tp=tp)


def test_mesh_order_is_the_mesh_dims_of_parallel_mesh():
    tree = ast.parse((ROOT / "dtcollie/parallel/mesh.py").read_text())
    assigned = [node.value for node in tree.body if isinstance(node, ast.Assign)
                and any(getattr(target, "id", None) == "MESH_DIMS" for target in node.targets)]
    assert [ast.literal_eval(value) for value in assigned] == [MESH_ORDER]


def test_two_nodes_pp_across_and_everything_else_inside():
    # pp 2 x dp_shard 2 x tp 4 = 16 ranks on 2 nodes of 8. Strides (row-major, tp innermost):
    # tp 1 -> span 4 (ranks 0-3); dp_shard 4 -> span 8 (0, 4 in node 0); pp 8 -> span 16 (0 and 8:
    # two nodes); dp = dp_replicate x dp_shard at stride 4 -> span 8; dp_replicate has size 1.
    assert dim_links(layout(pp=2, dp_shard=2, tp=4), 8) == {
        "tp": "intra", "dp_shard": "intra", "dp_replicate": "intra", "pp": "inter", "dp": "intra"}


def test_two_nodes_hsdp_replicates_across_and_shards_inside():
    # dp_replicate 2 x dp_shard 8: shard groups are ranks 0-7 and 8-15 (span 8); replicate groups
    # pair rank r with r + 8 (span 16), and the flattened dp spans all 16.
    links = dim_links(layout(dp_replicate=2, dp_shard=8), 8)
    assert (links["dp_shard"], links["dp_replicate"], links["dp"]) == ("intra", "inter", "inter")
    assert links["tp"] == links["pp"] == "intra"  # groups of one rank


def test_a_span_that_does_not_divide_the_node_crosses_it():
    # tp 3 on nodes of 4 (12 ranks, 3 nodes): the tp group {3, 4, 5} has ranks in nodes 0 and 1.
    assert dim_links(layout(dp_shard=4, tp=3), 4)["tp"] == "inter"


def test_a_job_inside_one_node_is_intra_everywhere():
    assert dim_links(layout(pp=2, tp=3), 8) == ALL_INTRA


@pytest.mark.parametrize("gpus_per_node, wanted", [(0, "gpus_per_node = 0 must be at least 1"),
                                                   (8, "12 ranks, not a whole number of nodes of 8 GPUs")])
def test_impossible_nodes_are_one_line_errors(gpus_per_node, wanted):
    with pytest.raises(ConfigError, match=wanted) as caught:
        dim_links(layout(dp_shard=12), gpus_per_node)
    assert "\n" not in str(caught.value)


def test_ring_all_gather():
    # 1 GB over 8 ranks at 100 GB/s: each rank receives 7/8 of it, 0.875 GB -> 8.75 ms, plus 7 ring
    # steps of 2 us = 14 us: 8.764 ms. A reduce-scatter moves the same.
    for kind in ("all_gather", "reduce_scatter"):
        seconds = collective_seconds(Collective("dp_shard", kind, 10**9, 8), "intra", HW)
        assert seconds == pytest.approx(8.764e-3)


def test_ring_all_reduce_across_nodes():
    # 400 MB over 4 ranks at 25 GB/s: 2 x 3/4 x 400 MB = 600 MB -> 24 ms, plus 2 x 3 = 6 steps of
    # 5 us = 30 us: 24.03 ms.
    assert collective_seconds(Collective("dp", "all_reduce", 4 * 10**8, 4), "inter", HW) == pytest.approx(24.03e-3)


def test_send_and_a_group_of_one():
    # 1 MB at 100 GB/s = 10 us, plus one step of 2 us.
    assert collective_seconds(Collective("pp", "send", 10**6, 2), "intra", HW) == pytest.approx(12e-6)
    assert collective_seconds(Collective("tp", "all_reduce", 10**9, 1), "intra", HW) == 0.0


@pytest.mark.parametrize("schedule, pp, m, v, expected", [
    ("GPipe", 4, 8, 1, 3 / 11),  # (pp-1) / (m+pp-1) = 3 / (8+3)
    ("1F1B", 4, 8, 1, 3 / 11),
    ("Interleaved1F1B", 4, 8, 2, 3 / 19),  # (pp-1) / (v*m+pp-1) = 3 / (16+3)
    ("ZBVZeroBubble", 4, 8, 2, 3 / 51),  # ZB-H1's third of it: 3 / (3*2*8+3)
    ("InterleavedZeroBubble", 4, 8, 2, 3 / 51),
    ("1F1B", 1, 8, 1, 0.0),  # no pipeline, no bubble
])
def test_bubble_fractions(schedule, pp, m, v, expected):
    assert bubble_fraction(schedule, pp, m, v) == pytest.approx(expected)


def test_bad_pipeline_inputs_are_one_line_errors():
    with pytest.raises(ConfigError, match="'PipeDream' is unknown; choose one of GPipe, 1F1B"):
        bubble_fraction("PipeDream", 4, 8, 1)
    with pytest.raises(ConfigError, match="n_microbatches = 0 must be at least 1"):
        bubble_fraction("1F1B", 4, 0, 1)


# 5e13 FLOPs at 100 TFLOPS x 0.5 = 1 s of compute.
ONE_SECOND = 5e13


def test_fsdp_communication_beyond_compute_exposes_exactly_the_excess():
    # All-gather of 300 GB over 2 ranks at 100 GB/s: 150 GB -> 1.5 s, plus 1 step of 2 us. Compute
    # is 1 s, so 0.5 s + 2 us shows; under compute (half the bytes: 0.75 s) none does.
    gather = Collective("dp_shard", "all_gather", 3 * 10**11, 2)
    t = step_time(ONE_SECOND, [gather], ALL_INTRA, HW, bubble=0.0)
    assert t.compute_s == pytest.approx(1.0)
    assert t.comm_s["dp_shard"] == pytest.approx(1.500002)
    assert t.exposed_comm_s["dp_shard"] == pytest.approx(0.500002)
    assert t.total_s == pytest.approx(1.500002) and t.bubble_s == 0.0
    hidden = step_time(ONE_SECOND, [replace(gather, nbytes=15 * 10**10)], ALL_INTRA, HW, bubble=0.0)
    assert hidden.exposed_comm_s["dp_shard"] == 0.0 and hidden.total_s == pytest.approx(1.0)


def test_the_excess_is_shared_between_overlapping_dims_by_their_time():
    # dp_shard 0.75 s + dp_replicate 0.75 s (all-reduce of 75 GB over 2 ranks: 75 GB moved) against
    # 1 s of compute: 0.5 s shows, half on each (latencies of 2 and 4 us aside).
    gather = Collective("dp_shard", "all_gather", 15 * 10**10, 2)
    reduce = Collective("dp_replicate", "all_reduce", 75 * 10**9, 2)
    t = step_time(ONE_SECOND, [gather, reduce], ALL_INTRA, HW, bubble=0.0)
    assert t.exposed_comm_s["dp_shard"] == pytest.approx(0.25, abs=1e-5)
    assert t.exposed_comm_s["dp_replicate"] == pytest.approx(0.25, abs=1e-5)
    assert t.total_s == pytest.approx(1.5, abs=1e-5)


def test_tensor_parallel_communication_adds_fully_and_the_bubble_stretches_it():
    # All-reduce of 10 GB over 2 ranks: 2 x 1/2 x 10 GB = 10 GB at 100 GB/s = 0.1 s, plus 2 steps of
    # 2 us: 0.100004 s on top of 1 s of compute, even though compute could have hidden it.
    tp = Collective("tp", "all_reduce", 10**10, 2)
    t = step_time(ONE_SECOND, [tp], ALL_INTRA, HW, bubble=0.0)
    assert t.exposed_comm_s["tp"] == pytest.approx(0.100004) and t.total_s == pytest.approx(1.100004)
    # A 20% bubble: 1.100004 / 0.8 = 1.375005 s, of which 0.275001 s idle.
    stretched = step_time(ONE_SECOND, [tp], ALL_INTRA, HW, bubble=0.2)
    assert stretched.total_s == pytest.approx(1.375005) and stretched.bubble_s == pytest.approx(0.275001)


def test_scalars_and_pipeline_transfers_are_exposed():
    # A 4-byte loss all-reduce over dp 8 (2 x 7/8 x 4 B = 7 B moved: 0.07 ns, plus 14 steps of 2 us =
    # 28.00007 us), a 512 KiB grad-norm all-reduce
    # on dp_shard (under 1 MiB: exposed, though dp_shard overlaps) and a 1 MB send (12 us).
    scalars = [Collective("dp", "all_reduce", 4, 8), Collective("dp_shard", "all_reduce", 512 * 1024, 2),
               Collective("pp", "send", 10**6, 2)]
    t = step_time(ONE_SECOND, scalars, ALL_INTRA, HW, bubble=0.0)
    # dp_shard's: 2 x 1/2 x 524288 B at 100 GB/s = 5.24288 us, plus 2 steps of 2 us = 9.24288 us.
    assert t.exposed_comm_s == pytest.approx({"dp": 28.00007e-6, "dp_shard": 9.24288e-6, "pp": 12e-6})
    assert t.exposed_s == pytest.approx(sum(t.comm_s.values()))


def test_throughput_and_mfu():
    # 1M tokens a step on 64 GPUs in 2 s: 8192 tokens/GPU/s. 60 TFLOP of model FLOPs per GPU in
    # 2 s = 30 TFLOPS of a 100 TFLOPS peak: 30%.
    assert tokens_per_gpu_per_second(2**20, 64, 2.0) == 8192
    assert mfu(6e13, 2.0, HW) == pytest.approx(0.3)


def test_bundled_profiles_load_with_their_published_peaks():
    assert bundled_names() == ("a100_80g_nvlink", "h100_sxm", "h200_sxm", "rtx3090_pcie")
    peaks = {name: load_hardware(name).peak_tflops for name in bundled_names()}
    assert peaks == {"a100_80g_nvlink": 312, "h100_sxm": 989, "h200_sxm": 989, "rtx3090_pcie": 71}
    for name in bundled_names():
        hw = load_hardware(name)
        assert hw.name == name and 0 < hw.efficiency <= 1 and hw.reserved_gib < hw.memory_gib
        assert hw.inter_node_gbps < hw.intra_node_gbps


def test_every_bundled_number_has_a_comment_above_it():
    for path in PROFILE_FOLDER.glob("*.toml"):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if "=" in line and not line.startswith("#"):
                assert lines[i - 1].startswith("#"), f"{path.name}: {line}"


def write_profile(folder: Path, **changes) -> Path:
    values = {**vars(load_hardware("h100_sxm")), "name": "my_box", **changes}
    values = {k: v for k, v in values.items() if v is not None}
    path = folder / "my_box.toml"
    path.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in values.items()))
    return path


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, str) else repr(value)


def test_a_user_file_loads(tmp_path):
    path = write_profile(tmp_path, intra_node_gbps=123, description="measured")
    hw = load_hardware(str(path))
    assert (hw.name, hw.description, hw.intra_node_gbps) == ("my_box", "measured", 123.0)
    assert isinstance(hw.intra_node_gbps, float)


@pytest.mark.parametrize("changes, wanted", [
    ({"efficiency": None}, r"missing key efficiency \(fraction of peak_tflops"),
    ({"peak_tflops": -989.0}, "peak_tflops = -989.0 must be a positive finite number"),
    ({"intra_node_gbps": "fast"}, "intra_node_gbps = 'fast' must be a positive finite number"),
    ({"inter_node_gbps": True}, "inter_node_gbps = True must be a positive finite number"),
    ({"memory_gib": float("inf")}, "memory_gib = inf must be a positive finite number"),
    ({"name": 3}, "name = 3 must be a string"),
    ({"efficency": 0.5}, "unknown key 'efficency'; did you mean efficiency"),
    ({"efficiency": 1.5}, "efficiency = 1.5 is a fraction of peak; it must be at most 1"),
    ({"reserved_gib": 90.0}, "reserved_gib = 90.0 leaves nothing of memory_gib = 79.6"),
])
def test_bad_user_files_are_one_line_errors_naming_file_and_key(tmp_path, changes, wanted):
    path = write_profile(tmp_path, **changes)
    with pytest.raises(ConfigError, match=wanted) as caught:
        load_hardware(str(path))
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_unknown_profiles_and_unreadable_files_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown hardware profile 'h100'; choose one of a100_80g_nvlink, "
                                          "h100_sxm, h200_sxm, rtx3090_pcie"):
        load_hardware("h100")
    with pytest.raises(ConfigError, match="missing.toml does not exist"):
        load_hardware(str(tmp_path / "missing.toml"))
    (tmp_path / "bad.toml").write_text("peak_tflops = [")
    with pytest.raises(ConfigError, match="bad.toml is not valid TOML"):
        load_hardware(str(tmp_path / "bad.toml"))


def test_every_key_has_a_doc():
    assert all(f.metadata["doc"] for f in KEYS.values())
