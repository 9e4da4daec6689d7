"""Learning-rate schedule, parameter groups and LARS against references written here."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from mixmask.core.schedule import lr_at
from mixmask.run.optim import LARS, build_optimizer, param_groups


def reference_lr(step, total, warmup, peak, schedule, milestones=(0.6, 0.8)):
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    if schedule == "step":
        factor = 1.0
        for m in milestones:
            if step / total >= m:
                factor /= 10
        return peak * factor
    t = (step - warmup) / (total - warmup)
    return peak * (1 + math.cos(math.pi * t)) / 2


@pytest.mark.parametrize("schedule", ["cosine", "step", "constant"])
@pytest.mark.parametrize("warmup", [0, 10])
def test_lr_schedule_matches_reference(schedule, warmup):
    total, peak = 100, 0.3
    for step in range(total + 1):
        got = lr_at(step, total_steps=total, warmup_steps=warmup, peak_lr=peak, schedule=schedule)
        assert got == pytest.approx(reference_lr(step, total, warmup, peak, schedule), rel=1e-9, abs=1e-12)
    assert lr_at(warmup, total_steps=total, warmup_steps=warmup, peak_lr=peak) == pytest.approx(peak)
    end = lr_at(total, total_steps=total, warmup_steps=warmup, peak_lr=peak, schedule=schedule)
    assert end == pytest.approx({"cosine": 0.0, "step": peak / 100, "constant": peak}[schedule], abs=1e-12)


def test_no_weight_decay_on_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 2))
    decay, no_decay = param_groups(model, 0.1)
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[2].weight)}
    assert {id(p) for p in no_decay["params"]} == {id(model[0].bias), id(model[1].weight), id(model[1].bias),
                                                    id(model[2].bias)}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    for name in ("sgd", "adam", "adamw", "lars"):
        opt = build_optimizer(name, model, lr=0.1, weight_decay=0.1)
        assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_decay_norm_and_bias_steps_like_the_official_optimizer_over_every_parameter(name):
    """decay_norm_and_bias=True is the official `SGD(model.parameters(), weight_decay=wd)` (Adam: W-MSE's l2)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.Linear(64, 2))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-1, 1)
    official = copy.deepcopy(model)
    ours = build_optimizer(name, model, lr=0.1, weight_decay=0.05, decay_norm_and_bias=True)
    cls = torch.optim.SGD if name == "sgd" else torch.optim.Adam
    extra = {"momentum": 0.9} if name == "sgd" else {}
    reference = cls(official.parameters(), lr=0.1, weight_decay=0.05, **extra)
    x = torch.randn(2, 3, 6, 6)
    excluded = copy.deepcopy(official)  # the default: biases and norms do not decay
    default = build_optimizer(name, excluded, lr=0.1, weight_decay=0.05)
    for net, opt in ((model, ours), (official, reference), (excluded, default)):
        for _ in range(2):
            opt.zero_grad()
            net(x).square().sum().backward()
            opt.step()
    for p, q in zip(model.parameters(), official.parameters(), strict=True):
        torch.testing.assert_close(p, q)
    assert not torch.allclose(excluded[1].weight, official[1].weight)
    assert [g["weight_decay"] for g in ours.param_groups] == [0.05, 0.05]


def test_lars_step_matches_reference():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5, 3))
    b = torch.nn.Parameter(torch.randn(5))
    opt = LARS([{"params": [w], "weight_decay": 0.01, "lars_exclude": False},
                {"params": [b], "weight_decay": 0.0, "lars_exclude": True}], lr=0.5, momentum=0.9)
    w_ref, b_ref = w.detach().clone(), b.detach().clone()
    buf_w, buf_b = torch.zeros_like(w_ref), torch.zeros_like(b_ref)
    for it in range(3):
        gw, gb = torch.randn(5, 3), torch.randn(5)
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step()
        d = gw + 0.01 * w_ref
        d = d * (0.001 * w_ref.norm() / d.norm())
        buf_w = d if it == 0 else 0.9 * buf_w + d
        w_ref -= 0.5 * buf_w
        buf_b = gb if it == 0 else 0.9 * buf_b + gb
        b_ref -= 0.5 * buf_b
        torch.testing.assert_close(w.detach(), w_ref)
        torch.testing.assert_close(b.detach(), b_ref)
