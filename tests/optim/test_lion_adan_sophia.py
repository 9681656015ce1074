"""Lion, Adan and SophiaG against the papers' formulas, the reference packages and a 2-rank DTensor run.

The formulas below are transcribed per tensor from the issue and the papers, independently of
dtcollie.optim; float64 keeps the comparison at 1e-6 meaningful (Lion's sign() would otherwise
be at the mercy of float32 rounding near zero).
"""

import copy
import math
import sys
from pathlib import Path

import pytest
import torch

from dtcollie.optim import Adan, Lion, SophiaG

STEPS = 5
SHAPES = [(4, 3), (5,), (2, 3, 2)]
HESSIAN_STEPS = {0, 2, 3}  # after which steps SophiaG gets a Hessian update (none before step 0)


def make_data(seed: int = 0, grad_scale: float = 1.0):
    """Initial params, per-step grads and per-step GNB grads for SHAPES, float64."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda shape: torch.randn(shape, generator=gen, dtype=torch.float64)
    params = [rand(s) for s in SHAPES]
    grads = [[rand(s) * grad_scale for s in SHAPES] for _ in range(STEPS)]
    hess_grads = [[rand(s) for s in SHAPES] for _ in range(STEPS)]
    return params, grads, hess_grads


def run(optimizer_cls, kwargs, params, grads, hess_grads=None, bs=None, steps=range(STEPS), opt=None):
    """Step an optimizer over `grads` on copies of `params`; returns (params, optimizer).

    `bs` marks SophiaG: it is passed to step() and `hess_grads` feed update_hessian().
    """
    params = [p.clone().requires_grad_() for p in params]
    opt = opt(params) if opt else optimizer_cls(params, **kwargs)
    for k in steps:
        _step(opt, params, grads[k], hess_grads[k] if hess_grads and bs is not None and k in HESSIAN_STEPS else None, bs)
    return params, opt


def _step(opt, params, grads, hess_grads, bs):
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step(bs=bs) if bs is not None else opt.step()
    if hess_grads is not None:
        for p, g in zip(params, hess_grads):
            p.grad = g.clone()
        opt.update_hessian()


# ---- the formulas, one tensor at a time -------------------------------------------------------

def lion_reference(params, grads, lr, betas, wd):
    b1, b2 = betas
    params = [p.clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    for step_grads in grads:
        for i, g in enumerate(step_grads):
            params[i] = params[i] * (1 - lr * wd)
            c = b1 * m[i] + (1 - b1) * g
            params[i] = params[i] - lr * torch.sign(c)
            m[i] = b2 * m[i] + (1 - b2) * g
    return params


def adan_reference(params, grads, lr, betas, eps, wd, no_prox, max_grad_norm):
    b1, b2, b3 = betas
    params = [p.clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    d = [torch.zeros_like(p) for p in params]
    n = [torch.zeros_like(p) for p in params]
    prev = [None] * len(params)
    for k, step_grads in enumerate(grads, start=1):
        scale = 1.0
        if max_grad_norm > 0:
            norm = math.sqrt(sum(float((g ** 2).sum()) for g in step_grads))
            scale = min(max_grad_norm / (norm + eps), 1.0)
        for i, raw in enumerate(step_grads):
            g = raw * scale
            g_prev = g if prev[i] is None else prev[i]
            m[i] = b1 * m[i] + (1 - b1) * g
            d[i] = b2 * d[i] + (1 - b2) * (g - g_prev)
            n[i] = b3 * n[i] + (1 - b3) * (g + b2 * (g - g_prev)) ** 2
            denom = torch.sqrt(n[i] / (1 - b3 ** k)) + eps
            update = lr / (1 - b1 ** k) * m[i] / denom + lr * b2 / (1 - b2 ** k) * d[i] / denom
            if no_prox:
                params[i] = params[i] * (1 - lr * wd) - update
            else:
                params[i] = (params[i] - update) / (1 + lr * wd)
            prev[i] = g
    return params


def sophia_reference(params, grads, hess_grads, lr, betas, rho, wd, bs):
    b1, b2 = betas
    params = [p.clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    h = [torch.zeros_like(p) for p in params]
    for k, step_grads in enumerate(grads):
        for i, g in enumerate(step_grads):
            params[i] = params[i] * (1 - lr * wd)
            m[i] = b1 * m[i] + (1 - b1) * g
            ratio = torch.clamp(m[i].abs() / (rho * bs * h[i] + 1e-15), max=1.0)
            params[i] = params[i] - lr * torch.sign(m[i]) * ratio
        if k in HESSIAN_STEPS:
            for i, g in enumerate(hess_grads[k]):
                h[i] = b2 * h[i] + (1 - b2) * g * g
    return params


def assert_close(actual, expected):
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a.detach(), e, rtol=1e-6, atol=1e-9)


def assert_moved(actual, initial):
    """Guard against a vacuous pass: the optimizer must have changed every tensor."""
    for a, p in zip(actual, initial):
        assert (a.detach() - p).abs().max() > 1e-4


LION = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
SOPHIA = dict(lr=1e-2, betas=(0.965, 0.99), rho=0.04, weight_decay=0.1)
BS = 8


def adan_kwargs(no_prox: bool, max_grad_norm: float) -> dict:
    return dict(lr=1e-2, betas=(0.98, 0.92, 0.99), eps=1e-8, weight_decay=0.1, no_prox=no_prox,
                max_grad_norm=max_grad_norm)


# ---- single process against the formulas ------------------------------------------------------

def test_lion_matches_formula():
    params, grads, _ = make_data()
    out, _ = run(Lion, LION, params, grads)
    assert_moved(out, params)
    assert_close(out, lion_reference(params, grads, LION["lr"], LION["betas"], LION["weight_decay"]))


@pytest.mark.parametrize("no_prox", [False, True])
@pytest.mark.parametrize("max_grad_norm", [0.0, 1.0])
def test_adan_matches_formula(no_prox, max_grad_norm):
    params, grads, _ = make_data()
    if max_grad_norm:  # the clip must be active at every step
        assert all(math.sqrt(sum(float((g ** 2).sum()) for g in gs)) > 3 * max_grad_norm for gs in grads)
    kw = adan_kwargs(no_prox, max_grad_norm)
    out, _ = run(Adan, kw, params, grads)
    assert_moved(out, params)
    assert_close(out, adan_reference(params, grads, kw["lr"], kw["betas"], kw["eps"], kw["weight_decay"],
                                     no_prox, max_grad_norm))


def test_adan_clipping_changes_the_result():
    params, grads, _ = make_data()
    clipped, _ = run(Adan, adan_kwargs(False, 1.0), params, grads)
    unclipped, _ = run(Adan, adan_kwargs(False, 0.0), params, grads)
    assert max((a - b).abs().max() for a, b in zip(clipped, unclipped)) > 1e-4


def test_adan_leaves_grads_unscaled():
    params, grads, _ = make_data()
    out, _ = run(Adan, adan_kwargs(False, 1.0), params, grads)
    assert_close([p.grad for p in out], grads[-1])


def test_sophia_matches_formula():
    params, grads, hess = make_data()
    out, _ = run(SophiaG, SOPHIA, params, grads, hess, bs=BS)
    assert_moved(out, params)
    assert_close(out, sophia_reference(params, grads, hess, SOPHIA["lr"], SOPHIA["betas"], SOPHIA["rho"],
                                       SOPHIA["weight_decay"], BS))


def test_sophia_ratio_is_not_saturated():
    """With bs·ρ·h large enough some elements use |m|/(ρ·bs·h) < 1: the Hessian really matters."""
    params, grads, hess = make_data()
    out, opt = run(SophiaG, SOPHIA, params, grads, hess, bs=BS)
    ratios = torch.cat([(opt.state[p]["exp_avg"].abs() / (SOPHIA["rho"] * BS * opt.state[p]["hessian"]))
                        .flatten() for p in out])
    assert (ratios < 1).any() and (ratios > 1).any()


CASES = [(Lion, LION, None), (Adan, adan_kwargs(False, 1.0), None), (Adan, adan_kwargs(True, 1.0), None),
         (SophiaG, SOPHIA, BS)]


@pytest.mark.parametrize("cls,kwargs,bs", CASES, ids=["lion", "adan-prox", "adan-no-prox", "sophia"])
def test_state_dict_round_trip(cls, kwargs, bs):
    params, grads, hess = make_data()
    straight, _ = run(cls, kwargs, params, grads, hess, bs=bs)
    half, first = run(cls, kwargs, params, grads, hess, bs=bs, steps=range(2))
    saved = copy.deepcopy(first.state_dict())

    def reload(new_params):
        opt = cls(new_params, **kwargs)
        opt.load_state_dict(saved)
        return opt

    resumed, _ = run(cls, kwargs, [p.detach() for p in half], grads, hess, bs=bs, steps=range(2, STEPS),
                     opt=reload)
    torch.testing.assert_close([p.detach() for p in resumed], [p.detach() for p in straight], rtol=0, atol=0)


# ---- against the reference packages -----------------------------------------------------------

def test_lion_matches_lion_pytorch():
    lion_pytorch = pytest.importorskip("lion_pytorch")
    params, grads, _ = make_data()
    ours, _ = run(Lion, LION, params, grads)
    theirs, _ = run(lion_pytorch.Lion, LION, params, grads)
    assert_close(ours, [p.detach() for p in theirs])


def test_sophia_matches_sophia_opt():
    sophia_opt = pytest.importorskip("sophia_opt")
    params, grads, hess = make_data()
    ours, _ = run(SophiaG, SOPHIA, params, grads, hess, bs=BS)
    theirs, _ = run(sophia_opt.SophiaG, SOPHIA, params, grads, hess, bs=BS)
    assert_close(ours, [p.detach() for p in theirs])


@pytest.mark.parametrize("no_prox", [False, True])
@pytest.mark.parametrize("foreach", [False, True])
def test_adan_matches_pytorch_optimizer(no_prox, foreach):
    """pytorch_optimizer names no_prox `weight_decouple`; like the official code it clips with
    max_grad_norm / (norm + eps) and scales p.grad in place (our `run` hands it fresh copies)."""
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    params, grads, _ = make_data()
    kw = adan_kwargs(no_prox, 1.0)
    ours, _ = run(Adan, kw, params, grads)
    theirs_kw = dict(lr=kw["lr"], betas=kw["betas"], eps=kw["eps"], weight_decay=kw["weight_decay"],
                     weight_decouple=no_prox, max_grad_norm=kw["max_grad_norm"], foreach=foreach)
    theirs, _ = run(pytorch_optimizer.Adan, theirs_kw, params, grads)
    assert_close(ours, [p.detach() for p in theirs])


# ---- two ranks: DTensor parameters, and pipeline stages ---------------------------------------

def _load_run_ranks():
    """tests/parallel's launcher; its folder goes on sys.path so spawned children can import it too."""
    folder = str(Path(__file__).resolve().parents[1] / "parallel")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    from spawn import run_ranks
    return run_ranks


