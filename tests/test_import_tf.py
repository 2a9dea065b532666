"""``runstate import`` of TensorFlow checkpoints (runstate.cli.import_tf).

The TensorFlow part runs once, in a subprocess (tests/tf_import_job.py, ``KERAS_BACKEND=
tensorflow``): it trains a seed-style loop saved by ``tf.train.CheckpointManager(max_to_keep=3)``,
writes damaged checkpoints and runs the CLI on each; this file then reads the results with
runstate alone and compares every value with what TensorFlow read back for the same key.
The layout rules, the detection of a checkpoint and the missing-tensorflow error need no
TensorFlow and run in the test process.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import runstate
from runstate.cli import main
from runstate.cli.import_tf import find, item_tree

ROOT = Path(__file__).resolve().parents[1]
SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"


def run_cli(*args: str | Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


# --- layout and detection: no TensorFlow needed -------------------------------------------


def test_keys_nest_without_the_variable_suffix() -> None:
    tree = item_tree(
        {
            "step" + SUFFIX: 1,
            "optimizer/_iterations" + SUFFIX: 2,
            "optimizer/_variables/2" + SUFFIX: 3,
            "global_step": 4,  # a TF1 Saver key: no suffix to drop
        }
    )
    assert tree == {"global_step": 4, "optimizer": {"_iterations": 2, "_variables": {"2": 3}}, "step": 1}


def test_a_value_whose_path_continues_goes_under_variable_value() -> None:
    keras2 = {
        "net/dense/kernel" + SUFFIX: "w",
        "net/dense/kernel/.OPTIMIZER_SLOT/optimizer/m" + SUFFIX: "m",
    }
    assert item_tree(keras2) == {
        "net": {"dense": {"kernel": {"VARIABLE_VALUE": "w", ".OPTIMIZER_SLOT": {"optimizer": {"m": "m"}}}}}
    }
    tf1 = {"dense/kernel": "w", "dense/kernel/Adam": "m", "dense/kernel/Adam_1": "v"}
    assert item_tree(tf1) == {"dense": {"kernel": {"VARIABLE_VALUE": "w", "Adam": "m", "Adam_1": "v"}}}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"a": 1, "a" + SUFFIX: 2}, "would both be a"),
        ({"a/VARIABLE_VALUE": 1, "a/b": 2, "a" + SUFFIX: 3}, "would replace another value at a/VARIABLE_VALUE"),
        ({"a//b": 1}, "empty name"),
    ],
)
def test_keys_that_would_overwrite_each_other_are_refused(values: dict[str, Any], message: str) -> None:
    with pytest.raises(runstate.CorruptCheckpointError, match=message):
        item_tree(values)


def test_find_recognizes_prefixes_their_files_and_manager_directories(tmp_path: Path) -> None:
    run = tmp_path / "tfrun"
    run.mkdir()
    for name in ("ckpt-3.index", "ckpt-3.data-00000-of-00001", "checkpoint", "old.pt"):
        (run / name).write_bytes(b"")
    prefix = str(run / "ckpt-3")
    assert find(str(run)) == str(run)
    assert find(prefix) == find(prefix + ".index") == find(prefix + ".data-00000-of-00001") == prefix
    assert find(str(run / "old.pt")) is None and find(str(run / "ckpt-4")) is None
    (run / "checkpoint").unlink()
    assert find(str(run)) is None  # a directory without CheckpointManager's 'checkpoint' file


def test_missing_tensorflow_is_named_and_nothing_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "ckpt-1.index").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # import tensorflow now fails
    code, out, err = run_cli("import", tmp_path / "ckpt-1", "-o", tmp_path / "out")
    assert (code, out) == (2, "")
    assert (
        err == "runstate import: error: reading a TensorFlow checkpoint needs tensorflow (pip install tensorflow-cpu)\n"
    )
    assert not (tmp_path / "out").exists()


def test_a_directory_without_a_checkpoint_file_is_refused_without_tensorflow(tmp_path: Path) -> None:
    code = (
        "import sys, contextlib, io\n"
        "from runstate.cli import main\n"
        "with contextlib.redirect_stderr(io.StringIO()) as err:\n"
        f"    code = main(['import', {str(tmp_path)!r}, '-o', {str(tmp_path / 'out')!r}])\n"
        "print(code, 'tensorflow' in sys.modules, err.getvalue().strip())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.startswith("2 False runstate import: error: ")
    assert "is not a file; give the file torch.save wrote, or a TensorFlow checkpoint" in proc.stdout
    assert not (tmp_path / "out").exists()


# --- real TensorFlow checkpoints (one subprocess) -----------------------------------------


def at(tree: dict[str, Any], key: str) -> Any:
    """The imported value of TensorFlow key ``key`` (the layout item_tree documents)."""
    parts = key.removesuffix(SUFFIX).split("/")
    node: Any = tree
    for name in parts:
        node = node[name]
    return node


def flat(tree: Any, prefix: str = "") -> list[str]:
    if not isinstance(tree, dict):
        return [prefix]
    return [p for k, v in tree.items() for p in flat(v, f"{prefix}/{k}" if prefix else k)]


def check_every_value(out: Path, label: str, expected: Any, strings: dict[str, list[str]]) -> None:
    loaded = runstate.load(out)
    keys = sorted(k.split("|", 1)[1] for k in [*expected.files, *strings] if k.startswith(label + "|"))
    keys.remove("_CHECKPOINTABLE_OBJECT_GRAPH")  # skipped: TensorFlow's record of the Python objects
    assert sorted(flat(loaded)) == sorted(k.removesuffix(SUFFIX) for k in keys)  # nothing more, nothing less
    for key in keys:
        value = at(loaded, key)
        if f"{label}|{key}" in strings:
            want = strings[f"{label}|{key}"]
            got = [value] if isinstance(value, bytes) else value
            assert [v.hex() for v in got] == want, key
        else:
            want = expected[f"{label}|{key}"]
            assert isinstance(value, np.ndarray) and value.dtype == want.dtype and value.shape == want.shape, key
            assert value.tobytes() == want.tobytes(), key  # bit-exact


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("tensorflow", reason="tensorflow-cpu is installed by make test")
    root = tmp_path_factory.mktemp("tfimport")
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONWARNINGS": "ignore"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "tf_import_job.py"), str(root)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root


@pytest.mark.e2e
def test_tf_checkpoint_manager_runs_import_exactly_and_bad_ones_write_nothing(job: Path) -> None:
    report = json.loads((job / "report.json").read_text())
    calls, expected, strings = report["calls"], np.load(job / "expected.npz"), report["strings"]
    assert report["live"]["checkpoints"] == ["ckpt-3", "ckpt-4", "ckpt-5"]  # max_to_keep=3 of 5 saves

    # A CheckpointManager directory: its latest checkpoint, every value as TensorFlow reads it.
    note = (
        "note: skipped iterator/.ATTRIBUTES/ITERATOR_STATE: a tf.data iterator's position (variant), "
        "which TensorFlow cannot read as values\n"
    )
    call = calls["dir"]
    assert call["code"] == 0 and call["stderr"] == "", call
    head = f"{note}imported {job}/tfrun/ckpt-5 into {job}/out/from_dir: 5 items (extra, gen, optimizer, save_counter, step), step 10 (from 'step'), "
    assert call["stdout"].startswith(head), call["stdout"]
    out = job / "out" / "from_dir"
    check_every_value(out, "ckpt-5", expected, strings)
    assert run_cli("verify", out)[0] == 0 and runstate.verify(out).ok
    assert runstate.inspect(out).step == 10
    code = f"import sys, runstate; runstate.load({str(out)!r}); print('tensorflow' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout == "False\n"  # the imported checkpoint loads without TensorFlow

    # ...and the live values of the run at its last save, by the documented names.
    state = runstate.load(out)
    assert int(state["step"]) == int(expected["live|step"]) == 10
    assert int(state["optimizer"]["_iterations"]) == int(expected["live|iterations"]) == 10
    trainable = state["optimizer"]["_trainable_variables"]  # the model's weights: their shortest path
    assert [trainable[str(i)].tobytes() for i in range(4)] == [expected[f"live|weight{i}"].tobytes() for i in range(4)]
    assert np.array_equal(state["gen"]["_state_var"], expected["live|gen_state"])
    assert state["extra"]["scale"].dtype == np.float64 and float(state["extra"]["scale"]) == 2.5
    assert state["extra"]["tag"] == bytes.fromhex(report["live"]["tag"]) == b"run-\x00\xff"
    assert state["extra"]["vocab"] == [b"a", b"bc", b""]

    # A prefix, and a .index file, name older checkpoints of the same run.
    assert calls["prefix"]["code"] == 0 and "ckpt-4 into" in calls["prefix"]["stdout"]
    check_every_value(job / "out" / "from_prefix", "ckpt-4", expected, strings)
    assert runstate.inspect(job / "out" / "from_prefix").step == 8
    assert calls["index_file"]["code"] == 0 and runstate.inspect(job / "out" / "from_index").step == 6

    # A value whose path other keys continue (optimizer slots): under VARIABLE_VALUE.
    assert calls["slots"]["code"] == 0 and "step 1 (from --step)" in calls["slots"]["stdout"]
    slots = runstate.load(job / "out" / "slots")
    assert slots["v"]["VARIABLE_VALUE"].tolist() == expected["slots|v" + SUFFIX].tolist()
    assert set(slots["v"][".OPTIMIZER_SLOT"]["opt"]) == {"m", "v"}

    # Damaged checkpoints: one error line each, exit 2, nothing written.
    why = {
        "alone": "alone.data-00000-of-00001; No such file or directory",
        "truncated": "cannot read",
        "junk": "not an sstable",
        "stale": "names no checkpoint whose .index exists",
    }
    for name, phrase in why.items():
        call = calls[name]
        assert call["code"] == 2 and call["stdout"] == "", call
        assert call["stderr"].startswith("runstate import: error: ") and call["stderr"].count("\n") == 1, call
        assert phrase in call["stderr"], call
        assert not (job / "out" / name).exists()
    assert "a checkpoint needs its .index and every .data-* file" in calls["truncated"]["stderr"]
    assert sorted(p.name for p in (job / "out").iterdir()) == ["from_dir", "from_index", "from_prefix", "slots"]
