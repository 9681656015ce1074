"""Pipeline split, placement and config checks; schedules against the unsplit model on 2 gloo ranks."""

import itertools
import time

import pytest
import torch
import torch.distributed as dist

from dtcollie.config import Parallelism
from dtcollie.errors import ConfigError
from dtcollie.loss import IGNORE_INDEX, cross_entropy_sum
from dtcollie.models.llama import ModelArgs, Transformer
from dtcollie.parallel.pipeline import (build_schedule, check_pipeline_config, parameter_costs, split_model,
                                        stage_indices, stage_layer_ids)
from spawn import run_ranks

TINY = ModelArgs(dim=32, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=48, max_seq_len=16)


def args_with(**changes) -> ModelArgs:
    values = dict(TINY.__dict__)
    values.update(changes)
    return ModelArgs(**values)


# ---------------------------------------------------------------------------------------------
# stage_layer_ids


def test_uniform_partition_is_even_and_contiguous():
    assert stage_layer_ids(args_with(n_layers=8), 3, "uniform") == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert stage_layer_ids(TINY, 4, "uniform") == [[0], [1], [2], [3]]
    assert stage_layer_ids(TINY, 1, "uniform") == [[0, 1, 2, 3]]


def test_uniform_partition_needs_a_layer_per_stage():
    with pytest.raises(ConfigError, match=r"5 pipeline stages .* the model has 4"):
        stage_layer_ids(TINY, 5, "uniform")


def test_explicit_partition():
    assert stage_layer_ids(args_with(n_layers=8), 2, "3,5") == [[0, 1, 2], [3, 4, 5, 6, 7]]
    assert stage_layer_ids(TINY, 3, " 1, 2 ,1") == [[0], [1, 2], [3]]


@pytest.mark.parametrize("partition, stages, message", [
    ("3,4", 2, r"pp_partition = '3,4' sums to 7 layers but the model has 8"),
    ("8", 2, r"pp_partition = '8' has 1 entries but there are 2 pipeline stages"),
    ("0,8", 2, r"pp_partition = '0,8' gives a stage 0 layers"),
    ("3;5", 2, r"pp_partition = '3;5' is not 'uniform', 'parameters' or a comma list"),
    ("even", 2, r"pp_partition = 'even'"),
])
def test_explicit_partition_errors(partition, stages, message):
    with pytest.raises(ConfigError, match=message) as error:
        stage_layer_ids(args_with(n_layers=8), stages, partition)
    assert "parallelism.pp_partition" in str(error.value) and "\n" not in str(error.value)


def max_stage_parameters(args: ModelArgs, counts: list[int]) -> int:
    layer, embedding, head = parameter_costs(args)
    costs = [count * layer for count in counts]
    costs[0] += embedding
    costs[-1] += head
    return max(costs)


def test_parameter_costs_match_the_model():
    args = args_with(n_layers=3)
    layer, embedding, head = parameter_costs(args)
    assert layer * 3 + embedding + head == sum(p.numel() for p in Transformer(args).parameters())


def test_parameter_partition_gives_end_stages_fewer_layers():
    # One layer has 7744 parameters; a 484-token vocabulary makes the embedding (15488) and the
    # norm + output (15520) two layers each, so 8 layers over 3 stages balance as 2 + 4 + 2.
    args = args_with(n_layers=8, vocab_size=484)
    assert parameter_costs(args)[0] == 7744
    assert [len(ids) for ids in stage_layer_ids(args, 3, "parameters")] == [2, 4, 2]
    assert stage_layer_ids(args, 3, "parameters")[1] == [2, 3, 4, 5]


@pytest.mark.parametrize("n_layers, stages, vocab", [(8, 3, 484), (9, 4, 2000), (7, 2, 64), (6, 6, 5000)])
def test_parameter_partition_is_optimal(n_layers, stages, vocab):
    """Against brute force over every split: no other split has a smaller largest stage."""
    args = args_with(n_layers=n_layers, vocab_size=vocab)
    counts = [len(ids) for ids in stage_layer_ids(args, stages, "parameters")]
    assert sum(counts) == n_layers and min(counts) >= 1 and len(counts) == stages
    best = min(max_stage_parameters(args, [b - a for a, b in zip((0,) + cuts, cuts + (n_layers,))])
               for cuts in itertools.combinations(range(1, n_layers), stages - 1))
    assert max_stage_parameters(args, counts) == best


# ---------------------------------------------------------------------------------------------
# stage_indices


