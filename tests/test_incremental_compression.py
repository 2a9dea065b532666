"""Incremental checkpoints with compression, and ``runstate copy`` of compressed checkpoints.

``CheckpointManager(incremental=True, compression="zstd")``: a tensor is compared with the base
by its decoded bytes (a compressed entry's ``xxh3`` covers the stored bytes), new blobs are
compressed, a reused tensor keeps its stored (compressed) entry. Paired with the cases that
must fail: a changed frozen tensor is written again; a damaged compressed blob is named by
verify; a crafted entry whose stored bytes match but do not decode to their checksum is not
copied. ``runstate copy`` copies compressed tensors as stored, bytes and entries unchanged.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import xxhash

torch = pytest.importorskip("torch")
pytest.importorskip("zstandard")

import runstate  # noqa: E402
from runstate.format.compress import Compression  # noqa: E402
from tests.test_format_spec import read_checkpoint  # noqa: E402
from tests.test_incremental import _blobs, _manifest, _referenced  # noqa: E402

#: Compress every tensor of at least one byte, in chunks small enough for several per tensor.
SMALL = Compression(chunk_bytes=64 * 1024, min_bytes=1)

BASE_BYTES = (128 * 128 + 128) * 4  # the frozen Linear(128, 128)


def _model(seed: int = 0) -> tuple[Any, Any]:
    torch.manual_seed(seed)
    base = torch.nn.Linear(128, 128)
    base.requires_grad_(False)
    model = torch.nn.Sequential(base, torch.nn.Linear(128, 4))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return model, opt


def _train(model: Any, opt: Any) -> None:
    model(torch.randn(8, 128)).sum().backward()
    opt.step()
    opt.zero_grad()


def _values(model: Any) -> dict[str, Any]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _loads_exactly(ckpt: Path, values: dict[str, Any]) -> bool:
    fresh, _ = _model(seed=99)
    runstate.load(ckpt, {"model": fresh}, exclude=["optimizer"])
    return all(torch.equal(fresh.state_dict()[k], v) for k, v in values.items())


def _cli(*args: Any) -> Any:
    from tests.test_cli import run

    return run(*args)


@pytest.mark.parametrize("mode", [True, "versions"])
def test_compressed_tensors_are_compared_decoded_and_reused(tmp_path: Path, mode: Any) -> None:
    run = tmp_path / "run"
    model, opt = _model()
    saved: dict[int, dict[str, Any]] = {}
    with runstate.CheckpointManager(run, keep_last=None, incremental=mode, compression=SMALL) as mgr:
        for step in range(1, 4):
            _train(model, opt)
            mgr.save(step, {"model": model, "optimizer": opt})
            saved[step] = _values(model)
            written = mgr._incremental.last  # type: ignore[union-attr]
            assert written is not None
            # the frozen base is compressed and yet referred to, not written, after the first save
            assert written.reused_bytes == (0 if step == 1 else BASE_BYTES), (step, written.reused_bytes)
    m = _manifest(run / "step-000000000003")
    assert m["format_version"] == 2 and m["requires"] == ["blobs", "zstd"] and m["files"] == {}
    base = m["items"]["model"]["tensors"]["0.weight"]
    assert base["file"].startswith("000000000001-") and base["dtype"] == "U8" and "compression" in base
    assert base == _manifest(run / "step-000000000001")["items"]["model"]["tensors"]["0.weight"]  # the stored entry
    assert "compression" in m["items"]["model"]["tensors"]["1.weight"]  # new bytes are compressed too
    for step, values in saved.items():
        ckpt = run / f"step-{step:012d}"
        assert runstate.verify(ckpt).ok and _loads_exactly(ckpt, values)
    tensors = read_checkpoint(run / "step-000000000003")[1]  # the independent reader: blobs and zstd
    assert tensors["model"]["state"]["0.weight"].tobytes() == saved[3]["0.weight"].numpy().tobytes()


def test_a_changed_frozen_tensor_is_written_again_compressed(tmp_path: Path) -> None:
    """Negative control: the decoded comparison does not reuse bytes that changed (a write
    through ``.data`` moves no version counter; the default mode hashes)."""
    run = tmp_path / "run"
    model, _ = _model()
    with runstate.CheckpointManager(run, keep_last=None, incremental=True, compression=SMALL) as mgr:
        mgr.save(1, {"model": model})
        model[0].weight.data.add_(1.0)
        mgr.save(2, {"model": model})
        written = mgr._incremental.last  # type: ignore[union-attr]
        assert written is not None and any("frozen" in name for name in written.own)
        assert written.reused_bytes == 128 * 4 + (128 * 4 + 4) * 4  # all but the changed weight
        assert written.entries["model"]["0.weight"].file in written.own
    assert _loads_exactly(run / "step-000000000002", _values(model))


def test_retention_gc_and_verify_with_compressed_blobs(tmp_path: Path) -> None:
    run = tmp_path / "run"
    model, opt = _model()
    with runstate.CheckpointManager(run, keep_last=2, incremental=True, compression=SMALL) as mgr:
        for step in range(1, 6):
            _train(model, opt)
            mgr.save(step, {"model": model, "optimizer": opt})
            mgr.wait()  # retention runs in the background after save returns
            assert _blobs(run) == _referenced(run)  # collected after each deletion, referenced ones kept
        assert mgr.steps() == [4, 5]
    frozen = next(b for b in _blobs(run) if "frozen" in b)
    assert frozen.startswith("000000000001-")  # the base of step 1 outlived step 1
    stray = run / "blobs" / "000000000009-0123abcd-model.safetensors"  # a killed save's compressed blob
    stray.write_bytes((run / "blobs" / frozen).read_bytes())
    proc = _cli("gc", run)
    assert proc.returncode == 0 and str(stray) in proc.stdout and not stray.exists(), proc.stdout
    assert _blobs(run) == _referenced(run) and runstate.verify(run / "step-000000000005").ok
    raw = bytearray((run / "blobs" / frozen).read_bytes())
    raw[-1] ^= 1  # inside the compressed bytes of the base
    (run / "blobs" / frozen).write_bytes(bytes(raw))
    report = runstate.verify(run / "step-000000000005")  # step 5 wrote no base bytes, yet reads them
    assert not report.ok and {p.file for p in report.problems} == {frozen}


def test_restore_then_save_reuses_compressed_blobs(tmp_path: Path) -> None:
    run = tmp_path / "run"
    model, opt = _model()
    with runstate.CheckpointManager(run, incremental=True, compression=SMALL) as mgr:
        mgr.save(1, {"model": model, "optimizer": opt})
    fresh, fopt = _model(seed=3)
    with runstate.CheckpointManager(run, incremental=True, compression=SMALL) as mgr:
        assert mgr.restore({"model": fresh, "optimizer": fopt}) == 1
        _train(fresh, fopt)
        mgr.save(2, {"model": fresh, "optimizer": fopt})
        assert mgr._incremental.last.reused_bytes == BASE_BYTES  # type: ignore[union-attr]
    # a run that was not compressed: its plain base is reused by a compressed save (same decoded bytes)
    plain = tmp_path / "plain"
    with runstate.CheckpointManager(plain, incremental=True) as mgr:
        mgr.save(1, {"model": model, "optimizer": opt})
    with runstate.CheckpointManager(plain, incremental=True, compression=SMALL) as mgr:
        mgr.restore({"model": fresh, "optimizer": fopt})
        _train(fresh, fopt)
        mgr.save(2, {"model": fresh, "optimizer": fopt})
        assert mgr._incremental.last.reused_bytes == BASE_BYTES  # type: ignore[union-attr]
    m = _manifest(plain / "step-000000000002")
    assert "compression" not in m["items"]["model"]["tensors"]["0.weight"]
    assert "compression" in m["items"]["model"]["tensors"]["1.weight"] and m["requires"] == ["blobs", "zstd"]
    assert _loads_exactly(plain / "step-000000000002", _values(fresh))


# ------------------------------------------------------------------------------------------------
# runstate copy of compressed checkpoints


def _stored(ckpt: Path, entry: dict[str, Any], blobs: Path | None = None) -> bytes:
    """The stored bytes of a tensor, read as docs/format.md says (no runstate code)."""
    path = (blobs if blobs is not None and entry["file"] in _manifest(ckpt).get("blobs", {}) else ckpt) / entry["file"]
    raw = path.read_bytes()
    start = 8 + int.from_bytes(raw[:8], "little")
    return raw[start + entry["data_offsets"][0] : start + entry["data_offsets"][1]]


def test_copy_of_a_compressed_checkpoint_keeps_the_stored_bytes(tmp_path: Path) -> None:
    model, opt = _model()
    _train(model, opt)
    src = tmp_path / "src"
    runstate.save(src, {"model": model, "optimizer": opt}, metrics={"loss": 0.25}, compression=SMALL)
    proc = _cli("copy", src, tmp_path / "copy")
    assert proc.returncode == 0 and "self-contained" in proc.stdout, proc.stderr
    a, b = _manifest(src), _manifest(tmp_path / "copy")
    assert b["format_version"] == 2 and b["requires"] == ["zstd"] and "blobs" not in b
    for item in ("model", "optimizer"):
        for name, e in a["items"][item]["tensors"].items():
            f = b["items"][item]["tensors"][name]
            assert {k: v for k, v in f.items() if k not in ("file", "data_offsets")} == {
                k: v for k, v in e.items() if k not in ("file", "data_offsets")
            }
            assert _stored(tmp_path / "copy", f) == _stored(src, e)  # copied as stored, not compressed again
    assert any("compression" in e for e in b["items"]["model"]["tensors"].values())
    assert runstate.verify(tmp_path / "copy").ok
    fresh, fopt = _model(seed=5)
    runstate.load(tmp_path / "copy", {"model": fresh, "optimizer": fopt})
    assert all(torch.equal(x, y) for x, y in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True))
    assert runstate.inspect(tmp_path / "copy").metrics == {"loss": 0.25}
    decoded = read_checkpoint(tmp_path / "copy")[1]["model"]["state"]  # the independent reader decodes the copy
    assert decoded["0.weight"].tobytes() == model[0].weight.detach().numpy().tobytes()


def test_copy_of_an_incremental_compressed_step_is_standalone(tmp_path: Path) -> None:
    run = tmp_path / "run"
    model, opt = _model()
    with runstate.CheckpointManager(run, keep_last=None, incremental=True, compression=SMALL) as mgr:
        for step in (1, 2):
            _train(model, opt)
            mgr.save(step, {"model": model, "optimizer": opt})
    values = _values(model)
    proc = _cli("copy", run, tmp_path / "alone", "--step", "latest")
    assert proc.returncode == 0, proc.stderr
    shutil.rmtree(run)  # the copy needs nothing of the run
    m = _manifest(tmp_path / "alone")
    assert m["requires"] == ["zstd"] and "blobs" not in m and m["step"] == 2
    assert runstate.verify(tmp_path / "alone").ok and _loads_exactly(tmp_path / "alone", values)


def test_copy_refuses_damaged_or_undecodable_compressed_bytes(tmp_path: Path) -> None:
    model, _ = _model()
    src = tmp_path / "src"
    runstate.save(src, {"model": model}, compression=SMALL)
    entry = _manifest(src)["items"]["model"]["tensors"]["0.weight"]
    # 1. stored bytes damaged: their checksum fails
    damaged = tmp_path / "damaged"
    shutil.copytree(src, damaged)
    path = damaged / entry["file"]
    raw = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")
    raw[start + entry["data_offsets"][0] + 40] ^= 1
    path.write_bytes(bytes(raw))
    proc = _cli("copy", damaged, tmp_path / "out1")
    assert proc.returncode != 0 and "checksum mismatch" in proc.stderr and not (tmp_path / "out1").exists()
    # 2. crafted: the stored bytes match their checksum but the decoded checksum is not theirs
    crafted = tmp_path / "crafted"
    shutil.copytree(src, crafted)
    body = _manifest(crafted)
    body["items"]["model"]["tensors"]["0.weight"]["compression"]["xxh3"] = "0" * 16
    body.pop("checksum")
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    body["checksum"] = xxhash.xxh3_64_hexdigest(canonical.encode("ascii"))
    (crafted / "manifest.json").write_text(json.dumps(body))
    proc = _cli("copy", crafted, tmp_path / "out2")
    assert proc.returncode != 0 and "decode" in proc.stderr and not (tmp_path / "out2").exists(), proc.stderr
    # the negative control of both: the intact source copies
    assert _cli("copy", src, tmp_path / "out3").returncode == 0
