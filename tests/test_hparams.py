"""Resuming with changes: set_hparams, Rewarm, extend_schedule, reset_optimizer_state,
against real torch optimizers and schedulers, through a real save and restore."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from torch.optim import lr_scheduler as lrs

import runstate
from runstate.torch import Rewarm, extend_schedule, reset_optimizer_state, set_hparams

TOTAL = 60
SWITCH = 23

SCHEDULERS = {
    "lambda": lambda opt: lrs.LambdaLR(opt, lambda s: 0.97**s),
    "step": lambda opt: lrs.StepLR(opt, step_size=7, gamma=0.5),
    "cosine": lambda opt: lrs.CosineAnnealingLR(opt, T_max=TOTAL, eta_min=0.01),
    "onecycle": lambda opt: lrs.OneCycleLR(
        opt, max_lr=opt.param_groups[0]["lr"], total_steps=TOTAL, cycle_momentum=False
    ),
    "linear": lambda opt: lrs.LinearLR(opt, start_factor=0.1, total_iters=30),
    "sequential": lambda opt: lrs.SequentialLR(
        opt,
        [
            lrs.LinearLR(opt, start_factor=0.1, total_iters=10),
            lrs.CosineAnnealingLR(opt, T_max=TOTAL - 10, eta_min=0.001),
        ],
        milestones=[10],
    ),
}


def make(kind: str, lr: float):
    param = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([param], lr=lr, weight_decay=0.01)
    return opt, SCHEDULERS[kind](opt)


def run(opt, sched, n: int) -> list[float]:
    out = []
    for _ in range(n):
        opt.zero_grad()
        opt.param_groups[0]["params"][0].sum().backward()
        opt.step()
        sched.step()
        out.append(float(opt.param_groups[0]["lr"]))
    return out


def resumed(tmp_path: Path, kind: str, old: float, change) -> list[float]:
    """Train with ``old``, save, restore into fresh objects, apply ``change``, continue."""
    opt, sched = make(kind, old)
    run(opt, sched, SWITCH)
    runstate.save(tmp_path / "ck", {"optimizer": opt, "scheduler": sched})
    opt2, sched2 = make(kind, old)
    runstate.load(tmp_path / "ck", {"optimizer": opt2, "scheduler": sched2})
    change(opt2, sched2)
    return run(opt2, sched2, TOTAL - SWITCH)


@pytest.mark.parametrize("kind", sorted(SCHEDULERS))
def test_new_lr_continues_the_schedule_scaled(tmp_path: Path, kind: str) -> None:
    opt, sched = make(kind, 0.3)
    expected = run(opt, sched, TOTAL)[SWITCH:]
    got = resumed(tmp_path, kind, 0.1, lambda o, s: set_hparams(o, s, lr=0.3))
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("kind", ["lambda", "step", "cosine", "onecycle", "sequential"])
def test_negative_control_setting_group_lr_by_hand_does_not_stick(tmp_path: Path, kind: str) -> None:
    opt, sched = make(kind, 0.3)
    expected = run(opt, sched, TOTAL)[SWITCH:]

    def by_hand(o, s) -> None:
        for g in o.param_groups:
            g["lr"] = 0.3

    got = resumed(tmp_path, kind, 0.1, by_hand)
    assert got != pytest.approx(expected, rel=1e-6)


def test_other_hyper_parameters_and_groups() -> None:
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([{"params": [a]}, {"params": [b]}], lr=0.1)
    set_hparams(opt, weight_decay=0.5, betas=(0.8, 0.95), groups=[1])
    assert opt.param_groups[0]["weight_decay"] == 0.01 and opt.param_groups[1]["weight_decay"] == 0.5
    assert opt.param_groups[1]["betas"] == (0.8, 0.95)
    with pytest.raises(ValueError, match="has no 'momentum'"):
        set_hparams(opt, momentum=0.9)
    with pytest.raises(ValueError, match="param group 2 does not exist"):
        set_hparams(opt, lr=1.0, groups=[2])
    sgd = torch.optim.SGD([a], lr=0.1, momentum=0.9)
    set_hparams(sgd, momentum=0.5)
    assert sgd.param_groups[0]["momentum"] == 0.5
    cycling = lrs.OneCycleLR(torch.optim.SGD([b], lr=0.1, momentum=0.9), max_lr=0.1, total_steps=10)
    with pytest.raises(ValueError, match="cycles momentum"):
        set_hparams(cycling.optimizer, cycling, momentum=0.5)


@pytest.mark.parametrize("kind", ["step", "onecycle", "cosine"])
def test_rewarm_ramps_then_rejoins_the_schedule(tmp_path: Path, kind: str) -> None:
    opt, sched = make(kind, 0.1)
    plain = run(opt, sched, TOTAL)[SWITCH:]
    opt, sched = make(kind, 0.1)
    run(opt, sched, SWITCH)
    rewarm = Rewarm(opt, steps=10, scheduler=sched, start_factor=0.1)
    got = []
    for i in range(TOTAL - SWITCH):
        opt.zero_grad()
        opt.param_groups[0]["params"][0].sum().backward()
        opt.step()
        rewarm.step()
        got.append(float(opt.param_groups[0]["lr"]))
        if i == 4:  # save and restore mid-ramp: the ramp continues
            runstate.save(tmp_path / "ck", {"optimizer": opt, "scheduler": sched, "rewarm": rewarm})
            opt2, sched2 = make(kind, 0.1)
            rewarm2 = Rewarm(opt2, steps=10, scheduler=sched2, start_factor=0.1)
            runstate.load(tmp_path / "ck", {"optimizer": opt2, "scheduler": sched2, "rewarm": rewarm2})
            opt, sched, rewarm = opt2, sched2, rewarm2
    factors = [0.1 + 0.9 * (i + 1) / 10 for i in range(9)]
    assert got[:9] == pytest.approx([f * p for f, p in zip(factors, plain)], rel=1e-9)
    assert got[9:] == pytest.approx(plain[9:], rel=1e-9)
    assert got[0] < 0.2 * plain[0]


def test_rewarm_validates() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        Rewarm(opt, steps=0)
    with pytest.raises(ValueError, match="start_factor"):
        Rewarm(opt, steps=3, start_factor=0.0)


@pytest.mark.parametrize(
    ("kind", "end_value"),
    [
        ("onecycle", None),
        ("cosine", 0.01),
        ("linear", 0.1),
        ("poly", 0.0),
    ],
)
def test_extend_schedule_is_continuous_and_reaches_the_same_end(kind: str, end_value: float | None) -> None:
    param = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([param], lr=0.1)
    sched = {
        "onecycle": lambda: lrs.OneCycleLR(opt, max_lr=0.1, total_steps=TOTAL, cycle_momentum=False),
        "cosine": lambda: lrs.CosineAnnealingLR(opt, T_max=TOTAL, eta_min=0.01),
        "linear": lambda: lrs.LinearLR(opt, start_factor=0.5, end_factor=1.0, total_iters=TOTAL),
        "poly": lambda: lrs.PolynomialLR(opt, total_iters=TOTAL, power=2.0),
    }[kind]()
    before = run(opt, sched, 35)
    slope = abs(before[-1] - before[-2])
    extend_schedule(sched, total_steps=3 * TOTAL)
    after = run(opt, sched, 3 * TOTAL - 35 - (1 if kind == "onecycle" else 0))
    assert abs(after[0] - before[-1]) <= 2 * slope + 1e-12  # no jump at the switch
    assert max(abs(b - a) for a, b in itertools.pairwise(after)) <= 2 * slope + 1e-12
    final = after[-1]
    if kind == "onecycle":
        end_value = 0.1 / 25 / 1e4
    if kind == "linear":
        end_value = 0.1  # end_factor 1.0 times the base 0.1
    assert final == pytest.approx(end_value, rel=1e-6, abs=1e-9)
    assert len(after) > TOTAL  # it really ran past the old horizon


def test_extend_schedule_rejects_bad_input() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    sched = lrs.StepLR(opt, 3)
    with pytest.raises(ValueError, match="StepLR is not supported"):
        extend_schedule(sched, total_steps=100)
    cos = lrs.CosineAnnealingLR(opt, T_max=10)
    run(opt, cos, 5)
    with pytest.raises(ValueError, match="must be an int after the current step 5"):
        extend_schedule(cos, total_steps=5)


def test_reset_optimizer_state() -> None:
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.Adam([a, b], lr=0.1)
    (a.sum() + b.sum()).backward()
    opt.step()
    assert reset_optimizer_state(opt, [b]) == 1
    assert a in opt.state and b not in opt.state
    assert reset_optimizer_state(opt) == 1 and not opt.state
    assert math.isfinite(opt.param_groups[0]["lr"])