def test_looped_placement():
    assert stage_indices(1, 4, 2, "Interleaved1F1B") == [1, 5]
    assert stage_indices(3, 4, 3, "InterleavedZeroBubble") == [3, 7, 11]
    assert stage_indices(2, 4, 1, "1F1B") == [2]
    assert stage_indices(0, 2, 1, "GPipe") == [0]


def test_v_placement():
    assert stage_indices(0, 4, 2, "ZBVZeroBubble") == [0, 7]
    assert stage_indices(1, 4, 2, "ZBVZeroBubble") == [1, 6]
    assert stage_indices(3, 4, 2, "ZBVZeroBubble") == [3, 4]
    with pytest.raises(ConfigError, match="pp_stages_per_rank = 2, got 3"):
        stage_indices(0, 4, 3, "ZBVZeroBubble")


@pytest.mark.parametrize("schedule, per_rank", [("1F1B", 1), ("Interleaved1F1B", 3), ("ZBVZeroBubble", 2)])
def test_every_stage_is_owned_once(schedule, per_rank):
    owned = sorted(s for rank in range(4) for s in stage_indices(rank, 4, per_rank, schedule))
    assert owned == list(range(4 * per_rank))


# ---------------------------------------------------------------------------------------------
# check_pipeline_config


def parallelism(**values) -> Parallelism:
    return Parallelism(**{"pp": 2, **values})


@pytest.mark.parametrize("values, n_layers, micro_batch_size", [
    (dict(pp=1, pp_schedule="ZBVZeroBubble", pp_microbatches=7), 4, 4),  # pp settings unused
    (dict(), 4, 4),
    (dict(pp_schedule="GPipe", pp_microbatches=1), 4, 1),
    (dict(pp_schedule="Interleaved1F1B", pp_stages_per_rank=2), 4, 4),
    (dict(pp=4, pp_schedule="Interleaved1F1B", pp_stages_per_rank=2, pp_microbatches=6), 8, 6),  # 1 round of 6
    (dict(pp=4, pp_schedule="InterleavedZeroBubble", pp_stages_per_rank=2, pp_microbatches=3), 8, 3),
    (dict(pp=4, pp_schedule="ZBVZeroBubble", pp_stages_per_rank=2, pp_microbatches=1), 8, 2),
    (dict(pp_partition="1,3"), 4, 2),
    (dict(pp_partition="parameters"), 4, 2),
])
def test_pipeline_config_accepted(values, n_layers, micro_batch_size):
    check_pipeline_config(parallelism(**values), args_with(n_layers=n_layers), micro_batch_size)


@pytest.mark.parametrize("values, n_layers, micro_batch_size, message", [
    (dict(pp=8), 4, 8, r"pp 8 x pp_stages_per_rank 1 = 8 pipeline stages but the model has 4 layers"),
    (dict(pp_schedule="Interleaved1F1B", pp_stages_per_rank=3), 4, 6, r"= 6 pipeline stages but the model has 4"),
    (dict(pp_schedule="Interleaved1F1B"), 4, 4, r"'Interleaved1F1B' needs pp_stages_per_rank >= 2, got 1"),
    (dict(pp_schedule="InterleavedZeroBubble"), 4, 4, r"'InterleavedZeroBubble' needs pp_stages_per_rank >= 2"),
    (dict(pp_schedule="ZBVZeroBubble", pp_stages_per_rank=3), 8, 6, r"'ZBVZeroBubble' needs pp_stages_per_rank = 2"),
    (dict(pp_schedule="ZBVZeroBubble"), 8, 6, r"'ZBVZeroBubble' needs pp_stages_per_rank = 2, got 1"),
    (dict(pp_schedule="GPipe", pp_stages_per_rank=2), 4, 4, r"'GPipe' runs one stage per rank but pp_stages_per"),
    (dict(pp_stages_per_rank=2), 4, 4, r"'1F1B' runs one stage per rank but pp_stages_per_rank = 2"),
    (dict(pp_microbatches=3), 4, 4, r"micro_batch_size = 4 cannot be split into parallelism.pp_microbatches = 3"),
    (dict(), 4, 3, r"micro_batch_size = 3 cannot be split into 2 pipeline micro-batches"),
    (dict(pp_microbatches=8), 4, 4, r"micro_batch_size = 4 cannot be split into parallelism.pp_microbatches = 8"),
    (dict(pp=4, pp_microbatches=2), 8, 4, r"'1F1B' needs at least pp = 4 micro-batches"),
    (dict(pp=4, pp_schedule="Interleaved1F1B", pp_stages_per_rank=2, pp_microbatches=9), 8, 9,
     r"multiple of n // pp = 2, got parallelism.pp_microbatches = 9"),
    (dict(pp=4, pp_schedule="InterleavedZeroBubble", pp_stages_per_rank=2, pp_microbatches=14), 8, 14,
     r"multiple of n // pp = 3"),
    (dict(pp_partition="3,3"), 4, 4, r"pp_partition = '3,3' sums to 6 layers but the model has 4"),
    (dict(pp_partition="4"), 4, 4, r"pp_partition = '4' has 1 entries but there are 2 pipeline stages"),
    (dict(pp_schedule="PipeDream"), 4, 4, r"pp_schedule = 'PipeDream' is unknown"),
])
def test_pipeline_config_errors(values, n_layers, micro_batch_size, message):
    with pytest.raises(ConfigError, match=message) as error:
        check_pipeline_config(parallelism(**values), args_with(n_layers=n_layers), micro_batch_size)
    assert "\n" not in str(error.value)


