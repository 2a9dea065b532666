"""Checkpoints from strangers: a hostile checkpoint can neither run code nor crash the reader.

Hypothesis mutates a real checkpoint (its manifest's JSON structure, its safetensors headers
and length prefixes, its tensor index entries coherently in manifest and header, raw bytes,
and file types: symlinks out of the directory, directories, FIFOs) and recomputes the
manifest checksum after most mutations, so they reach the parsers behind it. Whatever the
input, ``runstate.verify``, ``runstate.load`` and ``CheckpointManager.restore`` may only raise
``CheckpointError`` subclasses, and memory stays proportional to the files' real sizes. A
scan of ``src/`` keeps pickle, ``eval``/``exec`` and unsafe ``torch.load`` out of the code.
``fuzz/fuzz_reader.py`` runs the same attack under atheris for longer.
"""

from __future__ import annotations

import ast
import json
import os
import random
import re
import shutil
import struct
import sys
import tracemalloc
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import runstate
from runstate.format.manifest import _canonical_checksum

ROOT = Path(__file__).resolve().parents[1]
STEP_DIR = "step-000000000001"

# Hypothesis warns when it builds the repr of a 5000-digit string for its report; harmless.
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")

# --------------------------------------------------------------------------------------------
# The checkpoint under attack


def victim_state() -> dict[str, Any]:
    """A bit of everything a reader decodes: module, optimizer, arrays of odd dtypes, generators, plain values."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    return {
        "model": model,
        "optimizer": opt,
        "arrays": {
            "f": np.arange(6, dtype=np.float32).reshape(2, 3),
            "c128": np.array([1 + 2j]),  # stored as U8 with lib_dtype
            "scalar": np.float64(2.5),
            "empty": np.zeros((0, 3)),
            "bf16": torch.ones(2, dtype=torch.bfloat16),
        },
        "rng": random.Random(1),
        "gen": np.random.default_rng(2),
        "tgen": torch.Generator().manual_seed(3),
        "plain": {"i": 1, "big": 2**100, "f": -0.0, "b": b"xy", "t": (1, None), 0: "int key", "l": [True]},
    }


def live_state() -> dict[str, Any]:
    """What a training script passes to ``restore``."""
    model = nn.Linear(3, 2)
    return {
        "model": model,
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        "arrays": None,
        "rng": random.Random(),
        "gen": np.random.default_rng(),
        "tgen": torch.Generator(),
        "plain": None,
    }


@pytest.fixture(scope="module")
def victim(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The files of an intact checkpoint, by name."""
    path = tmp_path_factory.mktemp("victim") / "ck"
    runstate.save(path, victim_state(), step=1, metrics={"loss": 0.5})
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


#: Entries placed next to the checkpoint's files: names a hostile manifest may point at.
SPECIAL_NAMES = ("outside.safetensors", "inside.safetensors", "dir.safetensors", "fifo.safetensors")


def materialize(run: Path, files: dict[str, bytes]) -> Path:
    """Write a (mutated) checkpoint as the one step of a run directory, with hostile neighbours."""
    shutil.rmtree(run, ignore_errors=True)
    ckpt = run / STEP_DIR
    ckpt.mkdir(parents=True)
    for name, data in files.items():
        (ckpt / name).write_bytes(data)
    (run / "outside.safetensors").write_bytes(files.get("model.safetensors", b""))
    os.symlink(run / "outside.safetensors", ckpt / "outside.safetensors")  # escapes the directory
    os.symlink("model.safetensors", ckpt / "inside.safetensors")
    (ckpt / "dir.safetensors").mkdir()
    os.mkfifo(ckpt / "fifo.safetensors")  # opening it for reading would block forever
    return ckpt


class Scratch:
    """One materialized checkpoint, updated in place: only the files a case changed are rewritten."""

    def __init__(self, run: Path) -> None:
        self.run = run
        self.ckpt = run / STEP_DIR
        self.on_disk: dict[str, bytes] | None = None

    def put(self, files: dict[str, bytes]) -> Path:
        if self.on_disk is None or set(self.on_disk) != set(files):
            materialize(self.run, files)
        else:
            for name, data in files.items():
                if self.on_disk[name] != data:
                    (self.ckpt / name).write_bytes(data)
        self.on_disk = dict(files)
        return self.ckpt

    def spoil(self) -> None:
        """The directory was changed behind our back (file kinds): rebuild it next time."""
        self.on_disk = None


