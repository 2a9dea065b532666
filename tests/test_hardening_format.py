"""Issue 13 (Hardening II), the format and reader items.

* 13.4: a tensor whose path is ``__metadata__`` (the safetensors header's reserved key) and
  other odd names (empty, non-ASCII, control characters, ``/`` and ``.``) round-trip.
* 13.5: a checkpoint with more tensor files than the open-file limit reads (real process
  with a lowered ``RLIMIT_NOFILE``); an OS resource error is ``CheckpointReadError``, never
  damage, so ``restore`` neither falls back nor marks the newest checkpoint damaged.
* 13.7: a tree ``MAX_TREE_DEPTH`` deep saves and loads from a deep call stack; one level
  deeper (or a value containing itself) is ``UnsupportedTypeError`` at save time; a deeper
  tree in a manifest is damage, never a bare ``RecursionError``.
* 13.15: a raw-byte tensor whose ``lib_shape`` does not fit its bytes is damage (it used to
  hand out uninitialized memory, and ``verify`` said OK).
* 13.23: ``keep_best`` ranks integer metrics of any size exactly.
* 13.24: ``verify`` hashes tensors as a stream (memory stays far below the tensor's size);
  ``inspect`` describes huge integers.
"""

from __future__ import annotations

import errno
import json
import math
import os
import subprocess
import sys
import textwrap
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from torch import nn

import runstate
from runstate._impl.reader import CheckpointReader
from runstate.format.depth import MAX_TREE_DEPTH
from runstate.policies import Retention
from runstate.storage.local import LocalStore
from tests.test_untrusted import rewrite

ROOT = Path(__file__).resolve().parents[1]



def at_call_depth(depth: int, fn: Callable[[], Any]) -> Any:
    """Call ``fn`` with about ``depth`` more Python frames on the stack."""
    if depth <= 0:
        return fn()
    return at_call_depth(depth - 1, fn)


def same(a: Any, b: Any) -> bool:
    if isinstance(a, (np.ndarray, torch.Tensor)):
        equal: Any = a == b
        return type(a) is type(b) and a.dtype == b.dtype and a.shape == b.shape and bool(equal.all())
    if isinstance(a, dict):
        return type(a) is type(b) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


# --------------------------------------------------------------------------------------------
# 13.4: any key round-trips


class WithMetadataBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.register_buffer("__metadata__", torch.arange(3.0))


def test_a_tensor_named_metadata_round_trips(tmp_path: Path) -> None:
    """Regression: the tensor overwrote the header's ``__metadata__`` entry; the save reported
    success and the checkpoint could never be read."""
    torch.manual_seed(0)
    model = WithMetadataBuffer()
    state = {
        "model": model,
        "arrays": {"__metadata__": np.arange(4, dtype=np.int32), "x": np.ones(2)},
        "__metadata__": np.arange(5, dtype=np.int16),  # a bare tensor is named after its item
    }
    runstate.save(tmp_path / "ck", state, step=1)
    assert runstate.verify(tmp_path / "ck").ok
    loaded = runstate.load(tmp_path / "ck")
    assert same(loaded["arrays"], state["arrays"]) and same(loaded["__metadata__"], state["__metadata__"])
    assert same(loaded["model"]["__metadata__"], model.get_buffer("__metadata__"))

    fresh = WithMetadataBuffer()
    fresh.get_buffer("__metadata__").zero_()
    with runstate.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, {"model": model})
        assert mgr.restore({"model": fresh}) == 1
    assert torch.equal(fresh.get_buffer("__metadata__"), torch.arange(3.0))

    # The file stays a standard safetensors file, its metadata intact; the tensor at the
    # reserved path is named as if the name were taken (spec section 8).
    header = load_file(tmp_path / "ck" / "arrays.safetensors")
    assert sorted(header) == ["__metadata__#2", "x"]
    index = json.loads((tmp_path / "ck" / "manifest.json").read_text())["items"]["__metadata__"]["tensors"]
    assert list(index) == ["__metadata__#2"]


ODD_KEYS = ["", "é", "日本", "\x00", "\x1b]52;c;aGk=\x07", "\x7f\n\t", "a/b", "../x", "a.b", "a", "a.b#2", "\ud800"]


