"""The adapter protocol and its lazy registry (``runstate.adapters``).

The core asks the active adapters (those whose framework the program has imported) and never
imports a framework to check; a third-party framework plugs in by module name without
touching the core; a NumPy-only program uses the NumPy adapter alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import runstate
from runstate import adapters
from runstate.adapters import AdapterSpec, register_adapter
from runstate.adapters.base import Adapter, RestoreContext, StatefulRule, Unavailable
from runstate.format.tensors import NumpyCodec, TensorBlob, TensorCodec
from runstate.format.tree import ObjectCodec, StatefulState

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORKS = ("torch", "jax", "keras", "tensorflow")


def run_python(code: str, *missing: str) -> dict[str, Any]:
    """Run ``code`` in a fresh interpreter (``missing`` modules marked not installed); its last
    stdout line is JSON."""
    prelude = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in missing)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-c", prelude + code], capture_output=True, text=True, env=env, check=True, timeout=300
    )
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


# -- laziness -------------------------------------------------------------------------------------


def test_import_runstate_imports_no_framework_and_no_framework_adapter() -> None:
    got = run_python(
        "import json, runstate\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r} "
        "or m.startswith('runstate.adapters.'))))"
    )
    assert got == ["runstate.adapters.base"]  # the protocol only: no framework, no adapter


def test_an_adapter_is_imported_only_once_its_framework_is(tmp_path: Path) -> None:
    got = run_python(
        "import json, numpy as np, runstate\n"
        f"runstate.save({str(tmp_path / 'ck')!r}, {{'w': np.ones(3), 'step': 1}})\n"
        "before = sorted(m for m in sys.modules if m.startswith('runstate.adapters.'))\n"
        "import torch\n"
        "from runstate import adapters\n"
        "codec = adapters.find_codec(torch.ones(1))\n"
        "after = sorted(m for m in sys.modules if m.startswith('runstate.adapters.'))\n"
        "print(json.dumps({'before': before, 'after': after, 'lib': codec.lib,\n"
        "                  'active': [a.name for a in adapters.active_adapters()]}))"
    )
    assert "runstate.adapters.torch" not in got["before"] and "runstate.adapters.jax" not in got["before"]
    assert "runstate.adapters.torch" in got["after"] and got["lib"] == "torch"
    assert "runstate.adapters.torch_dcp" not in got["after"]  # DCP only for a distributed restore
    assert got["active"] == ["numpy", "torch", "torch.distributed"]


def test_numpy_only_program_uses_the_numpy_adapter_alone(tmp_path: Path) -> None:
    got = run_python(
        "import json, random, numpy as np, runstate\n"
        "from runstate import adapters\n"
        f"path = {str(tmp_path / 'ck')!r}\n"
        "state = {'w': np.arange(4.0), 'g': np.random.default_rng(3), 'r': random.Random(5), 'step': 7}\n"
        "runstate.save(path, state)\n"
        "live = {'w': np.zeros(4), 'g': np.random.default_rng(0), 'r': random.Random(0), 'step': 0}\n"
        "result = runstate.load(path, live)\n"
        "print(json.dumps({'w': live['w'].tolist(), 'g': int(live['g'].integers(1 << 30)),\n"
        "                  'expect_g': int(np.random.default_rng(3).integers(1 << 30)), 'step': live['step'],\n"
        "                  'active': [a.name for a in adapters.active_adapters()],\n"
        "                  'loaded': sorted(m for m in sys.modules if m.startswith('runstate.adapters.'))}))",
        *FRAMEWORKS,
    )
    assert got["w"] == [0.0, 1.0, 2.0, 3.0] and got["step"] == 7 and got["g"] == got["expect_g"]
    assert got["active"] == ["numpy"]
    assert got["loaded"] == ["runstate.adapters.base", "runstate.adapters.data", "runstate.adapters.numpy"]


# -- a third-party framework plugs in by module name ----------------------------------------------


class ToyTensor:
    """A tensor of a framework runstate has never heard of ("toyfw")."""

    def __init__(self, data: np.ndarray, device: str = "toy:0") -> None:
        self.data = data
        self.device = device

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def dtype(self) -> np.dtype[Any]:
        return self.data.dtype


class ToyModel:
    """A stateful object whose state_dict the toy adapter loads partially (like a torch module)."""

    def __init__(self) -> None:
        self.w = ToyTensor(np.zeros(2, dtype=np.float32), device="toy:1")
        self.loaded: list[tuple[dict[str, Any], bool]] = []

    def state_dict(self) -> dict[str, Any]:
        return {"w": self.w}

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        self.loaded.append((state, strict))
        if "w" in state:
            self.w = state["w"]


class ToyCodec:
    lib = "toyfw"

    def to_blob(self, value: Any, where: str) -> TensorBlob:
        blob = NumpyCodec().to_blob(value.data, where)
        return TensorBlob(blob.dtype, blob.shape, blob.nbytes, self.lib, blob.read, blob.meta)

    def from_bytes(self, data: np.ndarray, dtype: str, shape: tuple[int, ...], meta: dict[str, Any]) -> Any:
        return ToyTensor(np.array(NumpyCodec().from_bytes(data, dtype, shape, meta)), device="toy:cpu")


class ToyKey:
    """A toy PRNG key living on a device."""

    def __init__(self, key: int, device: str) -> None:
        self.key = key
        self.device = device


class ToyKeys:
    """Object codec for toy PRNG keys; a key of a device this machine lacks is Unavailable."""

    def get(self, value: Any) -> tuple[str, Any, dict[str, Any]] | None:
        if isinstance(value, ToyKey):
            return "toyfw.Key", np.asarray([value.key]), {"device": value.device}
        return None

    def make(self, kind: str, state: Any, attrs: dict[str, Any]) -> Any:
        if kind != "toyfw.Key":
            raise KeyError(kind)
        if attrs["device"] != "toy:0":
            return Unavailable(f"a toy key on {attrs['device']}", f"{attrs['device']} does not exist here")
        return ToyKey(int(np.asarray(state)[0]), attrs["device"])

    def copy_into(self, target: Any, source: Any) -> bool:
        return False


class ToyAdapter(Adapter):
    name = "toyfw"
    lib = "toyfw"

    def tensor_codec(self, value: Any) -> TensorCodec | None:
        return ToyCodec() if isinstance(value, ToyTensor) else None

    def codec(self) -> TensorCodec | None:
        return ToyCodec()

    def object_codec(self) -> ObjectCodec | None:
        return ToyKeys()

    def versions(self) -> dict[str, str]:
        return {"toyfw": "0.1"}

    def stateful_rule(self, obj: Any) -> StatefulRule | None:
        return (
            StatefulRule(check_class=False, compare_kinds=True, partial_load=True)
            if isinstance(obj, ToyModel)
            else None
        )

    def stateful_source(self, obj: Any, stored: StatefulState, path: tuple[Any, ...], ctx: RestoreContext) -> Any:
        if isinstance(obj, ToyModel) and isinstance(stored.state, dict) and "scale" in stored.state:
            ctx.add((*path, "scale"), "toy", "a toy model stores no scale")
        return stored.state

    def place_like(self, stored: Any, template: Any) -> Any:
        if isinstance(stored, ToyTensor) and isinstance(template, ToyTensor):
            return ToyTensor(stored.data, template.device)
        return stored


@pytest.fixture
def toyfw(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """The toy framework registered (not yet imported: the test imports it)."""
    module = types.ModuleType("toyfw")
    monkeypatch.setattr(adapters, "KNOWN_ADAPTERS", dict(adapters.KNOWN_ADAPTERS))
    monkeypatch.setattr(adapters, "_loaded", dict(adapters._loaded))
    register_adapter("toyfw", AdapterSpec(ToyAdapter(), lib="toyfw", objects={"toyfw.Key": "a toy key"}))
    monkeypatch.delitem(sys.modules, "toyfw", raising=False)
    monkeypatch.setitem(sys.modules, "toyfw", module)
    return module


def test_a_registered_adapter_is_inactive_until_its_framework_is_imported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(adapters, "KNOWN_ADAPTERS", dict(adapters.KNOWN_ADAPTERS))
    monkeypatch.setattr(adapters, "_loaded", dict(adapters._loaded))
    register_adapter("toyfw_absent", "tests.no_such_module_is_ever_imported")
    assert adapters.find_codec(ToyTensor(np.zeros(1))) is None  # the adapter module is not imported
    assert "toyfw_absent" not in adapters._loaded


def test_a_third_party_adapter_round_trips_its_tensors(tmp_path: Path, toyfw: types.ModuleType) -> None:
    state = {"t": ToyTensor(np.arange(3, dtype=np.float32)), "nested": {"u": ToyTensor(np.ones((2, 2)))}}
    info = runstate.save(tmp_path / "ck", state)
    manifest = json.loads((Path(info.path) / "manifest.json").read_text())
    assert manifest["versions"]["toyfw"] == "0.1"
    assert {e["lib"] for item in manifest["items"].values() for e in item["tensors"].values()} == {"toyfw"}
    live: dict[str, Any] = {"t": ToyTensor(np.zeros(3, dtype=np.float32), "toy:7"), "nested": {"u": None}}
    runstate.load(tmp_path / "ck", live)
    assert isinstance(live["t"], ToyTensor) and live["t"].data.tolist() == [0.0, 1.0, 2.0]
    assert live["t"].device == "toy:7"  # placed like the live value (adapter place_like)
    assert live["nested"]["u"].data.tolist() == [[1.0, 1.0], [1.0, 1.0]]
    with pytest.raises(runstate.StateMismatchError, match=r"shape \(3,\) in checkpoint, \(4,\) live"):
        runstate.load(tmp_path / "ck", {"t": ToyTensor(np.zeros(4, dtype=np.float32)), "nested": {"u": None}})


def test_a_third_party_stateful_rule_and_checks_apply(tmp_path: Path, toyfw: types.ModuleType) -> None:
    saved = ToyModel()
    saved.w = ToyTensor(np.asarray([3.0, 4.0], dtype=np.float32))
    runstate.save(tmp_path / "ck", {"m": saved})
    live = ToyModel()
    report = runstate.load(tmp_path / "ck", {"m": live}).report
    assert report and report.ok
    assert live.w.data.tolist() == [3.0, 4.0] and live.w.device == "toy:1"  # loaded in place, placed
    assert live.loaded[-1][1] is True  # partial_load: strict when everything matched

    runstate.save(tmp_path / "ck2", {"m": {"w": ToyTensor(np.ones(2, dtype=np.float32)), "scale": 2.0}})
    other = ToyModel()
    with pytest.raises(runstate.StateMismatchError, match="a toy model stores no scale"):
        runstate.load(tmp_path / "ck2", {"m": other})
    assert other.loaded == []  # phase one failed: nothing changed
    report = runstate.load(tmp_path / "ck2", {"m": other}, strict=False).report
    assert not report and report.of("m", "toy") == ["state['m']['scale']"]
    assert other.loaded[-1][1] is False and set(other.loaded[-1][0]) == {"w"}  # what matches, not strict


def test_an_unavailable_value_is_reported_without_naming_its_framework(tmp_path: Path, toyfw: types.ModuleType) -> None:
    runstate.save(tmp_path / "ck", {"k": ToyKey(5, "toy:9")})
    kept = ToyKey(1, "toy:0")
    with pytest.raises(runstate.StateMismatchError, match="toy:9 does not exist here"):
        runstate.load(tmp_path / "ck", {"k": kept})
    with pytest.raises(runstate.UnsupportedTypeError, match="toy:9 does not exist here"):
        runstate.load(tmp_path / "ck")
    state = {"k": kept}
    report = runstate.load(tmp_path / "ck", state, strict=False).report
    assert state["k"] is kept and report.of("k", "device") == ["state['k']"]


def test_registering_an_adapter_twice_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(adapters, "KNOWN_ADAPTERS", dict(adapters.KNOWN_ADAPTERS))
    with pytest.raises(runstate.CheckpointConfigError, match="clobber=True"):
        register_adapter("torch", ToyAdapter())
    register_adapter("torch", ToyAdapter(), clobber=True)
    assert adapters.KNOWN_ADAPTERS["torch"].target.__class__ is ToyAdapter


# -- restore results ------------------------------------------------------------------------------


def test_restore_report_truth_is_ok() -> None:
    from runstate._impl.restore import Mismatch, RestoreReport

    assert RestoreReport("p") and RestoreReport("p").ok
    bad = RestoreReport("p", (Mismatch("m", "state['m']", "shape", "state['m']: shape"),))
    assert not bad and not bad.ok


@pytest.mark.parametrize(
    "options",
    [
        {"rename": {"model": [("(", "")]}},
        {"rename": {"model": [(r"^(a)", r"\2")]}},
        {"rename": ["model"]},
        {"exclude": [1]},
    ],
)
def test_bad_restore_options_are_config_errors(tmp_path: Path, options: dict[str, Any]) -> None:
    runstate.save(tmp_path / "ck", {"model": {"a.w": np.ones(1)}})
    state: dict[str, Any] = {"model": None}
    with pytest.raises(runstate.CheckpointConfigError):
        runstate.load(tmp_path / "ck", state, **options)
    assert state["model"] is None
