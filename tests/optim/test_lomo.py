"""LOMO and AdaLomo: fused updates equal a plain transcription of the papers' formulas.

The references below recompute every step from full gradients (`torch.autograd.grad`) on a copy
of the model, one tensor at a time, straight from the formulas; the optimizers under test only
ever see one gradient at a time inside backward hooks. `pytorch_optimizer`'s LOMO/AdaLOMO (an
independent port of the authors' code) is a second reference where its conventions agree.
"""

import copy
import math
import os
import sys

import pytest
import torch
from torch import nn
from torch.distributed.tensor import Replicate, Shard

from dtcollie.optim import adalomo as adalomo_module
from dtcollie.optim.adalomo import AdaLomo
from dtcollie.optim.lomo import LOMO

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "parallel"))
from spawn import run_ranks  # noqa: E402

STEPS = 4


def make_model(seed: int = 0, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).to(dtype)


def batch(step: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(5, 6, generator=g).to(dtype), torch.randn(5, 4, generator=g).to(dtype)


def loss_of(model, step, dtype=torch.float32):
    x, y = batch(step, dtype)
    return ((model(x) - y) ** 2).mean()


def full_grads(model, step):
    return torch.autograd.grad(loss_of(model, step), list(model.parameters()))


def clip(grads, clip_value, clip_norm):
    if clip_norm:
        norm = torch.sqrt(sum((g * g).sum() for g in grads))
        coef = min(1.0, clip_norm / (float(norm) + 1e-6))
    grads = [g.clamp(-clip_value, clip_value) if clip_value else g for g in grads]
    return [g * coef for g in grads] if clip_norm else grads


@torch.no_grad()
def lomo_reference(model, step, lr, wd=0.0, clip_value=None, clip_norm=None):
    with torch.enable_grad():
        grads = clip(full_grads(model, step), clip_value, clip_norm)
    for p, g in zip(model.parameters(), grads):
        p.copy_(p - lr * (g + wd * p))


def rms(t):
    return t.norm() / math.sqrt(t.numel())


@torch.no_grad()
def adalomo_reference(model, states, step, lr, wd=0.0, clip_value=None, clip_norm=None,
                      eps1=1e-30, eps2=1e-3, threshold=1.0, decay=-0.8):
    with torch.enable_grad():
        grads = clip(full_grads(model, step), clip_value, clip_norm)
    t = step + 1
    beta = 1.0 - t ** decay
    for i, (p, g) in enumerate(zip(model.parameters(), grads)):
        s = g * g + eps1
        if p.dim() == 2:
            row = beta * states.get((i, "row"), 0.0) + (1 - beta) * s.mean(dim=1)
            col = beta * states.get((i, "col"), 0.0) + (1 - beta) * s.mean(dim=0)
            states[(i, "row")], states[(i, "col")] = row, col
            v = torch.outer(row, col) / row.mean()
        else:
            v = beta * states.get((i, "vec"), 0.0) + (1 - beta) * s
            states[(i, "vec")] = v
        u = g / v.sqrt()
        u = u / max(1.0, float(rms(u)) / threshold)
        lr_t = lr * max(eps2, float(rms(p)))
        p.copy_(p * (1 - lr_t * wd) - lr_t * u)


def fused_steps(opt, model, steps, lr, two_pass=False, start=0):
    for step in range(start, start + steps):
        loss = loss_of(model, step)
        if two_pass:
            opt.grad_norm(loss)
        assert opt.fused_backward(loss, lr)


def assert_same(a: nn.Module, b: nn.Module, tol=1e-6):
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=tol, atol=tol, msg=name)


def assert_moved(a: nn.Module, b: nn.Module):
    assert any((pa - pb).abs().max() > 1e-4 for pa, pb in zip(a.parameters(), b.parameters()))


LOMO_CASES = {"weight_decay": dict(wd=0.1), "clip_value": dict(clip_value=0.05),
              "clip_norm": dict(clip_norm=0.1, wd=0.01), "all": dict(wd=0.1, clip_value=0.05, clip_norm=0.1)}


@pytest.mark.parametrize("case", LOMO_CASES)
def test_lomo_matches_reference(case):
    kw = LOMO_CASES[case]
    model, ref = make_model(), make_model()
    start = copy.deepcopy(model)
    opt = LOMO(model, lr=0.1, weight_decay=kw.get("wd", 0.0), clip_grad_value=kw.get("clip_value"),
               clip_grad_norm=kw.get("clip_norm"))
    fused_steps(opt, model, STEPS, 0.1, two_pass=bool(kw.get("clip_norm")))
    for step in range(STEPS):
        lomo_reference(ref, step, 0.1, **kw)
    assert_same(model, ref)
    assert_moved(model, start)


ADALOMO_CASES = {"plain": dict(), "weight_decay": dict(wd=0.5),
                 "clipped": dict(wd=0.1, clip_value=0.05, clip_norm=0.1)}


