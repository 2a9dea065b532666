"""The training job of ``train_job.py``, written the way the README teaches for preemption.

    python preemptible_job.py CONFIG RUN_DIR OUT_DIR

``save_on_signals=(SIGTERM,)``: after a SIGTERM the next save writes, the loop breaks on
``mgr.preempted`` and the process exits with ``mgr.exit_code`` (75), which ``runstate run``
answers with a restart. Each step appends to ``OUT_DIR/losses.jsonl``; a finished run writes
``OUT_DIR/final.safetensors`` like ``train_job.py``, so the two compare directly.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from safetensors.torch import save_file
from torch import nn

import runstate
from tests.e2e.train_job import SAVE_EVERY, STEPS_PER_EPOCH, TOTAL_STEPS, build, final_tensors


def main() -> int:
    config, run_dir, out_dir = sys.argv[1:4]
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    os.makedirs(out_dir, exist_ok=True)
    state = build(config)
    model, opt, sched, loader = state["model"], state["optimizer"], state["scheduler"], state["loader"]
    if state.get("scaler") is not None or isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise SystemExit(f"{config}: use a configuration without a grad scaler or ReduceLROnPlateau")
    with (
        runstate.CheckpointManager(
            run_dir, keep_last=2, save_every_steps=SAVE_EVERY, save_on_signals=(signal.SIGTERM,)
        ) as mgr,
        open(os.path.join(out_dir, "losses.jsonl"), "a") as log,
    ):
        step = mgr.restore(state) or 0
        while step < TOTAL_STEPS and not mgr.preempted:
            for x, y in loader:
                model.train()
                loss = nn.functional.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                state["counters"]["epoch_loss"] += loss.item()
                if step % STEPS_PER_EPOCH == 0:
                    state["counters"]["epoch_loss"] = 0.0
                log.write(json.dumps({"step": step, "loss": loss.item().hex()}) + "\n")
                log.flush()
                mgr.save(step, state, metrics={"loss": loss.item()})
                if mgr.preempted or step >= TOTAL_STEPS:
                    break
    if mgr.preempted:
        return mgr.exit_code  # 75: "saved, restart me"
    save_file(final_tensors(state), os.path.join(out_dir, "final.safetensors"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
