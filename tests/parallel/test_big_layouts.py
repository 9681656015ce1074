"""The real Llama-2-7B and -70B under their intended multi-GPU layouts, checked without GPUs.

One test process plays one rank of the big world through a fake process group (collectives return
at once, nothing moves) and builds that rank's model with the trainer's own `check_layout` and
`parallelize_model` on the meta device, so nothing is allocated. Every local shard shape and the
rank's parameter bytes are compared with what the model shape and the layout imply, worked out
here by hand rather than by calling the code under test again:

- mesh coordinates are row-major over (pp, dp_replicate, dp_shard, tp);
- pipeline stage s of S holds layers [s * L/S, (s+1) * L/S) (uniform split; L/S is whole here);
- TP (Megatron): wq/wk/wv, w1/w3 and output split their rows (output features) over tp, wo and
  w2 their columns (input features); the embedding splits its rows (torch's RowwiseParallel on
  nn.Embedding shards the vocabulary); norms are replicated over tp;
- FSDP2 shards dim 0 of the TP-local tensor over dp_shard like torch.chunk: ceil(n / dp_shard)
  rows per shard, the last shards fewer (or none). Each rank still allocates a buffer of the
  ceil size (the padding), and the DTensor's local tensor is the unpadded view of it;
- HSDP replicates over dp_replicate: the local shard depends only on the dp_shard coordinate;
- master weights stay fp32 when training.mixed_precision = "bf16"; FSDP's MixedPrecisionPolicy
  casts to bf16 only for compute.
"""

import copy
import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Replicate
from torch.testing._internal.distributed.fake_pg import FakeStore

from dtcollie.config import load
from dtcollie.models.llama import FLAVORS
from dtcollie.parallel.build import parallelize_model
from dtcollie.run_spec import resolve

SEQ_LEN = 4096
VOCAB = 32000
# Published parameter counts (Hugging Face's num_parameters() of the Meta checkpoints).
PUBLISHED_PARAMS = {"llama2_7b": 6_738_415_616, "llama2_70b": 68_976_648_192}
MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


@dataclass
class Layout:
    flavor: str
    world: int
    sizes: dict  # pp, dp_replicate, dp_shard, tp
    ranks: dict  # simulated rank -> the pipeline stages it must hold
    num_stages: int = 1
    overrides: list = field(default_factory=list)


LAYOUTS = {
    # One node: TP in NVLink pairs, FSDP over 4; selective AC and compile as in 7b.toml.
    "7b_tp2_dp_shard4": Layout("llama2_7b", 8, dict(tp=2, dp_shard=4), {0: [0], 7: [0]}, overrides=[
        ("training.global_batch_size", "256"), ("training.micro_batch_size", "1"),
        ("activation_checkpoint.mode", "selective"), ("compile.enable", "true")]),
    # One node, no data parallelism: TP 4 inside a pipeline of 2.
    "7b_tp4_pp2": Layout("llama2_7b", 8, dict(tp=4, pp=2, dp_shard=1), {0: [0], 7: [1]}, num_stages=2, overrides=[
        ("parallelism.pp_schedule", "1F1B"), ("training.global_batch_size", "256"),
        ("training.micro_batch_size", "2")]),
    # 8 nodes: TP 8 in a node, 4 pipeline ranks with 2 interleaved stages each, FSDP over 2 (70b.toml).
    "70b_tp8_pp4_dp_shard2": Layout("llama2_70b", 64, dict(tp=8, pp=4, dp_shard=2), {0: [0, 4], 63: [3, 7]},
                                    num_stages=8, overrides=[
        ("parallelism.pp_schedule", "Interleaved1F1B"), ("parallelism.pp_stages_per_rank", "2"),
        ("parallelism.pp_microbatches", "8"), ("training.global_batch_size", "256"),
        ("training.micro_batch_size", "8"), ("activation_checkpoint.mode", "full")]),
    # 8 nodes, all four dims: HSDP (2 replicas of 2 shards), TP 8, V-shaped pipeline of 2 ranks.
    "70b_hsdp_tp8_pp2_zbv": Layout("llama2_70b", 64, dict(tp=8, pp=2, dp_replicate=2, dp_shard=2),
                                   {0: [0, 3], 63: [1, 2]}, num_stages=4, overrides=[
        ("parallelism.pp_schedule", "ZBVZeroBubble"), ("parallelism.pp_stages_per_rank", "2"),
        ("training.global_batch_size", "256"), ("training.micro_batch_size", "4")]),
    # 3 nodes: 12 FSDP shards do not divide 4096, 2048, 16000 or 5504 rows, so FSDP pads.
    "7b_tp2_dp_shard12_uneven": Layout("llama2_7b", 24, dict(tp=2, dp_shard=12), {0: [0], 23: [0]}, overrides=[
        ("training.global_batch_size", "48"), ("training.micro_batch_size", "1")]),
}

