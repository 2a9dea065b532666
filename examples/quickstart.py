"""Quickstart: train, get killed with SIGKILL, resume, and end bit-identical.

Runs three real processes:
  1. a training run killed by SIGKILL in the middle of an epoch,
  2. the same command again, which resumes from the latest checkpoint and finishes,
  3. a reference run that is never interrupted,
then checks that (2) ended with exactly the same weights, optimizer state and losses as (3).

    python examples/quickstart.py
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile

TOTAL_STEPS = 120
SAVE_EVERY = 10


def train(run_dir: str, crash_at: int | None) -> None:
    import torch
    from torch import nn

    import runstate
    from runstate.torch import resumable_loader

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(512, 16, generator=g)
    y = (x @ torch.randn(16, 1, generator=g)).squeeze(1) + 0.1 * torch.randn(512, generator=g)
    dataset = torch.utils.data.TensorDataset(x, y)

    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=TOTAL_STEPS)
    loader = resumable_loader(dataset, batch_size=32, seed=0)
    state = {"model": model, "optimizer": opt, "scheduler": sched, "loader": loader, "rng": runstate.RNG()}

    losses: dict[int, float] = {}
    with runstate.CheckpointManager(run_dir, keep_last=2, save_every_steps=SAVE_EVERY) as mgr:
        step = mgr.restore(state) or 0
        if step:
            print(f"  resumed from step {step}")
        while step < TOTAL_STEPS:
            for xb, yb in loader:
                loss = nn.functional.mse_loss(model(xb).squeeze(1), yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                losses[step] = loss.item()
                mgr.save(step, state, metrics={"loss": loss.item()})
                if step == crash_at:
                    print(f"  SIGKILL at step {step} (last checkpoint: step {mgr.latest_step()})", flush=True)
                    os.kill(os.getpid(), signal.SIGKILL)
                if step == TOTAL_STEPS:
                    break
    final = {k: v.tolist() for k, v in model.state_dict().items()}
    exp_avg = [s["exp_avg"].tolist() for s in opt.state_dict()["state"].values()]
    with open(os.path.join(run_dir, "result.json"), "w") as f:
        json.dump({"weights": final, "exp_avg": exp_avg, "losses": losses}, f)


def _run(run_dir: str, crash_at: int | None = None) -> int:
    cmd = [sys.executable, __file__, "--child", run_dir]
    if crash_at is not None:
        cmd += ["--crash-at", str(crash_at)]
    return subprocess.run(cmd, check=False).returncode


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        interrupted, reference = os.path.join(tmp, "interrupted"), os.path.join(tmp, "reference")
        print("1. training, killed mid-epoch at step 37:")
        code = _run(interrupted, crash_at=37)
        print(f"  exit code {code} (-9 = SIGKILL)")
        print("2. same command again:")
        _run(interrupted)
        print("3. reference run, never interrupted")
        _run(reference)
        with open(os.path.join(interrupted, "result.json")) as f:
            a = json.load(f)
        with open(os.path.join(reference, "result.json")) as f:
            b = json.load(f)
        resumed_steps = sorted(int(s) for s in a["losses"])
        same_losses = all(a["losses"][str(s)] == b["losses"][str(s)] for s in resumed_steps)
        same = a["weights"] == b["weights"] and a["exp_avg"] == b["exp_avg"] and same_losses
        print(f"losses after resume (steps {resumed_steps[0]}..{resumed_steps[-1]}) identical: {same_losses}")
        print(f"final weights and optimizer state bit-identical to the uninterrupted run: {same}")
        return 0 if same else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", metavar="RUN_DIR")
    parser.add_argument("--crash-at", type=int)
    args = parser.parse_args()
    if args.child:
        train(args.child, args.crash_at)
    else:
        sys.exit(main())
