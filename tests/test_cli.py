"""The ``runstate`` command line, run as a real process on real checkpoints.

Every command goes through the installed entry point in a subprocess (``python -m runstate``,
and the ``runstate`` console script): exit codes, the content of tables and ``--json``, and
one-line errors without a traceback. Commands that never need torch (ls, show, gc) start in
a fraction of a second; the others load torch, so those cases are kept few.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import runstate
import runstate.torch as rt

SCRIPT = Path(sys.executable).with_name("runstate")


def run(*args: Any, script: bool = False, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the CLI in a new process; errors must never show a traceback."""
    cmd = [str(SCRIPT)] if script else [sys.executable, "-m", "runstate"]
    proc = subprocess.run(
        [*cmd, *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        timeout=120,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def run_json(*args: Any) -> Any:
    proc = run(*args, "--json")
    assert proc.returncode in (0, 1), proc.stderr
    return json.loads(proc.stdout)


def one_error_line(proc: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def training_state() -> dict[str, Any]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    loader = rt.resumable_loader(torch.utils.data.TensorDataset(torch.randn(20, 4)), batch_size=4, seed=1)
    return {"model": model, "optimizer": opt, "scheduler": sched, "rng": runstate.RNG(), "loader": loader, "epoch": 0}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run with steps 2 and 4 (lr 0.0025 and 0.000625, 2 and 4 batches into the epoch)."""
    directory = tmp_path_factory.mktemp("cli") / "run"
    state = training_state()
    batches = iter(state["loader"])
    with runstate.CheckpointManager(directory, keep_last=None) as mgr:
        for step in range(1, 5):
            (x,) = next(batches)
            loss = state["model"](x).pow(2).mean()
            loss.backward()
            state["optimizer"].step()
            state["optimizer"].zero_grad()
            state["scheduler"].step()
            if step % 2 == 0:
                mgr.save(step, state, metrics={"loss": round(loss.item(), 4), "phase": "train"})
    return directory


@pytest.fixture
def damaged_run(run_dir: Path, tmp_path: Path) -> Path:
    """A copy of the run plus: step 6 with a flipped tensor byte, step 8 with an edited manifest,
    a leftover of an interrupted save, and a checkpoint the manager moved aside."""
    d = tmp_path / "damaged"
    shutil.copytree(run_dir, d)
    step4 = d / "step-000000000004"
    shutil.copytree(step4, d / "step-000000000006")
    weights = d / "step-000000000006" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x40
    weights.write_bytes(bytes(data))
    shutil.copytree(step4, d / "step-000000000008")
    manifest = d / "step-000000000008" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"step": 4', '"step": 8'))
    leftover = d / ".tmp-step-000000000010-0123456789ab"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"partial")
    shutil.copytree(step4, d / "step-000000000012.corrupt-1700000000")
    return d


def ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / f"step-{step:012d}"


# --- help -------------------------------------------------------------------------------

COMMANDS = ["ls", "show", "verify", "diff", "export", "import", "gc"]


def test_help_lists_every_command_through_the_console_script() -> None:
    assert SCRIPT.exists(), f"the runstate console script is not installed next to {sys.executable}"
    proc = run("--help", script=True)
    assert proc.returncode == 0
    for command in COMMANDS:
        assert f"    {command} " in proc.stdout, command


def test_startup_imports_neither_torch_nor_rich_and_ls_show_never_torch(run_dir: Path) -> None:
    code = (
        "import sys, contextlib, io\n"
        "from runstate.cli import build_parser, main\n"
        "build_parser()\n"
        "print(sorted(m for m in ('torch', 'rich') if m in sys.modules))\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    assert main(['ls', {str(run_dir)!r}]) == 0\n"
        f"    assert main(['show', {str(ckpt(run_dir, 2))!r}]) == 0\n"
        "print('torch' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.split() == ["[]", "False"]


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_explains_its_options(command: str) -> None:
    proc = run(command, "--help")
    assert proc.returncode == 0 and proc.stdout.startswith("usage: runstate " + command)
    expected = {
        "ls": ["--json"],
        "show": ["--tensors", "--json"],
        "verify": ["--json"],
        "diff": ["--atol", "--json"],
        "export": ["--output", "--dtype", "--force"],
        "import": ["--output", "--step"],
        "gc": ["--dry-run", "--json"],
    }[command]
    for option in expected:
        assert option in proc.stdout


# --- ls ----------------------------------------------------------------------------------


def test_ls_table_marks_leftovers_and_corrupt_checkpoints(damaged_run: Path) -> None:
    proc = run("ls", damaged_run, script=True)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if re.match(r" *\d+ +\d{4}-\d\d-\d\d ", line)]
    assert [r.split()[0] for r in rows] == ["2", "4", "6", "8", "10", "12"]
    assert "loss=" in rows[0] and "phase='train'" in rows[0] and rows[0].rstrip().endswith("ok")
    assert "ok" in rows[2]  # ls reads manifests only: a damaged tensor is verify's job
    assert "corrupt: manifest checksum mismatch" in rows[3]
    assert "leftover: interrupted save" in rows[4]
    assert "corrupt: moved aside by restore" in rows[5]
    assert "3 checkpoints (latest step 6), 2 corrupt, 1 leftover" in proc.stdout


def test_ls_json(damaged_run: Path) -> None:
    data = run_json("ls", damaged_run)
    by_step = {(e["step"], e["status"]): e for e in data["checkpoints"]}
    assert sorted(by_step) == [(2, "ok"), (4, "ok"), (6, "ok"), (8, "corrupt"), (10, "leftover"), (12, "corrupt")]
    ok = by_step[(2, "ok")]
    assert ok["metrics"]["phase"] == "train" and isinstance(ok["metrics"]["loss"], float)
    assert ok["nbytes"] == runstate.CheckpointManager(damaged_run, read_only=True).info(2).nbytes
    assert ok["created"] == runstate.CheckpointManager(damaged_run, read_only=True).info(2).created
    assert "checksum mismatch" in by_step[(8, "corrupt")]["reason"]
    assert by_step[(10, "leftover")]["nbytes"] == len(b"partial")


def test_ls_of_an_empty_directory(tmp_path: Path) -> None:
    proc = run("ls", tmp_path)
    assert proc.returncode == 0 and "no checkpoints" in proc.stdout
    assert run_json("ls", tmp_path)["checkpoints"] == []


# --- show --------------------------------------------------------------------------------


def test_show_json_has_the_training_state(run_dir: Path) -> None:
    d = run_json("show", ckpt(run_dir, 2))
    assert d["step"] == 2 and d["metrics"]["phase"] == "train"
    assert d["versions"]["torch"] == torch.__version__ and d["versions"]["runstate"] == runstate.__version__
    items = {i["name"]: i for i in d["items"]}
    assert list(items) == ["model", "optimizer", "scheduler", "rng", "loader", "epoch"]
    assert items["model"]["type"] == "torch.nn.modules.container.Sequential"
    assert (items["model"]["tensors"], items["model"]["nbytes"]) == (4, (8 * 4 + 8 + 2 * 8 + 2) * 4)
    assert items["optimizer"]["tensors"] == 12 and items["epoch"]["value"] == 0
    assert d["dtypes"]["F32"] == {"tensors": 16, "nbytes": 3 * 232 + 4 * 4}  # weights, exp_avg(_sq), steps
    (opt,) = d["optimizers"]
    assert opt["type"] == "torch.optim.adamw.AdamW"
    (group,) = opt["param_groups"]
    assert group["lr"] == pytest.approx(0.0025) and group["initial_lr"] == 0.01
    assert group["betas"] == [0.9, 0.999] and group["weight_decay"] == 0.05 and group["params"] == 4
    (sched,) = d["schedulers"]
    assert sched["type"].endswith("StepLR") and sched["last_lr"] == [pytest.approx(0.0025)]
    assert sched["last_epoch"] == 2
    assert d["rng"]["saved"] and d["rng"]["global"] == [{"item": "rng", "generators": ["python", "numpy", "torch"]}]
    (loader,) = d["loaders"]
    assert loader["batches_yielded"] == 2 and loader["samples_yielded"] == 8
    assert loader["sampler"]["position"] == 8 and loader["sampler"]["epoch"] == 0
    assert "tensors" not in d


def test_show_table_and_tensor_list(run_dir: Path) -> None:
    proc = run("show", ckpt(run_dir, 4), "--tensors")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for pattern in (
        r"^step +4$",
        r"torch\.optim\.adamw\.AdamW, 1 param group",
        r"^lr +0\.000625$",
        r"^weight_decay +0\.05$",
        r"^betas +\(0\.9, 0\.999\)$",
        r"StepLR: last lr 0\.000625 \(last_epoch 4\)",
        r"runstate\.RNG in 'rng': python, numpy, torch",
        r"4 batches into the epoch \(16 samples\); sampler epoch=0 position=16",
    ):
        assert re.search(pattern, out, re.M), pattern
    row = next(line for line in out.splitlines() if line.startswith("model") and "0.weight" in line)
    assert row.split()[2:5] == ["F32", "[8,", "4]"] and "model.safetensors" in row
    d = run_json("show", ckpt(run_dir, 4), "--tensors")
    assert {k: v for k, v in d["tensors"][4].items() if k != "file"} == {
        "item": "optimizer",
        "name": "state.0.step",
        "dtype": "F32",
        "shape": [],
        "nbytes": 4,
    }


def test_show_without_rng_says_so(tmp_path: Path) -> None:
    runstate.save(tmp_path / "c", {"w": np.arange(3.0), "step": 1})
    proc = run("show", tmp_path / "c")
    assert proc.returncode == 0 and "not saved" in proc.stdout and re.search(r"^step +none$", proc.stdout, re.M)


def test_plain_tables_without_rich(damaged_run: Path, run_dir: Path) -> None:
    code = (
        "import sys; sys.modules['rich'] = None\n"  # import rich now fails
        "from runstate.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    for args in (["ls", damaged_run], ["show", ckpt(run_dir, 2)]):
        proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert "─" not in proc.stdout and "------" in proc.stdout
    assert (
        "corrupt: moved aside by restore"
        in subprocess.run([sys.executable, "-c", code, "ls", str(damaged_run)], capture_output=True, text=True).stdout
    )


# --- verify ------------------------------------------------------------------------------


def test_verify_intact_run_and_checkpoint(run_dir: Path) -> None:
    proc = run("verify", run_dir)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("OK ") == 2 and "2 of 2 checkpoints passed" in proc.stdout
    report = run_json("verify", ckpt(run_dir, 2))
    assert report["ok"] and len(report["checkpoints"]) == 1
    n = len(runstate.inspect(ckpt(run_dir, 2)).tensors)  # 16 of the model and AdamW, plus the generators'
    assert n >= 19 and report["checkpoints"][0]["tensors_checked"] == n and report["checkpoints"][0]["problems"] == []


def test_verify_damaged_run_fails_with_each_problem_on_its_line(damaged_run: Path) -> None:
    proc = run("verify", damaged_run)
    assert proc.returncode == 1
    problems = [line.strip() for line in proc.stdout.splitlines() if line.startswith("  ")]
    assert problems == [
        f"{ckpt(damaged_run, 6)}: model.safetensors: tensor '2.bias': checksum mismatch in tensor '2.bias' of "
        "item 'model'; the file is damaged, restore from another checkpoint",
        f"{ckpt(damaged_run, 8)}: manifest.json: manifest checksum mismatch (stored "
        + proc.stdout.split("(stored ")[1].split(")")[0]
        + "); the manifest was edited or damaged, use another checkpoint",
    ]
    assert "2 of 4 checkpoints passed" in proc.stdout and "1 leftover(s)" in proc.stdout
    data = json.loads(run("verify", damaged_run, "--json").stdout)
    assert not data["ok"] and [c["ok"] for c in data["checkpoints"]] == [True, True, False, False]
    assert data["checkpoints"][2]["problems"][0]["tensor"] == "2.bias"


# --- diff --------------------------------------------------------------------------------


def test_diff_of_a_checkpoint_with_itself_is_equal(run_dir: Path) -> None:
    proc = run("diff", ckpt(run_dir, 2), ckpt(run_dir, 2))
    assert proc.returncode == 0, proc.stderr
    n = len(runstate.inspect(ckpt(run_dir, 2)).tensors)
    assert f"{n} equal, 0 changed" in proc.stdout and "the checkpoints are equal" in proc.stdout


def test_diff_reports_changed_tensors_and_values(run_dir: Path) -> None:
    proc = run("diff", ckpt(run_dir, 2), ckpt(run_dir, 4), "--json")
    assert proc.returncode == 1, proc.stderr
    d = json.loads(proc.stdout)
    assert not d["equal"] and (d["a"]["step"], d["b"]["step"]) == (2, 4)
    tensors = {t["path"]: t for t in d["tensors"]}
    a = runstate.load(ckpt(run_dir, 2))["model"]["0.weight"]
    b = runstate.load(ckpt(run_dir, 4))["model"]["0.weight"]
    w = tensors["model.0.weight"]
    assert w["status"] == "changed" and w["max_abs"] == pytest.approx(float((a - b).abs().max()))
    assert w["max_rel"] == pytest.approx(w["max_abs"] / float(a.abs().max()))
    assert tensors["optimizer.state.0.step"]["max_abs"] == 2.0
    assert tensors["rng.torch.cpu"]["status"] == "equal"  # nothing drew from the global generators
    values = {v["path"]: v for v in d["values"]}
    assert values["optimizer.param_groups.0.lr"]["a"] == "0.0025"
    assert values["optimizer.param_groups.0.lr"]["b"] == "0.000625"
    assert (values["loader._num_yielded"]["a"], values["loader._num_yielded"]["b"]) == ("2", "4")
    n = len(runstate.inspect(ckpt(run_dir, 2)).tensors)  # the generators' states are the ones equal
    assert d["counts"] == {"equal": n - 16, "changed": 16, "only in A": 0, "only in B": 0}
    # the human table: a large tolerance makes the tensors equal, the values still differ
    proc = run("diff", ckpt(run_dir, 2), ckpt(run_dir, 4), "--atol", "10")
    assert proc.returncode == 1
    assert f"tensors (atol 10): {n} equal, 0 changed" in proc.stdout
    assert "optimizer.param_groups.0.lr" in proc.stdout and "0.000625" in proc.stdout


def test_diff_only_in_a_or_b_and_tolerance(tmp_path: Path) -> None:
    s = np.float32(2.5)
    runstate.save(tmp_path / "a", {"w": np.array([1.0, 2.0, np.nan]), "s": s, "gone": np.zeros(2), "epoch": 1})
    runstate.save(tmp_path / "b", {"w": np.array([1.0, 2.0 + 1e-9, np.nan]), "s": s, "new": np.ones(1), "epoch": 1})
    d = json.loads(run("diff", tmp_path / "a", tmp_path / "b", "--json").stdout)
    status = {t["path"]: t["status"] for t in d["tensors"]}
    assert status == {"w": "changed", "s": "equal", "gone": "only in A", "new": "only in B"}
    assert d["tensors"][0]["max_abs"] == pytest.approx(1e-9) and d["tensors"][1]["shape"] == []
    proc = run("diff", tmp_path / "a", tmp_path / "b", "--atol", "1e-6")
    assert proc.returncode == 1 and "2 equal, 0 changed, 1 only in A, 1 only in B" in proc.stdout


# --- export ------------------------------------------------------------------------------


def test_export_model_weights_for_inference(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "model.safetensors"
    proc = run("export", ckpt(run_dir, 4), "model", "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert "4 tensors of item 'model'" in proc.stdout
    model = training_state()["model"]
    model.load_state_dict(load_file(out))  # strict: every key, every shape
    stored = runstate.load(ckpt(run_dir, 4))["model"]
    assert all(torch.equal(model.state_dict()[k], stored[k]) for k in stored)
    # bf16, and refusing to overwrite without --force
    proc = run("export", ckpt(run_dir, 4), "model", "-o", out, "--dtype", "bf16")
    one_error_line(proc, 2, "already exists", "--force")
    proc = run("export", ckpt(run_dir, 4), "model", "-o", out, "--dtype", "bf16", "--force")
    assert proc.returncode == 0, proc.stderr
    half = load_file(out)
    assert {t.dtype for t in half.values()} == {torch.bfloat16}
    assert torch.equal(half["0.weight"], stored["0.weight"].to(torch.bfloat16))


def test_export_errors(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.safetensors"
    one_error_line(run("export", ckpt(run_dir, 4), "nope", "-o", out), 2, "no item 'nope'", "model, optimizer")
    one_error_line(run("export", ckpt(run_dir, 4), "epoch", "-o", out), 2, "holds no tensors")
    one_error_line(run("export", run_dir, "model", "-o", out), 2, "is a run directory", "step-000000000004")
    assert not out.exists()


# --- import ------------------------------------------------------------------------------


class Malicious:
    """Unpickling this creates a file: the proof that a pickle ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


def test_import_torch_save_checkpoint_and_restore_it(tmp_path: Path) -> None:
    state = training_state()
    state["model"](torch.randn(3, 4)).sum().backward()
    state["optimizer"].step()
    state["scheduler"].step()
    legacy = {
        "model": state["model"].state_dict(),
        "optimizer": state["optimizer"].state_dict(),
        "scheduler": state["scheduler"].state_dict(),
        "epoch": 3,
        "step": 120,
    }
    torch.save(legacy, tmp_path / "old.pt")
    proc = run("import", tmp_path / "old.pt", "-o", tmp_path / "ck")
    assert proc.returncode == 0, proc.stderr
    assert "5 items (model, optimizer, scheduler, epoch, step), step 120" in proc.stdout
    assert runstate.verify(tmp_path / "ck").ok and runstate.inspect(tmp_path / "ck").step == 120
    fresh = training_state()
    restored = {**fresh, "epoch": 0, "step": 0}
    del restored["rng"], restored["loader"]
    runstate.load(tmp_path / "ck", restored)
    assert restored["model"] is fresh["model"] and restored["epoch"] == 3
    for k, v in legacy["model"].items():
        assert torch.equal(fresh["model"].state_dict()[k], v)
    assert fresh["optimizer"].param_groups[0]["lr"] == legacy["optimizer"]["param_groups"][0]["lr"]
    assert fresh["scheduler"].last_epoch == 1


def test_import_bare_state_dict_becomes_the_model_item(tmp_path: Path) -> None:
    torch.save(nn.Linear(2, 2).state_dict(), tmp_path / "sd.pt")
    proc = run("import", tmp_path / "sd.pt", "-o", tmp_path / "ck", "--step", "7")
    assert proc.returncode == 0 and "1 item (model), step 7" in proc.stdout
    assert set(runstate.load(tmp_path / "ck")["model"]) == {"weight", "bias"}


def test_import_refuses_a_pickle_that_runs_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"model": {"w": torch.ones(2)}, "payload": Malicious(marker)}, tmp_path / "evil.pt")
    proc = run("import", tmp_path / "evil.pt", "-o", tmp_path / "ck")
    line = one_error_line(proc, 1, "refused:", "needs arbitrary code to unpickle", "only tensors and plain containers")
    assert "open" in line
    assert not marker.exists(), "the pickle's code ran"
    assert not (tmp_path / "ck").exists() and os.listdir(tmp_path) == ["evil.pt"]
    # negative control: an unsafe load of the same file does run its code
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


def test_import_errors(tmp_path: Path) -> None:
    one_error_line(run("import", tmp_path / "missing.pt", "-o", tmp_path / "ck"), 2, "no such file")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    proc = run("import", tmp_path / "junk.pt", "-o", tmp_path / "ck")
    assert proc.returncode in (1, 2) and len(proc.stderr.strip().splitlines()) == 1
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    one_error_line(run("import", tmp_path / "list.pt", "-o", tmp_path / "ck"), 2, "holds a list, not a dict")
    assert not (tmp_path / "ck").exists()


# --- gc ----------------------------------------------------------------------------------


def test_gc_removes_leftovers_only(damaged_run: Path) -> None:
    leftover = damaged_run / ".tmp-step-000000000010-0123456789ab"
    proc = run("gc", damaged_run, "--dry-run")
    assert proc.returncode == 0 and f"would remove {leftover}" in proc.stdout and leftover.exists()
    data = run_json("gc", damaged_run)
    assert data["removed"] == [str(leftover)] and data["nbytes"] == len(b"partial") and not data["dry_run"]
    assert not leftover.exists()
    kept = sorted(p.name for p in damaged_run.iterdir() if not p.name.startswith("."))
    assert kept == [f"step-{s:012d}" for s in (2, 4, 6, 8)] + ["step-000000000012.corrupt-1700000000"]
    assert "no leftovers" in run("gc", damaged_run).stdout


# --- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["ls", "{missing}"], "no such directory"),
        (["ls", "{file}"], "is a file, not a run directory"),
        (["ls", "{ckpt}"], "is a checkpoint, not a run directory"),
        (["show", "{missing}"], "no checkpoint at"),
        (["show", "{file}"], "is a file, not a checkpoint directory"),
        (["show", "{corrupt}"], "manifest checksum mismatch"),
        (["verify", "{missing}"], "no such checkpoint or run directory"),
        (["verify", "{file}"], "is a file"),
        (["diff", "{ckpt}", "{missing}"], "no checkpoint at"),
        (["diff", "{ckpt}", "{ckpt}", "--atol", "-1"], "--atol must be"),
        (["gc", "{missing}"], "no such directory"),
    ],
)
def test_errors_are_one_line_with_exit_code_2(damaged_run: Path, args: list[str], needle: str) -> None:
    paths = {
        "missing": damaged_run / "nope",
        "file": damaged_run / "step-000000000002" / "model.safetensors",
        "ckpt": damaged_run / "step-000000000002",
        "corrupt": damaged_run / "step-000000000008",
    }
    proc = run(*(a.format(**paths) for a in args))
    line = one_error_line(proc, 2, needle)
    assert line.startswith(f"runstate {args[0]}: error: ")
