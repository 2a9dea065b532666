"""The on-disk format spec (docs/format.md) is enough to read a checkpoint without runstate.

The first part of this module is an independent reader written from docs/format.md alone:
it uses only json, struct, numpy and xxhash, never runstate. The tests save real
checkpoints with runstate and check that this reader gets back exactly what was saved.
"""

from __future__ import annotations

import base64
import json
import math
import os
import random
import struct
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xxhash

# ---------------------------------------------------------------------------------------
# Independent reader (docs/format.md). No runstate imports here.
# ---------------------------------------------------------------------------------------

SUPPORTED_VERSION = 2
SUPPORTED_FEATURES = {"blobs", "zstd"}  # section 11: every "requires" entry this reader follows
NUMPY_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?", "C64": "<c8",
}  # fmt: skip
SIZES = {"BF16": 2, "F8_E4M3": 1, "F8_E4M3FNUZ": 1, "F8_E5M2": 1, "F8_E5M2FNUZ": 1}


class FormatError(Exception):
    pass


def read_manifest(ckpt: Path) -> dict[str, Any]:
    """Parse manifest.json, refuse newer versions, verify the checksum."""
    body = json.loads((ckpt / "manifest.json").read_bytes())
    if body.get("format") != "runstate" or type(body.get("format_version")) is not int:
        raise FormatError("not a runstate manifest")
    if body["format_version"] > SUPPORTED_VERSION:
        raise FormatError(f"format_version {body['format_version']} is newer than {SUPPORTED_VERSION}")
    unknown = set(body.get("requires", [])) - SUPPORTED_FEATURES
    if unknown:
        raise FormatError(f"needs newer features {sorted(unknown)}")
    stored = body.pop("checksum")
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    if xxhash.xxh3_64_hexdigest(canonical.encode("ascii")) != stored:
        raise FormatError("manifest checksum mismatch")
    return body