# --------------------------------------------------------------------------------------------
# Running every reader entry point


ENTRY_POINTS = ("verify", "load", "load into state", "restore")


def attack(ckpt: Path, outcomes: Counter[str] | None = None) -> None:
    """Run every reader on ``ckpt``; anything but a ``CheckpointError`` propagates (and fails the test)."""
    calls: dict[str, Callable[[], Any]] = {
        "verify": lambda: runstate.verify(ckpt),
        "load": lambda: runstate.load(ckpt),
        "load into state": lambda: runstate.load(ckpt, live_state()),
        "restore": lambda: runstate.CheckpointManager(ckpt.parent, read_only=True).restore(live_state()),
    }
    for name, call in calls.items():
        try:
            result = call()
        except runstate.CheckpointError as exc:
            if outcomes is not None:
                outcomes[f"{name}: {type(exc).__name__}"] += 1
            continue
        if outcomes is not None:
            ok = result.ok if isinstance(result, runstate.VerifyReport) else True
            outcomes[f"{name}: {'ok' if ok else 'reported'}"] += 1


def test_the_victim_is_intact_and_its_neighbours_are_ignored(victim: dict[str, bytes], tmp_path: Path) -> None:
    """Negative control: unmutated, every entry point succeeds, so the fuzz outcomes mean something."""
    ckpt = materialize(tmp_path / "run", victim)
    outcomes: Counter[str] = Counter()
    attack(ckpt, outcomes)
    assert outcomes == {"verify: ok": 1, "load: ok": 1, "load into state: ok": 1, "restore: ok": 1}


# --------------------------------------------------------------------------------------------
# Mutations

NASTY_INTS = [0, 1, -1, 7, 8, 2**31, 2**32 + 1, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**30, -(2**63)]
NASTY_STRS = [
    "",
    ".",
    "..",
    "../x.safetensors",
    "../../etc/passwd",
    "/etc/passwd",
    "a/b.safetensors",
    "..\\x.safetensors",
    "x\x00.safetensors",
    "manifest.json",
    "model.safetensors",
    "optimizer.safetensors",
    *SPECIAL_NAMES,
    "F32",
    "U8",
    "BOOL",
    "BF16",
    "C64",
    "F8_E4M3",
    "I64",
    "torch",
    "numpy",
    "<c16",
    "complex128",
    "|O",
    "O",
    "V8",
    "<U2",
    "M8[s]",
    "(1000000000000,)f8",
    "(1,2f8",
    "float8_e8m0fnu",
    "random.Random",
    "numpy.Generator",
    "numpy.RandomState",
    "torch.Generator",
    "PCG64",
    "MT19937",
    "SeedSequence",
    "os.system",
    "builtins.eval",
    "tensor",
    "object",
    "stateful",
    "dict",
    "list",
    "int",
    "float",
    "bytes",
    "none",
    "0x" + "f" * 3000,
    "9" * 5000,
    "1e999",
    "nan",
    "-inf",
    "!!notbase64",
    "2d06800538d394c2",
    "weight",
    "bias",
    "state.0.momentum_buffer",
    "param_groups",
    "__metadata__",
    "\ud800",
    "é" * 3,
]
NODE_TYPES = ["none", "bool", "int", "float", "str", "bytes", "list", "tuple", "dict", "tensor", "stateful", "object", "x"]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from(NASTY_INTS),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=10),
    st.sampled_from(NASTY_STRS),
)
keys = st.one_of(st.text(max_size=6), st.sampled_from(["t", "v", "name", "kind", "attrs", "type", "ordered", *NASTY_STRS[:20]]))
typed_nodes = st.fixed_dictionaries(
    {"t": st.sampled_from(NODE_TYPES)},
    optional={
        "v": st.deferred(lambda: values),
        "name": st.sampled_from(NASTY_STRS),
        "kind": st.sampled_from(NASTY_STRS),
        "attrs": st.deferred(lambda: values),
        "type": scalars,
        "ordered": scalars,
    },
)
values: st.SearchStrategy[Any] = st.recursive(
    st.one_of(scalars, typed_nodes),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)),
    max_leaves=12,
)


def nested(depth: int, kind: str) -> Any:
    node: Any = {"t": "none"}
    for _ in range(depth):
        node = {"t": "list", "v": [node]} if kind == "typed" else [node]
    return node


