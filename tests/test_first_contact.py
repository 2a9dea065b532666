"""What a new user meets in the first hour (issue 14): framework subpackages reached from
``import runstate``, the demo without matplotlib, a tied-weight model read without runstate,
and the README's "Where to save in the loop" rules, each run as printed."""

from __future__ import annotations

import os
import pkgutil
import re
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import runstate

ROOT = Path(__file__).resolve().parents[1]
# One intra-op thread: on a busy machine two threads of a tiny model mostly wait for each other.
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
FRAMEWORKS = {"torch", "keras", "jax", "tensorflow", "flax", "optax", "numpy", "lightning", "hf"}


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def python_blocks(section: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", section, re.S)


# 14.2: runstate.torch / runstate.keras after a plain `import runstate`.


def test_framework_subpackages_resolve_on_attribute_access() -> None:
    code = textwrap.dedent(
        """
        import sys
        import runstate
        heavy = {"torch", "keras", "tensorflow", "jax", "torchdata", "lightning"} & set(sys.modules)
        assert not heavy, f"import runstate imported {sorted(heavy)}"
        assert {"torch", "keras"} <= set(dir(runstate)), dir(runstate)
        assert not hasattr(runstate, "no_such_thing")
        loader = runstate.torch.resumable_loader(list(range(8)), batch_size=4, seed=0)
        print("torch", sorted(i for batch in loader for i in batch.tolist()) == list(range(8)), "torch" in sys.modules)
        assert "keras" not in sys.modules
        print("keras", runstate.keras.Checkpoint.__name__, runstate.keras.State.__name__)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env={**ENV, "KERAS_BACKEND": "torch"}, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["torch True True", "keras Checkpoint State"]


def test_every_framework_subpackage_is_lazily_reachable() -> None:
    # A new subpackage named after a framework (runstate.jax...) must be added to the lazy list.
    named_after_a_framework = {m.name for m in pkgutil.iter_modules(runstate.__path__)} & FRAMEWORKS
    assert named_after_a_framework == set(runstate._FRAMEWORK_SUBPACKAGES)
    with pytest.raises(AttributeError, match="module 'runstate' has no attribute 'nope'"):
        runstate.nope  # type: ignore[attr-defined]


# 14.3: `runstate demo` installed without matplotlib (runstate[torch,cli]).


@pytest.mark.e2e
def test_demo_without_matplotlib_finishes_and_says_how_to_get_the_picture(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['matplotlib'] = None  # as if it were not installed\n"
        "from runstate.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    # 100 steps, seed 0: the SIGKILL comes at step 42, after the checkpoint at step 25.
    args = ["demo", "--steps", "100", "--seed", "0", "--out", str(tmp_path / "demo")]
    proc = subprocess.run([sys.executable, "-c", code, *args], env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    hints = [line for line in proc.stdout.splitlines() if "matplotlib" in line and "output in" not in line]
    expected = "loss curves: not drawn, matplotlib is not installed (pip install 'runstate[demo]' draws them)"
    assert hints == [expected], proc.stdout
    assert "OK: (b) is bit-identical to (a)" in proc.stdout
    assert not (tmp_path / "demo" / "loss.png").exists()


def test_readme_and_package_name_the_demo_extra() -> None:
    assert "pip install 'runstate[demo]'" in (ROOT / "README.md").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    demo_extra = re.search(r"^demo = \[(.*)\]$", pyproject, re.M)
    assert demo_extra and "matplotlib" in demo_extra.group(1)


# 14.4: a tied-weight model's file read without runstate, as the README prints it.


class TinyGPT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(11, 8)
        self.ln_f = nn.LayerNorm(8)
        self.lm_head = nn.Linear(8, 11, bias=False)
        self.lm_head.weight = self.wte.weight


def test_readme_reads_a_tied_weight_model_without_runstate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import load_file

    (block,) = [b for b in python_blocks(readme_section("Safe and checkable")) if "load_model" in b]
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    trained = TinyGPT()
    runstate.save(tmp_path / "ckpt", {"model": trained}, step=1)
    with pytest.raises(RuntimeError, match="Missing key"):  # what the README says does not work
        TinyGPT().load_state_dict(load_file("ckpt/model.safetensors"))
    model = TinyGPT()
    exec(block, {"model": model})
    assert model.lm_head.weight is model.wte.weight
    for (name, value), (_, expected) in zip(model.state_dict().items(), trained.state_dict().items()):
        assert torch.equal(value, expected), name
    model.ln_f = nn.Linear(8, 8)  # any other difference is still an error
    with pytest.raises(RuntimeError, match="ln_f"):
        exec(block, {"model": model})


# 14.12: the README's "Where to save in the loop": the loop resumes exactly after a SIGKILL;
# each rule broken makes it differ.

KILL_AT = 47  # not a save step: the resume starts from step 40, where an evaluation ran

KILLER = textwrap.dedent(
    f"""
    import os, signal, runstate
    _save = runstate.CheckpointManager.save
    def _save_then_die(self, step, *args, **kwargs):
        written = _save(self, step, *args, **kwargs)
        if step == {KILL_AT} and os.environ.get("KILL") == "1":
            os.kill(os.getpid(), signal.SIGKILL)
        return written
    runstate.CheckpointManager.save = _save_then_die
    """
)
DIGEST = "\nprint('params', torch.cat([p.detach().flatten() for p in model.parameters()]).numpy().tobytes().hex())\n"


def loop_block() -> str:
    return python_blocks(readme_section("Where to save in the loop"))[0]


def test_where_to_save_rules_are_lines_of_the_tested_loop() -> None:
    loop, *rules = python_blocks(readme_section("Where to save in the loop"))
    assert len(rules) == 3
    lines = {line.strip() for line in loop.splitlines()}
    for rule in rules:
        for line in rule.strip().splitlines():
            assert line.strip() in lines, line


@pytest.mark.e2e
def test_where_to_save_loop_sigkilled_and_run_again_is_bit_identical(tmp_path: Path) -> None:
    def run(cwd: Path, kill: bool) -> subprocess.CompletedProcess[str]:
        cwd.mkdir(exist_ok=True)
        env = {**ENV, "KILL": "1" if kill else "0"}
        return subprocess.run(
            [sys.executable, "-c", KILLER + loop_block() + DIGEST], cwd=cwd, env=env, capture_output=True, text=True
        )

    uninterrupted = run(tmp_path / "a", kill=False)
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    killed = run(tmp_path / "b", kill=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = run(tmp_path / "b", kill=False)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.splitlines()[-1] == uninterrupted.stdout.splitlines()[-1]
    assert "step 40: eval loss" not in resumed.stdout and "step 60: eval loss" in resumed.stdout


class Crash(Exception):
    pass


def run_in_process(code: str, cwd: Path, monkeypatch: pytest.MonkeyPatch, *, crash: bool) -> bytes:
    """Run the loop here (crashed at step KILL_AT and run again when ``crash``): its final parameters."""
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    save = runstate.CheckpointManager.save

    def save_then_crash(self: runstate.CheckpointManager, step: int, *args: Any, **kwargs: Any) -> bool:
        written = save(self, step, *args, **kwargs)
        if crash and step == KILL_AT:
            raise Crash
        return written

    with monkeypatch.context() as patch:
        patch.setattr(runstate.CheckpointManager, "save", save_then_crash)
        if crash:
            with pytest.raises(Crash):
                exec(code, {"__name__": "__loop__"})
            crash = False
        scope: dict[str, Any] = {"__name__": "__loop__"}
        exec(code, scope)
    return b"".join(p.detach().numpy().tobytes() for p in scope["model"].parameters())


@pytest.fixture
def own_torch() -> Iterator[None]:
    """One intra-op thread while the loop runs here; the RNGs as they were afterwards."""
    rng, threads = runstate.RNG(), torch.get_num_threads()
    saved = rng.state_dict()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    rng.load_state_dict(saved)


EVAL = '        if step % 20 == 0:\n            print(f"step {step}: eval loss {evaluate():.4f}")  # random numbers: before the save\n'
SAVE = "        mgr.save(step, state)  # the last thing in the step\n"
UPDATE = "state.update(batch=batch, tokens=tokens, loss_ema=loss_ema)"
BROKEN = {
    "1: evaluation after the save": lambda code: code.replace(EVAL, "").replace(SAVE, SAVE + EVAL),
    "2: prefetched batch not in the state": lambda code: code.replace(UPDATE, "state.update(tokens=tokens, loss_ema=loss_ema)"),
    "3: counter not copied into the state": lambda code: code.replace(UPDATE, "state.update(batch=batch, loss_ema=loss_ema)"),
}  # fmt: skip


@pytest.mark.usefixtures("own_torch")
def test_where_to_save_each_rule_broken_changes_the_resumed_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop = loop_block()
    reference = run_in_process(loop, tmp_path / "reference", monkeypatch, crash=False)
    # The harness itself changes nothing: the loop as printed, crashed and run again, is exact.
    assert run_in_process(loop, tmp_path / "control", monkeypatch, crash=True) == reference
    for rule, broken in BROKEN.items():
        code = broken(loop)
        assert code != loop, rule
        # Not interrupted, the broken loop is the same run (rule 1 moves the evaluation, rules 2
        # and 3 change only what is saved); crashed and resumed, it is another run.
        assert run_in_process(code, tmp_path / f"{rule[0]}-whole", monkeypatch, crash=False) == reference, rule
        assert run_in_process(code, tmp_path / f"{rule[0]}-resumed", monkeypatch, crash=True) != reference, rule
