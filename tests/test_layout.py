"""Issue 16, item 6: what the package layout promises a reader.

Framework helpers are packages named after their framework (``runstate.torch``, ``runstate.keras``,
``runstate.jax``), and what ``runstate import`` writes depends on no class of the CLI.
"""

from __future__ import annotations

import json
import pkgutil
from pathlib import Path

import pytest

import runstate


def test_framework_helpers_are_packages_named_after_their_framework() -> None:
    packages = {m.name for m in pkgutil.iter_modules(runstate.__path__) if m.ispkg}
    assert {"torch", "keras", "jax"} <= packages
    assert {"torch", "keras", "jax"} <= set(runstate._FRAMEWORK_SUBPACKAGES)


def test_import_pt_stores_plain_dicts_that_name_no_class(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from runstate.cli import main

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 7}, tmp_path / "old.pt")
    assert main(["import", str(tmp_path / "old.pt"), "-o", str(tmp_path / "imported")]) == 0

    items = json.loads((tmp_path / "imported" / "manifest.json").read_text())["items"]
    assert {name: item["tree"]["t"] for name, item in items.items()} == {
        "model": "dict",
        "optimizer": "dict",
        "step": "int",
    }
    assert "runstate.cli" not in json.dumps(items)  # no CLI class name is ever written to disk
    # negative control: a live module saved by runstate is a stateful item naming its class
    runstate.save(tmp_path / "saved", {"model": model})
    saved = json.loads((tmp_path / "saved" / "manifest.json").read_text())["items"]["model"]["tree"]
    assert saved["t"] == "stateful" and "Linear" in saved["type"]

    # and it loads into live objects as docs/cli.md prints it
    fresh = torch.nn.Linear(3, 2)
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.5, momentum=0.9)
    state = {"model": fresh, "optimizer": fresh_opt, "step": 0}
    result = runstate.load(tmp_path / "imported", state)
    assert result == 7 and state["step"] == 7 and result.report.ok
    assert torch.equal(fresh.weight, model.weight) and fresh_opt.param_groups[0]["lr"] == 0.1
