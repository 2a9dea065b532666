"""Optional zstd compression of tensor files (docs/format.md, "Compression").

Round trips of every dtype, bit for bit; both checksums; damage and lying indexes refused;
async saves and CheckpointManager restores; checkpoints without compression unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xxhash

torch = pytest.importorskip("torch")
zstandard = pytest.importorskip("zstandard")

import runstate  # noqa: E402
from runstate.format.compress import Compression, Packing  # noqa: E402
from runstate.format.safetensors_io import write_safetensors  # noqa: E402
from runstate.format.tensors import NumpyCodec  # noqa: E402
from tests.conftest import fresh_training_state, make_training_state  # noqa: E402
from tests.test_format_spec import read_checkpoint  # noqa: E402

#: Compress every tensor of at least one byte, in small chunks: several chunks per tensor.
SMALL = Compression(chunk_bytes=64 * 1024, min_bytes=1)


def _manifest(ckpt: Path) -> dict[str, Any]:
    return dict(json.loads((ckpt / "manifest.json").read_bytes()))


def _rewrite(ckpt: Path, body: dict[str, Any]) -> None:
    """Write a manifest with a correct checksum: what a crafted checkpoint can always do."""
    body = {k: v for k, v in body.items() if k != "checksum"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    body["checksum"] = xxhash.xxh3_64_hexdigest(canonical.encode("ascii"))
    (ckpt / "manifest.json").write_text(json.dumps(body))


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, torch.Tensor):
        return value.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b""
    return np.ascontiguousarray(value).tobytes()


def _every_dtype() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    big = torch.randn(300, 257, generator=g)  # 308 KB: 5 chunks of 64 KiB, the last one short
    return {
        "f32": big,
        "bf16": big.bfloat16(),
        "f16": big.half(),
        "f64": big[:40].double(),
        "i64": torch.randint(-1000, 1000, (9000,), generator=g),
        "i8": torch.randint(-100, 100, (5000,), generator=g).to(torch.int8),
        "bool": torch.rand(7000, generator=g) > 0.5,
        "f8": big[:20].to(torch.float8_e4m3fn),
        "c128": torch.randn(500, dtype=torch.complex128, generator=g),  # stored as raw bytes + lib_dtype
        "scalar": torch.tensor(3.25),  # 0-d
        "empty": torch.zeros(0, 4),
        "strided": big.t()[::2],  # a non-contiguous source
        "np_f32": np.random.default_rng(0).standard_normal((100, 33)).astype(np.float32),
        "np_scalar": np.float64(2.5),
        "np_longdouble": np.arange(50, dtype=np.longdouble),
    }


def test_every_dtype_round_trips_bit_for_bit(tmp_path: Path) -> None:
    state = {"t": _every_dtype()}
    runstate.save(tmp_path / "z", state, compression=SMALL)
    runstate.save(tmp_path / "plain", state)
    loaded = runstate.load(tmp_path / "z")["t"]
    for name, value in state["t"].items():
        got = loaded[name]
        assert type(got) is type(value), name
        if isinstance(value, torch.Tensor):
            assert got.dtype == value.dtype and got.shape == value.shape, name
        else:
            assert np.asarray(got).dtype == np.asarray(value).dtype and np.shape(got) == np.shape(value), name
        assert _as_bytes(got) == _as_bytes(value), name
    z, plain = _manifest(tmp_path / "z"), _manifest(tmp_path / "plain")
    assert z["format_version"] == 2 and z["requires"] == ["zstd"]
    entries, plain_entries = z["items"]["t"]["tensors"], plain["items"]["t"]["tensors"]
    for name, entry in entries.items():
        ref = plain_entries[name]
        if ref["data_offsets"] == [ref["data_offsets"][0]] * 2:  # an empty tensor: nothing to compress
            assert "compression" not in entry
            continue
        packed = entry["compression"]
        # the decoded bytes are the uncompressed checkpoint's bytes, checksum for checksum
        assert (packed["dtype"], packed["shape"], packed["xxh3"]) == (ref["dtype"], ref["shape"], ref["xxh3"]), name
        assert entry["dtype"] == "U8" and entry["shape"] == [entry["data_offsets"][1] - entry["data_offsets"][0]]
        planes = {"F32": 4, "F64": 8, "F16": 2, "BF16": 2}.get(packed["dtype"], 1)
        assert len(packed["chunks"]) == math.ceil(packed["nbytes"] / packed["chunk"]) * planes, name
    f32 = entries["f32"]["compression"]
    assert f32["filter"] == "bytegroup" and len(f32["chunks"]) == 5 * 4  # 5 chunks of 4 byte planes
    assert entries["i64"]["compression"]["filter"] == "none"  # floats only are byte-grouped
    assert entries["c128"]["lib_dtype"] == "complex128" and entries["c128"]["compression"]["dtype"] == "U8"


def test_default_compression_is_off_and_files_are_unchanged(tmp_path: Path) -> None:
    """The hashes below come from the code before compression existed (git HEAD b407f3d)."""
    state = {
        "model": {
            "w": torch.arange(6144, dtype=torch.float32).reshape(64, 96) / 7,
            "b": (torch.arange(96, dtype=torch.float32) / 3).bfloat16(),
            "i": torch.arange(3000),
            "s": torch.tensor(2.5),
            "e": torch.zeros(0, 3),
        },
        "arr": np.linspace(0, 1, 5000),
        "epoch": 3,
    }
    runstate.save(tmp_path / "ck", state, step=5)
    hashes = {}
    for f in sorted(os.listdir(tmp_path / "ck")):
        raw = (tmp_path / "ck" / f).read_bytes()
        if f == "manifest.json":
            body = json.loads(raw)
            for key in ("created", "versions", "checksum"):
                body.pop(key)
            raw = json.dumps(body, sort_keys=True).encode()
        hashes[f] = hashlib.sha256(raw).hexdigest()
    assert hashes == {
        "arr.safetensors": "2c8c910d7844ab382cd60dee034076780bd1ae470a201faaf8333ad662303ab0",
        "manifest.json": "0e7aab6b7e366a45f5cc711f3087286ce646323ac24efb1ffcbb0cc54336429a",
        "model.safetensors": "4144f90884e81f7a2cd43de2dfcefb42dd987261789981a53516add97b8bd518",
    }
    assert _manifest(tmp_path / "ck")["format_version"] == 1


def test_small_tensors_stay_plain_with_the_default_options(tmp_path: Path) -> None:
    state = {"m": {"big": torch.ones(10_000), "small": torch.ones(100), "scalar": torch.tensor(1.0)}}
    runstate.save(tmp_path / "ck", state, compression="zstd")
    entries = _manifest(tmp_path / "ck")["items"]["m"]["tensors"]
    assert "compression" in entries["big"] and entries["big"]["data_offsets"][1] < 1000
    assert "compression" not in entries["small"] and "compression" not in entries["scalar"]
    assert all(torch.equal(runstate.load(tmp_path / "ck")["m"][k], v) for k, v in state["m"].items())


def test_files_stay_valid_safetensors(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    runstate.save(tmp_path / "ck", {"m": {"w": torch.randn(100, 100), "b": torch.randn(3)}}, compression=SMALL)
    stored = load_file(str(tmp_path / "ck" / "m.safetensors"))
    entries = _manifest(tmp_path / "ck")["items"]["m"]["tensors"]
    assert stored["w"].dtype == torch.uint8 and list(stored["w"].shape) == entries["w"]["shape"]


def test_independent_reader_follows_compression(tmp_path: Path) -> None:
    state = {"model": make_training_state()["model"], "arrays": _every_dtype()}
    runstate.save(tmp_path / "ck", state, compression=SMALL)
    _, values = read_checkpoint(tmp_path / "ck")
    for name, value in state["model"].state_dict().items():
        assert values["model"]["state"][name].tobytes() == _as_bytes(value)
    assert values["arrays"]["f32"].tobytes() == _as_bytes(state["arrays"]["f32"])
    assert values["arrays"]["c128"].tobytes() == _as_bytes(state["arrays"]["c128"])


def _flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x40
    path.write_bytes(bytes(raw))


def _data_start(path: Path) -> int:
    return 8 + int(struct.unpack("<Q", path.read_bytes()[:8])[0])


def test_a_damaged_compressed_byte_is_detected_never_loaded(tmp_path: Path) -> None:
    ckpt = tmp_path / "ck"
    runstate.save(ckpt, {"m": {"w": torch.randn(300, 300)}}, compression=SMALL)
    entry = _manifest(ckpt)["items"]["m"]["tensors"]["w"]
    _flip(ckpt / "m.safetensors", _data_start(ckpt / "m.safetensors") + entry["data_offsets"][1] - 20)
    with pytest.raises(
        runstate.CorruptCheckpointError, match="checksum mismatch in the compressed bytes of tensor 'w'"
    ):
        runstate.load(ckpt)
    report = runstate.verify(ckpt)
    assert not report.ok and "compressed bytes" in str(report.problems[0])
    target = {"m": {"w": torch.zeros(300, 300)}}
    with pytest.raises(runstate.CorruptCheckpointError):
        runstate.load(ckpt, target)
    assert torch.count_nonzero(target["m"]["w"]) == 0  # nothing was changed


def test_verify_checks_the_decoded_bytes_too(tmp_path: Path) -> None:
    """A checkpoint whose stored bytes match their checksum but whose decoded checksum is wrong."""
    ckpt = tmp_path / "ck"
    runstate.save(ckpt, {"m": {"w": torch.randn(300, 300)}}, compression=SMALL)
    assert runstate.verify(ckpt).ok
    body = _manifest(ckpt)
    body["items"]["m"]["tensors"]["w"]["compression"]["xxh3"] = "0" * 16
    _rewrite(ckpt, body)
    report = runstate.verify(ckpt)
    assert not report.ok and "decode to bytes whose checksum differs" in str(report.problems[0])
    with pytest.raises(runstate.CorruptCheckpointError, match="decode to bytes whose checksum differs"):
        runstate.load(ckpt)


def _lie(ckpt: Path, change: Any) -> None:
    body = _manifest(ckpt)
    change(body["items"]["m"]["tensors"]["w"])
    _rewrite(ckpt, body)


@pytest.mark.parametrize(
    "lie",
    [
        "frames decode to more than the index says",
        "frames decode to less than the index says",
        "chunk sizes shifted",
        "a huge tensor from a few bytes",
        "chunk table that does not add up",
        "compression without requires",
    ],
)
def test_a_lying_index_is_refused(tmp_path: Path, lie: str) -> None:
    ckpt = tmp_path / "ck"
    value = torch.randint(0, 50, (256, 256), dtype=torch.int32)  # 256 KiB: 4 chunks of 64 KiB, one piece each
    runstate.save(ckpt, {"m": {"w": value}}, compression=SMALL)
    if lie == "frames decode to more than the index says":  # the last frame holds 64 KiB, the index says 32

        def change(e: dict[str, Any]) -> None:
            e["compression"].update(shape=[224, 256], nbytes=224 * 1024)

        match = "chunk 3, piece 0: frame declares 65536 bytes, the index says 32768"
    elif lie == "frames decode to less than the index says":

        def change(e: dict[str, Any]) -> None:
            p = e["compression"]
            p.update(shape=[512, 256], nbytes=512 * 1024, chunk=128 * 1024, chunks=p["chunks"])

        match = "chunk 0, piece 0: frame declares 65536 bytes, the index says 131072"
    elif lie == "chunk sizes shifted":

        def change(e: dict[str, Any]) -> None:
            c = e["compression"]["chunks"]
            c[0], c[1] = c[0] - 7, c[1] + 7

        match = "do not decode"
    elif lie == "a huge tensor from a few bytes":

        def change(e: dict[str, Any]) -> None:
            n = 1 << 40  # 1 TiB in chunks of 64 MiB, from the few KB stored
            chunks = [1] * (n // (64 << 20))
            chunks[0] += e["data_offsets"][1] - e["data_offsets"][0] - len(chunks)
            e["compression"].update(shape=[n // 4], nbytes=n, chunk=64 << 20, chunks=chunks)

        match = "impossible stored size"
    elif lie == "chunk table that does not add up":

        def change(e: dict[str, Any]) -> None:
            e["compression"]["chunks"][0] += 1

        match = "pieces add up to"
    else:

        def change(e: dict[str, Any]) -> None:
            pass

        body = _manifest(ckpt)
        del body["requires"]
        _rewrite(ckpt, body)
        match = "does not name .{0,2}zstd"
    _lie(ckpt, change)
    with pytest.raises(runstate.CorruptCheckpointError, match=match):
        runstate.load(ckpt)


def test_decoding_never_allocates_past_the_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A frame that claims more than its chunk is refused before it is decompressed."""
    ckpt = tmp_path / "ck"
    runstate.save(ckpt, {"m": {"w": torch.zeros(64, 1024, dtype=torch.int32)}}, compression=SMALL)  # 4 chunks
    calls: list[int] = []
    real = zstandard.ZstdDecompressor

    class Spy:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.inner = real(*args, **kwargs)

        def decompress(self, data: Any, *args: Any, **kwargs: Any) -> bytes:
            calls.append(zstandard.get_frame_parameters(data).content_size)
            return bytes(self.inner.decompress(data, *args, **kwargs))

    monkeypatch.setattr(zstandard, "ZstdDecompressor", Spy)
    assert torch.count_nonzero(runstate.load(ckpt)["m"]["w"]) == 0
    assert calls == [65536] * 4
    calls.clear()
    _lie(ckpt, lambda e: e["compression"].update(shape=[56, 1024], nbytes=224 * 1024))  # last chunk: 32 KiB
    with pytest.raises(
        runstate.CorruptCheckpointError, match="chunk 3, piece 0: frame declares 65536 bytes, the index says 32768"
    ):
        runstate.load(ckpt)
    assert calls == [65536] * 3  # the lying frame was refused from its header, never decompressed


