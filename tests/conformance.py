"""The conformance suite every framework adapter inherits.

A family (PyTorch, Keras on each backend, JAX + optax, a custom framework) subclasses
:class:`Conformance` in its own test file and implements the hooks: build a training state,
train it a few steps, list every number it holds, build a state that does not match, and name
a training job to run in subprocesses. It then gets, for free:

* an in-process round trip that restores every value bit for bit, with the same structure,
  after which training continues identically (negative control: before the restore the
  values differ);
* restore-in-place semantics: stateful objects are the same objects after the restore,
  immutable values (JAX) are replaced in the ``state`` dict;
* a strict mismatch that raises ``StateMismatchError`` and changes nothing;
* no pickle anywhere: only ``manifest.json`` and safetensors files, loadable with pickle
  disabled;
* a real subprocess that is SIGKILLed mid-run and resumed: the losses after the resume point
  and the final values are bit-identical to an uninterrupted run, and a resume that leaves part
  of the state out (the family's negative control) is not.

The subprocess job takes ``RUN_DIR OUT_DIR [--kill-at STEP] [--resume full|<negative>]``,
appends ``{"step", "loss"}`` (loss as ``float.hex``) to ``OUT_DIR/losses.jsonl`` for every
step, saves every ``save_every`` steps, SIGKILLs itself right after step ``--kill-at`` and its
save, and, when it finishes, writes its final values to ``OUT_DIR/final.safetensors`` with
safetensors directly (not through runstate).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from safetensors.numpy import load_file

import runstate

ROOT = Path(__file__).resolve().parents[1]


def same_values(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> list[str]:
    """Names whose arrays differ in dtype, shape or any bit; empty when all are identical."""
    if a.keys() != b.keys():
        return sorted(a.keys() ^ b.keys())
    return [k for k in a if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or a[k].tobytes() != b[k].tobytes()]


def structure(value: Any) -> Any:
    """A comparable description of a state's shape: containers, types, array shapes and dtypes."""
    if isinstance(value, dict):
        return (type(value).__name__, [(k, structure(v)) for k, v in value.items()])
    if isinstance(value, tuple) and hasattr(type(value), "_fields"):
        return (type(value).__qualname__, type(value)._fields, [structure(v) for v in value])
    if type(value) in (list, tuple):
        return (type(value).__name__, [structure(v) for v in value])
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return (type(value).__name__, tuple(value.shape), str(value.dtype))
    return type(value).__qualname__


