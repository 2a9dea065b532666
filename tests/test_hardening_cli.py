"""The command line against hostile or unusual checkpoints, and the first-hour paper cuts.

Issue 13 (hardening): names carrying terminal escape sequences are printed escaped (16);
one name per step, so an unpadded ``step-1200`` is never listed as a checkpoint it is not
(21); no traceback whatever the input, with a documented exit code for the unexpected (24);
``diff`` compares floats by their bits, values and tensors alike (26). Issue 14 (first
contact): ``diff --ignore`` (7); a run directory plus ``--step N|latest`` (9); the usual
step counters of ``torch.save`` checkpoints (10).

Every command runs as a real process through ``python -m runstate``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import runstate
from runstate.cli.diff import same_value
from tests.test_cli import one_error_line

#: Sequences a hostile name could carry: an OSC 52 clipboard write, a carriage return and an
#: erase-line (hiding what came before), a bidi override, a C1 control (CSI), DEL.
OSC52 = "\x1b]52;c;cm0gLXJmIH4=\x07"
ERASE = "\r\x1b[2K"
HOSTILE = ["\x1b", "\r", "\x07", "\u202e", "\x9b", "\x7f"]


def run(*args: Any, plain: bool = False) -> subprocess.CompletedProcess[str]:
    """Run the CLI in a new process (``plain``: as if rich were not installed)."""
    if plain:
        code = "import sys; sys.modules['rich'] = None\nfrom runstate.cli import main\nsys.exit(main(sys.argv[1:]))\n"
        cmd = [sys.executable, "-c", code]
    else:
        cmd = [sys.executable, "-m", "runstate"]
    return subprocess.run(
        [*cmd, *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        timeout=300,
    )



def assert_no_control(text: str) -> None:
    for char in HOSTILE:
        assert char not in text, (char, text)


def ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / f"step-{step:012d}"


# --- 13.16: terminal escape injection ----------------------------------------------------


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run (its directory name too) whose item, tensor and metric names carry escape sequences."""
    directory = tmp_path_factory.mktemp("hostile") / f"run{ERASE}x"
    with runstate.CheckpointManager(directory, keep_last=None) as mgr:
        for step in (1, 2):
            state = {
                f"model{OSC52}": {f"w{ERASE}": np.full(3, float(step)), "b\u202eevil": np.zeros(2)},
                f"cfg{ERASE}": {"k\x9bx\x7f": step},
            }
            mgr.save(step, state, metrics={f"loss{OSC52}": 1.0 / step})
    return directory


@pytest.mark.parametrize("plain", [False, True], ids=["rich", "plain"])
def test_names_with_escape_sequences_are_printed_escaped(hostile_run: Path, plain: bool) -> None:
    outputs = [
        run("ls", hostile_run, plain=plain),
        run("show", ckpt(hostile_run, 2), "--tensors", plain=plain),
        run("diff", ckpt(hostile_run, 1), ckpt(hostile_run, 2), plain=plain),
        run("verify", hostile_run, plain=plain),
    ]
    for proc in outputs:
        assert proc.returncode in (0, 1), proc.stderr
        assert_no_control(proc.stdout + proc.stderr)
    ls, show, diff, verify = (p.stdout for p in outputs)
    escaped_osc = "\\x1b]52;c;cm0gLXJmIH4=\\x07"
    assert f"loss{escaped_osc}=0.5" in ls and "run\\r\\x1b[2Kx" in ls
    assert f"model{escaped_osc}" in show and "w\\r\\x1b[2K" in show and "b\\u202eevil" in show
    assert f"model{escaped_osc}.w\\r\\x1b[2K" in diff and "k\\x9bx\\x7f" in diff
    assert diff.count("changed") >= 2 and "OK " in verify
    # an error line that names one of them is escaped too
    proc = run("export", ckpt(hostile_run, 2), f"nope{OSC52}", "-o", hostile_run.parent / "x.safetensors")
    assert_no_control(one_error_line(proc, 2, f"no item 'nope{escaped_osc}'"))


