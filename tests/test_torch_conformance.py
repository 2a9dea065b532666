"""PyTorch through the shared adapter conformance suite.

The subprocess part reuses ``tests/e2e/train_job.py`` (AdamW + OneCycle, dropout, a resumable
loader); ``tests/test_exact_resume.py`` covers many more torch configurations and kill points.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tests.conformance import Conformance

JOB = Path(__file__).parent / "e2e" / "train_job.py"


class TestTorchConformance(Conformance):
    adapter = "torch"
    in_place_items = ("model", "optimizer", "scheduler", "data_generator")
    negative_resume = "no_rng"
    save_every = 4
    total_steps = 42
    kill_at = 19

    def make_state(self, seed: int, hidden: int = 8) -> dict[str, Any]:
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 2))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        state = {
            "model": model,
            "optimizer": opt,
            "scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
            "data_generator": torch.Generator().manual_seed(seed + 10),
            "step": 0,
        }
        return self.train(state, 2 + seed)

    def train(self, state: dict[str, Any], steps: int) -> dict[str, Any]:
        for _ in range(steps):
            x = torch.randn(8, 4, generator=state["data_generator"])
            loss = state["model"](x).pow(2).mean()
            state["optimizer"].zero_grad()
            loss.backward()
            state["optimizer"].step()
            state["scheduler"].step()
            state["step"] += 1
        return state

    def values(self, state: dict[str, Any]) -> dict[str, np.ndarray]:
        out = {f"model.{k}": v.detach().numpy().copy() for k, v in state["model"].state_dict().items()}
        for pid, bufs in state["optimizer"].state_dict()["state"].items():
            out.update({f"optimizer.{pid}.{k}": v.detach().numpy().copy() for k, v in bufs.items()})
        out["lr"] = np.asarray([g["lr"] for g in state["optimizer"].param_groups])
        out["scheduler"] = np.asarray(state["scheduler"].last_epoch)
        out["data_generator"] = state["data_generator"].get_state().numpy().copy()
        out["step"] = np.asarray(state["step"])
        return out

    def mismatched_state(self) -> dict[str, Any]:
        return self.make_state(0, hidden=16)

    def job_command(self) -> list[str]:
        return [sys.executable, str(JOB), "adamw_onecycle"]
