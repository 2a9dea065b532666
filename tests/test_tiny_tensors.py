"""States of many tiny tensors (issue 20, target 6): the fast paths of the save must store
exactly what the general paths stored.

A save of 10,000 tiny tensors gathers their bytes into a few large writes, reads the bytes of
plain CPU tensors through NumPy, writes the safetensors header piece by piece, asks the
registry once per class, keeps the active adapters between calls and pauses the cyclic garbage
collector while it encodes. Each test here fails when one of those shortcuts changes a byte, a
name, a checksum, or what the program sees afterwards.
"""

from __future__ import annotations

import gc
import io
import json
import os
import random
import string
import struct
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import xxhash
from safetensors import safe_open

import runstate
from runstate import adapters
from runstate.format import safetensors_io
from runstate.format.gcpause import gc_paused
from runstate.format.safetensors_io import header_bytes, write_safetensors
from runstate.format.tensors import TensorBlob

N_TINY = 10_000


def mixed_tensors(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """``n`` tensors of at most 1 KiB: every dtype runstate stores, 0-d, empty, non-contiguous,
    requiring grad, lazily conjugated or negated views, and a few above the gathering size."""
    gen = torch.Generator().manual_seed(seed)
    dtypes = [
        torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
        torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128,
        torch.uint16, torch.uint32, torch.uint64, torch.float8_e4m3fn, torch.float8_e5m2,
    ]  # fmt: skip
    shapes: list[tuple[int, ...]] = [(), (0,), (1,), (3,), (2, 3), (4, 0, 2), (16,), (5, 5), (64,), (2, 2, 2)]
    out: dict[str, torch.Tensor] = {}
    big = torch.arange(40_000, dtype=torch.float32)
    for i in range(n):
        dtype, shape = dtypes[i % len(dtypes)], shapes[(i // len(dtypes)) % len(shapes)]
        base = torch.randint(0, 100, shape, generator=gen, dtype=torch.int64)
        if dtype.is_complex:
            t = torch.complex(base.double(), -base.double()).to(dtype)
        else:
            t = base.to(torch.float32).to(dtype) if dtype.is_floating_point else base.to(dtype)
        kind = i % 7
        if kind == 1 and t.dim() >= 2:
            t = t.transpose(0, -1)  # not contiguous
        elif kind == 2 and t.dtype.is_floating_point and t.element_size() >= 2:
            t = t.clone().requires_grad_(True)
        elif kind == 3 and t.dtype.is_complex:
            t = t.conj()  # lazy conjugate bit
        elif kind == 4 and t.dtype.is_complex:
            t = torch._neg_view(t)  # lazy negative bit
        elif kind == 5 and t.numel() > 1:
            t = t.reshape(-1)[1:]  # a view that does not start at its storage's start
        out[f"t{i:05d}"] = t
        if i in (2500, 7500):  # 160 KB: written on its own, between two gathered runs
            out[f"t{i:05d}big"] = big if i == 2500 else big[1:].reshape(3, 13_333)
    return out


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality of values, dtype and shape (NaN-safe, conj/neg resolved)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a, b = a.detach().resolve_conj().resolve_neg(), b.detach().resolve_conj().resolve_neg()
    return bytes(a.contiguous().view(-1).view(torch.uint8).numpy()) == bytes(
        b.contiguous().view(-1).view(torch.uint8).numpy()
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    tensors = mixed_tensors(N_TINY)
    path = tmp_path_factory.mktemp("tiny") / "ck"
    runstate.save(path, {"tensors": tensors})
    return path, tensors


def test_ten_thousand_tiny_tensors_of_every_kind_round_trip_exactly(
    saved: tuple[Path, dict[str, torch.Tensor]],
) -> None:
    path, tensors = saved
    got = runstate.load(path)["tensors"]
    assert list(got) == list(tensors)
    bad = [k for k, v in tensors.items() if not same(v, got[k])]
    assert bad == []
    # negative control: the comparison sees a single flipped bit
    flipped = got["t00000"].clone()
    flipped.reshape(-1).view(torch.uint8)[0] ^= 1
    assert not same(tensors["t00000"], flipped)


def test_safe_open_reads_every_tensor_and_the_data_is_their_bytes_in_index_order(
    saved: tuple[Path, dict[str, torch.Tensor]],
) -> None:
    path, tensors = saved
    manifest = json.loads((path / "manifest.json").read_text())
    index = manifest["items"]["tensors"]["tensors"]
    (fname,) = {e["file"] for e in index.values()}
    raw = (path / fname).read_bytes()
    start = 8 + struct.unpack("<Q", raw[:8])[0]
    end = 0
    with safe_open(str(path / fname), framework="pt") as f:
        assert set(f.keys()) == set(index) == set(tensors)
        for name, entry in index.items():
            begin, stop = entry["data_offsets"]
            assert begin == end  # contiguous, in index order: no gap, no overlap
            end = stop
            piece = raw[start + begin : start + stop]
            assert xxhash.xxh3_64_hexdigest(piece) == entry["xxh3"]
            t = tensors[name].detach().resolve_conj().resolve_neg().contiguous()
            assert piece == bytes(t.view(-1).view(torch.uint8).numpy()), name
            stored = f.get_tensor(name)
            if "lib_dtype" in entry:  # complex128: raw bytes, U8 [nbytes]
                assert stored.dtype == torch.uint8 and bytes(stored.numpy()) == piece
            else:
                assert same(stored, t), name
    assert start + end == len(raw)


def test_one_flipped_byte_of_one_tiny_tensor_is_detected_and_named(
    saved: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    path, _tensors = saved
    damaged = tmp_path / "ck"
    damaged.mkdir()
    for f in path.iterdir():
        (damaged / f.name).write_bytes(f.read_bytes())
    index = json.loads((path / "manifest.json").read_text())["items"]["tensors"]["tensors"]
    victim = "t06001"
    entry = index[victim]
    assert 0 < entry["data_offsets"][1] - entry["data_offsets"][0] <= 1024
    file = damaged / entry["file"]
    raw = bytearray(file.read_bytes())
    raw[8 + struct.unpack("<Q", raw[:8])[0] + entry["data_offsets"][1] - 1] ^= 0x40  # its last byte
    file.write_bytes(bytes(raw))

    report = runstate.verify(damaged)
    assert not report.ok
    assert [(p.file, p.tensor) for p in report.problems] == [(entry["file"], victim)]
    with pytest.raises(runstate.CorruptCheckpointError) as err:
        runstate.load(damaged)
    assert err.value.tensor == victim and victim in str(err.value)
    assert runstate.verify(path).ok  # negative control: the original is intact


def _reader(a: np.ndarray) -> Callable[[], memoryview]:
    return lambda: a.reshape(-1).view(np.uint8).data


class CountingFile(io.BytesIO):
    """A file that counts its write calls."""

    writes = 0

    def write(self, data: Any) -> int:
        self.writes += 1
        return super().write(data)


def test_tiny_tensors_are_written_in_a_few_writes_with_large_ones_in_their_place() -> None:
    small = [np.full(16, i, dtype=np.float32) for i in range(3000)]
    large = np.arange(50_000, dtype=np.float32)  # above the gathering size: written on its own
    arrays = [*small[:1500], large, *small[1500:]]
    blobs = [(f"a{i}", TensorBlob("F32", a.shape, a.nbytes, "numpy", _reader(a))) for i, a in enumerate(arrays)]
    f = CountingFile()
    size, written = write_safetensors(f, blobs, {"format": "np"})
    assert f.writes <= 5  # header, the run before the large tensor, the large one, the run after it
    data = f.getvalue()
    assert size == len(data)
    start = 8 + struct.unpack("<Q", data[:8])[0]
    assert data[start:] == b"".join(a.tobytes() for a in arrays)
    for (name, _blob), a in zip(blobs, arrays, strict=True):
        w = written[name]
        assert data[start + w.begin : start + w.end] == a.tobytes()
        assert w.xxh3 == xxhash.xxh3_64_hexdigest(a.tobytes())


def test_many_tiny_tensors_flush_their_buffer_past_its_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(safetensors_io, "_GATHER_BYTES", 1000)
    arrays = [np.full(25, i, dtype=np.int64) for i in range(100)]  # 200 bytes each
    blobs = [(f"a{i}", TensorBlob("I64", a.shape, a.nbytes, "numpy", _reader(a))) for i, a in enumerate(arrays)]
    f = CountingFile()
    write_safetensors(f, blobs, {})
    assert 20 <= f.writes <= 22  # a write every 5 tensors, not one per tensor nor one at the end
    data = f.getvalue()
    assert data[8 + struct.unpack("<Q", data[:8])[0] :] == b"".join(a.tobytes() for a in arrays)


def _reference_header(tensors: list[tuple[str, str, tuple[int, ...], int, int]], metadata: dict[str, str]) -> bytes:
    """The header as json.dumps writes it: what header_bytes wrote before it was hand-built."""
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    for name, dtype, shape, begin, end in tensors:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    return raw + b" " * (-len(raw) % 8)


def test_the_header_is_byte_for_byte_the_json_of_the_spec() -> None:
    rnd = random.Random(20)
    alphabet = string.printable + 'éü\u2028\U0001f600\x00\x7f"\\/'
    for _ in range(2000):
        names = sorted(
            {"".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 8))) for _ in range(rnd.randint(0, 6))}
        )
        names = [n for n in names if n != "__metadata__"]
        tensors = [
            (n, rnd.choice(["F32", "U8", "BF16"]), tuple(rnd.randint(0, 2**40) for _ in range(rnd.randint(0, 4))),
             rnd.randint(0, 2**50), rnd.randint(0, 2**50))
            for n in names
        ]  # fmt: skip
        metadata = rnd.choice([{}, {"format": "pt", "runstate_item": rnd.choice([*names, "x"])}])
        assert header_bytes(tensors, metadata) == _reference_header(tensors, metadata)
    with pytest.raises(ValueError, match="listed twice"):
        header_bytes([("a", "F32", (1,), 0, 4), ("a", "F32", (1,), 4, 8)], {})
    with pytest.raises(TypeError):
        header_bytes([("a", "F32", (np.int64(1),), 0, 4)], {})  # type: ignore[list-item]  # json.dumps refuses it too
    with pytest.raises(TypeError):
        header_bytes([("a", "F32", (True,), 0, 4)], {})  # json.dumps would write "true"


def test_tied_and_aliased_tensors_are_told_apart_by_their_memory_and_layout(tmp_path: Path) -> None:
    w = torch.arange(12, dtype=torch.float32)
    c = torch.complex(torch.arange(4.0), torch.ones(4))
    state = {
        "a": w,
        "a_again": w,  # the same tensor: stored once
        "same_memory": w.view(12),  # another object, same memory and layout: stored once
        "reshaped": w.view(3, 4),  # same memory, other shape: stored apart
        "shifted": w[1:],  # another start
        "as_int": w.view(torch.int32),  # same memory, other dtype
        "c": c,
        "c_conj": c.conj(),  # same memory, conjugate bit
        "c_neg": torch._neg_view(c),  # same memory, negative bit
        "empty1": torch.empty(0),
        "empty2": torch.empty(0),  # empty tensors are never merged
    }
    runstate.save(tmp_path / "ck", {"s": state})
    manifest = json.loads((tmp_path / "ck" / "manifest.json").read_text())
    item = manifest["items"]["s"]
    pairs = {k: node["name"] for k, node in item["tree"]["v"]}
    assert pairs["a_again"] == pairs["a"] == pairs["same_memory"] == "a"
    assert len(set(pairs.values())) == len(pairs) - 2
    got = runstate.load(tmp_path / "ck")["s"]
    assert got["a"] is got["a_again"]
    for k, v in state.items():
        assert same(v, got[k]), k


TOY_CODEC: Any = object()


def test_the_active_adapters_follow_imports_and_removals(monkeypatch: pytest.MonkeyPatch) -> None:
    class Toy:
        pass

    class ToyAdapter(adapters.Adapter):
        name = "toy"

        def tensor_codec(self, value: Any) -> Any:
            return TOY_CODEC if isinstance(value, Toy) else None

    monkeypatch.setattr(adapters, "KNOWN_ADAPTERS", dict(adapters.KNOWN_ADAPTERS))
    monkeypatch.setattr(adapters, "_loaded", dict(adapters._loaded))
    adapters.register_adapter("toyfw_cache_test", ToyAdapter())
    monkeypatch.delitem(sys.modules, "toyfw_cache_test", raising=False)
    assert adapters.find_codec(Toy()) is None  # not imported: inactive (and this answer is kept)
    monkeypatch.setitem(sys.modules, "toyfw_cache_test", types.ModuleType("toyfw_cache_test"))
    assert adapters.find_codec(Toy()) is TOY_CODEC  # imported: active at the next call
    monkeypatch.setitem(sys.modules, "toyfw_cache_test", None)  # marked missing, same number of modules
    assert adapters.find_codec(Toy()) is None
    assert "toy" not in [a.name for a in adapters.active_adapters()]
    monkeypatch.setitem(sys.modules, "toyfw_cache_test", types.ModuleType("toyfw_cache_test"))
    assert "toy" in [a.name for a in adapters.active_adapters()]
    other = ToyAdapter()
    monkeypatch.setitem(adapters._loaded, "toyfw_cache_test", other)  # replaced in place
    assert any(a is other for a in adapters.active_adapters())


def test_a_save_of_many_tiny_tensors_runs_no_full_garbage_collection(tmp_path: Path) -> None:
    tensors = {f"t{i:05d}": torch.randn(8) for i in range(N_TINY)}
    full: list[int] = []

    def note(phase: str, info: dict[str, int]) -> None:
        if phase == "start" and info["generation"] == 2:
            full.append(1)

    assert gc.isenabled()
    gc.collect()
    gc.callbacks.append(note)
    try:
        runstate.save(tmp_path / "ck", {"tensors": tensors})
    finally:
        gc.callbacks.remove(note)
    assert full == []  # before: two, each walking every object of the program
    assert gc.isenabled()  # enabled again afterwards


def test_the_collector_pause_is_reentrant_and_keeps_a_program_s_own_choice() -> None:
    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the outer walk still runs
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the program had disabled it: left so
    finally:
        gc.enable()
    with pytest.raises(RuntimeError), gc_paused():
        raise RuntimeError("a failed walk")
    assert gc.isenabled()


def test_incremental_saves_of_tiny_tensors_rewrite_only_what_changed(tmp_path: Path) -> None:
    tensors = {f"t{i:04d}": torch.randn(4) for i in range(2000)}
    mgr = runstate.CheckpointManager(tmp_path / "run", incremental=True)
    mgr.save(1, {"tensors": tensors}, force=True)
    tensors["t0999"].add_(1.0)
    mgr.save(2, {"tensors": tensors}, force=True)
    mgr.close()
    got = runstate.load(tmp_path / "run" / Path(mgr.path(2)).name)["tensors"]
    assert all(torch.equal(got[k], v) for k, v in tensors.items())
    first = json.loads((Path(mgr.path(1)) / "manifest.json").read_text())["items"]["tensors"]["tensors"]
    second = json.loads((Path(mgr.path(2)) / "manifest.json").read_text())["items"]["tensors"]["tensors"]
    changed = [k for k in first if first[k]["xxh3"] != second[k]["xxh3"]]
    assert changed == ["t0999"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_a_child_forked_during_a_paused_walk_has_the_collector_on() -> None:
    """A DataLoader worker forked while another thread encodes a state must not inherit a
    collector that nothing will ever turn back on."""
    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.write(write, b"1" if gc.isenabled() else b"0")
            os._exit(0)
        os.close(write)
        seen = os.read(read, 1)
        os.close(read)
        os.waitpid(pid, 0)
    assert gc.isenabled()
    assert seen == b"1"


def test_the_programs_state_dict_runs_with_the_collector_on(tmp_path: Path) -> None:
    """The collector is paused for runstate's own walk, not for the program's code it calls
    (a state_dict() blocking in an all-gather while other threads make cyclic garbage)."""
    seen: list[bool] = []

    class Blocking:
        def state_dict(self) -> dict[str, Any]:
            seen.append(gc.isenabled())
            return {"w": np.ones(3)}

        def load_state_dict(self, state: dict[str, Any]) -> None:
            pass

    runstate.save(tmp_path / "ck", {"x": Blocking(), "many": {f"t{i}": np.ones(2) for i in range(50)}})
    assert seen == [True]
    assert gc.isenabled()