def test_json_keeps_the_names_exact(hostile_run: Path) -> None:
    shown = json.loads(run("show", ckpt(hostile_run, 2), "--tensors", "--json").stdout)
    assert [i["name"] for i in shown["items"]] == [f"model{OSC52}", f"cfg{ERASE}"]
    assert {t["name"] for t in shown["tensors"]} == {f"w{ERASE}", "b\u202eevil"}
    assert list(shown["metrics"]) == [f"loss{OSC52}"]
    listed = json.loads(run("ls", hostile_run, "--json").stdout)
    assert listed["directory"] == str(hostile_run)
    diffed = json.loads(run("diff", ckpt(hostile_run, 1), ckpt(hostile_run, 2), "--json").stdout)
    assert f"cfg{ERASE}.k\x9bx\x7f" in {v["path"] for v in diffed["values"]}


def test_a_damaged_tensor_with_a_hostile_name_is_reported_escaped(hostile_run: Path, tmp_path: Path) -> None:
    damaged = tmp_path / f"damaged{ERASE}"
    shutil.copytree(ckpt(hostile_run, 2), damaged)
    (weights,) = [p for p in damaged.iterdir() if p.suffix == ".safetensors" and "model" in p.name]
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    proc = run("verify", damaged)
    assert proc.returncode == 1 and "checksum mismatch" in proc.stdout
    assert_no_control(proc.stdout + proc.stderr)


# --- 13.24: no traceback, whatever the input ---------------------------------------------


def test_integers_too_long_to_print_in_decimal(tmp_path: Path) -> None:
    big = 10**5000
    with runstate.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, {"x": big, "w": np.zeros(2)}, metrics={"big": big})
        mgr.save(2, {"x": big + 1, "w": np.zeros(2)}, metrics={"big": -big})
    run_dir = tmp_path / "run"
    ls = run("ls", run_dir)
    assert ls.returncode == 0 and "Traceback" not in ls.stderr, ls.stderr
    assert "big=~1e+5000 (5001 digits)" in ls.stdout and "big=~-1e+5000 (5001 digits)" in ls.stdout
    show = run("show", ckpt(run_dir, 1))
    assert show.returncode == 0, show.stderr
    assert "~1e+5000 (5001 digits)" in show.stdout
    data = json.loads(run("show", ckpt(run_dir, 1), "--json").stdout)
    assert int(data["metrics"]["big"], 16) == big  # exact, as hex: decimal would exceed Python's limit
    diff = run("diff", ckpt(run_dir, 1), ckpt(run_dir, 2))
    assert diff.returncode == 1 and "Traceback" not in diff.stderr, diff.stderr
    (row,) = [line for line in diff.stdout.splitlines() if line.startswith("x ")]
    assert row.split()[1:] == ["changed", "~1e+5000", "(5001", "digits)", "~1e+5000", "(5001", "digits)"]
    diffed = json.loads(run("diff", ckpt(run_dir, 1), ckpt(run_dir, 2), "--json").stdout)
    assert [v["path"] for v in diffed["values"]] == ["x"]


def test_export_of_a_complex128_tensor_is_a_one_line_error(tmp_path: Path) -> None:
    runstate.save(tmp_path / "c", {"w": np.arange(3, dtype=np.complex128), "z": np.ones(2, dtype=np.complex64)})
    out = tmp_path / "w.safetensors"
    one_error_line(run("export", tmp_path / "c", "w", "-o", out), 2, "tensor 'w' is complex128", "cannot store")
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["c"]  # no temporary left behind
    proc = run("export", tmp_path / "c", "z", "-o", out)  # complex64 it can
    assert proc.returncode == 0, proc.stderr


