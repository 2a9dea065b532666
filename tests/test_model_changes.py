"""Resuming into a changed model: reports, key renames (DDP / torch.compile prefixes) and
optimizer state matched by parameter name, not position."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

import runstate


class Wrapper(nn.Module):
    """Stands in for DDP (``module.``) or torch.compile (``_orig_mod.``): same keys, a prefix."""

    def __init__(self, inner: nn.Module, attr: str = "module") -> None:
        super().__init__()
        setattr(self, attr, inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return next(iter(self.children()))(x)


def trained(model: nn.Module, steps: int = 3) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        model(torch.randn(4, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
    return opt


def test_exact_restore_reports_nothing(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = trained(model)
    with runstate.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, {"model": model, "optimizer": opt})
        fresh = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        assert mgr.restore({"model": fresh, "optimizer": torch.optim.AdamW(fresh.parameters())}) == 1
        assert mgr.last_restore_report is not None and mgr.last_restore_report.ok


def test_added_layer_keeps_the_moments_of_unchanged_layers(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = trained(model)
    saved = {name: opt.state[p]["exp_avg"].clone() for name, p in model.named_parameters()}
    with runstate.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, {"model": model, "optimizer": opt})
    # The new model inserts a layer in the middle: positions shift, names of the others stay.
    grown = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    grown.insert(2, nn.Linear(8, 8))
    grown.insert(3, nn.ReLU())
    grown[4] = nn.Linear(8, 2)
    new_opt = torch.optim.AdamW(grown.parameters(), lr=1e-2)
    state = {"model": grown, "optimizer": new_opt}
    mgr = runstate.CheckpointManager(tmp_path)
    with pytest.raises(runstate.StateMismatchError) as err:
        mgr.restore(state)
    assert "state['optimizer']['model.2.weight']: new parameter" in str(err.value)
    with caplog.at_level(logging.WARNING, logger="runstate"):
        assert mgr.restore(state, strict=False) == 1
    report = mgr.last_restore_report
    assert report is not None and not report.ok
    assert set(report.of("model", "missing")) == {"state['model']['4.weight']", "state['model']['4.bias']"}
    assert set(report.of("model", "shape")) == {"state['model']['2.weight']", "state['model']['2.bias']"}
    assert set(report.of("optimizer", "new_parameter")) >= {"state['optimizer']['model.4.weight']"}
    assert "restoring only what matches" in caplog.text
    assert torch.equal(grown[0].weight, model[0].weight)
    # Matched by name: layer 0 keeps its moments; the reshaped/new layers start fresh.
    assert torch.equal(new_opt.state[grown[0].weight]["exp_avg"], saved["0.weight"])
    assert grown[4].weight not in new_opt.state and grown[2].weight not in new_opt.state
    # Training goes on.
    grown(torch.randn(2, 4)).sum().backward()
    new_opt.step()


def test_negative_control_by_position_would_misplace_moments(tmp_path: Path) -> None:
    """Without names (loading the positional state_dict by hand) the moments land on the
    wrong parameters or fail, which is what matching by name avoids."""
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2))
    opt = trained(model)
    smaller = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    positional = torch.optim.AdamW(smaller.parameters())
    with pytest.raises(ValueError):
        positional.load_state_dict(opt.state_dict())
    runstate.save(tmp_path / "ck", {"model": model, "optimizer": opt})
    by_name = torch.optim.AdamW(smaller.parameters())
    runstate.load(tmp_path / "ck", {"model": smaller, "optimizer": by_name}, strict=False)
    assert torch.equal(by_name.state[smaller[0].weight]["exp_avg"], opt.state[model[0].weight]["exp_avg"])
    assert smaller[1].weight not in by_name.state  # '1.weight' changed shape (8,8) -> (2,8): fresh


@pytest.mark.parametrize("prefix", ["module", "_orig_mod"])
def test_wrapper_prefix_is_detected_suggested_and_renamed(tmp_path: Path, prefix: str) -> None:
    inner = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    wrapped = Wrapper(inner, prefix)
    opt = trained(wrapped)
    runstate.save(tmp_path / "ck", {"model": wrapped, "optimizer": opt})
    plain = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    state = {"model": plain, "optimizer": plain_opt}
    with pytest.raises(runstate.StateMismatchError) as err:
        runstate.load(tmp_path / "ck", state)
    assert f"the checkpoint's keys carry a '{prefix}.' prefix: pass rename={{'model': [(r'^" in str(err.value)
    runstate.load(tmp_path / "ck", state, rename={"model": [(rf"^{prefix}\.", "")]})
    assert torch.equal(plain[2].weight, inner[2].weight)
    for p_live, p_saved in zip(plain.parameters(), inner.parameters()):
        assert torch.equal(plain_opt.state[p_live]["exp_avg"], opt.state[p_saved]["exp_avg"])
    # And the reverse: a plain checkpoint into a wrapped model.
    runstate.save(tmp_path / "plain", {"model": plain, "optimizer": plain_opt})
    rewrapped = Wrapper(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), prefix)
    target = {"model": rewrapped, "optimizer": torch.optim.AdamW(rewrapped.parameters())}
    with pytest.raises(runstate.StateMismatchError, match="the live keys carry a"):
        runstate.load(tmp_path / "plain", target)
    runstate.load(tmp_path / "plain", target, rename={"model": [(r"^", f"{prefix}.")]})
    assert torch.equal(next(iter(rewrapped.children()))[0].weight, plain[0].weight)