class Conformance:
    """Inherit, implement the hooks, and every test below runs for the family."""

    #: items whose live object must be the very same object after a restore (restored in place)
    in_place_items: ClassVar[tuple[str, ...]] = ()
    #: the job's ``--resume`` value that leaves part of the state out: must NOT resume exactly
    negative_resume: ClassVar[str] = ""
    #: the job saves every ``save_every`` steps and runs ``total_steps``
    save_every: ClassVar[int] = 4
    total_steps: ClassVar[int] = 0
    #: the job is killed right after this step (not a multiple of ``save_every``: mid-cadence)
    kill_at: ClassVar[int] = 0
    #: seconds a job may take
    job_timeout: ClassVar[int] = 300
    #: the name of the adapter (``runstate.adapters``) the family's values go through
    adapter: ClassVar[str] = "numpy"

    # -- hooks ---------------------------------------------------------------------------
    def make_state(self, seed: int) -> dict[str, Any]:
        """A training state, already trained a little, that differs for each seed."""
        raise NotImplementedError

    def train(self, state: dict[str, Any], steps: int) -> dict[str, Any]:
        """Train ``steps`` steps; return the state (the same dict)."""
        raise NotImplementedError

    def values(self, state: dict[str, Any]) -> dict[str, np.ndarray]:
        """Every number the state holds (weights, optimizer moments, counters, RNG states)."""
        raise NotImplementedError

    def mismatched_state(self) -> dict[str, Any]:
        """A state with the same items as ``make_state`` but a tensor of another shape."""
        raise NotImplementedError

    def job_command(self) -> list[str]:
        """The job's command line up to (not including) ``RUN_DIR OUT_DIR``."""
        raise NotImplementedError

    def job_env(self) -> dict[str, str]:
        """Extra environment for the job."""
        return {}

    # -- in-process tests ----------------------------------------------------------------
    def test_round_trip_restores_every_value(self, tmp_path: Path) -> None:
        saved = self.make_state(0)
        runstate.save(tmp_path / "ck", saved)
        target = self.make_state(1)
        assert same_values(self.values(saved), self.values(target)), "seeds 0 and 1 must differ (negative control)"
        runstate.load(tmp_path / "ck", target)
        assert same_values(self.values(saved), self.values(target)) == []
        assert structure(target) == structure(saved)

    def test_the_round_trip_goes_through_the_family_adapter(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        from runstate import adapters

        saved = self.make_state(0)
        active = {a.name: a for a in adapters.active_adapters()}
        assert self.adapter in active, f"the {self.adapter} adapter is not active: {sorted(active)}"
        inner = active[self.adapter]
        module = next(m for m, a in adapters._loaded.items() if a is inner)
        calls: set[str] = set()

        class Counting:  # the family's adapter, noting which of its methods the core calls
            def __getattr__(self, name: str) -> Any:
                attr = getattr(inner, name)
                if not callable(attr):
                    return attr
                return lambda *a, **k: (calls.add(name), attr(*a, **k))[1]

        monkeypatch.setitem(adapters._loaded, module, Counting())
        runstate.save(tmp_path / "ck", saved)
        runstate.load(tmp_path / "ck", self.make_state(1))
        assert {"tensor_codec", "item_extras", "versions", "place_like"} <= calls, sorted(calls)

    def test_training_continues_identically_after_restore(self, tmp_path: Path) -> None:
        saved = self.make_state(0)
        runstate.save(tmp_path / "ck", saved)
        target = self.make_state(1)
        runstate.load(tmp_path / "ck", target)
        self.train(saved, 3)
        self.train(target, 3)
        assert same_values(self.values(saved), self.values(target)) == []

    def test_restore_is_in_place_for_stateful_items(self, tmp_path: Path) -> None:
        runstate.save(tmp_path / "ck", self.make_state(0))
        target = self.make_state(1)
        before = {k: id(v) for k, v in target.items()}
        runstate.load(tmp_path / "ck", target)
        for key in self.in_place_items:
            assert id(target[key]) == before[key], f"{key} was replaced, not restored in place"
        assert target.keys() == before.keys()

    def test_strict_mismatch_raises_and_changes_nothing(self, tmp_path: Path) -> None:
        runstate.save(tmp_path / "ck", self.make_state(0))
        target = self.mismatched_state()
        before = self.values(target)
        with pytest.raises(runstate.StateMismatchError, match=r"shape|structure"):
            runstate.load(tmp_path / "ck", target)
        assert same_values(before, self.values(target)) == []

    def test_checkpoint_holds_no_pickle_and_loads_without_it(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        saved = self.make_state(0)
        runstate.save(tmp_path / "ck", saved)
        names = sorted(p.name for p in (tmp_path / "ck").iterdir())
        assert "manifest.json" in names
        assert all(n == "manifest.json" or n.endswith(".safetensors") for n in names), names
        for p in (tmp_path / "ck").iterdir():
            head = p.read_bytes()[:4]
            assert not (head[:1] == b"\x80" and 2 <= head[1] <= 5), f"{p.name} starts like a pickle"
            assert head != b"PK\x03\x04", f"{p.name} is a zip (torch.save format)"

        def refuse(*_a: Any, **_k: Any) -> Any:
            raise AssertionError("pickle was used")

        for name in ("load", "loads", "Unpickler"):
            monkeypatch.setattr(pickle, name, refuse)
        target = self.make_state(1)
        runstate.load(tmp_path / "ck", target)
        assert same_values(self.values(saved), self.values(target)) == []

    # -- subprocess test -----------------------------------------------------------------
    def run_job(self, run_dir: Path, out_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]), "PYTHONWARNINGS": "ignore"}
        env.update(self.job_env())
        return subprocess.run(
            [*self.job_command(), str(run_dir), str(out_dir), *extra],
            capture_output=True,
            text=True,
            timeout=self.job_timeout,
            env=env,
            check=False,
        )

    @staticmethod
    def losses(out_dir: Path) -> dict[int, str]:
        out: dict[int, str] = {}
        for line in (out_dir / "losses.jsonl").read_text().splitlines():
            rec = json.loads(line)
            out[rec["step"]] = rec["loss"]  # a resumed run's record for the same step wins
        return out

    @pytest.mark.e2e
    def test_sigkill_and_resume_is_bit_identical(self, tmp_path: Path) -> None:
        assert self.kill_at % self.save_every != 0 and self.save_every < self.kill_at < self.total_steps
        ref = self.run_job(tmp_path / "ref-run", tmp_path / "ref")
        assert ref.returncode == 0, ref.stderr[-3000:]

        run_dir, out_dir = tmp_path / "run", tmp_path / "out"
        killed = self.run_job(run_dir, out_dir, "--kill-at", str(self.kill_at))
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
        assert not (out_dir / "final.safetensors").exists()
        resume_step = self.kill_at - self.kill_at % self.save_every
        assert max(int(p.name.split("-")[1]) for p in run_dir.glob("step-*")) == resume_step
        shutil.copytree(run_dir, tmp_path / "neg-run")
        shutil.copytree(out_dir, tmp_path / "neg")

        resumed = self.run_job(run_dir, out_dir, "--resume", "full")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        ref_losses, got = self.losses(tmp_path / "ref"), self.losses(out_dir)
        assert sorted(got) == list(range(1, self.total_steps + 1))
        diverged = [s for s in range(resume_step + 1, self.total_steps + 1) if got[s] != ref_losses[s]]
        assert not diverged, f"losses differ after resuming at {resume_step}: first at step {diverged[0]}"
        final_ref = load_file(tmp_path / "ref" / "final.safetensors")
        assert same_values(final_ref, load_file(out_dir / "final.safetensors")) == []

        # Negative control: the same kill point, resumed without part of the state.
        partial = self.run_job(tmp_path / "neg-run", tmp_path / "neg", "--resume", self.negative_resume)
        assert partial.returncode == 0, partial.stderr[-3000:]
        assert same_values(final_ref, load_file(tmp_path / "neg" / "final.safetensors")), (
            f"resuming with {self.negative_resume!r} unexpectedly matched"
        )
