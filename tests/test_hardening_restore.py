"""Restore correctness (issue 13: items 8, 10, 11, 12, 13, 20, 22; issue 14: item 11).

Each test reproduces a way a restore used to go silently wrong or end in a raw exception:
param groups matched by position, a half-applied restore, another optimizer class accepted,
replaced values of another kind/shape/dtype, colliding or invalid rename rules, lazy modules,
a CUDA generator read without CUDA, and plain run metadata overwritten by the stored one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import runstate
from runstate.adapters import torch as torch_adapter


def stepped(opt: torch.optim.Optimizer, model: nn.Module, steps: int = 2) -> None:
    for _ in range(steps):
        model(torch.randn(3, 4)).sum().backward()
        opt.step()
        opt.zero_grad()


# -- 13.8: param groups are matched by their parameters' names ------------------------------------


def grouped(model: nn.Linear, order: tuple[str, ...]) -> torch.optim.AdamW:
    settings = {"weight": {"weight_decay": 0.1, "lr": 0.01}, "bias": {"weight_decay": 0.0, "lr": 0.02}}
    return torch.optim.AdamW([{"params": [getattr(model, n)], **settings[n]} for n in order])


def test_param_groups_in_another_order_keep_their_own_hyper_parameters(tmp_path: Path) -> None:
    model = nn.Linear(4, 3)
    opt = grouped(model, ("weight", "bias"))
    stepped(opt, model)
    opt.param_groups[0]["lr"] = 0.005  # as a scheduler would have decayed it
    runstate.save(tmp_path / "ck", {"model": model, "optimizer": opt})
    fresh = nn.Linear(4, 3)
    refactored = grouped(fresh, ("bias", "weight"))  # the same groups, listed the other way round
    runstate.load(tmp_path / "ck", {"model": fresh, "optimizer": refactored})
    bias_group, weight_group = refactored.param_groups
    assert bias_group["params"][0] is fresh.bias and bias_group["weight_decay"] == 0.0 and bias_group["lr"] == 0.02
    assert weight_group["weight_decay"] == 0.1 and weight_group["lr"] == 0.005
    for name in ("weight", "bias"):
        saved = opt.state[getattr(model, name)]["exp_avg"]
        assert torch.equal(refactored.state[getattr(fresh, name)]["exp_avg"], saved)


def test_param_groups_that_cannot_be_matched_are_refused_or_reported(tmp_path: Path) -> None:
    model = nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)  # one group
    stepped(opt, model)
    runstate.save(tmp_path / "ck", {"model": model, "optimizer": opt})
    fresh = nn.Linear(4, 3)
    split = grouped(fresh, ("weight", "bias"))  # two groups now: which one gets the stored settings?
    state = {"model": fresh, "optimizer": split}
    with pytest.raises(runstate.StateMismatchError, match=r"param_groups'\]\[0\]: this param group matches no"):
        runstate.load(tmp_path / "ck", state)
    assert split.param_groups[1]["weight_decay"] == 0.0 and not split.state  # nothing changed
    with runstate.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, {"model": model, "optimizer": opt})
        assert mgr.restore(state, strict=False) == 1
        report = mgr.last_restore_report
    assert report is not None
    assert report.of("optimizer", "param_groups") == [
        "state['optimizer']['param_groups'][0]",
        "state['optimizer']['param_groups'][1]",
    ]
    # The live hyper-parameters stay, the moments are restored by name.
    assert split.param_groups[1]["weight_decay"] == 0.0 and split.param_groups[1]["lr"] == 0.02
    assert torch.equal(split.state[fresh.bias]["exp_avg"], opt.state[model.bias]["exp_avg"])


# -- 13.11: the class of every stateful item is checked -----------------------------------------


def test_another_optimizer_class_is_refused_under_strict(tmp_path: Path) -> None:
    model = nn.Linear(4, 3)
    adam = torch.optim.Adam(model.parameters(), lr=0.01)
    stepped(adam, model)
    runstate.save(tmp_path / "ck", {"model": model, "optimizer": adam})
    fresh = nn.Linear(4, 3)
    sgd = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    state = {"model": fresh, "optimizer": sgd}
    with pytest.raises(runstate.StateMismatchError) as err:
        runstate.load(tmp_path / "ck", state)
    assert (
        "state['optimizer']: the checkpoint holds the state of a torch.optim.adam.Adam, the live object is a "
        "torch.optim.sgd.SGD; restore into an object of the stored class, or pass exclude=['optimizer']" in str(err.value)
    )
    assert sgd.param_groups[0]["momentum"] == 0.9 and not torch.equal(fresh.weight, model.weight)
    runstate.load(tmp_path / "ck", state, strict=False)  # the model is restored, the SGD kept
    assert torch.equal(fresh.weight, model.weight)
    assert sgd.param_groups[0]["momentum"] == 0.9 and "betas" not in sgd.param_groups[0]
    fresh(torch.randn(2, 4)).sum().backward()
    sgd.step()  # used to raise KeyError: 'momentum'


def test_another_scheduler_class_with_the_same_keys_is_refused(tmp_path: Path) -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=0.1)
    lrs = torch.optim.lr_scheduler
    runstate.save(tmp_path / "ck", {"scheduler": lrs.LambdaLR(opt, lambda s: 0.9**s)})
    other = lrs.MultiplicativeLR(opt, lambda s: 0.9)  # a state_dict with exactly the same keys
    with pytest.raises(runstate.StateMismatchError, match="state of a torch.optim.lr_scheduler.LambdaLR"):
        runstate.load(tmp_path / "ck", {"scheduler": other})


def test_a_scheduler_for_another_number_of_param_groups_is_refused(tmp_path: Path) -> None:
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    lrs = torch.optim.lr_scheduler
    runstate.save(tmp_path / "ck", {"scheduler": lrs.StepLR(torch.optim.SGD([a], lr=0.1), step_size=2)})
    live = lrs.StepLR(torch.optim.SGD([{"params": [a]}, {"params": [b], "lr": 0.5}], lr=0.1), step_size=2)
    with pytest.raises(runstate.StateMismatchError) as err:
        runstate.load(tmp_path / "ck", {"scheduler": live})
    assert "state['scheduler']['base_lrs']: the checkpoint's scheduler drives 1 param groups" in str(err.value)
    runstate.load(tmp_path / "ck", {"scheduler": live}, strict=False)  # kept, not half-loaded
    assert live.base_lrs == [0.1, 0.5]
    live.optimizer.step()
    live.step()


class Counter:
    def __init__(self) -> None:
        self.n = 0

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.n = state["n"]


def test_a_class_saved_from_a_script_matches_the_same_class_imported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    counter = Counter()
    counter.n = 5
    monkeypatch.setattr(Counter, "__module__", "__main__")  # as when train.py ran as a script
    runstate.save(tmp_path / "ck", {"counter": counter})
    monkeypatch.undo()
    fresh = Counter()
    runstate.load(tmp_path / "ck", {"counter": fresh})
    assert fresh.n == 5


# -- 13.12: strict checks the kinds, shapes and dtypes of replaced values ----------------------------


def test_replaced_values_of_another_kind_shape_or_dtype(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    runstate.save(
        tmp_path / "ck",
        {
            "model": np.zeros(3),
            "buffers": {"ema": torch.zeros(3), "hist": np.zeros(2, dtype=np.float64), "t": torch.ones(2)},
            "step": 7,
        },
    )
    model = nn.Linear(2, 2)
    live_ema, live_hist, live_t = torch.ones(4), np.ones(2, dtype=np.float32), np.ones(2)
    state: dict[str, Any] = {"model": model, "buffers": {"ema": live_ema, "hist": live_hist, "t": live_t}, "step": 0}
    with pytest.raises(runstate.StateMismatchError) as err:
        runstate.load(tmp_path / "ck", state)
    msg = str(err.value)
    assert "state['model']: a NumPy array in the checkpoint, a torch.nn.modules.linear.Linear live" in msg
    assert "state['buffers']['ema']: shape (3,) in checkpoint, (4,) live" in msg
    assert "state['buffers']['hist']: dtype float64 in checkpoint, float32 live" in msg
    assert "state['buffers']['t']: a torch tensor in the checkpoint, a NumPy array live" in msg
    assert state["model"] is model and state["step"] == 0  # nothing changed
    with caplog.at_level(logging.WARNING, logger="runstate"):
        runstate.load(tmp_path / "ck", state, strict=False)
    assert state["model"] is model and state["buffers"]["ema"] is live_ema and state["buffers"]["hist"] is live_hist
    assert state["buffers"]["t"] is live_t and state["step"] == 7  # what matches is restored
    assert "a NumPy array in the checkpoint" in caplog.text


def test_live_none_and_plain_values_accept_what_is_stored(tmp_path: Path) -> None:
    runstate.save(tmp_path / "ck", {"a": torch.ones(3), "best": 0.25, "n": np.int64(3), "hist": [1, 2, 3]})
    state: dict[str, Any] = {"a": None, "best": float("inf"), "n": 0, "hist": []}
    runstate.load(tmp_path / "ck", state)
    assert torch.equal(state["a"], torch.ones(3)) and state["best"] == 0.25 and state["hist"] == [1, 2, 3]


def test_a_generator_of_another_kind_is_not_swapped_in(tmp_path: Path) -> None:
    runstate.save(tmp_path / "ck", {"g": np.random.default_rng(1)})
    live = np.random.Generator(np.random.MT19937(2))
    with pytest.raises(runstate.StateMismatchError, match=r"a numpy.Generator \(bit_generator PCG64\) in the check"):
        runstate.load(tmp_path / "ck", {"g": live})


# -- 13.13: rename rules ---------------------------------------------------------------------------


def test_rename_rules_mapping_two_keys_to_one_are_refused(tmp_path: Path) -> None:
    runstate.save(tmp_path / "ck", {"model": {"module.w": torch.ones(1), "w": torch.zeros(1), "b": torch.ones(1)}})
    state: dict[str, Any] = {"model": None}
    with pytest.raises(runstate.StateMismatchError) as err:
        runstate.load(tmp_path / "ck", state, rename={"model": [(r"^module\.", "")]})
    assert "give several stored keys the same name" in str(err.value)
    assert "['module.w', 'w'] -> 'w'" in str(err.value)
    assert state["model"] is None


@pytest.mark.parametrize(
    ("rules", "expected"),
    [
        ([("(", "")], "pattern '(' is not a valid regular expression"),
        ([(r"^(a)", r"\2")], r"replacement '\\2' of pattern '^(a)' is invalid"),
        (["^a"], "each rule must be a (pattern, replacement) pair of strings"),
    ],
)
def test_bad_rename_rules_are_clear_errors(tmp_path: Path, rules: Any, expected: str) -> None:
    runstate.save(tmp_path / "ck", {"model": {"a.w": torch.ones(1)}})
    with pytest.raises(runstate.CheckpointError) as err:
        runstate.load(tmp_path / "ck", {"model": None}, rename={"model": rules})
    assert expected in str(err.value) and "rename['model']" in str(err.value)


# -- 13.10: a failure in phase two names what was already restored -------------------------------


class Boom(Exception):
    pass


class Fragile:
    """Loads fine in phase one (its state_dict matches), raises in phase two."""

    def state_dict(self) -> dict[str, Any]:
        return {"x": 1}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise Boom("refusing this state")


def test_a_failure_in_phase_two_names_the_items_already_restored(tmp_path: Path) -> None:
    model = nn.Linear(2, 2)
    runstate.save(tmp_path / "ck", {"model": model, "fragile": Fragile(), "epoch": 3})
    fresh = nn.Linear(2, 2)
    state: dict[str, Any] = {"model": fresh, "fragile": Fragile(), "epoch": 0}
    with pytest.raises(runstate.PartialRestoreError) as err:
        runstate.load(tmp_path / "ck", state)
    assert isinstance(err.value, runstate.StateMismatchError) and isinstance(err.value.__cause__, Boom)
    assert err.value.restored == ("state['model']",) and err.value.failed == "state['fragile']"
    assert "restoring state['fragile'] raised Boom: refusing this state; state['model'] was already restored" in str(
        err.value
    )
    assert state["epoch"] == 0  # plain values are replaced only after every object loaded


class Raising:
    def state_dict(self) -> dict[str, Any]:
        raise Boom("no state here")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def test_a_state_dict_that_raises_in_phase_one_is_a_clear_error(tmp_path: Path) -> None:
    runstate.save(tmp_path / "ck", {"x": {"a": 1}})
    with pytest.raises(runstate.StateMismatchError, match=r"state\['x'\]: Raising.state_dict\(\) raised Boom"):
        runstate.load(tmp_path / "ck", {"x": Raising()})


# -- 13.20: lazy modules -------------------------------------------------------------------------


def test_a_lazy_module_is_materialized_like_torch_does(tmp_path: Path) -> None:
    model = nn.Sequential(nn.LazyLinear(3), nn.ReLU(), nn.LazyLinear(2))
    model(torch.randn(2, 5))
    runstate.save(tmp_path / "ck", {"model": model})
    fresh = nn.Sequential(nn.LazyLinear(3), nn.ReLU(), nn.LazyLinear(2))  # uninitialized parameters
    runstate.load(tmp_path / "ck", {"model": fresh})
    for (name, saved), restored in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(saved, restored), name
    assert torch.equal(fresh(torch.ones(1, 5)), model(torch.ones(1, 5)))


# -- 13.22: a CUDA generator restored on a machine without CUDA -------------------------------------


def save_with_a_cuda_generator(path: Path, monkeypatch: pytest.MonkeyPatch, state: dict[str, Any]) -> None:
    """Save as a CUDA machine would: the generator is recorded on cuda:0 with a CUDA state."""
    real_get = torch_adapter.TorchObjects.get

    def as_cuda(self: Any, value: Any) -> Any:
        got = real_get(self, value)
        if got is None:
            return None
        return got[0], torch.arange(16, dtype=torch.uint8), {"device": "cuda:0"}  # a CUDA state is 16 bytes

    with monkeypatch.context() as m:
        m.setattr(torch_adapter.TorchObjects, "get", as_cuda)
        runstate.save(path, state)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_a_cuda_generator_without_cuda_is_a_clear_error_or_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    model = nn.Linear(2, 2)
    save_with_a_cuda_generator(tmp_path / "ck", monkeypatch, {"model": model, "gen": torch.Generator()})
    live = torch.Generator().manual_seed(3)
    before = live.get_state()
    fresh = nn.Linear(2, 2)
    state: dict[str, Any] = {"model": fresh, "gen": live}
    with pytest.raises(runstate.StateMismatchError) as err:
        runstate.load(tmp_path / "ck", state)
    assert "state['gen']: a torch.Generator on cuda:0 is stored, but CUDA is not available on this machine" in str(
        err.value
    )
    assert "damaged" not in str(err.value)
    with caplog.at_level(logging.WARNING, logger="runstate"):
        runstate.load(tmp_path / "ck", state, strict=False)
    assert state["gen"] is live and torch.equal(live.get_state(), before)
    assert torch.equal(fresh.weight, model.weight)
    assert "CUDA is not available" in caplog.text
    with pytest.raises(runstate.UnsupportedTypeError, match="CUDA is not available"):
        runstate.load(tmp_path / "ck")  # no live state to keep: say what is missing
    # A manager does not take it for a damaged checkpoint and fall back to an older step.
    with runstate.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, {"model": model, "gen": torch.Generator()})
    save_with_a_cuda_generator(tmp_path / "run" / "step-000000000002", monkeypatch, {"model": model, "gen": live})
    mgr = runstate.CheckpointManager(tmp_path / "run", read_only=True)
    with pytest.raises(runstate.StateMismatchError, match="CUDA is not available"):
        mgr.restore({"model": nn.Linear(2, 2), "gen": torch.Generator()})
    assert mgr.restore({"model": nn.Linear(2, 2), "gen": torch.Generator()}, strict=False) == 2
    report = mgr.last_restore_report
    assert report is not None and report.of("gen", "device") == ["state['gen']"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_rng_with_cuda_states_warns_when_restored_without_cuda(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with monkeypatch.context() as m:  # save as a machine with two initialized CUDA devices would
        m.setattr(torch.cuda, "is_available", lambda: True)
        m.setattr(torch.cuda, "is_initialized", lambda: True)
        m.setattr(torch.cuda, "device_count", lambda: 2)
        m.setattr(torch.cuda, "get_rng_state", lambda i: torch.full((16,), i, dtype=torch.uint8))
        runstate.save(tmp_path / "ck", {"rng": runstate.RNG()})
    expected = torch.rand(3)
    torch.manual_seed(123)
    with caplog.at_level(logging.WARNING, logger="runstate"):
        runstate.load(tmp_path / "ck", {"rng": runstate.RNG()})
    assert "holds the random state of 2 CUDA device(s), this machine has 0" in caplog.text
    assert torch.equal(torch.rand(3), expected)  # everything this machine has is restored


# -- 14.11: exclude leaves run metadata alone -------------------------------------------------------


def test_exclude_keeps_the_live_config(tmp_path: Path) -> None:
    model = nn.Linear(2, 2)
    runstate.save(tmp_path / "ck", {"model": model, "config": {"lr": 0.1, "out": "runs/a"}, "log_dir": "runs/a"})
    fresh = nn.Linear(2, 2)
    config = {"lr": 0.3, "out": "runs/b"}
    state: dict[str, Any] = {"model": fresh, "config": config, "log_dir": "runs/b"}
    runstate.load(tmp_path / "ck", state, exclude=["config", "log_*"])
    assert state["config"] is config and config == {"lr": 0.3, "out": "runs/b"} and state["log_dir"] == "runs/b"
    assert torch.equal(fresh.weight, model.weight)
    # Excluded items need not be in the live state either (no "unexpected item" under strict).
    runstate.load(tmp_path / "ck", {"model": nn.Linear(2, 2)}, exclude=["config", "log_dir"])
    with runstate.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(5, {"model": model, "config": {"lr": 0.1}})
        kept = {"lr": 0.3}
        state = {"model": nn.Linear(2, 2), "config": kept}
        assert mgr.restore(state, exclude=["config"]) == 5
        assert state["config"] is kept and kept == {"lr": 0.3}
        assert mgr.last_restore_report is not None and mgr.last_restore_report.excluded == ("config",)
    with pytest.raises(runstate.CheckpointConfigError, match="exclude must be a list of item names"):
        runstate.load(tmp_path / "ck", {"model": nn.Linear(2, 2)}, exclude=[1])  # type: ignore[list-item]


def test_an_exclude_pattern_that_matches_nothing_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A misspelled exclude (``confg``) would restore the stored config silently: say so in the log.
    runstate.save(tmp_path / "ck", {"model": nn.Linear(2, 2), "config": {"lr": 0.1}})
    state: dict[str, Any] = {"model": nn.Linear(2, 2), "config": {"lr": 0.3}}
    with caplog.at_level(logging.WARNING, logger="runstate"):
        runstate.load(tmp_path / "ck", state, exclude=["confg", "model"])
    warnings = [r.getMessage() for r in caplog.records if "matches no item" in r.getMessage()]
    assert len(warnings) == 1 and "'confg'" in warnings[0] and "'config'" in warnings[0], warnings
    assert state["config"] == {"lr": 0.1}  # restored, as the log says