nasty_values = st.one_of(
    values,
    st.builds(nested, st.integers(1, 300), st.sampled_from(["typed", "plain"])),  # deep, still checksummable
)


def pick_path(data: st.DataObject, root: Any) -> tuple[Any, ...]:
    """A position in a JSON tree (keys and indices from the root), reached by a random descent."""
    path: tuple[Any, ...] = ()
    node = root
    while isinstance(node, (dict, list)) and node and data.draw(st.integers(0, 5), label="descend") > 0:
        key = data.draw(st.sampled_from(list(node) if isinstance(node, dict) else range(len(node))), label="key")
        path, node = (*path, key), node[key]
    return path


def mutate_json(data: st.DataObject, root: Any) -> Any:
    """Apply one structural mutation somewhere in ``root`` (a parsed JSON document)."""
    path = pick_path(data, root)
    op = data.draw(st.sampled_from(["replace", "replace", "delete", "insert", "wrap", "duplicate"]), label="op")
    if not path:
        return data.draw(nasty_values) if op == "replace" else [root] if op == "wrap" else root
    parent = root
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    if op == "replace":
        parent[last] = data.draw(nasty_values, label="value")
    elif op == "delete":
        del parent[last]
    elif op == "insert":
        target = parent[last]
        if isinstance(target, dict):
            target[data.draw(keys, label="key")] = data.draw(nasty_values, label="value")
        elif isinstance(target, list):
            target.insert(data.draw(st.integers(0, len(target))), data.draw(nasty_values, label="value"))
        else:
            parent[last] = [target, data.draw(nasty_values, label="value")]
    elif op == "wrap":
        parent[last] = data.draw(st.sampled_from([[parent[last]], {"t": "list", "v": [parent[last]]}, {"v": parent[last]}]))
    elif isinstance(parent, list):
        parent.insert(last, parent[last])  # the same entry twice
    else:
        parent[last] = [parent[last], parent[last]]
    return root


def dump_manifest(data: st.DataObject, body: Any) -> bytes:
    """Serialize a mutated manifest, usually with a checksum that matches, so deeper parsers see it."""
    if isinstance(body, dict) and data.draw(st.integers(0, 9), label="fix checksum") > 0:
        body.pop("checksum", None)
        try:
            body["checksum"] = _canonical_checksum(body)
        except (ValueError, RecursionError, TypeError):
            body["checksum"] = "0" * 16
    try:
        return json.dumps(body).encode()
    except (ValueError, RecursionError):
        return b'{"format": "runstate", "format_version": 1}'