def test_odd_tensor_names_round_trip(tmp_path: Path) -> None:
    """Empty, non-ASCII, control-character, ``/`` and ``.`` keys, and keys whose joined paths
    collide (``{"a.b": x}`` vs ``{"a": {"b": y}}``, ``0`` vs ``"0"``), all keep their tensor."""
    arrays: dict[Any, Any] = {k: np.full(2, i, dtype=np.int64) for i, k in enumerate(ODD_KEYS)}
    arrays["a"] = {"b": np.full(3, 100), "": np.full(3, 101)}
    arrays[0] = np.full(1, 102)
    arrays["0"] = np.full(1, 103)
    arrays[("a", "b")] = np.full(1, 104)
    state = {"arrays": arrays, "é \x1b item/..": np.arange(3)}
    runstate.save(tmp_path / "ck", state, step=1)
    assert runstate.verify(tmp_path / "ck").ok
    loaded = runstate.load(tmp_path / "ck")
    assert same(loaded, state)
    names = list(json.loads((tmp_path / "ck" / "manifest.json").read_text())["items"]["arrays"]["tensors"])
    assert len(names) == len(set(names)) == len(ODD_KEYS) - 1 + 5  # "a" holds a dict of two


def test_a_manifest_naming_a_tensor_metadata_is_damage(tmp_path: Path) -> None:
    ckpt = tmp_path / "ck"
    runstate.save(ckpt, {"a": {"x": np.arange(3)}})

    def edit(body: dict[str, Any]) -> None:
        item = body["items"]["a"]
        item["tensors"] = {"__metadata__": item["tensors"]["x"]}
        item["tree"]["v"][0][1]["name"] = "__metadata__"

    rewrite(ckpt, edit)
    with pytest.raises(runstate.CorruptCheckpointError, match="reserved"):
        runstate.load(ckpt)
    assert not runstate.verify(ckpt).ok


# --------------------------------------------------------------------------------------------
# 13.5: any number of files; OS resource errors are not damage

MANY = 150  # tensor files per checkpoint: one per item
LIMIT = 40  # RLIMIT_NOFILE in the reading process


def many_files_state(step: int) -> dict[str, Any]:
    return {f"t{i:03d}": np.full(4, step * 1000 + i, dtype=np.int64) for i in range(MANY)}