def test_tied_embeddings_across_stages_need_a_looped_schedule():
    check_pipeline_config(parallelism(), args_with(tie_embeddings=True), 4)  # 1F1B: first and last stage apart
    with pytest.raises(ConfigError, match="tied embeddings with parallelism.pp_schedule = 'ZBVZeroBubble'"):
        check_pipeline_config(parallelism(pp_schedule="ZBVZeroBubble", pp_stages_per_rank=2),
                              args_with(tie_embeddings=True), 4)


# ---------------------------------------------------------------------------------------------
# split_model


def meta_model(args: ModelArgs = TINY) -> Transformer:
    with torch.device("meta"):
        return Transformer(args)


def test_split_keeps_names_and_drops_parts():
    model = meta_model()
    full_names = {name for name, _ in model.named_parameters()}
    layer_ids = [[0], [1, 2], [3]]
    first, last = split_model(model, [0, 2], layer_ids)
    (middle,) = split_model(model, [1], layer_ids)
    assert list(first.layers.keys()) == ["0"] and list(middle.layers.keys()) == ["1", "2"]
    assert list(last.layers.keys()) == ["3"]
    assert first.tok_embeddings is not None and first.norm is None and first.output is None
    assert middle.tok_embeddings is None and middle.norm is None and middle.output is None
    assert last.tok_embeddings is None and last.norm is not None and last.output is not None
    names = [{name for name, _ in part.named_parameters()} for part in (first, middle, last)]
    assert "layers.2.attention.wq.weight" in names[1] and "output.weight" in names[2]
    assert set.union(*names) == full_names and sum(map(len, names)) == len(full_names)
    assert all(p.is_meta for part in (first, middle, last) for p in part.parameters())
    assert len(model.layers) == 4 and model.output is not None  # the original is untouched


def test_middle_stage_passes_hidden_states_through():
    torch.manual_seed(0)
    model = Transformer(TINY)
    model.init_weights()
    parts = split_model(model, [0, 1, 2], [[0], [1, 2], [3]])
    tokens = torch.randint(0, TINY.vocab_size, (2, 8))
    hidden = tokens
    for part in parts:
        hidden = part(hidden)
    torch.testing.assert_close(hidden, model(tokens), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Schedules on 2 ranks against the unsplit model

BATCH, SEQ = 4, 12
# (schedule, stages per rank, micro-batches, partition): each of the five configured schedules.
LAYOUTS = [
    ("GPipe", 1, 2, "1,3"),
    ("1F1B", 1, 4, "uniform"),
    ("Interleaved1F1B", 2, 4, "uniform"),
    ("InterleavedZeroBubble", 2, 2, "uniform"),
    ("ZBVZeroBubble", 2, 4, "uniform"),
]


def make_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and next-token labels with some ignored positions, so token counts differ by micro-batch."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, TINY.vocab_size, (BATCH, SEQ + 1), generator=generator)
    labels = tokens[:, 1:].clone()
    labels[0, :5] = IGNORE_INDEX
    labels[3, :9] = IGNORE_INDEX
    return tokens[:, :-1], labels


def reference(model: Transformer, tokens, labels):
    """Loss and gradients of the unsplit model on the whole batch."""
    model.zero_grad(set_to_none=True)
    loss = cross_entropy_sum(model(tokens), labels) / (labels != IGNORE_INDEX).sum()
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}