@pytest.mark.parametrize("piece", [None, 5], ids=["whole", "one_row_per_block"])
@pytest.mark.parametrize("case", ADALOMO_CASES)
def test_adalomo_matches_reference(case, piece, monkeypatch):
    kw = ADALOMO_CASES[case]
    if piece:  # the update goes over blocks of rows of about PIECE elements: here one 6-wide row each
        monkeypatch.setattr(adalomo_module, "PIECE", piece)
    model, ref = make_model(), make_model()
    start = copy.deepcopy(model)
    opt = AdaLomo(model, lr=0.05, weight_decay=kw.get("wd", 0.0), clip_grad_value=kw.get("clip_value"),
                  clip_grad_norm=kw.get("clip_norm"))
    fused_steps(opt, model, STEPS, 0.05)  # the norm pass runs implicitly when clipping by norm
    states = {}
    for step in range(STEPS):
        adalomo_reference(ref, states, step, 0.05, **kw)
    assert_same(model, ref)
    assert_moved(model, start)
    # Both shapes of state, with the step count starting at 1 on the first step.
    weight_state, bias_state = opt.state[model[0].weight], opt.state[model[0].bias]
    assert weight_state["exp_avg_sq_row"].shape == (8,) and weight_state["exp_avg_sq_col"].shape == (6,)
    assert bias_state["exp_avg_sq"].shape == (8,) and float(bias_state["step"]) == STEPS


def test_adalomo_step_path_equals_fused_path():
    fused, plain = make_model(), make_model()
    kw = dict(lr=0.05, weight_decay=0.1, clip_grad_norm=0.1, clip_grad_value=0.05)
    fused_opt, plain_opt = AdaLomo(fused, **kw), AdaLomo(plain, **kw)
    fused_steps(fused_opt, fused, STEPS, 0.05)
    for step in range(STEPS):
        loss_of(plain, step).backward()
        plain_opt.step()
        assert all(p.grad is None for p in plain.parameters())
    assert_same(fused, plain)


def test_at_most_one_gradient_alive():
    model = make_model()
    params = list(model.parameters())
    live = []
    # Registered before the optimizer's hooks, so these run first, when this param's grad is ready.
    for p in params:
        p.register_post_accumulate_grad_hook(lambda _: live.append(sum(q.grad is not None for q in params)))
    opt = AdaLomo(model, lr=0.05, clip_grad_norm=1.0)
    loss = loss_of(model, 0)
    opt.grad_norm(loss)
    opt.fused_backward(loss, 0.05)
    assert live == [1] * (2 * len(params))
    assert all(p.grad is None for p in params)


def test_loss_scaler_skips_overflow_and_grows():
    model, ref = make_model(), make_model()
    opt = LOMO(model, lr=0.1, clip_grad_norm=0.1, loss_scale=2.0 ** 8, loss_scale_window=2)
    before = copy.deepcopy(model)
    # Overflow: scaled gradients are inf; the update pass must not touch any parameter.
    loss = loss_of(model, 0) * 1e38
    norm = opt.grad_norm(loss)
    assert not torch.isfinite(norm)
    assert opt.fused_backward(loss, 0.1) is False
    assert_same(model, before, tol=0)
    assert all(p.grad is None for p in model.parameters())
    assert opt.scaler.scale == 2.0 ** 7
    # Two clean steps (the window) double the scale; the clean updates are unscaled correctly.
    fused_steps(opt, model, 2, 0.1, start=1)
    assert opt.scaler.scale == 2.0 ** 8
    for step in (1, 2):
        lomo_reference(ref, step, 0.1, clip_norm=0.1)
    assert_same(model, ref)
    # A bare fused_backward with a scaler runs the overflow check itself.
    assert opt.fused_backward(loss_of(model, 3) * 1e38, 0.1) is False
    assert opt.scaler.scale == 2.0 ** 7


def test_fp16_parameters_get_a_scaler():
    model = make_model(dtype=torch.float16)
    before = copy.deepcopy(model)
    opt = AdaLomo(model, lr=0.05, clip_grad_norm=1.0)
    assert opt.scaler is not None and opt.scaler.scale == 2.0 ** 16
    # At 2**16 this loss's fp16 gradients overflow for real: skipped, untouched, scale halved,
    # until a scale that fits is found.
    applied = []
    for _ in range(8):
        applied.append(opt.fused_backward(loss_of(model, 0, torch.float16), 0.05))
        if applied[-1]:
            break
        assert_same(model, before, tol=0)
    assert applied[0] is False and applied[-1] is True
    assert opt.scaler.scale == 2.0 ** (17 - len(applied))
    assert all(p.dtype == torch.float16 for p in model.parameters())
    assert_moved(model, before)
    assert opt.state[model[0].weight]["exp_avg_sq_row"].dtype == torch.float32
    assert AdaLomo(make_model(), lr=0.05).scaler is None  # fp32: no scaler