DIST_SHAPES = [(4, 6), (5,), (3, 4), (6, 2)]
# (mesh name, placement) per DIST_SHAPES entry: Shard(0), an uneven Shard(0) of a 1-D tensor, a
# Shard(1), and a tensor on a second mesh so the global norm must combine two meshes. The worker
# adds a Replicate parameter, which the global norm must count once.
DIST_LAYOUT = [("dp", "S0"), ("dp", "S0"), ("dp", "S1"), ("tp", "S0")]
DIST_CASES = [("lion", Lion, LION, None), ("adan-prox-clip", Adan, adan_kwargs(False, 1.0), None),
              ("adan-no-prox-clip", Adan, adan_kwargs(True, 1.0), None), ("sophia", SophiaG, SOPHIA, BS)]


def dist_data():
    gen = torch.Generator().manual_seed(1)
    rand = lambda s: torch.randn(s, generator=gen, dtype=torch.float64)
    params = [rand(s) for s in DIST_SHAPES]
    grads = [[rand(s) for s in DIST_SHAPES] for _ in range(STEPS)]
    hess = [[rand(s) for s in DIST_SHAPES] for _ in range(STEPS)]
    return params, grads, hess


def _ranks_worker(rank, world_size):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    meshes = {"dp": init_device_mesh("cpu", (2,), mesh_dim_names=("dp",)),
              "tp": init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))}
    placements = {"S0": [Shard(0)], "S1": [Shard(1)], "R": [Replicate()]}
    layout = DIST_LAYOUT + [("dp", "R")]
    params0, grads, hess = dist_data()
    # one more, replicated, parameter: counted once in the global norm
    extra = torch.randn(3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    params0 = params0 + [extra]
    grads = [g + [extra * (k + 1)] for k, g in enumerate(grads)]
    hess = [h + [extra * (k + 2)] for k, h in enumerate(hess)]

    def shard(t, i):
        # a clone: a Replicate DTensor's local tensor may be `t` itself, and steps write in place
        mesh, where = layout[i]
        return distribute_tensor(t.clone(), meshes[mesh], placements[where])

    results = {}
    for name, cls, kwargs, bs in DIST_CASES:
        params = [torch.nn.Parameter(shard(p, i)) for i, p in enumerate(params0)]
        opt = cls(params, **kwargs)
        for k in range(STEPS):
            for i, p in enumerate(params):
                p.grad = shard(grads[k][i], i)
            opt.step(bs=bs) if bs is not None else opt.step()
            if bs is not None and k in HESSIAN_STEPS:
                for i, p in enumerate(params):
                    p.grad = shard(hess[k][i], i)
                opt.update_hessian()
        results[name] = [p.detach().full_tensor().numpy().copy() for p in params]

    # pipeline stages: rank r owns a disjoint set of plain parameters; the norm spans both.
    stage_params, stage_grads, _ = make_data(seed=3, grad_scale=1.0)
    mine = [i for i in range(len(SHAPES)) if i % world_size == rank] or [0]
    params = [stage_params[i].clone().requires_grad_() for i in mine]
    opt = Adan(params, **adan_kwargs(False, 1.0), pp_group=dist.group.WORLD)
    for k in range(STEPS):
        for p, i in zip(params, mine):
            p.grad = stage_grads[k][i].clone()
        opt.step()
    results["pp"] = dict(zip(mine, [p.detach().numpy() for p in params]))
    # numpy, not tensors: torch would share tensor storage with the exiting child by file descriptor
    return results


def test_two_ranks_match_one_process():
    run_ranks = _load_run_ranks()
    per_rank = run_ranks(2, _ranks_worker, timeout=180)
    params, grads, hess = dist_data()
    extra = torch.randn(3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    params = params + [extra]
    grads = [g + [extra * (k + 1)] for k, g in enumerate(grads)]
    hess = [h + [extra * (k + 2)] for k, h in enumerate(hess)]
    for name, cls, kwargs, bs in DIST_CASES:
        expected, _ = run(cls, kwargs, params, grads, hess, bs=bs)
        for rank_results in per_rank:
            assert_close([torch.from_numpy(a) for a in rank_results[name]], [p.detach() for p in expected])

    stage_params, stage_grads, _ = make_data(seed=3)
    expected, _ = run(Adan, adan_kwargs(False, 1.0), stage_params, stage_grads)
    for rank_results in per_rank:
        for i, value in rank_results["pp"].items():
            torch.testing.assert_close(torch.from_numpy(value), expected[i].detach(), rtol=1e-6, atol=1e-9)
    owned = set().union(*(r["pp"].keys() for r in per_rank))
    assert owned == set(range(len(SHAPES)))