def read_safetensors(path: Path) -> tuple[dict[str, Any], bytes]:
    """Return (header, data section) of a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def decompress(entry: dict[str, Any], stored: bytes) -> tuple[dict[str, Any], bytes]:
    """Section 16: decode a compressed tensor piece by piece (zstd frames, or bytes stored as
    is), undo byte-grouping, check the decoded checksum; return the decoded entry and bytes."""
    import zstandard  # only a compressed checkpoint needs a zstd decoder

    c = entry["compression"]
    if c["codec"] != "zstd" or c["filter"] not in ("none", "bytegroup"):
        raise FormatError(f"unknown codec or filter in {entry['file']}")
    width = {**{k: np.dtype(v).itemsize for k, v in NUMPY_DTYPES.items()}, **SIZES}[c["dtype"]]
    planes = width if c["filter"] == "bytegroup" else 1
    out, pos, sizes = bytearray(), 0, iter(c["chunks"])
    for start in range(0, c["nbytes"], c["chunk"]):
        n = min(c["chunk"], c["nbytes"] - start) // planes  # raw bytes of each piece of this chunk
        chunk = b""
        for _ in range(planes):
            size = next(sizes)
            piece = stored[pos : pos + size]
            pos += size
            if size != n:  # a zstd frame (a piece as long as its raw bytes is stored as is)
                if zstandard.get_frame_parameters(piece).content_size != n:  # refuse before decoding
                    raise FormatError(f"a frame in {entry['file']} does not declare {n} bytes")
                piece = zstandard.ZstdDecompressor().decompress(piece)
            chunk += piece
        if planes > 1:  # byte planes back to elements
            chunk = np.frombuffer(chunk, np.uint8).reshape(planes, -1).T.tobytes()
        out += chunk
    if pos != len(stored) or len(out) != c["nbytes"] or xxhash.xxh3_64_hexdigest(bytes(out)) != c["xxh3"]:
        raise FormatError(f"decoded tensor checksum mismatch in {entry['file']}")
    decoded = {k: v for k, v in entry.items() if k != "compression"}
    return decoded | {"dtype": c["dtype"], "shape": c["shape"], "data_offsets": [0, len(out)]}, bytes(out)


def decode_tensor(entry: dict[str, Any], data: bytes) -> Any:
    begin, end = entry["data_offsets"]
    raw = data[begin:end]
    if xxhash.xxh3_64_hexdigest(raw) != entry["xxh3"]:
        raise FormatError(f"tensor checksum mismatch in {entry['file']}")
    if "compression" in entry:
        entry, raw = decompress(entry, raw)
    if "lib_dtype" in entry:  # raw bytes of a dtype safetensors lacks
        try:
            arr = np.frombuffer(raw, np.dtype(entry["lib_dtype"])).reshape(entry["lib_shape"])
        except TypeError:  # no NumPy equivalent (e.g. torch float8_e8m0fnu): keep the bytes
            arr = np.frombuffer(raw, np.uint8)
    elif entry["dtype"] == "BF16":
        arr = (np.frombuffer(raw, "<u2").astype("<u4") << 16).view("<f4").reshape(entry["shape"])
    elif entry["dtype"] in SIZES:
        arr = np.frombuffer(raw, np.uint8).reshape([*entry["shape"], SIZES[entry["dtype"]]])
    else:
        arr = np.frombuffer(raw, NUMPY_DTYPES[entry["dtype"]]).reshape(entry["shape"])
    return arr.reshape(()).copy()[()] if entry.get("scalar") else arr.copy()


def decode_node(node: dict[str, Any], tensors: dict[str, Any]) -> Any:
    t, v = node["t"], node.get("v")
    if t == "none":
        return None
    if t in ("bool", "str"):
        return v
    if t == "int":
        return int(v)
    if t == "float":
        return float(v)
    if t == "bytes":
        return base64.b64decode(v, validate=True)
    if t in ("list", "tuple"):
        out = [decode_node(x, tensors) for x in v]
        return out if t == "list" else tuple(out)
    if t == "dict":
        pairs = [(k if isinstance(k, str) else decode_node(k, tensors), decode_node(x, tensors)) for k, x in v]
        return OrderedDict(pairs) if node.get("ordered") else dict(pairs)
    if t == "tensor":
        return tensors[node["name"]]
    if t == "stateful":
        return {"__stateful__": node["type"], "state": decode_node(v, tensors)}
    if t == "object":
        return {"__object__": node["kind"], "attrs": node["attrs"], "state": decode_node(v, tensors)}
    raise FormatError(f"unknown node type {t!r}")


def read_blob_sections(ckpt: Path, manifest: dict[str, Any], sections: dict[str, bytes]) -> None:
    """Section 15: files listed in "blobs" are in the run's blobs/ folder (the checkpoint's
    parent); their header holds at least the tensors the manifest puts there, as the manifest says."""
    for fname, info in manifest.get("blobs", {}).items():
        path = ckpt.parent / "blobs" / fname
        if path.stat().st_size != info["nbytes"]:
            raise FormatError(f"blob {fname}: size differs from the manifest")
        header, sections[fname] = read_safetensors(path)
        for item in manifest["items"].values():
            for name, e in item["tensors"].items():
                if e["file"] == fname and header.get(name) != {
                    "dtype": e["dtype"], "shape": e["shape"], "data_offsets": e["data_offsets"]
                }:
                    raise FormatError(f"blob {fname}: header entry {name!r} differs from the manifest")


def read_checkpoint(ckpt: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return (manifest, {item: decoded value}); every byte is checked against the manifest."""
    manifest = read_manifest(ckpt)
    sections: dict[str, bytes] = {}
    for fname, info in manifest["files"].items():
        if (ckpt / fname).stat().st_size != info["nbytes"]:
            raise FormatError(f"{fname}: size differs from the manifest")
        header, sections[fname] = read_safetensors(ckpt / fname)
        expected = {
            name: {"dtype": e["dtype"], "shape": e["shape"], "data_offsets": e["data_offsets"]}
            for item in manifest["items"].values()
            for name, e in item["tensors"].items()
            if e["file"] == fname
        }
        if {k: v for k, v in header.items() if k != "__metadata__"} != expected:
            raise FormatError(f"{fname}: header differs from the manifest")
    read_blob_sections(ckpt, manifest, sections)
    values = {}
    for name, item in manifest["items"].items():
        tensors = {k: decode_tensor(e, sections[e["file"]]) for k, e in item["tensors"].items()}
        values[name] = decode_node(item["tree"], tensors)
    return manifest, values


# ---------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------

torch = pytest.importorskip("torch")
import runstate  # noqa: E402