def test_state_dict_round_trip_continues_identically():
    model = make_model()
    kw = dict(lr=0.05, weight_decay=0.1, clip_grad_norm=0.1, loss_scale=2.0 ** 8, loss_scale_window=3)
    opt = AdaLomo(model, **kw)
    fused_steps(opt, model, 2, 0.05)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    assert saved_opt["loss_scaler"] == {"scale": 2.0 ** 8, "clean_steps": 2}
    fused_steps(opt, model, 2, 0.05, start=2)

    resumed = make_model(seed=1)
    resumed.load_state_dict(saved_model)
    resumed_opt = AdaLomo(resumed, **kw)
    resumed_opt.load_state_dict(saved_opt)
    fused_steps(resumed_opt, resumed, 2, 0.05, start=2)
    assert_same(model, resumed, tol=0)
    assert resumed_opt.scaler.state_dict() == opt.scaler.state_dict()
    assert float(resumed_opt.state[resumed[2].weight]["step"]) == 4


def test_against_pytorch_optimizer():
    """pytorch_optimizer (pip: pytorch-optimizer) ports the authors' LOMO/AdaLomo."""
    po = pytest.importorskip("pytorch_optimizer")
    # LOMO: the port has no weight decay; two-pass norm clipping and value clipping agree.
    ours, theirs = make_model(), make_model()
    opt = LOMO(ours, lr=0.1, clip_grad_norm=0.1, clip_grad_value=0.05)
    ref = po.LOMO(theirs, lr=0.1, clip_grad_norm=0.1, clip_grad_value=0.05)
    fused_steps(opt, ours, STEPS, 0.1)
    for step in range(STEPS):
        loss = loss_of(theirs, step)
        ref.grad_norm(loss)
        ref.fused_backward(loss, 0.1)
    assert_same(ours, theirs)
    # AdaLOMO: the port multiplies the loss by a fixed 1024 (a power of two: exact in fp32).
    ours, theirs = make_model(), make_model()
    kw = dict(lr=0.05, weight_decay=0.1, clip_grad_norm=0.1, clip_grad_value=0.05)
    opt, ref = AdaLomo(ours, **kw), po.AdaLOMO(theirs, **kw)
    fused_steps(opt, ours, STEPS, 0.05)
    for step in range(STEPS):
        loss = loss_of(theirs, step)
        ref.grad_norm(loss)
        ref.fused_backward(loss, 0.05)
    assert_same(ours, theirs, tol=1e-5)


# ---------------------------------------------------------------------------- 2 ranks, DTensor


def _sharded_rank(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (world_size,))
    results = {}
    for name, make_opt in (("adalomo", lambda m: AdaLomo(m, lr=0.05, weight_decay=0.1, clip_grad_norm=0.1,
                                                          clip_grad_value=0.2)),
                           ("lomo", lambda m: LOMO(m, lr=0.1, weight_decay=0.1, clip_grad_norm=0.1))):
        single, sharded = make_model(), make_model()
        # Weight 0: Shard(0) (colwise), weight 2: Shard(1) (rowwise); bias 0 Shard(0), bias 2 Replicate.
        parallelize_module(sharded, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
        assert sharded[2].weight.placements == (Shard(1),) and sharded[2].bias.placements == (Replicate(),)
        single_opt, sharded_opt = make_opt(single), make_opt(sharded)
        fused_steps(single_opt, single, STEPS, single_opt.param_groups[0]["lr"])
        fused_steps(sharded_opt, sharded, STEPS, sharded_opt.param_groups[0]["lr"])
        diff = max(float((a.detach().full_tensor() if isinstance(a, DTensor) else a) .sub(b).abs().max())
                   for a, b in zip(sharded.parameters(), single.parameters()))
        moved = max(float((a - b).detach().abs().max()) for a, b in zip(single.parameters(), make_model().parameters()))
        results[name] = (diff, moved)
        if name == "adalomo":
            col_w, row_w = sharded_opt.state[sharded[0].weight], sharded_opt.state[sharded[2].weight]
            results["placements"] = [tuple(s[k].placements) for s, k in
                                     ((col_w, "exp_avg_sq_row"), (col_w, "exp_avg_sq_col"),
                                      (row_w, "exp_avg_sq_row"), (row_w, "exp_avg_sq_col"))]
            state_diff = max(float((sharded_opt.state[a][k].full_tensor() - single_opt.state[b][k]).abs().max())
                             for a, b in zip(sharded.parameters(), single.parameters())
                             for k in sharded_opt.state[a] if k != "step")
            results["state_diff"] = state_diff
    return results


def test_sharded_dtensor_params_match_one_process():
    for result in run_ranks(2, _sharded_rank):
        for name in ("adalomo", "lomo"):
            diff, moved = result[name]
            assert diff < 1e-5 and moved > 1e-3, (name, diff, moved)
        assert result["state_diff"] < 1e-5
        # Colwise weight (Shard(0)): rows sharded, columns replicated; rowwise (Shard(1)): the reverse.
        assert result["placements"] == [(Shard(0),), (Replicate(),), (Replicate(),), (Shard(0),)]