def split_safetensors(raw: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    header: dict[str, Any] = json.loads(raw[8 : 8 + n])
    return header, raw[8 + n :]


def join_safetensors(header: Any, data: bytes, *, pad: bool = True) -> bytes:
    body = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body + data


def tensor_files(files: dict[str, bytes]) -> list[str]:
    return sorted(name for name in files if name.endswith(".safetensors"))


def refresh_sizes(body: dict[str, Any], files: dict[str, bytes]) -> None:
    """Make the manifest's file sizes agree with the (mutated) files, so the size check passes."""
    for name, entry in body.get("files", {}).items():
        if name in files and isinstance(entry, dict):
            entry["nbytes"] = len(files[name])


def mutate_manifest(data: st.DataObject, files: dict[str, bytes]) -> None:
    body = json.loads(files["manifest.json"])
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        body = mutate_json(data, body)
    files["manifest.json"] = dump_manifest(data, body)


def mutate_header(data: st.DataObject, files: dict[str, bytes]) -> None:
    """Mutate a safetensors header's JSON, keeping the file size in the manifest right."""
    name = data.draw(st.sampled_from(tensor_files(files)), label="file")
    header, payload = split_safetensors(files[name])
    header = mutate_json(data, header)
    files[name] = join_safetensors(header, payload, pad=data.draw(st.booleans(), label="pad"))
    body = json.loads(files["manifest.json"])
    refresh_sizes(body, files)
    files["manifest.json"] = dump_manifest(data, body)


def mutate_header_text(data: st.DataObject, files: dict[str, bytes]) -> None:
    """Replace a number or string of a header's JSON text by a token ``json.dumps`` never writes
    (no checksum covers a header, so only its length and the file size need fixing)."""
    name = data.draw(st.sampled_from(tensor_files(files)), label="file")
    raw = files[name]
    (n,) = struct.unpack("<Q", raw[:8])
    text = raw[8 : 8 + n]
    spots = [m.span() for m in re.finditer(rb'\d+|"[^"]*"', text)]
    start, end = data.draw(st.sampled_from(spots), label="spot")
    text = text[:start] + data.draw(st.sampled_from(RAW_TOKENS), label="token") + text[end:]
    files[name] = struct.pack("<Q", len(text)) + text + raw[8 + n :]
    body = json.loads(files["manifest.json"])
    refresh_sizes(body, files)
    files["manifest.json"] = dump_manifest(data, body)


def mutate_length(data: st.DataObject, files: dict[str, bytes]) -> None:
    """Overwrite a header-length prefix with a hostile number."""
    name = data.draw(st.sampled_from(tensor_files(files)), label="file")
    raw = files[name]
    n = data.draw(st.one_of(st.sampled_from([*NASTY_INTS[:11], 100 * 1024**2, len(raw), len(raw) - 8]), st.integers(0, 2**64 - 1)))
    files[name] = struct.pack("<Q", n % 2**64) + raw[8:]


def mutate_entry(data: st.DataObject, files: dict[str, bytes]) -> None:
    """Change a tensor's dtype, shape, offsets or library fields in manifest *and* header alike,
    re-hashing its bytes, so that only the deepest checks (sizes, overlaps, rebuilding) remain."""
    body = json.loads(files["manifest.json"])
    item = data.draw(st.sampled_from(sorted(k for k, v in body["items"].items() if v["tensors"])), label="item")
    tensors = body["items"][item]["tensors"]
    tname = data.draw(st.sampled_from(sorted(tensors)), label="tensor")
    entry = tensors[tname]
    dims = st.lists(st.one_of(st.integers(0, 8), st.sampled_from(NASTY_INTS)), max_size=4)
    for field, strategy in (
        ("dtype", st.sampled_from(["F32", "F64", "F16", "BF16", "U8", "I64", "BOOL", "C64", "F8_E4M3", "Q4", *NASTY_STRS[:3]])),
        ("shape", dims),
        ("data_offsets", st.lists(st.one_of(st.integers(-8, 200), st.sampled_from(NASTY_INTS)), min_size=2, max_size=3)),
        ("lib", st.sampled_from(["torch", "numpy", "jax", 3])),
        ("lib_dtype", st.one_of(st.sampled_from(NASTY_STRS), scalars)),
        ("lib_shape", st.one_of(dims, scalars)),
        ("scalar", scalars),
    ):
        if data.draw(st.integers(0, 3), label=f"change {field}") == 0:
            entry[field] = data.draw(strategy, label=field)
    fname = entry.get("file")
    if fname in files:
        header, payload = split_safetensors(files[fname])
        if isinstance(header.get(tname), dict):
            for field in ("dtype", "shape", "data_offsets"):
                if field in entry:
                    header[tname][field] = entry[field]
        if data.draw(st.booleans(), label="resize data"):
            payload = payload[: data.draw(st.integers(0, len(payload)))] + bytes(data.draw(st.integers(0, 64)))
        files[fname] = join_safetensors(header, payload)
        offsets = entry.get("data_offsets")
        if isinstance(offsets, list) and len(offsets) == 2 and all(type(x) is int for x in offsets):
            begin, end = offsets
            if 0 <= begin <= end <= len(payload):
                entry["xxh3"] = xxhash.xxh3_64_hexdigest(payload[begin:end])
    refresh_sizes(body, files)
    files["manifest.json"] = dump_manifest(data, body)


#: JSON text no ``json.dumps`` writes: numbers past the int digit limit, absurd nesting, NaN.
RAW_TOKENS = [b"9" * 5000, b"[" * 5000, b"{" * 5000, b"1e999999", b"NaN", b"-Infinity", b'"\\ud800"', b"\x00"]


def mutate_bytes(data: st.DataObject, files: dict[str, bytes]) -> None:
    """Raw damage: overwrite, cut or grow any file, or splice in a hostile JSON token (no fix-up)."""
    name = data.draw(st.sampled_from(sorted(files)), label="file")
    raw = bytearray(files[name])
    at = data.draw(st.integers(0, len(raw)), label="at")
    op = data.draw(st.sampled_from(["overwrite", "insert", "truncate", "token"]), label="op")
    blob = data.draw(st.sampled_from(RAW_TOKENS) if op == "token" else st.binary(max_size=16), label="bytes")
    if op == "overwrite":
        raw[at : at + len(blob)] = blob
    elif op in ("insert", "token"):
        raw[at:at] = blob
    else:
        del raw[at:]
    files[name] = bytes(raw)


def mutate_file_kind(data: st.DataObject, files: dict[str, bytes], ckpt: Path) -> None:
    """After materializing: swap a file for a symlink (out of the directory or in), a directory or a FIFO."""
    name = data.draw(st.sampled_from(sorted(files)), label="file")
    path = ckpt / name
    path.unlink()
    kind = data.draw(st.sampled_from(["symlink out", "symlink in", "dir", "fifo", "missing", "absolute symlink"]))
    if kind == "symlink out":
        os.symlink(ckpt.parent / "outside.safetensors", path)
    elif kind == "symlink in":
        os.symlink("manifest.json" if name != "manifest.json" else "model.safetensors", path)
    elif kind == "absolute symlink":
        os.symlink("/etc/passwd", path)
    elif kind == "dir":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)