def test_padding_after_the_header_is_spaces_only(tmp_path: Path) -> None:
    """Zeros compress to a few bytes: the header room reserved for the worst case is mostly padding."""
    ckpt = tmp_path / "ck"
    runstate.save(ckpt, {"m": {"w": torch.zeros(300, 300), "b": torch.zeros(5000)}}, compression=SMALL)
    path = ckpt / "m.safetensors"
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = raw[8 : 8 + n]
    assert n % 8 == 0 and len(header) - len(header.rstrip(b" ")) >= 8  # more than the alignment
    assert torch.count_nonzero(runstate.load(ckpt)["m"]["w"]) == 0
    path.write_bytes(raw[: 8 + n - 1] + b"\t" + raw[8 + n :])  # JSON whitespace, but not a space
    with pytest.raises(runstate.CorruptCheckpointError, match="header bytes differ"):
        runstate.load(ckpt)


def test_a_file_that_cannot_seek_gets_the_same_tensor_bytes() -> None:
    """An object-store upload cannot seek: the data goes through a spool, the header is exact."""

    class Upload(io.RawIOBase):
        def __init__(self) -> None:
            self.buf = bytearray()

        def writable(self) -> bool:
            return True

        def seekable(self) -> bool:
            return False

        def write(self, b: Any) -> int:
            self.buf += bytes(b)
            return len(memoryview(b).cast("B"))

    tensors = [
        ("w", NumpyCodec().to_blob(np.arange(100_000, dtype=np.float32), "w")),
        ("s", NumpyCodec().to_blob(np.float32(1), "s")),
    ]
    seekable = io.BytesIO()
    size_a, written_a = write_safetensors(seekable, tensors, {"format": "np"}, compression=SMALL)  # type: ignore[arg-type]
    upload = Upload()
    size_b, written_b = write_safetensors(upload, tensors, {"format": "np"}, compression=SMALL)  # type: ignore[arg-type]
    a, b = seekable.getvalue(), bytes(upload.buf)
    assert (len(a), len(b)) == (size_a, size_b)
    na, nb = (struct.unpack("<Q", x[:8])[0] for x in (a, b))
    assert a[8 + na :] == b[8 + nb :] and nb <= na
    assert json.loads(a[8 : 8 + na]) == json.loads(b[8 : 8 + nb])
    assert b[8 : 8 + nb].rstrip(b" ").endswith(b"}") and nb - len(b[8 : 8 + nb].rstrip(b" ")) < 8  # exact
    assert {k: (w.xxh3, w.packing) for k, w in written_a.items()} == {
        k: (w.xxh3, w.packing) for k, w in written_b.items()
    }


