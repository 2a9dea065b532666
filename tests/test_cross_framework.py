"""Reading a checkpoint without the framework that wrote it: tensors come back as NumPy.

Each check runs in a fresh process where the writing framework is made unimportable
(``sys.modules[name] = None``), as on a machine where it is not installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import runstate

ROOT = Path(__file__).resolve().parents[1]

READER = """
import json, sys
for name in sys.argv[2].split(","):
    sys.modules[name] = None  # not installed
import numpy as np, runstate
out = {}
try:
    got = runstate.load(sys.argv[1])
    flat = {}
    def walk(prefix, v):
        if isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}.{k}", x)
        elif isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                walk(f"{prefix}.{i}", x)
        else:
            flat[prefix[1:]] = v
    walk("", got)
    out["types"] = sorted({type(v).__module__ + "." + type(v).__name__ for v in flat.values()})
    out["dtypes"] = {k: str(v.dtype) for k, v in flat.items() if hasattr(v, "dtype")}
    out["values"] = {k: np.asarray(v).astype(np.float64).tolist() for k, v in flat.items()
                     if hasattr(v, "dtype") and v.dtype.kind != "c"}
except Exception as exc:
    out["error"] = f"{type(exc).__name__}: {exc}"
out["loaded"] = sorted(m for m in ("torch", "jax", "tensorflow", "keras", "ml_dtypes") if sys.modules.get(m))
print(json.dumps(out))
"""


def read_without(path: Path, *missing: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-c", READER, str(path), ",".join(missing)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=120,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_torch_checkpoint_reads_as_numpy_without_torch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).to(torch.bfloat16)
    state = {
        "model": model,
        "t": {
            "f32": torch.arange(4, dtype=torch.float32) / 3,
            "f16": torch.tensor([0.5, -1.25], dtype=torch.float16),
            "i64": torch.tensor([1, -(2**40)]),
            "f8": torch.tensor([0.5, 2.0], dtype=torch.float8_e4m3fn),
            "c128": torch.tensor([1 + 2j], dtype=torch.complex128),
        },
        "rng": runstate.RNG(),
    }
    runstate.save(tmp_path / "ck", state)

    got = read_without(tmp_path / "ck", "torch")
    assert "error" not in got, got
    assert "torch" not in got["loaded"] and "ml_dtypes" in got["loaded"]
    assert all(t.startswith("numpy.") or t.startswith("builtins.") for t in got["types"]), got["types"]
    assert got["dtypes"]["model.weight"] == "bfloat16" and got["dtypes"]["t.f8"] == "float8_e4m3fn"
    assert got["dtypes"]["t.c128"] == "complex128" and got["dtypes"]["rng.torch.cpu"] == "uint8"
    assert got["values"]["model.weight"] == model.weight.detach().double().tolist()  # bf16 is exact in f64
    for name in ("f32", "f16", "i64", "f8"):
        assert got["values"][f"t.{name}"] == state["t"][name].double().tolist(), name

    without = read_without(tmp_path / "ck", "torch", "ml_dtypes")
    assert without["error"].startswith("UnsupportedTypeError") and "pip install ml-dtypes" in without["error"]


def test_jax_checkpoint_reads_as_numpy_without_jax(tmp_path: Path) -> None:
    jnp = pytest.importorskip("jax.numpy")
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    params = {"w": jnp.arange(3, dtype=jnp.bfloat16), "b": jnp.zeros(2)}
    runstate.save(tmp_path / "arrays", {"params": params, "opt": optax.adam(1e-3).init(params)})
    runstate.save(tmp_path / "key", {"key": jax.random.key(0)})

    got = read_without(tmp_path / "arrays", "jax")
    assert "error" not in got and "jax" not in got["loaded"], got
    assert got["dtypes"]["params.w"] == "bfloat16" and got["values"]["params.w"] == [0.0, 1.0, 2.0]
    assert got["dtypes"]["opt.0.0"] == "int32"  # ScaleByAdamState.count, as a plain tuple
    assert read_without(tmp_path / "key", "jax")["error"] == (
        "UnsupportedTypeError: this checkpoint holds a typed JAX PRNG key (jax.random.key); install jax to load it"
    )
