"""Resume a run with the learning rate raised 3x: naively, and with set_hparams + Rewarm.

A small MLP (the demo's two-spiral task, SGD with Nesterov momentum, cosine schedule) trains
for ``PHASE1`` steps and is checkpointed. Both variants restore that checkpoint and continue
with a 3x base LR:

(a) naive: multiply each ``group["lr"]`` by 3 (the chainable cosine schedule goes on from
    there: the LR jumps 3x at once, on top of a momentum buffer built at the old LR);
(b) ``runstate.torch.set_hparams(opt, sched, lr=3 * base)`` plus ``Rewarm(opt, steps=...)``:
    the schedule is rescaled consistently and the new LR is ramped in.

    python examples/resume_with_changes.py [--out DIR]

writes ``resume-with-changes.png`` and prints the peak smoothed loss after the resume.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from typing import Any

import torch
from torch import nn

import runstate
from runstate.demo.job import spirals
from runstate.torch import Rewarm, set_hparams

BASE_LR = 0.1
FACTOR = 3.0
PHASE1 = 200
PHASE2 = 150
TOTAL = PHASE1 + PHASE2
WINDOW = 10


def build() -> dict[str, Any]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 2))
    opt = torch.optim.SGD(model.parameters(), lr=BASE_LR, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=TOTAL, eta_min=BASE_LR / 20)
    return {"model": model, "optimizer": opt, "scheduler": sched, "rng": runstate.RNG()}


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    data = spirals(4096, seed=0)
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(TOTAL):
        idx = torch.randint(0, len(data), (128,), generator=g)
        out.append((data.tensors[0][idx], data.tensors[1][idx]))
    return out


def train(
    state: dict[str, Any],
    data: list[tuple[torch.Tensor, torch.Tensor]],
    start: int,
    stop: int,
    rewarm: Rewarm | None = None,
) -> list[float]:
    model, opt, sched = state["model"], state["optimizer"], state["scheduler"]
    losses = []
    for step in range(start, stop):
        x, y = data[step]
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        (rewarm or sched).step()
        losses.append(loss.item())
    return losses


def smooth(values: list[float]) -> list[float]:
    return [
        sum(values[max(0, i - WINDOW + 1) : i + 1]) / len(values[max(0, i - WINDOW + 1) : i + 1])
        for i in range(len(values))
    ]


def run(workdir: str) -> dict[str, list[float]]:
    """Train, checkpoint, and continue both ways; return the per-step losses."""
    torch.set_num_threads(1)
    data = batches()
    state = build()
    before = train(state, data, 0, PHASE1)
    ckpt = os.path.join(workdir, "ckpt")
    runstate.save(ckpt, state, step=PHASE1)

    naive = build()
    runstate.load(ckpt, naive)
    for group in naive["optimizer"].param_groups:
        group["lr"] *= FACTOR
    after_naive = train(naive, data, PHASE1, TOTAL)

    careful = build()
    runstate.load(ckpt, careful)
    set_hparams(careful["optimizer"], careful["scheduler"], lr=FACTOR * BASE_LR)
    rewarm = Rewarm(careful["optimizer"], steps=50, scheduler=careful["scheduler"], start_factor=0.05)
    after_careful = train(careful, data, PHASE1, TOTAL, rewarm)
    return {"before": before, "naive": after_naive, "careful": after_careful}


def plot(curves: dict[str, list[float]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
    pre = smooth(curves["before"])
    ax.plot(range(1, PHASE1 + 1), pre, color="#444444", lw=2, label="before the resume")
    for key, color, label in (
        ("naive", "#d62728", "(a) naive: group['lr'] *= 3"),
        ("careful", "#1f77b4", "(b) set_hparams(lr=3x) + Rewarm(50 steps)"),
    ):
        post = smooth(curves["before"][-WINDOW:] + curves[key])[WINDOW:]
        ax.plot(range(PHASE1 + 1, TOTAL + 1), post, color=color, lw=1.6, label=label)
    ax.axvline(PHASE1, color="#888888", ls=":")
    ax.text(PHASE1, 0.97, " resume with 3x LR", transform=ax.get_xaxis_transform(), va="top", fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (mean of last {WINDOW} steps)")
    ax.set_title("Raising the learning rate 3x at a resume")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def peaks(curves: dict[str, list[float]]) -> dict[str, float]:
    """Pre-resume level, and each variant's worst smoothed loss after the resume."""
    level = sum(curves["before"][-WINDOW:]) / WINDOW
    out = {"before": level}
    for key in ("naive", "careful"):
        out[key] = max(smooth(curves["before"][-WINDOW:] + curves[key])[WINDOW:])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=".", help="where to write resume-with-changes.png")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        curves = run(tmp)
    p = peaks(curves)
    print(f"loss before the resume (mean of last {WINDOW} steps): {p['before']:.4f}")
    print(f"(a) naive 3x LR:               peak {p['naive']:.4f} ({p['naive'] / p['before']:.2f}x)")
    print(f"(b) set_hparams + Rewarm:      peak {p['careful']:.4f} ({p['careful'] / p['before']:.2f}x)")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "resume-with-changes.png")
    plot(curves, path)
    print(f"plot: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
