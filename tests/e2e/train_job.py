"""A real training job for the end-to-end tests; run as a subprocess.

    python train_job.py CONFIG RUN_DIR OUT_DIR [--kill-at STEP] [--resume full|weights_only|no_rng|no_loader]

Each step appends ``{"step", "loss"}`` to ``OUT_DIR/losses.jsonl``; a finished run writes its
final parameters and optimizer state to ``OUT_DIR/final.safetensors`` with safetensors
directly (not through runstate), so the comparison does not trust the code under test.
With ``--kill-at`` the process SIGKILLs itself right after that step's optimizer update,
before or after that step's save depending on the cadence.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn
from torchdata.stateful_dataloader import StatefulDataLoader

import runstate
from runstate.torch import resumable_loader

N_SAMPLES = 96
BATCH = 8
STEPS_PER_EPOCH = N_SAMPLES // BATCH  # 12
TOTAL_STEPS = 42  # crosses three epoch boundaries
SAVE_EVERY = 4  # step 12, 24, 36 are checkpoints at epoch ends


class Augmented(torch.utils.data.Dataset):
    """Synthetic classification data; augmentation draws from random, NumPy and torch."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(7)
        self.x = torch.randn(N_SAMPLES, 10, generator=g)
        self.y = torch.randint(0, 3, (N_SAMPLES,), generator=g)

    def __len__(self) -> int:
        return N_SAMPLES

    def __getitem__(self, i: int):
        x = self.x[i] + 0.1 * torch.randn(10)
        x = x * (1.0 + 0.05 * float(np.random.standard_normal()))
        if random.random() < 0.5:
            x = x.flip(0)
        return x, self.y[i]


CONFIGS = {
    # optimizer, scheduler, num_workers, grad scaler
    "adamw_onecycle": ("adamw", "onecycle", 0, False),
    "sgd_nesterov_warm_restarts": ("sgd", "warm_restarts", 2, False),
    "rmsprop_steplr_scaler": ("rmsprop", "steplr", 0, True),
    "adagrad_plateau": ("adagrad", "plateau", 2, False),
}
# torchdata's own shuffled StatefulDataLoader (not runstate.torch.resumable_loader), as users
# write it: it resumes exactly through runstate (tests/test_exact_resume.py).
PLAIN_LOADER_CONFIGS = {
    "plain_loader_workers0": ("adamw", "onecycle", 0, False),
    "plain_loader_workers2": ("adamw", "onecycle", 2, False),
}


def build(config: str):
    opt_name, sched_name, workers, use_scaler = {**CONFIGS, **PLAIN_LOADER_CONFIGS}[config]
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 3))
    params = model.parameters()
    if opt_name == "adamw":
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.05)
    elif opt_name == "sgd":
        opt = torch.optim.SGD(params, lr=5e-2, momentum=0.9, nesterov=True, weight_decay=1e-4)
    elif opt_name == "rmsprop":
        opt = torch.optim.RMSprop(params, lr=1e-3, momentum=0.5, centered=True)
    else:
        opt = torch.optim.Adagrad(params, lr=5e-2)
    if sched_name == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=5e-2, total_steps=TOTAL_STEPS)
    elif sched_name == "warm_restarts":
        sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=5, T_mult=2)
    elif sched_name == "steplr":
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)
    else:
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0, threshold=0.5)
    if config in PLAIN_LOADER_CONFIGS:
        loader = StatefulDataLoader(Augmented(), batch_size=BATCH, shuffle=True, num_workers=workers)
    else:
        loader = resumable_loader(Augmented(), batch_size=BATCH, seed=3, num_workers=workers)
    state = {
        "model": model,
        "optimizer": opt,
        "scheduler": sched,
        "loader": loader,
        "rng": runstate.RNG(),
        "counters": {"epoch_loss": 0.0},
    }
    if use_scaler:
        state["scaler"] = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=3)
    return state


def final_tensors(state) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v.detach().clone() for k, v in state["model"].state_dict().items()}
    for pid, bufs in state["optimizer"].state_dict()["state"].items():
        for k, v in bufs.items():
            out[f"optimizer.{pid}.{k}"] = v.detach().clone().reshape(v.shape)
    lrs = [g["lr"] for g in state["optimizer"].param_groups]
    out["lr"] = torch.tensor(lrs, dtype=torch.float64)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("config", choices=sorted({**CONFIGS, **PLAIN_LOADER_CONFIGS}))
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    p.add_argument("--kill-at", type=int)
    p.add_argument("--resume", default="full", choices=["full", "weights_only", "no_rng", "no_loader"])
    p.add_argument("--async-save", action="store_true", help="CheckpointManager(async_save=True)")
    args = p.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    os.makedirs(args.out_dir, exist_ok=True)

    state = build(args.config)
    model, opt, sched, loader = state["model"], state["optimizer"], state["scheduler"], state["loader"]
    scaler = state.get("scaler")
    log_path = os.path.join(args.out_dir, "losses.jsonl")
    with (
        runstate.CheckpointManager(
            args.run_dir, keep_last=2, save_every_steps=SAVE_EVERY, async_save=args.async_save
        ) as mgr,
        open(log_path, "a") as log,
    ):
        if args.resume == "full":
            step = mgr.restore(state) or 0
        else:
            dropped = {"weights_only": None, "no_rng": "rng", "no_loader": "loader"}[args.resume]
            partial = {"model": model} if dropped is None else {k: v for k, v in state.items() if k != dropped}
            step = mgr.restore(partial, strict=False) or 0
            state.update({k: v for k, v in partial.items() if k in ("counters",)})
        while step < TOTAL_STEPS:
            for x, y in loader:
                model.train()
                loss = nn.functional.cross_entropy(model(x), y)
                opt.zero_grad()
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                else:
                    loss.backward()
                    opt.step()
                step += 1
                state["counters"]["epoch_loss"] += loss.item()
                if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    if step % STEPS_PER_EPOCH == 0:  # epoch end: before the save of this step
                        sched.step(state["counters"]["epoch_loss"])
                else:
                    sched.step()
                if step % STEPS_PER_EPOCH == 0:
                    state["counters"]["epoch_loss"] = 0.0
                log.write(json.dumps({"step": step, "loss": loss.item().hex()}) + "\n")
                log.flush()
                mgr.save(step, state, metrics={"loss": loss.item()})
                if step == args.kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                if step >= TOTAL_STEPS:
                    break
    save_file(final_tensors(state), os.path.join(args.out_dir, "final.safetensors"))


if __name__ == "__main__":
    sys.exit(main())