MUTATORS: dict[str, Callable[[st.DataObject, dict[str, bytes]], None]] = {
    "manifest": mutate_manifest,
    "header": mutate_header,
    "header text": mutate_header_text,
    "length": mutate_length,
    "entry": mutate_entry,
    "bytes": mutate_bytes,
}

# --------------------------------------------------------------------------------------------
# The fuzz tests


def run_fuzz(victim: dict[str, bytes], run: Path, kinds: list[str], examples: int) -> Counter[str]:
    """Run ``examples`` hypothesis cases of the given mutation kinds; return the outcome counts."""
    outcomes: Counter[str] = Counter()
    scratch = Scratch(run)

    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=False,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )
    @given(data=st.data())
    def case(data: st.DataObject) -> None:
        files = dict(victim)
        kind = data.draw(st.sampled_from(kinds), label="kind")
        if kind == "file kind":
            ckpt = scratch.put(files)
            scratch.spoil()
            mutate_file_kind(data, files, ckpt)
        else:
            MUTATORS[kind](data, files)
            ckpt = scratch.put(files)
        outcomes["cases"] += 1
        outcomes[f"kind {kind}"] += 1
        attack(ckpt, outcomes)

    case()
    return outcomes


def report(outcomes: Counter[str], name: str) -> None:
    lines = ", ".join(f"{k}={v}" for k, v in sorted(outcomes.items()) if not k.startswith("kind"))
    print(f"\n{name}: {outcomes['cases']} fuzz cases, 0 non-CheckpointError escapes ({lines})")


@pytest.mark.parametrize(
    ("kinds", "examples"),
    [
        (["manifest"], 800),
        (["header", "header text", "length"], 600),
        (["entry"], 600),
        (["bytes", "file kind"], 300),
    ],
    ids=["manifest", "header", "entry", "bytes-and-file-kinds"],
)
def test_only_checkpoint_errors_escape(
    victim: dict[str, bytes], tmp_path: Path, kinds: list[str], examples: int, stress: bool
) -> None:
    outcomes = run_fuzz(victim, tmp_path / "run", kinds, examples * (10 if stress else 1))
    report(outcomes, "+".join(kinds))
    assert outcomes["cases"] >= examples * 0.9
    # The mutations reach past the manifest checksum: some fail deep, some still load.
    assert outcomes["verify: reported"] > 0
    if kinds == ["entry"]:
        assert outcomes["load: ok"] > 0 and outcomes["load: CorruptCheckpointError"] > 0


# --------------------------------------------------------------------------------------------
# Regressions: what the fuzzer found