def test_a_checkpoint_with_more_files_than_the_open_file_limit_reads(tmp_path: Path) -> None:
    """Regression: every file stayed open; at the limit EMFILE was reported as corruption,
    so restore fell back to the older step and marked the newest one damaged."""
    with runstate.CheckpointManager(tmp_path / "run", keep_last=5) as mgr:
        mgr.save(1, many_files_state(1))
        mgr.save(2, many_files_state(2))
    assert len(list((tmp_path / "run" / "step-000000000002").glob("*.safetensors"))) == MANY
    child = textwrap.dedent(
        f"""
        import logging, resource, sys
        import numpy as np
        import runstate
        logging.basicConfig(level=logging.WARNING, stream=sys.stdout)
        run = sys.argv[1]
        runstate.load(run + "/step-000000000001")  # warm up every import while fds are plenty
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, ({LIMIT}, hard))
        state = {{f"t{{i:03d}}": None for i in range({MANY})}}
        with runstate.CheckpointManager(run) as mgr:
            print("restored", mgr.restore(state))
        assert all(int(state[f"t{{i:03d}}"][0]) == 2000 + i for i in range({MANY})), state
        report = runstate.verify(run + "/step-000000000002")
        print("verify", report.ok, report.tensors_checked, report.problems)
        print("load", len(runstate.load(run + "/step-000000000002")))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", child, str(tmp_path / "run")], capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines == ["restored 2", f"verify True {MANY} ()", f"load {MANY}"], proc.stdout + proc.stderr


def test_a_file_opened_again_is_checked_again(tmp_path: Path) -> None:
    """Files closed to stay under the limit are checked again when reopened: a header changed
    in between is damage, an unchanged one reads."""
    ckpt = tmp_path / "ck"
    runstate.save(ckpt, many_files_state(1))
    with CheckpointReader(ckpt) as reader:
        assert int(reader.load_tensor("t000", "t000")[0]) == 1000
        for i in range(1, 40):  # t000.safetensors is closed on the way
            reader.load_tensor(f"t{i:03d}", f"t{i:03d}")
        assert int(reader.load_tensor("t000", "t000")[0]) == 1000  # reopened, same header
        for i in range(1, 40):
            reader.load_tensor(f"t{i:03d}", f"t{i:03d}")
        raw = (ckpt / "t000.safetensors").read_bytes()
        (ckpt / "t000.safetensors").write_bytes(raw.replace(b'"format":"np"', b'"format":"pt"'))
        with pytest.raises(runstate.CorruptCheckpointError, match="header bytes differ"):
            reader.load_tensor("t000", "t000")


def fail_opens(monkeypatch: pytest.MonkeyPatch, code: int) -> list[str]:
    """Make ``os.open`` of tensor files fail with ``code``, as the kernel does at the limit."""
    real_open = os.open
    failed: list[str] = []

    def fake_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if str(path).endswith(".safetensors") and not flags & (os.O_WRONLY | os.O_RDWR):
            failed.append(str(path))
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)
    return failed


@pytest.mark.parametrize("code", [errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EIO, errno.EACCES])
def test_an_os_resource_error_is_not_damage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, code: int
) -> None:
    """Regression: EMFILE while opening a tensor file was a CorruptCheckpointError, so restore
    skipped the newest checkpoint as damaged and restored an older one."""
    run = tmp_path / "run"
    with runstate.CheckpointManager(run) as mgr:
        mgr.save(1, {"a": np.arange(3), "n": 1})
        mgr.save(2, {"a": np.arange(3) + 10, "n": 2})
    live: dict[str, Any] = {"a": None, "n": None}
    with runstate.CheckpointManager(run) as mgr:
        with monkeypatch.context() as m:
            failed = fail_opens(m, code)
            with pytest.raises(runstate.CheckpointReadError, match="not damage") as err:
                mgr.restore(live)
            assert failed and not isinstance(err.value, runstate.CorruptCheckpointError)
            assert err.value.errno == code and isinstance(err.value.__cause__, OSError)
            assert live == {"a": None, "n": None}  # nothing restored, no fallback to step 1
            with pytest.raises(runstate.CheckpointReadError):
                runstate.verify(run / "step-000000000002")
            with pytest.raises(runstate.CheckpointReadError):
                runstate.load(run / "step-000000000002")
        assert mgr.restore(live) == 2 and live["n"] == 2
    assert "damaged" not in caplog.text


def test_a_read_error_in_the_middle_of_a_file_is_not_damage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An I/O error while reading tensor bytes (verify's stream, load's whole read) is a
    ``CheckpointReadError``, not a raw ``OSError`` and not damage."""
    ckpt = tmp_path / "ck"
    runstate.save(ckpt, {"a": np.arange(1000)})  # 8000 bytes of tensor data
    real_open_read = LocalStore.open_read

    class FailingFile:
        """A tensor file whose disk fails when the tensor's bytes are read."""

        def __init__(self, f: Any) -> None:
            self.f = f

        def __getattr__(self, name: str) -> Any:
            return getattr(self.f, name)

        def readinto(self, buf: Any) -> int:
            raise OSError(errno.EIO, "Input/output error")

    def open_read(self: LocalStore, name: str) -> tuple[Any, int]:
        f, size = real_open_read(self, name)
        return (FailingFile(f) if name.endswith(".safetensors") else f), size

    monkeypatch.setattr(LocalStore, "open_read", open_read)
    with pytest.raises(runstate.CheckpointReadError, match="Input/output error"):
        runstate.load(ckpt)
    with pytest.raises(runstate.CheckpointReadError, match="Input/output error"):
        runstate.verify(ckpt)


def test_damage_is_still_damage(tmp_path: Path) -> None:
    """Negative control: a missing file or a symlink stays a CorruptCheckpointError."""
    ckpt = tmp_path / "ck"
    runstate.save(ckpt, {"a": np.arange(3), "b": np.arange(2)})
    (ckpt / "a.safetensors").unlink()
    os.replace(ckpt / "b.safetensors", tmp_path / "b.safetensors")
    os.symlink(tmp_path / "b.safetensors", ckpt / "b.safetensors")
    report = runstate.verify(ckpt)
    assert sorted(p.file or "" for p in report.problems) == ["a.safetensors", "b.safetensors"]
    with pytest.raises(runstate.CorruptCheckpointError):
        runstate.load(ckpt)


# --------------------------------------------------------------------------------------------
# 13.7: nesting depth


def deep(levels: int, kind: str, leaf: Any) -> Any:
    """A tree whose leaf is ``levels`` nodes deep (the root counts as one)."""
    value = leaf
    if kind == "keys":  # a dict whose key is a chain of tuples: the key is one node deeper than its dict
        for i in range(levels - 2):
            value = (i, value)
        return {value: "v"}
    for i in range(levels - 1):
        if kind == "list":
            value = [value]
        elif kind == "dict":
            value = {f"k{i}": value}
        else:
            value = (i, value)
    return value


KINDS = ["list", "dict", "tuple"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_tree_at_the_maximum_depth_saves_and_loads_from_a_deep_stack(tmp_path: Path, kind: str) -> None:
    """Regression: from a deep call stack a 100-level tree raised a bare RecursionError at
    save, and one saved from a shallow stack was called damaged at load."""
    limit = sys.getrecursionlimit()
    value = deep(MAX_TREE_DEPTH, kind, np.arange(3))
    ckpt = tmp_path / "ck"
    at_call_depth(800, lambda: runstate.save(ckpt, {"deep": value, "other": 1}, step=1))
    loaded = at_call_depth(800, lambda: runstate.load(ckpt))
    assert same(loaded["deep"], value)
    assert at_call_depth(800, lambda: runstate.verify(ckpt)).ok
    contents = at_call_depth(800, lambda: runstate.inspect(ckpt))
    assert contents.items["deep"].kind == "value"

    run = tmp_path / "run"
    with runstate.CheckpointManager(run) as mgr:
        at_call_depth(800, lambda: mgr.save(1, {"deep": value}, metrics={"loss": 1.0}))
        live: dict[str, Any] = {"deep": None}
        assert at_call_depth(800, lambda: mgr.restore(live)) == 1
    assert same(live["deep"], value)
    assert sys.getrecursionlimit() == limit


def test_a_tree_at_the_maximum_depth_through_tuple_keys(tmp_path: Path) -> None:
    value = deep(MAX_TREE_DEPTH, "keys", 7)
    runstate.save(tmp_path / "ck", {"deep": value})
    assert same(at_call_depth(800, lambda: runstate.load(tmp_path / "ck"))["deep"], value)
    with pytest.raises(runstate.UnsupportedTypeError, match=f"deeper than {MAX_TREE_DEPTH}"):
        runstate.save(tmp_path / "ck2", {"deep": [value]})


@pytest.mark.parametrize("kind", [*KINDS, "keys"])
@pytest.mark.parametrize("caller", [0, 800])
def test_a_tree_one_level_too_deep_is_refused_at_save(tmp_path: Path, kind: str, caller: int) -> None:
    value = deep(MAX_TREE_DEPTH + 1, kind, 5 if kind == "keys" else np.arange(2))
    with pytest.raises(runstate.UnsupportedTypeError, match=f"nests deeper than {MAX_TREE_DEPTH} levels"):
        at_call_depth(caller, lambda: runstate.save(tmp_path / "ck", {"deep": value}))
    assert not (tmp_path / "ck").exists()


def test_a_value_that_contains_itself_is_refused(tmp_path: Path) -> None:
    """Regression: a self-referencing list raised RecursionError."""
    loop: list[Any] = [1]
    loop.append(loop)
    with pytest.raises(runstate.UnsupportedTypeError, match="contains itself"):
        runstate.save(tmp_path / "ck", {"loop": loop})
    assert not (tmp_path / "ck").exists()


def test_a_deeper_tree_in_a_manifest_is_damage_not_a_recursion_error(tmp_path: Path) -> None:
    ckpt = tmp_path / "ck"
    runstate.save(ckpt, {"x": 1})

    def edit(body: dict[str, Any]) -> None:
        node: Any = {"t": "none"}
        for _ in range(MAX_TREE_DEPTH):
            node = {"t": "list", "v": [node]}
        body["items"]["x"]["tree"] = node

    rewrite(ckpt, edit)
    for caller in (0, 800):
        with pytest.raises(runstate.CorruptCheckpointError, match=f"deeper than {MAX_TREE_DEPTH} levels"):
            at_call_depth(caller, lambda: runstate.load(ckpt))
    assert not runstate.verify(ckpt).ok


# --------------------------------------------------------------------------------------------
# 13.15: raw bytes and their claimed shape agree exactly


def raw_entry(body: dict[str, Any], item: str) -> dict[str, Any]:
    ((entry),) = body["items"][item]["tensors"].values()
    return entry  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("value", "claim"),
    [
        (torch.zeros(0, dtype=torch.complex128), {"lib_shape": [4096]}),  # used to return torch.empty memory
        (np.zeros(0, dtype=np.complex128), {"lib_shape": [4096]}),
        (torch.zeros(0, dtype=torch.float8_e8m0fnu), {"lib_shape": [64, 64]}),  # a dtype NumPy does not know
        (torch.zeros(2, dtype=torch.complex128), {"lib_shape": [1]}),
        (np.zeros(2, dtype=np.complex128), {"lib_shape": [3]}),
        (np.zeros(2, dtype=np.complex128), {"lib_shape": [2, 0]}),
        (torch.zeros(3, dtype=torch.float8_e8m0fnu), {"lib_shape": [2]}),
        (np.zeros(2, dtype=np.complex128), {"lib_shape": None}),  # lib_dtype alone used to raise a raw KeyError
        (torch.zeros(2, dtype=torch.complex128), {"lib_shape": None}),
        (np.zeros(2, dtype=np.complex128), {"dtype": "U16", "shape": [16]}),
        (torch.zeros(0, dtype=torch.complex128), {"lib_shape": [2**70, 0]}),  # verify said OK, load "damaged"
        (np.zeros(0, dtype=np.complex128), {"lib_shape": [0, 2**64]}),
    ],
    ids=lambda x: f"{type(x).__module__}-{x.dtype}-{tuple(x.shape)}" if hasattr(x, "dtype") else str(x),
)
def test_raw_bytes_must_fit_their_lib_shape(tmp_path: Path, value: Any, claim: dict[str, Any]) -> None:
    """Regression: a zero-byte raw tensor with ``lib_shape: [4096]`` came back as a torch
    tensor of 4096 uninitialized elements (process memory), and ``verify`` said OK."""
    ckpt = tmp_path / "ck"
    runstate.save(ckpt, {"t": value})
    assert same(runstate.load(ckpt)["t"], value)

    def edit(body: dict[str, Any]) -> None:
        entry = raw_entry(body, "t")
        for key, v in claim.items():
            if v is None:
                entry.pop(key)
            else:
                entry[key] = v

    rewrite(ckpt, edit)
    report = runstate.verify(ckpt)
    assert not report.ok and "manifest.json" in [p.file for p in report.problems]
    with pytest.raises(runstate.CorruptCheckpointError, match="lib_shape|lib_dtype|U8"):
        runstate.load(ckpt)


def test_every_raw_dtype_the_writers_use_still_reads(tmp_path: Path) -> None:
    """Negative control for the exact size check: real raw-byte tensors of every kind load."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    state: dict[str, Any] = {
        "np_c128": np.arange(6, dtype=np.complex128).reshape(2, 3),
        "np_longdouble": np.arange(3, dtype=np.longdouble),
        "np_empty": np.zeros((0, 5), dtype=np.complex128),
        "np_int4": np.arange(4).astype(ml_dtypes.int4),
        "t_c128": torch.tensor([[1 + 2j, 3], [4j, -1]], dtype=torch.complex128),
        "t_e8m0": torch.ones(5).to(torch.float8_e8m0fnu),
        "t_empty": torch.zeros(3, 0, dtype=torch.complex128),
        "scalar": np.complex128(1 + 2j),
    }
    runstate.save(tmp_path / "ck", state)
    assert runstate.verify(tmp_path / "ck").ok
    loaded = runstate.load(tmp_path / "ck")
    for key, value in state.items():
        got = loaded[key]
        if isinstance(value, torch.Tensor):
            assert got.dtype == value.dtype and got.shape == value.shape
            assert torch.equal(got.view(torch.uint8), value.view(torch.uint8)) if value.numel() else True
        else:
            assert np.asarray(got).dtype == np.asarray(value).dtype and np.array_equal(np.asarray(got), value)


# --------------------------------------------------------------------------------------------
# 13.23: keep_best ranks any number


@pytest.mark.parametrize("mode", ["min", "max"])
def test_keep_best_ranks_huge_integer_metrics(tmp_path: Path, mode: str) -> None:
    """Regression: an integer metric >= 2**1024 raised OverflowError after committing, and
    retention stopped."""
    big = 2**2000
    scores = {1: big, 2: big - 1, 3: float("inf") if mode == "min" else float("-inf"), 4: big + 1, 5: 0.5, 6: -big}
    with runstate.CheckpointManager(tmp_path, keep_last=1, keep_best=2, best_metric="m", best_mode=mode) as mgr:
        for step, m in scores.items():
            mgr.save(step, {"x": step}, metrics={"m": m})
    best = sorted(scores, key=lambda s: scores[s] if mode == "min" else -scores[s])[:2]
    assert mgr.steps() == sorted({*best, 6})
    assert best == ([6, 5] if mode == "min" else [4, 1])


def test_keep_best_compares_int_and_float_exactly() -> None:
    """2**60 + 1 and float(2**60) are different numbers; converting to float would tie them."""
    policy = Retention(keep_last=1, keep_best=1, best_metric="m")
    metrics: dict[int, dict[str, Any]] = {
        1: {"m": 2**60 + 1},
        2: {"m": float(2**60)},
        3: {"m": float("nan")},
        4: {"m": True},
        5: {},
    }
    assert policy.to_keep([1, 2, 3, 4, 5], metrics) == {2, 5}
    metrics = {1: {"m": 2**60 - 1}, 2: {"m": float(2**60)}, 5: {}}
    assert policy.to_keep([1, 2, 5], metrics) == {1, 5}


# --------------------------------------------------------------------------------------------
# 13.24: verify streams; inspect and huge ints


def test_verify_hashes_tensors_as_a_stream(tmp_path: Path) -> None:
    """Regression: verify read every tensor whole (MemoryError for one larger than memory)."""
    size = 64 * 1024 * 1024
    ckpt = tmp_path / "ck"
    runstate.save(ckpt, {"big": np.ones(size // 8, dtype=np.float64), "small": np.arange(3)})
    runstate.verify(ckpt)  # warm up imports
    tracemalloc.start()
    try:
        report = runstate.verify(ckpt)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert report.ok and report.nbytes_checked == size + 3 * 8 and report.tensors_checked == 2
    assert peak < size // 4, f"peak {peak / 2**20:.1f} MiB for a {size / 2**20:.0f} MiB tensor"

    with open(ckpt / "big.safetensors", "r+b") as f:  # negative control: damage past the first chunk
        f.seek(-5, os.SEEK_END)
        f.write(b"\x55")
    report = runstate.verify(ckpt)
    assert [(p.file, p.tensor) for p in report.problems] == [("big.safetensors", "big")]
    assert "checksum mismatch" in report.problems[0].reason


def test_inspect_describes_huge_integers(tmp_path: Path) -> None:
    values = {"big": 2**100_000 + 1, "neg": -(2**50_000), "mid": 10**4000}
    runstate.save(tmp_path / "ck", {"plain": values, "x": np.arange(2)}, metrics={"m": 2**20_000})
    contents = runstate.inspect(tmp_path / "ck")
    assert contents.items["plain"].value == values and contents.metrics == {"m": 2**20_000}
    info = runstate.load(tmp_path / "ck")["plain"]
    assert info == values and math.isclose(math.log2(info["big"]), 100_000)