def _trained_linear() -> tuple[Any, Any]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return model, opt


def _same(a: Any, b: Any) -> None:
    """Exact equality of a saved value and a decoded one (NaN equal to NaN, -0.0 to -0.0)."""
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    if isinstance(a, (np.ndarray, np.generic)):
        assert type(b) is type(a), (type(a), type(b))
        assert b.dtype == a.dtype and np.shape(b) == np.shape(a)
        np.testing.assert_array_equal(b, a)
    elif isinstance(a, float):
        assert type(b) is float and (a == b or (math.isnan(a) and math.isnan(b)))
        assert math.copysign(1.0, a) == math.copysign(1.0, b)
    elif isinstance(a, dict):
        assert type(b) is type(a) and list(b) == list(a)
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(b) is type(a) and len(b) == len(a)
        for x, y in zip(a, b, strict=True):
            _same(x, y)
    else:
        assert type(b) is type(a) and b == a


def _state() -> dict[str, Any]:
    model, opt = _trained_linear()
    return {
        "model": model,
        "optimizer": opt,
        "arrays": {
            "f32": np.arange(6, dtype=np.float32).reshape(2, 3),
            "i64": np.array([-(2**62), 7], dtype=np.int64),
            "mask": np.array([True, False]),
            "u16": np.arange(3, dtype=np.uint16),
            "c128": np.array([1 + 2j, -3.5j]),  # no safetensors dtype: U8 + lib_dtype
            "scalar": np.float32(2.5),
            "fortran": np.asfortranarray(np.arange(6, dtype=np.int32).reshape(2, 3)),
        },
        "plain": {
            "by_int": {1: "one", -2: {"deep": [1, 2]}, 10**30: None},
            "tuple": (1, 2.0, "three"),
            "list": [1, 2.0, "three"],
            "floats": [-0.0, math.inf, -math.inf, math.nan, 0.1, 1e-300],
            "big": 2**100,
            "neg_big": -(3**70),
            "bytes": b"\x00\xffrunstate",
            "none": None,
            "flags": (True, False),
            "keys": {None: 1, True: 2, 1.5: 3, b"k": 4, (1, "a"): 5, "s": 6},
            "ordered": OrderedDict([("b", 1), ("a", 2)]),
        },
        "epoch": 3,
        "bf16": torch.tensor([1.5, -2.0, 3.0], dtype=torch.bfloat16),
        "c128_torch": torch.tensor([1 + 1j, 2 - 2j], dtype=torch.complex128),
    }


def test_independent_reader_recovers_every_value(tmp_path: Path) -> None:
    state = _state()
    runstate.save(tmp_path / "ckpt", state, step=100, metrics={"loss": 0.25})
    manifest, got = read_checkpoint(tmp_path / "ckpt")

    assert list(got) == list(state)  # items keep their order
    assert got["model"]["__stateful__"] == "torch.nn.modules.linear.Linear"
    _same(state["model"].state_dict(), got["model"]["state"])  # an OrderedDict, like state_dict()

    opt_saved, opt_got = state["optimizer"].state_dict(), got["optimizer"]["state"]
    assert got["optimizer"]["__stateful__"] == "torch.optim.adamw.AdamW"
    assert list(opt_got["state"]) == [0, 1]  # int keys stay ints
    _same(opt_saved["state"], opt_got["state"])
    _same(opt_saved["param_groups"], opt_got["param_groups"])  # betas stays a tuple
    assert type(opt_got["param_groups"][0]["betas"]) is tuple

    _same(state["arrays"], got["arrays"])
    assert got["arrays"]["scalar"].shape == () and isinstance(got["arrays"]["scalar"], np.float32)
    _same(state["plain"], got["plain"])
    assert got["plain"]["big"] == 2**100 and type(got["plain"]["tuple"]) is tuple
    assert type(got["plain"]["list"]) is list and type(got["plain"]["ordered"]) is OrderedDict
    assert got["epoch"] == 3 and type(got["epoch"]) is int
    np.testing.assert_array_equal(got["bf16"], state["bf16"].float().numpy())
    np.testing.assert_array_equal(got["c128_torch"], state["c128_torch"].numpy())
    assert manifest["items"]["c128_torch"]["tensors"]["c128_torch"]["lib_dtype"] == "complex128"
    assert manifest["items"]["arrays"]["tensors"]["c128"]["lib_dtype"] == "<c16"