def rewrite(ckpt: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Edit the manifest as an attacker would: with a checksum that matches."""
    body = json.loads((ckpt / "manifest.json").read_text())
    edit(body)
    body.pop("checksum")
    body["checksum"] = _canonical_checksum(body)
    (ckpt / "manifest.json").write_text(json.dumps(body))


def small(tmp_path: Path) -> Path:
    ckpt = tmp_path / "ck"
    runstate.save(ckpt, {"a": np.arange(4, dtype=np.float32), "n": [1, 2]}, step=1)
    return ckpt


def replace_header(ckpt: Path, header: bytes, *, length: int | None = None) -> None:
    """Give a.safetensors a new header; the manifest's size follows so that the header is parsed."""
    (ckpt / "a.safetensors").write_bytes(struct.pack("<Q", len(header) if length is None else length) + header)
    rewrite(ckpt, lambda b: b["files"]["a.safetensors"].update(nbytes=8 + len(header)))


def expect_corrupt(ckpt: Path, words: str) -> None:
    report = runstate.verify(ckpt)
    assert not report.ok and any(words in p.reason for p in report.problems), report.problems
    with pytest.raises(runstate.CorruptCheckpointError, match=re.escape(words)):
        runstate.load(ckpt)


def test_a_huge_number_in_the_manifest_is_corruption(tmp_path: Path) -> None:
    """Regression: a 5000-digit integer made json raise a plain ValueError (int digit limit)."""
    ckpt = small(tmp_path)
    text = (ckpt / "manifest.json").read_text()
    (ckpt / "manifest.json").write_text(text.replace('"step": 1', '"step": ' + "1" * 5000))
    expect_corrupt(ckpt, "not valid JSON (Exceeds the limit")


@pytest.mark.parametrize(
    ("header", "words"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "maximum recursion depth"),  # RecursionError escaped verify
        (b'{"x":' + b"1" * 5000 + b"}", "Exceeds the limit"),  # ValueError escaped verify
        (b'{"x": 1}\xff\xfe', "not valid JSON"),
    ],
    ids=["deep", "huge-int", "bad-utf8"],
)
def test_hostile_header_json_is_corruption(tmp_path: Path, header: bytes, words: str) -> None:
    """Regression: RecursionError and the int digit limit's ValueError escaped from verify."""
    ckpt = small(tmp_path)
    replace_header(ckpt, header)
    expect_corrupt(ckpt, words)


def test_a_fifo_in_place_of_a_file_does_not_hang_the_reader(tmp_path: Path) -> None:
    """Regression: opening a FIFO blocked forever (verify and load hung)."""
    ckpt = small(tmp_path)
    for name in ("a.safetensors", "manifest.json"):
        saved = (ckpt / name).read_bytes()
        (ckpt / name).unlink()
        os.mkfifo(ckpt / name)
        expect_corrupt(ckpt, "not a regular file")
        (ckpt / name).unlink()
        (ckpt / name).write_bytes(saved)
    assert runstate.verify(ckpt).ok


def test_a_file_shared_by_two_items_is_corruption(tmp_path: Path) -> None:
    ckpt = tmp_path / "ck"
    runstate.save(ckpt, {"a": np.arange(2), "b": np.arange(3)})

    def steal(body: dict[str, Any]) -> None:
        body["items"]["b"]["tensors"]["b"]["file"] = "a.safetensors"

    rewrite(ckpt, steal)
    expect_corrupt(ckpt, "tensors of 2 items in this file")


@pytest.mark.parametrize(
    "bad",
    ["<U4", "M8[s]", "V16", "|S16", "(2,)<f8", "f8,i4", "(1,2f8", "x" * 100, ["<f8", 2], {"names": ["a"], "formats": ["<c16"]}],
)
def test_lib_dtype_must_name_a_numeric_dtype(tmp_path: Path, bad: Any) -> None:
    """Regression: lib_dtype "<U4" or "M8[s]" rebuilt strings or dates out of raw bytes, and
    "(1,2f8" made NumPy's dtype parser raise SyntaxError out of ``load``. The writer stores
    only numeric dtypes this way (spec section 10)."""
    ckpt = tmp_path / "ck"
    runstate.save(ckpt, {"c": np.array([1 + 2j])})
    assert runstate.load(ckpt)["c"].dtype == np.complex128

    def edit(body: dict[str, Any]) -> None:
        body["items"]["c"]["tensors"]["c"]["lib_dtype"] = bad

    rewrite(ckpt, edit)
    expect_corrupt(ckpt, "lib_dtype")


