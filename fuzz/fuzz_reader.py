"""Atheris fuzz target: a hostile checkpoint may only ever raise ``runstate.CheckpointError``.

    python fuzz/fuzz_reader.py [CORPUS_DIR] [libFuzzer flags: -max_total_time=600 -rss_limit_mb=1024 ...]
    python fuzz/fuzz_reader.py --smoke 300        # without atheris: seeds plus random byte flips

Each input is ``mode (1 byte) | file (1 byte) | payload`` and turns a small, real checkpoint
(a module, an optimizer, odd dtypes, generators, plain values) into a hostile one:

* mode 0: ``payload`` replaces the file's bytes;
* mode 1: ``payload`` is a manifest; if it parses as a JSON object its checksum is
  recomputed, so the fuzzer gets past the checksum into the schema and tree decoders;
* mode 2: ``payload`` is a safetensors header for the file; the file is rebuilt around it
  and the manifest's size and checksum updated, so the header checks are reached.

The checkpoint is then read by ``runstate.verify``, ``runstate.load`` (plain and into a live
state) and ``CheckpointManager.restore``. Any exception that is not a ``CheckpointError``
is a finding (libFuzzer saves the input as ``crash-*``); so is running out of the
``-rss_limit_mb`` memory or hanging. Seed inputs (the intact files in every mode) are
written to the corpus directory when it is empty.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import random
import shutil
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import runstate
from runstate.format.manifest import _canonical_checksum

MODES = 3
_WORK = Path()  # a temporary directory, made by _setup() (nothing happens at import)
_VICTIM: dict[str, bytes] = {}
_NAMES: list[str] = []


def _state() -> dict[str, Any]:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    return {
        "model": model,
        "optimizer": opt,
        "arrays": {"f": np.arange(6, dtype=np.float32).reshape(2, 3), "c128": np.array([1 + 2j]), "s": np.float64(2.5)},
        "rng": random.Random(1),
        "gen": np.random.default_rng(2),
        "plain": {"i": 1, "big": 2**100, "f": -0.0, "b": b"xy", "t": (1, None), 0: "int key"},
    }


def _live() -> dict[str, Any]:
    model = nn.Linear(3, 2)
    return {
        "model": model,
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        "arrays": None,
        "rng": random.Random(),
        "gen": np.random.default_rng(),
        "plain": None,
    }


def _setup() -> None:
    global _WORK
    _WORK = Path(tempfile.mkdtemp(prefix="runstate-fuzz-"))
    atexit.register(shutil.rmtree, _WORK, True)
    runstate.save(_WORK / "victim", _state(), step=1, metrics={"loss": 0.5})
    _VICTIM.update({p.name: p.read_bytes() for p in sorted((_WORK / "victim").iterdir())})
    _NAMES.extend(sorted(_VICTIM))


def _with_checksum(body: dict[str, Any]) -> bytes:
    body.pop("checksum", None)
    try:
        body["checksum"] = _canonical_checksum(body)
        return json.dumps(body).encode()
    except (ValueError, RecursionError, TypeError):
        return b"{}"


def checkpoint_from(data: bytes) -> dict[str, bytes]:
    """The files of the checkpoint an input describes."""
    files = dict(_VICTIM)
    if len(data) < 2:
        return files
    mode, name, payload = data[0] % MODES, _NAMES[data[1] % len(_NAMES)], data[2:]
    if mode == 0:
        files[name] = payload
    elif mode == 1:
        try:
            body = json.loads(payload)
        except (ValueError, RecursionError):
            body = None
        files["manifest.json"] = _with_checksum(body) if isinstance(body, dict) else payload
    elif name != "manifest.json":
        raw = files[name]
        (n,) = struct.unpack("<Q", raw[:8])
        files[name] = struct.pack("<Q", len(payload)) + payload + raw[8 + n :]
        body = json.loads(files["manifest.json"])
        body["files"][name] = {"nbytes": len(files[name])}
        files["manifest.json"] = _with_checksum(body)
    return files


def seeds() -> list[bytes]:
    """The intact checkpoint, once per mode and file: good starting points for mutation."""
    out = []
    for i, name in enumerate(_NAMES):
        raw = _VICTIM[name]
        out.append(bytes([0, i]) + raw)
        if name == "manifest.json":
            out.append(bytes([1, i]) + raw)
        else:
            (n,) = struct.unpack("<Q", raw[:8])
            out.append(bytes([2, i]) + raw[8 : 8 + n])
    return out


def _write(files: dict[str, bytes]) -> Path:
    run = _WORK / "run"
    shutil.rmtree(run, ignore_errors=True)
    ckpt = run / "step-000000000001"
    ckpt.mkdir(parents=True)
    for name, blob in files.items():
        (ckpt / name).write_bytes(blob)
    os.symlink("/etc/passwd", ckpt / "outside.safetensors")
    os.mkfifo(ckpt / "fifo.safetensors")
    return ckpt


def TestOneInput(data: bytes) -> None:  # the name atheris expects
    ckpt = _write(checkpoint_from(data))
    for call in (
        lambda: runstate.verify(ckpt),
        lambda: runstate.load(ckpt),
        lambda: runstate.load(ckpt, _live()),
        lambda: runstate.CheckpointManager(ckpt.parent).restore(_live()),
    ):
        with contextlib.suppress(runstate.CheckpointError):  # anything else escapes: a finding
            call()


def _smoke(n: int) -> None:
    """Without atheris: every seed, then ``n`` inputs with random bytes flipped, inserted or cut."""
    rnd = random.Random(0)
    inputs = seeds()
    for _ in range(n):
        data = bytearray(rnd.choice(inputs))
        for _ in range(rnd.randint(1, 4)):
            at = rnd.randrange(len(data))
            op = rnd.randrange(3)
            if op == 0:
                data[at] = rnd.randrange(256)
            elif op == 1:
                data[at:at] = bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 8)))
            else:
                del data[at : at + rnd.randint(1, 8)]
        inputs.append(bytes(data))
    for data in inputs:
        TestOneInput(data)
    print(f"smoke: {len(inputs)} inputs, no exception but CheckpointError")


def main(argv: list[str]) -> None:
    import logging

    logging.getLogger("runstate").setLevel(logging.ERROR)  # restore() logs every damaged checkpoint
    _setup()
    if argv[1:2] == ["--smoke"]:
        _smoke(int(argv[2]) if len(argv) > 2 else 300)
        return
    import atheris  # pip install atheris (make fuzz does)

    corpus = next((a for a in argv[1:] if not a.startswith("-")), None)
    if corpus is None:
        corpus = str(_WORK / "corpus")
        argv = [*argv, corpus]
    if not os.path.isfile(corpus):  # a file is an input to replay (crash-*, oom-*...)
        os.makedirs(corpus, exist_ok=True)
    if os.path.isdir(corpus) and not os.listdir(corpus):
        for i, seed in enumerate(seeds()):
            Path(corpus, f"seed-{i}").write_bytes(seed)
    atheris.instrument_func(TestOneInput)
    for name, module in list(sys.modules.items()):  # coverage feedback from runstate and json only
        if name == "runstate" or name.startswith(("runstate.", "json")):
            for value in list(vars(module).values()):
                if callable(value) and getattr(value, "__module__", None) == name:
                    _instrument(atheris, value)
    atheris.Setup(argv, TestOneInput)
    atheris.Fuzz()


def _instrument(atheris: Any, obj: Any) -> None:
    """Instrument a function, or every method of a class, for coverage."""
    targets = vars(obj).values() if isinstance(obj, type) else [obj]
    for target in targets:
        func = getattr(target, "__func__", target)
        if hasattr(func, "__code__"):
            with contextlib.suppress(Exception):  # a function atheris cannot patch is merely not covered
                atheris.instrument_func(func)


if __name__ == "__main__":
    main(sys.argv)