def test_manifest_fields(tmp_path: Path) -> None:
    import datetime as dt

    state = _state()
    runstate.save(tmp_path / "ckpt", state, step=100, metrics={"loss": 0.25, "acc": 1, "tag": "x", "ok": True})
    ckpt = tmp_path / "ckpt"
    raw = (ckpt / "manifest.json").read_bytes()
    assert raw.endswith(b"\n") and raw.isascii()
    body = json.loads(raw)
    assert list(body) == [
        "format", "format_version", "step", "created", "metrics", "versions", "items", "files", "checksum",
    ]  # fmt: skip
    assert body["format"] == "runstate" and body["format_version"] == 1 and body["step"] == 100
    assert dt.datetime.fromisoformat(body["created"]).utcoffset() == dt.timedelta(0)
    metrics = decode_node(body["metrics"], {})
    assert metrics == {"loss": 0.25, "acc": 1, "tag": "x", "ok": True}
    assert [type(v) for v in metrics.values()] == [float, int, str, bool]
    assert {"runstate", "python", "numpy", "torch"} <= set(body["versions"])
    assert all(isinstance(v, str) for v in body["versions"].values())
    assert re_hex16(body["checksum"])
    # Every file that holds tensors is listed with its exact size; nothing else is in the directory.
    assert sorted(os.listdir(ckpt)) == sorted(["manifest.json", *body["files"]])
    for fname, info in body["files"].items():
        assert set(info) == {"nbytes"} and (ckpt / fname).stat().st_size == info["nbytes"]
    # One file per item with tensors, named after the item; items without tensors have none.
    assert set(body["files"]) == {f"{n}.safetensors" for n in ("model", "optimizer", "arrays", "bf16", "c128_torch")}
    assert body["items"]["epoch"] == {"tree": {"t": "int", "v": "3"}, "tensors": {}}
    for item in body["items"].values():
        for entry in item["tensors"].values():
            assert {"file", "dtype", "shape", "data_offsets", "xxh3", "lib"} <= set(entry)
            assert entry["lib"] in ("torch", "numpy") and re_hex16(entry["xxh3"])
            assert ("device" in entry) == (entry["lib"] == "torch")
    # A flipped byte anywhere in the manifest body is detected by the checksum.
    tampered = raw.replace(b'"step": 100', b'"step": 101')
    assert tampered != raw
    (ckpt / "manifest.json").write_bytes(tampered)
    with pytest.raises(FormatError, match="checksum"):
        read_manifest(ckpt)
    with pytest.raises(runstate.CorruptCheckpointError):
        runstate.load(ckpt)


def re_hex16(s: str) -> bool:
    return isinstance(s, str) and len(s) == 16 and all(c in "0123456789abcdef" for c in s)