def test_optimizer_state_of_the_wrong_shape_is_a_mismatch_not_a_crash(tmp_path: Path) -> None:
    """Regression: a checksummed manifest whose optimizer ``param_groups`` is a number made
    ``restore`` raise TypeError from the optimizer check."""
    ckpt = tmp_path / "run" / STEP_DIR
    state = victim_state()
    runstate.save(ckpt, {"model": state["model"], "optimizer": state["optimizer"]}, step=1)

    def edit(body: dict[str, Any]) -> None:
        pairs = body["items"]["optimizer"]["tree"]["v"]["v"]
        for pair in pairs:
            if pair[0] == "param_groups":
                pair[1] = {"t": "int", "v": "5"}
            if pair[0] == "state":
                pair[1] = {"t": "list", "v": []}

    rewrite(ckpt, edit)
    model = nn.Linear(3, 2)
    live = {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1)}
    with pytest.raises(runstate.StateMismatchError, match="optimizer"):
        runstate.CheckpointManager(ckpt.parent, read_only=True).restore(live)


# --------------------------------------------------------------------------------------------
# Memory stays bounded by the real sizes of the files


HUGE_CLAIMS: dict[str, Callable[[Path], None]] = {
    "header length 100 MiB - 1": lambda ck: replace_header(ck, b"{}", length=100 * 1024**2 - 1),
    "header length 2**64 - 1": lambda ck: replace_header(ck, b"{}", length=2**64 - 1),
    "huge shape in header and manifest": lambda ck: (
        replace_header(ck, b'{"a":{"dtype":"F32","shape":[1099511627776],"data_offsets":[0,4398046511104]}}'),
        rewrite(ck, lambda b: b["items"]["a"]["tensors"]["a"].update(shape=[2**40], data_offsets=[0, 2**42])),
    ),
    "huge file size in the manifest": lambda ck: rewrite(
        ck, lambda b: b["files"]["a.safetensors"].update(nbytes=2**62)
    ),
    "huge lib_shape": lambda ck: rewrite(
        ck, lambda b: b["items"]["a"]["tensors"]["a"].update(lib_dtype="<f4", lib_shape=[2**40, 2**40])
    ),
}


@pytest.mark.parametrize("claim", list(HUGE_CLAIMS))
def test_memory_stays_bounded_when_sizes_lie(tmp_path: Path, claim: str) -> None:
    ckpt = small(tmp_path)
    runstate.load(ckpt)  # warm up: imports and caches are not the reader's allocations
    HUGE_CLAIMS[claim](ckpt)
    tracemalloc.start()
    try:
        attack_one = runstate.verify(ckpt)
        with pytest.raises(runstate.CheckpointError):
            runstate.load(ckpt)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert not attack_one.ok or claim == "huge lib_shape"  # verify checks bytes; the shape is load's business
    assert peak < 4 * 1024**2, f"{claim}: peak {peak / 1024**2:.1f} MiB"


def test_reading_a_manifest_allocates_its_size_not_the_limit(tmp_path: Path) -> None:
    """Regression: the manifest was read with ``read(1 GiB + 1)``, which allocates a 1 GiB
    buffer up front for every load (and fails where memory cannot be overcommitted)."""
    ckpt = small(tmp_path)
    runstate.load(ckpt)
    tracemalloc.start()
    try:
        runstate.load(ckpt)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024**2, f"peak {peak / 1024**2:.1f} MiB"


@pytest.mark.fresh_process  # tracemalloc counts every thread: no other test's threads may allocate meanwhile
def test_memory_stays_bounded_under_fuzzing(victim: dict[str, bytes], tmp_path: Path) -> None:
    """A sample of the fuzz cases, with every allocation traced."""
    for name, data in victim.items():
        assert len(data) < 64 * 1024, name
    tracemalloc.start()
    try:
        outcomes = run_fuzz(victim, tmp_path / "run", ["manifest", "header", "length", "entry"], 60)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    report(outcomes, "under tracemalloc")
    assert peak < 64 * 1024**2, f"peak {peak / 1024**2:.1f} MiB"


# --------------------------------------------------------------------------------------------
# Nothing from a checkpoint runs as code