# A few shards worked out by hand, as a reader would check them (local shape of a named tensor).
SPOT_CHECKS = {
    ("7b_tp2_dp_shard4", 0): {"layers.0.attention.wq.weight": (4096 // 2 // 4, 4096),
                              "layers.31.attention.wo.weight": (4096 // 4, 4096 // 2),
                              "layers.31.feed_forward.w2.weight": (4096 // 4, 11008 // 2),
                              "tok_embeddings.weight": (32000 // 2 // 4, 4096),
                              "output.weight": (32000 // 2 // 4, 4096), "norm.weight": (4096 // 4,)},
    ("7b_tp4_pp2", 7): {"layers.16.attention.wq.weight": (1024, 4096), "layers.31.attention.wo.weight": (4096, 1024),
                        "layers.31.feed_forward.w2.weight": (4096, 2752), "output.weight": (8000, 4096)},
    ("70b_tp8_pp4_dp_shard2", 63): {"layers.79.attention.wq.weight": (8192 // 8 // 2, 8192),
                                    "layers.79.attention.wk.weight": (8 * 128 // 8 // 2, 8192),
                                    "layers.30.attention.wo.weight": (8192 // 2, 8192 // 8),
                                    "layers.30.feed_forward.w2.weight": (8192 // 2, 28672 // 8),
                                    "output.weight": (32000 // 8 // 2, 8192)},
    ("70b_hsdp_tp8_pp2_zbv", 0): {"tok_embeddings.weight": (2000, 8192), "output.weight": (2000, 8192),
                                  "layers.0.attention.wq.weight": (512, 8192), "layers.79.feed_forward.w1.weight":
                                  (28672 // 8 // 2, 8192)},
    # Last of 12 shards: ceil(16000 / 12) = 1334 rows per shard, 16000 - 11 * 1334 = 1326 left.
    ("7b_tp2_dp_shard12_uneven", 23): {"tok_embeddings.weight": (1326, 4096),
                                       "layers.0.attention.wq.weight": (2048 - 11 * 171, 4096),
                                       "layers.0.feed_forward.w2.weight": (4096 - 11 * 342, 5504),
                                       "norm.weight": (4096 - 11 * 342,)},
    ("7b_tp2_dp_shard12_uneven", 0): {"tok_embeddings.weight": (1334, 4096),
                                      "layers.0.attention.wq.weight": (171, 4096),
                                      "layers.0.feed_forward.w2.weight": (342, 5504)},
}
# 7B over tp 2 x dp_shard 4: the 65 norms (65 x 4096 = 266,240) are replicated over tp, so shard
# over 4; everything else over 8: (6,738,415,616 - 266,240) / 8 + 266,240 / 4 = 842,335,232.
PER_RANK_PARAMS = {("7b_tp2_dp_shard4", 0): 842_335_232, ("7b_tp2_dp_shard4", 7): 842_335_232}


def layout_config(layout: Layout):
    sizes = {"pp": 1, "dp_replicate": 1, "dp_shard": 1, "tp": 1, **layout.sizes}
    overrides = [("model.flavor", layout.flavor), ("training.seq_len", str(SEQ_LEN)),
                 ("training.mixed_precision", "bf16"), ("training.eval_interval", "0")]
    overrides += [(f"parallelism.{name}", str(size)) for name, size in sizes.items()]
    return load(None, overrides + layout.overrides)


def model_args(flavor: str):
    """The flavor's shape with the Llama 2 vocabulary; no tokenizer is read."""
    args = copy.deepcopy(FLAVORS[flavor])
    args.vocab_size, args.max_seq_len = VOCAB, SEQ_LEN
    return args


@contextmanager
def fake_world(rank: int, world_size: int):
    """This process plays `rank` of `world_size`."""
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def coordinates(rank: int, sizes: dict) -> dict:
    """Mesh coordinates of `rank`, row-major over (pp, dp_replicate, dp_shard, tp)."""
    coords = {}
    for name in reversed(MESH_DIMS):
        rank, coords[name] = divmod(rank, sizes.get(name, 1))
    return coords


def chunk_rows(rows: int, parts: int, index: int) -> int:
    """Rows of chunk `index` when torch.chunk splits `rows` into `parts` (ceil-size chunks)."""
    size = -(-rows // parts)
    return max(0, min(size, rows - index * size))


def global_shapes(args, layer_ids, first: bool, last: bool) -> dict:
    """name -> (whole-model shape, the dim TP splits or None for a tp-replicated tensor)."""
    dim, hidden, head_dim = args.dim, args.hidden_dim, args.dim // args.n_heads
    q, kv = args.n_heads * head_dim, args.n_kv_heads * head_dim
    shapes = {"tok_embeddings.weight": ((args.vocab_size, dim), 0)} if first else {}
    for i in layer_ids:
        shapes.update({f"layers.{i}.{name}": value for name, value in {
            "attention_norm.weight": ((dim,), None), "ffn_norm.weight": ((dim,), None),
            "attention.wq.weight": ((q, dim), 0), "attention.wk.weight": ((kv, dim), 0),
            "attention.wv.weight": ((kv, dim), 0), "attention.wo.weight": ((dim, q), 1),
            "feed_forward.w1.weight": ((hidden, dim), 0), "feed_forward.w3.weight": ((hidden, dim), 0),
            "feed_forward.w2.weight": ((dim, hidden), 1)}.items()})
    if last:
        shapes.update({"norm.weight": ((dim,), None), "output.weight": ((args.vocab_size, dim), 0)})
    return shapes


def tp_local(shape, tp_dim, tp: int) -> list[int]:
    shape = list(shape)
    if tp_dim is not None:
        assert shape[tp_dim] % tp == 0
        shape[tp_dim] //= tp
    return shape


def local_shape(shape, tp_dim, tp: int, dp_shard: int, shard_index: int) -> tuple:
    """This rank's shard: TP split first, then FSDP's chunk of dim 0."""
    shape = tp_local(shape, tp_dim, tp)
    shape[0] = chunk_rows(shape[0], dp_shard, shard_index)
    return tuple(shape)


def padded_numel(shape, tp_dim, tp: int, dp_shard: int) -> int:
    """Elements FSDP allocates on every rank for this tensor: the first (ceil-size) chunk."""
    shape = tp_local(shape, tp_dim, tp)
    return math.prod([chunk_rows(shape[0], dp_shard, 0), *shape[1:]])


def held_layers(args, stages: list[int], num_stages: int) -> list[int]:
    assert args.n_layers % num_stages == 0
    per_stage = args.n_layers // num_stages
    return [i for s in stages for i in range(s * per_stage, (s + 1) * per_stage)]


def clean_name(name: str) -> str:
    """Activation checkpointing wraps blocks; the state-dict name has no wrapper prefix."""
    return name.replace("_checkpoint_wrapped_module.", "")


@contextmanager
def built_rank(layout: Layout, rank: int):
    """Checks first (as the trainer does, before any process group), then the rank's model."""
    spec = resolve(layout_config(layout), layout.world, torch.device("cuda"), vocab_size=VOCAB)
    with fake_world(rank, layout.world):
        yield spec.model_args, spec.dims, parallelize_model(spec, spec.dims.build_mesh("cpu"))


CASES = [(name, rank) for name, layout in LAYOUTS.items() for rank in layout.ranks]


@pytest.mark.parametrize("flavor", sorted(PUBLISHED_PARAMS))
def test_shapes_here_add_up_to_the_published_parameter_count(flavor):
    args = model_args(flavor)
    shapes = global_shapes(args, range(args.n_layers), True, True)
    assert sum(math.prod(shape) for shape, _ in shapes.values()) == PUBLISHED_PARAMS[flavor]


@pytest.mark.parametrize("name, rank", CASES, ids=[f"{n}-rank{r}" for n, r in CASES])
def test_rank_holds_the_expected_shards(name, rank):
    layout = LAYOUTS[name]
    sizes = {"pp": 1, "dp_replicate": 1, "dp_shard": 1, "tp": 1, **layout.sizes}
    coords = coordinates(rank, sizes)
    tp, dp_shard = sizes["tp"], sizes["dp_shard"]
    with built_rank(layout, rank) as (args, dims, model):
        assert tuple(getattr(dims, n) for n in MESH_DIMS) == tuple(sizes[n] for n in MESH_DIMS)
        stages = layout.ranks[rank]
        assert (model.stage_ids, model.num_stages) == (stages, layout.num_stages)
        first, last = 0 in stages, layout.num_stages - 1 in stages
        expected = global_shapes(args, held_layers(args, stages, layout.num_stages), first, last)
        params = {clean_name(n): p for part in model.parts for n, p in part.named_parameters()}
        assert sorted(params) == sorted(expected)

        wrong = {}
        for pname, (shape, tp_dim) in expected.items():
            want = local_shape(shape, tp_dim, tp, dp_shard, coords["dp_shard"])
            got = tuple(params[pname].to_local().shape)
            if got != want:
                wrong[pname] = (got, want)
        assert not wrong, f"local shapes (got, expected): {dict(list(wrong.items())[:6])}"

        # Every parameter is a DTensor over the dims that split or replicate it: HSDP's replica dim
        # (Replicate), FSDP's shard dim, then tp. These layouts are bf16, so FSDP (whose policy does
        # the casting) is applied even where dp_shard is 1.
        dp_dims = (("dp_replicate",) if sizes["dp_replicate"] > 1 else ()) + ("dp_shard",)
        for pname, p in params.items():
            assert isinstance(p, DTensor) and p.device_mesh.mesh_dim_names == dp_dims + ("tp",), pname
            if sizes["dp_replicate"] > 1:
                assert p.placements[0] == Replicate(), pname
            assert p.dtype == torch.float32, pname  # fp32 master weights under bf16 mixed precision
        roots = [part for part in model.parts if isinstance(part, FSDPModule)]
        assert len(roots) == len(model.parts)
        assert all(r._get_fsdp_state()._mp_policy.param_dtype == torch.bfloat16 for r in roots)

        for pname, shape in SPOT_CHECKS.get((name, rank), {}).items():
            assert tuple(params[pname].to_local().shape) == shape, pname

        held = sum(p.to_local().numel() for p in params.values())
        if (name, rank) in PER_RANK_PARAMS:
            assert held == PER_RANK_PARAMS[name, rank]
        assert sum(p.to_local().numel() * p.to_local().element_size() for p in params.values()) == 4 * held
        assert held == sum(math.prod(local_shape(s, d, tp, dp_shard, coords["dp_shard"]))
                           for s, d in expected.values())
        # The stage's parameters, split as the layout says: tp-split tensors over tp x dp_shard,
        # norms over dp_shard only. FSDP allocates the padded size: at most one row more per tensor.
        stage_params = sum(math.prod(s) for s, _ in expected.values())
        if len(stages) == layout.num_stages:  # the whole model on this rank (no pipeline)
            assert stage_params == PUBLISHED_PARAMS[layout.flavor]
        norms = sum(math.prod(s) for s, d in expected.values() if d is None)
        ideal = (stage_params - norms) / (tp * dp_shard) + norms / dp_shard
        padded = sum(padded_numel(s, d, tp, dp_shard) for s, d in expected.values())
        one_row_each = sum(math.prod(tp_local(s, d, tp)[1:]) for s, d in expected.values())
        assert ideal <= padded < ideal + one_row_each
        if coords["dp_shard"] == 0:
            assert held == padded  # the first shard is always the full, ceil-size chunk


def test_fsdp_pads_the_short_last_shard():
    """FSDP2's own record of the uneven layout's last shard: a short local tensor in a ceil-size
    buffer (what every rank allocates)."""
    layout, rank = LAYOUTS["7b_tp2_dp_shard12_uneven"], 23
    with built_rank(layout, rank) as (args, dims, model):
        block = model.parts[0].layers["0"]
        by_name = {clean_name(n): p for n, p in block.named_parameters()}
        fsdp_params = {id(fp.sharded_param): fp for fp in block._get_fsdp_state()._fsdp_param_group.fsdp_params}
        wq = fsdp_params[id(by_name["attention.wq.weight"])]
        w2 = fsdp_params[id(by_name["feed_forward.w2.weight"])]
        # wq TP-local (2048, 4096): 12 chunks of 171 rows, the last 2048 - 11 * 171 = 167.
        assert tuple(wq.sharded_param.to_local().shape) == (167, 4096)
        assert tuple(wq.padded_sharded_param_size) == (171, 4096)
        # w2 TP-local (4096, 5504): chunks of 342 rows, the last 4096 - 11 * 342 = 334.
        assert tuple(w2.sharded_param.to_local().shape) == (334, 5504)
        assert tuple(w2.padded_sharded_param_size) == (342, 5504)
        assert wq._sharded_param_data.numel() == 171 * 4096