def test_safetensors_layout(tmp_path: Path) -> None:
    model, opt = _trained_linear()
    state = {"model": model, "optimizer": opt, "np": {"a": np.ones(3)}, "mixed": [torch.ones(2), np.ones(2)]}
    runstate.save(tmp_path / "ckpt", state, step=1)
    manifest = read_manifest(tmp_path / "ckpt")
    for item_name, expected_format in (("model", "pt"), ("optimizer", "pt"), ("np", "np"), ("mixed", "np")):
        raw = (tmp_path / "ckpt" / f"{item_name}.safetensors").read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        assert n % 8 == 0 and raw[8:9] == b"{"
        text = raw[8 : 8 + n].decode("ascii")
        assert text.rstrip(" ").endswith("}") and len(text) - len(text.rstrip(" ")) < 8  # space padding
        header = json.loads(text)
        assert header["__metadata__"] == {"format": expected_format, "runstate_item": item_name}
        entries = manifest["items"][item_name]["tensors"]
        assert [k for k in header if k != "__metadata__"] == list(entries)  # same names, same order
        offset = 0
        for name, entry in entries.items():  # back to back, relative to the data section
            assert header[name]["data_offsets"] == entry["data_offsets"] == [offset, offset + _nbytes(entry)]
            offset += _nbytes(entry)
        assert len(raw) == 8 + n + offset
        data = raw[8 + n :]
        for entry in entries.values():
            begin, end = entry["data_offsets"]
            assert xxhash.xxh3_64_hexdigest(data[begin:end]) == entry["xxh3"]
    w = model.weight.detach().numpy()
    raw = (tmp_path / "ckpt" / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert raw[8 + n : 8 + n + w.nbytes] == w.astype("<f4").tobytes()  # raw little-endian bytes


def _nbytes(entry: dict[str, Any]) -> int:
    size = {"F64": 8, "F32": 4, "I64": 8, "I32": 4, "U8": 1, "U32": 4, "BOOL": 1}[entry["dtype"]]
    return size * math.prod(entry["shape"])


def test_safetensors_load_file_feeds_load_state_dict(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    model, opt = _trained_linear()
    runstate.save(tmp_path / "ckpt", {"model": model, "optimizer": opt}, step=7)
    loaded = load_file(tmp_path / "ckpt" / "model.safetensors")
    assert list(loaded) == list(model.state_dict())
    fresh = torch.nn.Linear(3, 2)
    fresh.load_state_dict(loaded)  # strict
    assert torch.equal(fresh.weight, model.weight) and torch.equal(fresh.bias, model.bias)
    optim = load_file(tmp_path / "ckpt" / "optimizer.safetensors")
    assert set(optim) == {f"state.{i}.{k}" for i in (0, 1) for k in ("step", "exp_avg", "exp_avg_sq")}


def test_tied_weights_stored_once(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(4, 2)
            self.head = torch.nn.Linear(2, 4, bias=False)
            self.head.weight = self.emb.weight

    model = Tied()
    runstate.save(tmp_path / "ckpt", {"model": model})
    manifest, got = read_checkpoint(tmp_path / "ckpt")
    assert list(manifest["items"]["model"]["tensors"]) == ["emb.weight"]
    assert manifest["items"]["model"]["tree"]["v"]["v"][1] == ["head.weight", {"t": "tensor", "name": "emb.weight"}]
    assert list(load_file(tmp_path / "ckpt" / "model.safetensors")) == ["emb.weight"]
    sd = got["model"]["state"]
    assert list(sd) == ["emb.weight", "head.weight"] and sd["emb.weight"] is sd["head.weight"]
    np.testing.assert_array_equal(sd["head.weight"], model.head.weight.detach().numpy())


def test_tensor_names_and_file_names(tmp_path: Path) -> None:
    state = {
        "x": {"a.b": np.ones(1), "a": {"b": np.zeros(1)}, 0: np.full(1, 2.0), "0": np.full(1, 3.0), "l": [np.ones(2)]},
        "bare": np.arange(3),
        "my model/v2": {"w": np.ones(1)},
        ".hidden": {"w": np.ones(1)},
        "manifest": {"w": np.ones(1)},
    }
    runstate.save(tmp_path / "ckpt", state)
    manifest, got = read_checkpoint(tmp_path / "ckpt")
    assert list(manifest["items"]["x"]["tensors"]) == ["a.b", "a.b#2", "0", "0#2", "l.0"]
    assert list(manifest["items"]["bare"]["tensors"]) == ["bare"]
    assert manifest["items"]["my model/v2"]["tensors"]["w"]["file"] == "my_model_v2.safetensors"
    assert manifest["items"][".hidden"]["tensors"]["w"]["file"] == "hidden.safetensors"
    assert manifest["items"]["manifest"]["tensors"]["w"]["file"] == "manifest_2.safetensors"  # name reserved
    header, _ = read_safetensors(tmp_path / "ckpt" / "my_model_v2.safetensors")
    assert header["__metadata__"]["runstate_item"] == "my model/v2"
    assert got["x"]["a"]["b"][0] == 0.0 and got["x"]["a.b"][0] == 1.0
    assert got["x"][0][0] == 2.0 and got["x"]["0"][0] == 3.0


def test_sharded_item(tmp_path: Path) -> None:
    from runstate._impl.group import SingleProcess
    from runstate._impl.pipeline import capture, save_checkpoint
    from runstate.storage import open_store

    arrays = {"x": np.arange(10.0), "y": np.arange(10.0) + 1, "z": np.arange(30.0)}
    one = SingleProcess()
    save_checkpoint(open_store(tmp_path), "ckpt", capture({"a": arrays}, None, one), group=one, step=1, shard_bytes=160)
    manifest, got = read_checkpoint(tmp_path / "ckpt")
    files = {k: e["file"] for k, e in manifest["items"]["a"]["tensors"].items()}
    assert files == {"x": "a-00001-of-00002.safetensors", "y": "a-00001-of-00002.safetensors",
                     "z": "a-00002-of-00002.safetensors"}  # fmt: skip
    assert manifest["items"]["a"]["tensors"]["z"]["data_offsets"] == [0, 240]  # offsets restart per file
    _same(arrays, got["a"])


def test_generators_and_rng(tmp_path: Path) -> None:
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    rng = runstate.RNG()
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    state = {
        "rng": rng,
        "r": random.Random(5),
        "g": np.random.default_rng(6),
        "tg": torch.Generator().manual_seed(7),
    }
    runstate.save(tmp_path / "ckpt", state)
    manifest, got = read_checkpoint(tmp_path / "ckpt")

    assert got["rng"]["__stateful__"] == "runstate.rng.RNG"
    saved = got["rng"]["state"]
    assert saved["python"]["version"] == py_state[0] and saved["python"]["gauss_next"] == py_state[2]
    np.testing.assert_array_equal(saved["python"]["state"], np.array(py_state[1], dtype=np.uint32))
    assert saved["numpy"]["bit_generator"] == "MT19937" and saved["numpy"]["state"]["pos"] == np_state[2]
    np.testing.assert_array_equal(saved["numpy"]["state"]["key"], np_state[1])
    np.testing.assert_array_equal(saved["torch"]["cpu"], torch_state.numpy())
    if not torch.cuda.is_initialized():
        assert saved["torch"]["cuda"] == []
    assert list(manifest["items"]["rng"]["tensors"])[:3] == ["python.state", "numpy.state.key", "torch.cpu"]

    assert got["r"]["__object__"] == "random.Random" and got["r"]["attrs"] == {}
    version, internal, gauss = got["r"]["state"]
    assert (version, tuple(int(x) for x in internal), gauss) == random.Random(5).getstate()
    assert got["g"]["__object__"] == "numpy.Generator" and got["g"]["attrs"] == {"bit_generator": "PCG64"}
    assert got["g"]["state"] == np.random.default_rng(6).bit_generator.state  # 128-bit ints survive
    assert got["tg"]["__object__"] == "torch.Generator" and got["tg"]["attrs"] == {"device": "cpu"}
    np.testing.assert_array_equal(got["tg"]["state"], torch.Generator().manual_seed(7).get_state().numpy())


def test_run_directory_layout(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with runstate.CheckpointManager(run) as mgr:
        mgr.save(100, {"epoch": 1, "w": np.ones(2)}, force=True)
        (run / ".tmp-step-000000000200-0123456789ab").mkdir()  # leftover of an interrupted save
        names = sorted(os.listdir(run))
    assert names == [".lock", ".tmp-step-000000000200-0123456789ab", "step-000000000100"]
    assert (run / ".lock").read_text().startswith(f"pid {os.getpid()} on ")
    committed = [n for n in names if not n.startswith(".")]
    _, got = read_checkpoint(run / committed[0])
    assert got["epoch"] == 1
    assert read_manifest(run / "step-000000000100")["step"] == 100


def test_newer_format_version_is_refused(tmp_path: Path) -> None:
    runstate.save(tmp_path / "ckpt", {"epoch": 1}, step=3)
    path = tmp_path / "ckpt" / "manifest.json"
    body = json.loads(path.read_bytes())
    del body["checksum"]
    body["format_version"] = 3
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    body["checksum"] = xxhash.xxh3_64_hexdigest(canonical.encode("ascii"))
    path.write_text(json.dumps(body))
    with pytest.raises(runstate.FormatVersionError):
        runstate.load(tmp_path / "ckpt")
    with pytest.raises(FormatError, match="newer"):
        read_manifest(tmp_path / "ckpt")


def test_flipped_tensor_byte_is_detected(tmp_path: Path) -> None:
    runstate.save(tmp_path / "ckpt", {"w": np.arange(8, dtype=np.float64)})
    path = tmp_path / "ckpt" / "w.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(FormatError, match="tensor checksum"):
        read_checkpoint(tmp_path / "ckpt")
    with pytest.raises(runstate.CorruptCheckpointError):
        runstate.load(tmp_path / "ckpt")