def test_an_unexpected_error_is_one_line_with_exit_code_3(tmp_path: Path) -> None:
    """A bug in a command (simulated: describe() raising) still ends in one line; --debug shows where."""
    runstate.save(tmp_path / "c", {"w": np.zeros(2)})
    code = (
        "import sys\n"
        "import runstate.cli.show as show\n"
        "def broken(*args, **kwargs):\n"
        "    raise RuntimeError('boom')\n"
        "show.describe = broken\n"
        "from runstate.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)

    line = one_error_line(cli("show", str(tmp_path / "c")), 3, "unexpected RuntimeError: boom", "--debug")
    assert line.startswith("runstate show: error: ")
    for args in (["show", str(tmp_path / "c"), "--debug"], ["--debug", "show", str(tmp_path / "c")]):
        proc = cli(*args)
        assert proc.returncode == 3 and "Traceback" in proc.stderr and "in broken" in proc.stderr
        assert proc.stderr.strip().splitlines()[-1] == "runstate show: error: unexpected RuntimeError: boom"


# --- 13.26: diff compares floats by their bits -------------------------------------------


def test_diff_compares_float_values_by_their_bits_like_tensors(tmp_path: Path) -> None:
    nan = float("nan")
    runstate.save(tmp_path / "a", {"v": 0.0, "n": nan, "c": {"x": [1.5, 0.0]}, "t": np.zeros(2)})
    runstate.save(tmp_path / "b", {"v": -0.0, "n": nan, "c": {"x": [1.5, -0.0]}, "t": -np.zeros(2)})
    proc = run("diff", tmp_path / "a", tmp_path / "b", "--json")
    assert proc.returncode == 1, proc.stderr
    d = json.loads(proc.stdout)
    assert {v["path"]: (v["a"], v["b"]) for v in d["values"]} == {"v": ("0.0", "-0.0"), "c.x.1": ("0.0", "-0.0")}
    (t,) = d["tensors"]
    assert t["status"] == "changed"  # the tensor and the value answer alike
    # the same NaN is the same value (as the same NaN tensor is the same tensor)
    runstate.save(tmp_path / "c", {"n": nan, "t": np.array([nan])})
    runstate.save(tmp_path / "d", {"n": nan, "t": np.array([nan])})
    proc = run("diff", tmp_path / "c", tmp_path / "d")
    assert proc.returncode == 0 and "the checkpoints are equal" in proc.stdout, proc.stdout + proc.stderr


def test_same_value_is_bitwise_for_floats() -> None:
    quiet, payload = float("nan"), struct.unpack("<d", struct.pack("<Q", 0x7FF8000000000001))[0]
    assert same_value(quiet, quiet) and not same_value(quiet, payload)
    assert not same_value(0.0, -0.0) and same_value(-0.0, -0.0)
    assert not same_value(complex(0.0, 1.0), complex(-0.0, 1.0)) and same_value(1j, 1j)
    assert not same_value(1, 1.0) and not same_value(True, 1) and same_value("a", "a")


# --- 14.7: diff --ignore ------------------------------------------------------------------


def _config_run(path: Path, out_dir: str) -> None:
    state = {"model": {"w": np.arange(4.0)}, "shuffle": random.Random(), "config": {"out_dir": out_dir, "lr": 0.1}}
    runstate.save(path, state, step=10)


def test_diff_ignore_confirms_two_runs_equal_apart_from_chosen_items(tmp_path: Path) -> None:
    _config_run(tmp_path / "a", "runs/a")
    _config_run(tmp_path / "b", "runs/b")  # an unseeded Python generator and another out_dir
    proc = run("diff", tmp_path / "a", tmp_path / "b")
    assert proc.returncode == 1 and "config.out_dir" in proc.stdout and "shuffle." in proc.stdout
    proc = run("diff", tmp_path / "a", tmp_path / "b", "--ignore", "shuffle", "--ignore", "config.out_dir")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ignored (2): shuffle, config.out_dir" in proc.stdout
    assert "the checkpoints are equal (apart from what --ignore left out)" in proc.stdout
    # item/key form and globs; a pattern that matches nothing is named
    proc = run("diff", tmp_path / "a", tmp_path / "b", "--ignore", "shuf*", "--ignore", "config/out_*", "--json")
    d = json.loads(proc.stdout)
    assert proc.returncode == 0 and d["equal"] and d["ignored"] == ["shuffle", "config.out_dir"]
    assert d["unmatched_ignore"] == [] and d["ignore"] == ["shuf*", "config/out_*"]
    proc = run("diff", tmp_path / "a", tmp_path / "b", "--ignore", "shuffle", "--ignore", "config.outdir")
    assert proc.returncode == 1 and "note: --ignore 'config.outdir' matched nothing" in proc.stdout
    # ignoring does not hide anything else: the model still counts
    runstate.save(tmp_path / "c", {"model": {"w": np.arange(4.0) + 1}, "shuffle": random.Random(), "config": {}})
    proc = run("diff", tmp_path / "a", tmp_path / "c", "--ignore", "shuffle", "--ignore", "config")
    assert proc.returncode == 1 and "model.w" in proc.stdout


# --- 14.9: a run directory plus --step ---------------------------------------------------


@pytest.fixture(scope="module")
def steps_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("steps") / "run"
    with runstate.CheckpointManager(directory, keep_last=None) as mgr:
        for step in (100, 200, 300):
            mgr.save(step, {"model": {"w": np.full(2, float(step))}, "epoch": step // 100})
    return directory


def test_show_verify_export_take_a_run_directory_and_a_step(steps_run: Path, tmp_path: Path) -> None:
    assert json.loads(run("show", steps_run, "--step", "latest", "--json").stdout)["step"] == 300
    assert json.loads(run("show", steps_run, "--step", "200", "--json").stdout)["step"] == 200
    proc = run("verify", steps_run, "--step", "latest")
    assert proc.returncode == 0 and proc.stdout.splitlines()[0].startswith(f"OK      {ckpt(steps_run, 300)}")
    assert proc.stdout.count("OK ") == 1
    out = tmp_path / "w.safetensors"
    proc = run("export", steps_run, "model", "--step", "100", "-o", out)
    assert proc.returncode == 0, proc.stderr
    from safetensors.numpy import load_file

    assert load_file(out)["w"].tolist() == [100.0, 100.0]


def test_diff_takes_run_directories_and_steps(steps_run: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(steps_run, other)
    proc = run("diff", steps_run, other, "--step", "latest")
    assert proc.returncode == 0 and f"A  {ckpt(steps_run, 300)}  (step 300)" in proc.stdout
    d = json.loads(run("diff", steps_run, steps_run, "--step-a", "100", "--step-b", "latest", "--json").stdout)
    assert (d["a"]["step"], d["b"]["step"]) == (100, 300) and not d["equal"]
    # --step applies to the run directory; a checkpoint given as the other side is used as given
    d = json.loads(run("diff", ckpt(steps_run, 200), other, "--step", "200", "--json").stdout)
    assert (d["a"]["step"], d["b"]["step"]) == (200, 200) and d["equal"]


def test_step_errors_are_one_line(steps_run: Path) -> None:
    one_error_line(run("show", steps_run, "--step", "7"), 2, "no checkpoint of step 7", "100, 200, 300")
    one_error_line(run("show", ckpt(steps_run, 100), "--step", "100"), 2, "is a checkpoint", "--step")
    one_error_line(run("verify", steps_run.parent / "nope", "--step", "latest"), 2, "no such run directory")
    one_error_line(run("diff", steps_run, steps_run, "--step-a", "5"), 2, "no checkpoint of step 5")
    proc = run("diff", ckpt(steps_run, 100), ckpt(steps_run, 200), "--step", "latest")
    one_error_line(proc, 2, "--step picks a step of A or B where it is a run directory")
    line = one_error_line(run("show", steps_run), 2, "is a run directory", "--step latest")
    assert str(ckpt(steps_run, 300)) in line
    empty = steps_run.parent / "empty"
    empty.mkdir()
    one_error_line(run("export", empty, "model", "--step", "latest", "-o", empty / "x"), 2, "no committed checkpoint")
    proc = run("show", steps_run, "--step", "-1")
    assert proc.returncode == 2 and "expected a step number >= 0 or 'latest'" in proc.stderr


# --- 13.21: one name per step --------------------------------------------------------------


def test_unpadded_step_directories_are_not_checkpoints_of_the_run(steps_run: Path, tmp_path: Path) -> None:
    """step-400 (as `runstate import -o run/step-400` used to write) was listed as step 400 but read
    as step-000000000400: an intact checkpoint called damaged, and the newest "step" of the run."""
    run_dir = tmp_path / "run"
    shutil.copytree(steps_run, run_dir)
    for name in ("step-400", "step-0000000000500", "step-000000000600\n"):
        shutil.copytree(ckpt(steps_run, 300), run_dir / name)
    with runstate.CheckpointManager(run_dir, read_only=True) as mgr:
        assert mgr.steps() == [100, 200, 300] and mgr.latest_step() == 300
        state: dict[str, Any] = {"model": {"w": np.zeros(2)}, "epoch": 0}
        assert mgr.restore(state) == 300 and state["epoch"] == 3
    assert not [p for p in os.listdir(run_dir) if "corrupt" in p]
    proc = run("verify", run_dir)
    assert proc.returncode == 0 and "3 of 3 checkpoints passed" in proc.stdout, proc.stdout
    proc = run("ls", run_dir)
    assert proc.returncode == 0 and "3 checkpoints (latest step 300)" in proc.stdout
    assert "misnamed: not a name the run reads; rename it to step-000000000400" in proc.stdout
    assert "step-000000000500" in proc.stdout and "2 misnamed" in proc.stdout


def test_import_into_a_run_directory_writes_the_padded_name(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    torch.save({"model": {"w": torch.ones(2)}, "epoch": 1}, tmp_path / "old.pt")
    run_dir = tmp_path / "run"
    proc = run("import", tmp_path / "old.pt", "-o", run_dir / "step-1200")
    assert proc.returncode == 0, proc.stderr
    assert f"into {ckpt(run_dir, 1200)}:" in proc.stdout and "step 1200 (from the output name step-1200)" in proc.stdout
    assert [n for n in os.listdir(run_dir) if not n.startswith(".")] == ["step-000000001200"]
    with runstate.CheckpointManager(run_dir, read_only=True) as mgr:
        assert mgr.steps() == [1200]
    assert run("verify", run_dir).returncode == 0
    one_error_line(run("import", tmp_path / "old.pt", "-o", run_dir / "step-1200"), 2, "already exists")
    proc = run("import", tmp_path / "old.pt", "-o", run_dir / "step-1300", "--step", "5")
    one_error_line(proc, 2, "--step 5 disagrees with the output name step-1300")
    assert [n for n in os.listdir(run_dir) if not n.startswith(".")] == ["step-000000001200"]


# --- 14.10: import recognizes the usual step counters --------------------------------------


def test_import_recognizes_the_usual_step_counters(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    cases: dict[str, tuple[dict[str, Any], int | None, str]] = {
        "nanogpt": ({"iter_num": 2000, "best_val_loss": 1.5, "epoch": 3}, 2000, "from 'iter_num'"),
        "iteration": ({"iteration": 7, "epoch": 1}, 7, "from 'iteration'"),
        "tensor": ({"global_step": torch.tensor(42), "epoch": 1}, 42, "from 'global_step'"),
        "epoch": ({"epoch": 3, "step": -1}, 3, "from 'epoch'; no step counter found"),
        "none": ({"lr": 0.1}, None, "no step, global_step, iter_num, iteration, epoch entry found"),
    }
    for name, (extra, step, said) in cases.items():
        torch.save({"model": {"w": torch.ones(2)}, **extra}, tmp_path / f"{name}.pt")
        proc = run("import", tmp_path / f"{name}.pt", "-o", tmp_path / name)
        assert proc.returncode == 0, proc.stderr
        assert said in proc.stdout, proc.stdout
        assert runstate.inspect(tmp_path / name).step == step
    proc = run("import", tmp_path / "nanogpt.pt", "-o", tmp_path / "given", "--step", "5")
    assert proc.returncode == 0 and "step 5 (from --step)" in proc.stdout
    assert runstate.inspect(tmp_path / "given").step == 5


def test_import_of_a_file_that_is_not_a_torch_save_is_one_line_with_exit_code_2(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    files = {
        "text.pt": (b"hello\n", "KeyError"),  # torch.load raised a bare KeyError: exit 3
        "empty.pt": (b"", "EOFError"),  # the reason was an empty string
        "proto5.pt": (b"\x80\x05K\x01.", "Invalid magic number"),  # torch's UserWarning was a second line
        "index.pt": (b"\x80\x02a\x9b\x91\xff\xc9\x11\xf5|\xce", "cannot read"),  # a bare IndexError
        "struct.pt": (b"\x80\x02X\x91Kf", "cannot read"),  # a bare struct.error
    }
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    for name, (data, said) in files.items():
        (tmp_path / name).write_bytes(data)
        proc = subprocess.run(
            [sys.executable, "-m", "runstate", "import", str(tmp_path / name), "-o", str(tmp_path / f"{name}.out")],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        one_error_line(proc, 2, f"cannot read {tmp_path / name} as a torch.save file: ", said)
        assert not (tmp_path / f"{name}.out").exists()


# --- docs/cli.md, "Comparing two runs": the transcript as printed -------------------------

TRAIN = """
import random, sys
import torch
from torch import nn
import runstate

out = sys.argv[1]
torch.manual_seed(0)  # torch only: Python's and NumPy's global generators stay unseeded
model = nn.Linear(4, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
state = {"model": model, "optimizer": opt, "rng": runstate.RNG(), "config": {"out_dir": out, "lr": 0.1}}
with runstate.CheckpointManager(out) as mgr:
    for step in range(1, 101):
        model(torch.randn(8, 4)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        if step % 50 == 0:
            mgr.save(step, state)
"""


def test_the_comparing_two_runs_transcript_of_the_docs(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    for out in ("runs/a", "runs/b"):
        subprocess.run([sys.executable, "-c", TRAIN, out], cwd=tmp_path, check=True, timeout=300)
    section = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    section = section.split("## Comparing two runs", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("\n```", 1)[0] for b in section.split("```\n")[1::2]]
    assert len(blocks) == 2
    for block in blocks:
        lines = block.strip("\n").splitlines()
        command, expected, code = lines[0], lines[1:-2], int(lines[-1])
        assert command.startswith("$ runstate diff ") and lines[-2] == "$ echo $?"
        args = command.removeprefix("$ runstate ").split()
        proc = subprocess.run(
            [sys.executable, "-m", "runstate", *args], cwd=tmp_path, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == code, proc.stdout + proc.stderr
        got = proc.stdout.rstrip("\n").splitlines()
        assert len(got) == len(expected), proc.stdout
        for want, line in zip(expected, got, strict=True):
            if want.startswith("rng."):  # the unseeded generators' differences are random: compare the rest
                assert want.split()[:4] == line.split()[:4], (want, line)
            else:
                assert want == line


def test_gc_of_a_directory_that_is_not_a_run_leaves_nothing_behind(tmp_path: Path) -> None:
    """Regression: ``runstate gc ~`` (a slip) created ``~/.lock``: gc took the writer lock first."""
    (tmp_path / "notes.txt").write_text("mine")
    proc = run("gc", tmp_path)
    assert proc.returncode == 0 and "no leftovers" in proc.stdout, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