def test_incompressible_bytes_are_stored_as_they_are() -> None:
    """Noise does not shrink: its pieces are stored as is, so a compressed tensor never grows."""
    rng = np.random.default_rng(1)
    blob = NumpyCodec().to_blob(rng.integers(0, 256, 200_000, dtype=np.uint8), "r")
    out = io.BytesIO()
    size, written = write_safetensors(out, [("r", blob)], {}, compression=SMALL)  # type: ignore[arg-type]
    packing = written["r"].packing
    assert packing is not None and len(out.getvalue()) == size
    assert packing.chunks == (65536, 65536, 65536, 200_000 - 3 * 65536)  # every piece as is
    assert size == 8 + struct.unpack("<Q", out.getvalue()[:8])[0] + 200_000


def test_compressed_async_save_and_manager_restore(tmp_path: Path) -> None:
    state = make_training_state(hidden=64)
    with runstate.CheckpointManager(tmp_path / "run", async_save=True, compression=SMALL) as mgr:
        mgr.save(1, state)
        mgr.wait()
    restored = fresh_training_state(hidden=64)
    with runstate.CheckpointManager(tmp_path / "run", compression="zstd") as mgr:
        assert mgr.restore(restored) == 1
    for (k, a), (_, b) in zip(state["model"].state_dict().items(), restored["model"].state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    sa, sb = state["optimizer"].state_dict()["state"], restored["optimizer"].state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    manifest = _manifest(tmp_path / "run" / "step-000000000001")
    assert any("compression" in e for it in manifest["items"].values() for e in it["tensors"].values())


def test_manager_falls_back_past_a_damaged_compressed_checkpoint(tmp_path: Path) -> None:
    state = make_training_state(hidden=64)
    with runstate.CheckpointManager(tmp_path / "run", compression=SMALL) as mgr:
        mgr.save(1, state)
        mgr.save(2, state)
    step2 = tmp_path / "run" / "step-000000000002"
    entry = _manifest(step2)["items"]["optimizer"]["tensors"]
    e = next(e for e in entry.values() if "compression" in e)
    _flip(step2 / e["file"], _data_start(step2 / e["file"]) + e["data_offsets"][0] + 3)
    with runstate.CheckpointManager(tmp_path / "run") as mgr:
        assert mgr.restore(fresh_training_state(hidden=64)) == 1


def test_cli_show_and_ls_describe_a_compressed_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from runstate.cli import main

    with runstate.CheckpointManager(tmp_path / "run", compression="zstd") as mgr:
        mgr.save(3, {"m": {"w": torch.zeros(100, 200)}})
    assert main(["ls", str(tmp_path / "run")]) == 0
    assert main(["show", "--tensors", str(tmp_path / "run" / "step-000000000003")]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("m") and "F32" in x and "100" in x)
    assert "200" in line  # the decoded dtype and shape, not the stored U8 bytes
    assert main(["verify", str(tmp_path / "run" / "step-000000000003")]) == 0
    summary = runstate.inspect(tmp_path / "run" / "step-000000000003").tensors[0]
    assert (summary.dtype, tuple(summary.shape)) == ("F32", (100, 200)) and summary.nbytes < 1000


def test_missing_zstandard_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runstate.save(tmp_path / "ck", {"m": {"w": torch.zeros(5000)}}, compression="zstd")
    monkeypatch.setitem(sys.modules, "zstandard", None)  # import zstandard now raises ImportError
    with pytest.raises(runstate.CheckpointConfigError, match=r"pip install runstate\[zstd\]"):
        runstate.save(tmp_path / "other", {"m": {"w": torch.zeros(5000)}}, compression="zstd")
    assert not (tmp_path / "other").exists()
    with pytest.raises(runstate.UnsupportedTypeError, match=r"pip install runstate\[zstd\]"):
        runstate.load(tmp_path / "ck")


def test_missing_zstandard_is_not_damage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine without zstandard must not take compressed steps for damaged ones: falling
    back to an older step (and a rollback setting the newer ones aside) would lose training."""
    run = tmp_path / "run"
    with runstate.CheckpointManager(run, keep_last=None) as mgr:
        mgr.save(1, {"m": {"w": torch.zeros(5000)}})
    with runstate.CheckpointManager(run, keep_last=None, compression="zstd") as mgr:
        mgr.save(2, {"m": {"w": torch.ones(5000)}})
    monkeypatch.setitem(sys.modules, "zstandard", None)
    with (
        runstate.CheckpointManager(run, read_only=True) as mgr,
        pytest.raises(runstate.UnsupportedTypeError, match=r"pip install runstate\[zstd\]"),
    ):
        mgr.latest_step(verified=True)
    with runstate.CheckpointManager(run, keep_last=None) as mgr:
        state = {"m": {"w": torch.zeros(5000)}}
        with pytest.raises(runstate.UnsupportedTypeError, match=r"pip install runstate\[zstd\]"):
            mgr.restore(state)
        assert mgr.steps() == [1, 2] and mgr.abandoned() == []


@pytest.mark.parametrize("bad", ["lz4", "ZSTD", 3, True])
def test_a_bad_option_is_a_config_error(tmp_path: Path, bad: Any) -> None:
    with pytest.raises(runstate.CheckpointConfigError, match="compression must be None, 'zstd'"):
        runstate.save(tmp_path / "ck", {"x": 1}, compression=bad)
    with pytest.raises(runstate.CheckpointConfigError, match="chunk_bytes"):
        Compression(chunk_bytes=1000)
    with pytest.raises(runstate.CheckpointConfigError, match="level"):
        Compression(level=30)


def test_packing_json_round_trip() -> None:
    sizes = (100, 50, 16384, 16384, 10, 10, 3616, 3616)  # 2 chunks of 4 planes; 16384 and 3616: as is
    p = Packing(1, "bytegroup", 65536, sizes, "F32", (20000,), 80000, "0123456789abcdef")
    assert Packing.from_json(p.to_json(), sum(sizes)) == p
    with pytest.raises(ValueError, match="impossible stored size 3617 for 3616"):
        Packing.from_json({**p.to_json(), "chunks": [*sizes[:7], 3617]}, sum(sizes) + 1)
    with pytest.raises(ValueError, match="pieces add up"):
        Packing.from_json(p.to_json(), sum(sizes) + 1)


def test_compressed_checkpoint_on_s3_round_trips(s3_endpoint: str, s3_bucket: str) -> None:
    """An S3 upload cannot seek: the data section goes through the spool, the header is exact."""
    from tests.conftest import s3_options

    url, options = f"s3://{s3_bucket}/zexp", s3_options(s3_endpoint)
    saved = make_training_state(hidden=64)
    with runstate.CheckpointManager(url, storage_options=options, compression=SMALL) as mgr:
        mgr.save(5, saved)
    restored = fresh_training_state(hidden=64)
    with runstate.CheckpointManager(url, storage_options=options) as mgr:
        assert mgr.restore(restored) == 5
        info = mgr.info(5)
    for (k, a), (_, b) in zip(saved["model"].state_dict().items(), restored["model"].state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    sa, sb = saved["optimizer"].state_dict()["state"], restored["optimizer"].state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)
    assert runstate.verify(info.path, storage_options=options).ok


def test_a_piece_is_exactly_one_frame() -> None:
    """Bytes after a piece's frame (covered by a checksum a crafter can recompute) are refused."""
    from runstate.format.compress import DecodeError, decode_chunks

    raw = np.zeros(65536, np.uint8)
    frame = zstandard.ZstdCompressor(level=1).compress(raw.tobytes())
    digest = xxhash.xxh3_64_hexdigest(raw.tobytes())
    for stored, ok in ((frame, True), (frame + b"xx", False)):
        p = Packing(1, "none", 65536, (len(stored),), "U8", (65536,), 65536, digest)
        out = np.ones(65536, np.uint8)
        decode = decode_chunks(p, lambda n, s=stored: memoryview(s[:n]), out)
        if ok:
            assert [piece.size for piece in decode] == [65536] and not out.any()
        else:
            with pytest.raises(DecodeError, match="unused data"):
                list(decode)


# --------------------------------------------------------------------------- the Packer: threads, buffers, skips


def _tensors_of_every_kind() -> list[tuple[np.ndarray, str, tuple[int, ...]]]:
    """Raw bytes of float, int and noise tensors, several 64 KiB chunks each, the last one short."""
    rng = np.random.default_rng(3)
    f32 = (rng.standard_normal(70_001) * 0.01).astype(np.float32)
    arrays: list[tuple[np.ndarray, str]] = [
        (f32, "F32"),
        (f32[:50_000].astype(np.float16), "F16"),
        (f32.astype(np.float64)[:30_000], "F64"),
        (rng.integers(-5, 5, 40_000), "I64"),
        (rng.integers(0, 256, 200_000, dtype=np.uint8), "U8"),  # noise: stored as is
        (np.zeros(100_000, np.int32), "I32"),
    ]
    return [(a.reshape(-1).view(np.uint8), code, a.shape) for a, code in arrays]


def _packed(options: Compression) -> list[tuple[Packing, bytes]]:
    from runstate.format.compress import Packer

    out = []
    with Packer(options) as packer:
        for data, code, shape in _tensors_of_every_kind():
            pieces: list[bytes] = []

            def keep(piece: Any, pieces: list[bytes] = pieces) -> None:
                pieces.append(bytes(piece))  # a piece is valid only during the call

            packing = packer.compress(data, code, shape, keep)
            out.append((packing, b"".join(pieces)))
    return out


def test_threads_do_not_change_the_bytes() -> None:
    """Chunks compressed by 1, 2 or 5 threads give the same pieces in the same order."""
    one = _packed(dataclasses.replace(SMALL, threads=1))
    assert [p.filter for p, _ in one] == ["bytegroup"] * 3 + ["none"] * 3
    assert _packed(dataclasses.replace(SMALL, threads=2)) == one
    assert _packed(dataclasses.replace(SMALL, threads=5)) == one
    tensors = [
        (f"t{i}", NumpyCodec().to_blob(d.view(np.uint8), f"t{i}"))
        for i, (d, _c, _s) in enumerate(_tensors_of_every_kind())
    ]
    files = []
    for threads in (1, 3):
        f = io.BytesIO()
        write_safetensors(f, tensors, {}, compression=dataclasses.replace(SMALL, threads=threads))  # type: ignore[arg-type]
        files.append(f.getvalue())
    assert files[0] == files[1]


def test_a_piece_that_does_not_compress_is_stored_after_a_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    """Mantissa noise is judged on a 16 KiB sample and stored as is; the exponent plane is compressed."""
    from runstate.format import compress

    seen: list[int] = []
    real = compress._compressor

    class Spy:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def compress(self, data: Any) -> bytes:
            seen.append(len(memoryview(data)))
            return bytes(self.inner.compress(data))

    monkeypatch.setattr(compress, "_compressor", lambda *a: Spy(real(*a)))
    data = np.random.default_rng(0).standard_normal(256 * 1024).astype(np.float32).view(np.uint8)  # 4 chunks
    options = Compression(chunk_bytes=256 * 1024, threads=1)
    with compress.Packer(options) as packer:
        packing = packer.compress(data, "F32", (256 * 1024,), lambda p: None)
    plane = 64 * 1024
    for c in range(4):
        noise, exponent = packing.chunks[4 * c : 4 * c + 3], packing.chunks[4 * c + 3]
        assert noise == (plane, plane, plane) and exponent < plane / 2
    # per chunk: a sample of each noise plane, then the exponent plane's sample and the whole plane
    assert seen == ([compress.SAMPLE_BYTES] * 4 + [plane]) * 4


def test_one_packer_reuses_its_threads_contexts_and_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    """A file of many tensors creates a few zstd contexts and chunk buffers, not one per chunk."""
    import threading

    from runstate.format import compress

    made: list[bool] = []
    real = compress._compressor

    def counted(zstd: Any, level: int, planes: bool) -> Any:
        made.append(planes)
        return real(zstd, level, planes)

    monkeypatch.setattr(compress, "_compressor", counted)
    data = np.random.default_rng(0).standard_normal(64 * 1024).astype(np.float32).view(np.uint8)  # 4 chunks of 64 KiB
    ints = np.arange(64 * 1024, dtype=np.int32).view(np.uint8)
    options = dataclasses.replace(SMALL, threads=3)
    with compress.Packer(options) as packer:
        for _ in range(20):
            packer.compress(data, "F32", (64 * 1024,), lambda p: None)
            packer.compress(ints, "I32", (64 * 1024,), lambda p: None)
        assert packer.window == 4 and packer.buffers_made <= packer.window
        assert len(made) <= 2 * 3  # one context per thread and kind
    assert not [t for t in threading.enumerate() if t.name.startswith("runstate-zstd")]


def test_a_failing_write_stops_the_threads_and_raises() -> None:
    """A write that fails (disk full) mid-tensor propagates; no compression thread is left behind."""
    import threading

    class Full(io.BytesIO):
        def write(self, b: Any) -> int:
            if self.tell() > 200_000:
                raise OSError(28, "No space left on device")
            return super().write(b)

    data = np.random.default_rng(0).standard_normal(500_000).astype(np.float32)
    blob = NumpyCodec().to_blob(data, "w")
    with pytest.raises(OSError, match="No space left"):
        write_safetensors(Full(), [("w", blob)], {}, compression=dataclasses.replace(SMALL, threads=4))  # type: ignore[arg-type]
    assert not [t for t in threading.enumerate() if t.name.startswith("runstate-zstd")]


def test_compressing_a_large_tensor_holds_a_few_chunks() -> None:
    """Memory while compressing stays a few chunks (buffers and frames), whatever the tensor's size."""
    import tracemalloc

    from runstate.format.compress import Packer

    data = (
        (np.random.default_rng(0).standard_normal(4 * 1024 * 1024) * 1e-3).astype(np.float32).view(np.uint8)
    )  # 16 MiB
    tracemalloc.start()
    try:
        with Packer(dataclasses.replace(SMALL, threads=4)) as packer:
            packer.compress(data, "F32", (data.size // 4,), lambda p: None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 64 * 1024, peak  # 256 chunks of 64 KiB; at most 5 in flight

