from __future__ import annotations

import pytest
import torch
from torch import nn


def make_training_state(seed: int = 0, hidden: int = 8) -> dict:
    """A small model, AdamW and a scheduler after two real steps."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(2):
        model(torch.randn(3, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return {"model": model, "optimizer": opt, "scheduler": sched}


def fresh_training_state(seed: int = 100, hidden: int = 8) -> dict:
    """Same architecture, different weights, optimizer never stepped."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    return {"model": model, "optimizer": opt, "scheduler": sched}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--stress",
        action="store_true",
        default=False,
        help="run the fault-injection and fuzz tests ten times longer (make stress)",
    )


@pytest.fixture
def stress(request: pytest.FixtureRequest) -> bool:
    """True under ``--stress``: fault-injection and fuzz tests scale their trial counts up."""
    return bool(request.config.getoption("--stress"))