def relative_error(value: torch.Tensor, expected: torch.Tensor) -> float:
    return ((value - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def build_parts(rank: int, pp: int, schedule: str, per_rank: int, partition: str, weights: dict):
    """As the trainer does: split on meta, materialise, recompute RoPE, load the weights by name."""
    stage_ids = stage_indices(rank, pp, per_rank, schedule)
    layer_ids = stage_layer_ids(TINY, pp * per_rank, partition)
    parts = split_model(meta_model(), stage_ids, layer_ids)
    for part in parts:
        part.to_empty(device="cpu")
        part.init_rope()
        part.load_state_dict({name: weights[name] for name in part.state_dict()})
    return stage_ids, parts


def run_layout(rank: int, pp: int, layout, model: Transformer) -> dict:
    """Two pipeline steps (the first also infers stage shapes) compared with the unsplit model."""
    schedule, per_rank, n_microbatches, partition = layout
    num_stages = pp * per_rank
    stage_ids, parts = build_parts(rank, pp, schedule, per_rank, partition, model.state_dict())
    result = {"names": sorted(name for part in parts for name, _ in part.named_parameters()),
              "losses": [], "grad_errors": []}
    token_count = torch.zeros((), dtype=torch.long)
    pipe = build_schedule(parts, stage_ids, num_stages, dist.group.WORLD, torch.device("cpu"), schedule,
                          n_microbatches, lambda logits, labels: cross_entropy_sum(logits, labels) / token_count)
    for step in range(2):
        tokens, labels = make_batch(seed=step)
        token_count.fill_((labels != IGNORE_INDEX).sum())
        ref_loss, ref_grads = reference(model, tokens, labels)
        for part in parts:
            part.zero_grad(set_to_none=True)
        losses, kwargs = [], {}
        inputs = (tokens,) if 0 in stage_ids else ()
        if num_stages - 1 in stage_ids:
            kwargs = dict(target=labels, losses=losses)
        # return_outputs=False as in the trainer: the last stage then keeps no logits after each loss.
        pipe.step(*inputs, return_outputs=False, **kwargs)
        if losses:
            result["losses"].append((len(losses), sum(loss.item() for loss in losses), ref_loss))
        result["grad_errors"].append({
            name: float("inf") if p.grad is None else relative_error(p.grad, ref_grads[name])
            for part in parts for name, p in part.named_parameters()})
    return result


def pipeline_worker(rank: int, world_size: int, layouts) -> dict:
    torch.manual_seed(0)
    model = Transformer(TINY)
    model.init_weights()
    results = {}
    for layout in layouts:
        start = time.perf_counter()
        results[layout[0]] = run_layout(rank, world_size, layout, model)
        results[layout[0]]["seconds"] = time.perf_counter() - start
    return results


@pytest.fixture(scope="module")
def pipeline_results():
    return run_ranks(2, pipeline_worker, LAYOUTS, timeout=120)


@pytest.mark.parametrize("layout", LAYOUTS, ids=[layout[0] for layout in LAYOUTS])
def test_schedule_matches_unsplit_model(pipeline_results, layout):
    schedule, _, n_microbatches, _ = layout
    per_rank = [results[schedule] for results in pipeline_results]
    full_names = sorted(name for name, _ in meta_model().named_parameters())
    assert sorted(name for result in per_rank for name in result["names"]) == full_names
    # The loss: one per micro-batch, only on the rank with the last stage, summing to the whole batch's.
    loss_ranks = [rank for rank, result in enumerate(per_rank) if result["losses"]]
    assert loss_ranks == ([0] if schedule == "ZBVZeroBubble" else [1])
    for count, pipeline_loss, ref_loss in per_rank[loss_ranks[0]]["losses"]:
        assert count == n_microbatches
        assert pipeline_loss == pytest.approx(ref_loss, rel=1e-5)
    # The gradients: the plain sum over micro-batches, equal to the whole batch's, for every parameter.
    for rank, result in enumerate(per_rank):
        for step, errors in enumerate(result["grad_errors"]):
            worst = max(errors, key=errors.get)
            assert errors[worst] <= 1e-5, f"rank {rank} step {step}: {worst} off by {errors[worst]:.2e} (relative)"


# ---------------------------------------------------------------------------------------------
# The launcher itself


def failing_worker(rank: int, world_size: int):
    if rank == 1:
        raise ValueError("rank one is broken")
    time.sleep(60)  # the caller must not wait for this rank once another has failed


def hanging_worker(rank: int, world_size: int):
    if rank == 0:
        time.sleep(600)
    return rank


def test_run_ranks_reports_child_traceback_and_hangs():
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"(?s)rank 1 failed:.*ValueError: rank one is broken"):
        run_ranks(2, failing_worker, timeout=120)
    assert time.monotonic() - start < 60  # did not wait for rank 0's sleep
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ranks \[0(, 1)?\] did not finish within 3 s"):
        run_ranks(2, hanging_worker, timeout=3)
    assert time.monotonic() - start < 60