def test_names_in_a_checkpoint_are_never_imported(tmp_path: Path) -> None:
    """Class names, object kinds and bit generator names are data: a module they name is not imported."""
    (tmp_path / "evil_marker_module.py").write_text(
        f"open({str(tmp_path / 'imported')!r}, 'w').close()\nclass Evil:\n    pass\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        ckpt = tmp_path / "run" / STEP_DIR
        runstate.save(ckpt, {"m": nn.Linear(1, 1), "g": np.random.default_rng(0), "r": random.Random(0)}, step=1)

        def edit(body: dict[str, Any]) -> None:
            body["items"]["m"]["tree"]["type"] = "evil_marker_module.Evil"
            body["items"]["g"]["tree"]["kind"] = "evil_marker_module.Evil"
            body["items"]["r"]["tree"]["attrs"] = {"bit_generator": "evil_marker_module"}

        rewrite(ckpt, edit)
        attack(ckpt)
        assert not (tmp_path / "imported").exists() and "evil_marker_module" not in sys.modules
    finally:
        sys.path.remove(str(tmp_path))


PICKLE_MODULES = {"pickle", "_pickle", "cPickle"}
FORBIDDEN_MODULES = {"cloudpickle", "dill", "shelve", "marshal", "joblib"}
#: Naming pickle's exceptions is fine (``except pickle.UnpicklingError`` around a
#: ``torch.load(weights_only=True)``); anything else of pickle (de)serializes.
PICKLE_EXCEPTIONS = {"UnpicklingError", "PicklingError", "PickleError"}
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__"}


def unsafe_code(source: str, filename: str) -> list[str]:
    """Uses of pickle, eval/exec and ``torch.load`` without ``weights_only=True`` in ``source``."""
    tree = ast.parse(source, filename)
    found: list[str] = []
    aliases = {
        a.asname or a.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for a in node.names
        if a.name in PICKLE_MODULES
    }
    allowed_refs = {
        id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.attr in PICKLE_EXCEPTIONS
    }
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in FORBIDDEN_MODULES]
        elif isinstance(node, ast.ImportFrom):
            module = (node.module or "").split(".")[0]
            if module in FORBIDDEN_MODULES or (
                module in PICKLE_MODULES and any(a.name not in PICKLE_EXCEPTIONS for a in node.names)
            ):
                found.append(f"{where}: from {node.module} import {', '.join(a.name for a in node.names)}")
        elif isinstance(node, ast.Name) and node.id in aliases and id(node) not in allowed_refs:
            found.append(f"{where}: {node.id} used for more than its exceptions")
        elif isinstance(node, ast.Constant) and node.value in FORBIDDEN_MODULES | PICKLE_MODULES:
            found.append(f"{where}: the string {node.value!r} (importlib?)")
        elif isinstance(node, ast.Call):
            func = ast.unparse(node.func)
            if func.split(".")[-1] in FORBIDDEN_CALLS and (isinstance(node.func, ast.Name) or func.startswith("builtins.")):
                found.append(f"{where}: {func}()")
            if func.startswith("torch.") and func.endswith(".load"):
                safe = any(
                    k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                    for k in node.keywords
                )
                if not safe:
                    found.append(f"{where}: {func}() without weights_only=True")
            for k in node.keywords:
                if k.arg == "allow_pickle" and not (isinstance(k.value, ast.Constant) and k.value.value is False):
                    found.append(f"{where}: {func}(allow_pickle=...)")
    return found


def test_src_has_no_pickle_eval_exec_or_unsafe_torch_load() -> None:
    files = sorted((ROOT / "src").rglob("*.py"))
    assert len(files) > 15
    found = [hit for path in files for hit in unsafe_code(path.read_text(), str(path.relative_to(ROOT)))]
    assert found == []


@pytest.mark.parametrize(
    "snippet",
    [
        "import pickle\npickle.loads(b'')",
        "import pickle as p\np.load(f)",
        "import pickle\nf(pickle)",
        "import cloudpickle as cp",
        "from pickle import loads",
        "from pickle import UnpicklingError, Unpickler",
        "import importlib\nimportlib.import_module('pickle')",
        "x = eval('1')",
        "exec('x = 1')",
        "import builtins\nbuiltins.eval('1')",
        "import torch\ntorch.load('f')",
        "import torch\ntorch.load('f', weights_only=False)",
        "import numpy as np\nnp.load('f', allow_pickle=True)",
        "x = __import__('os')",
    ],
)
def test_the_scan_finds_each_forbidden_use(snippet: str) -> None:
    """Negative controls for the scan above."""
    assert unsafe_code(snippet, "snippet.py")


def test_the_scan_accepts_safe_code() -> None:
    safe = (
        "import re, torch, pickle\nfrom pickle import PicklingError\nre.compile('x')\n"
        "try:\n    torch.load('f', weights_only=True)\nexcept pickle.UnpicklingError:\n    pass\n"
        "msg = 'cannot be stored without pickle'\n"
    )
    assert unsafe_code(safe, "safe.py") == []
