"""torch.distributed: real 2-process groups (gloo on CPU) started by tests/dist_job.py.

DDP: replicated items written once, per-rank items (RNG, data position) by every rank, a
rank SIGKILLed in the middle of writing its files never yields a committed checkpoint, and
the resumed run is bit-identical on every rank (negative control: weights-only resume).
FSDP2 (DTensor): saved on N processes and restored on M for 2->2, 2->1 and 1->2, the whole
model and optimizer state bit-identical, and training continues identically.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch  # the pinned CPU build has torch.distributed (gloo): these tests must run, never skip

import runstate
from runstate.errors import CorruptCheckpointError
from runstate.format.manifest import ChunkedTensor, TensorEntry

JOB = Path(__file__).with_name("dist_job.py")
SRC = Path(__file__).resolve().parents[1] / "src"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def job(*args: Any, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, str(JOB), *map(str, args), "--port", str(_port())]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return proc


def results(out: Path, world: int = 2) -> list[dict[str, Any]]:
    return [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    d = tmp_path_factory.mktemp("ddp-ref")
    job("ddp", 2, d / "run", d / "out")
    return results(d / "out")


def test_ddp_writes_replicated_items_once_and_per_rank_items_per_rank(tmp_path: Path) -> None:
    job("ddp", 2, tmp_path / "run", tmp_path / "out", "--steps", 5)
    ckpt = tmp_path / "run" / "step-000000000005"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["ranks"] == {"world_size": 2, "per_rank": ["rng", "data"]}
    assert sorted(manifest["items"]) == ["data@rank0", "data@rank1", "model", "optimizer", "rng@rank0", "rng@rank1", "scheduler"]
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(
        ["manifest.json", "model.safetensors", "optimizer.safetensors", "rng_rank0.safetensors", "rng_rank1.safetensors", "data_rank0.safetensors", "data_rank1.safetensors", "rank-00000.part.json", "rank-00001.part.json"]
    )
    assert runstate.verify(ckpt).ok
    # the two ranks really saved different data positions
    stored = runstate.load(ckpt)
    assert not torch.equal(stored["data@rank0"]["gen"], stored["data@rank1"]["gen"])


@pytest.mark.parametrize(
    ("rank", "when"),
    [(1, "mid-save"), (0, "mid-save"), (0, "before-commit")],
    ids=["rank 1 mid-write", "rank 0 mid-write", "rank 0 after every rank's files, before commit"],
)
def test_ddp_rank_killed_mid_save_commits_nothing_and_resume_is_exact(
    tmp_path: Path, uninterrupted: list[dict[str, Any]], rank: int, when: str
) -> None:
    run, out = tmp_path / "run", tmp_path / "out"
    killed = job("ddp", 2, run, out, "--kill-rank", rank, "--kill-step", 15, "--kill-when", when, check=False)
    assert killed.returncode != 0 and "SIGKILL" in killed.stderr
    names = sorted(p.name for p in run.iterdir())
    assert "step-000000000015" not in names  # rank 0 never committed without rank 1's files
    assert [n for n in names if n.startswith("step-")] == ["step-000000000005", "step-000000000010"]
    assert any(n.startswith(".tmp-step-000000000015") for n in names)  # the half-written save, invisible
    job("ddp", 2, run, out)
    resumed = results(out)
    for ref, got in zip(uninterrupted, resumed):
        assert got["start"] == 10
        assert got["losses"] == ref["losses"][10:]
        assert got["params"] == ref["params"]
    assert not [p for p in run.iterdir() if p.name.startswith(".tmp-")]  # cleaned by the next save


def test_ddp_on_s3_rank_killed_mid_upload_resumes_exactly(
    tmp_path: Path, uninterrupted: list[dict[str, Any]], s3_endpoint: str, s3_bucket: str
) -> None:
    """The same protocol on an object store: ranks write under the step prefix, rank 0's
    manifest (written last) commits; a rank killed mid-upload leaves no manifest."""
    import boto3

    url, out = f"s3://{s3_bucket}/ddp", tmp_path / "out"
    s3 = ("--s3-endpoint", s3_endpoint)
    killed = job("ddp", 2, url, out, "--kill-rank", 1, "--kill-step", 15, "--kill-when", "mid-save", *s3, check=False)
    assert killed.returncode != 0
    client = boto3.client(
        "s3", endpoint_url=s3_endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="ddp/")["Contents"]}
    assert "ddp/step-000000000010/manifest.json" in keys
    assert "ddp/step-000000000015/manifest.json" not in keys
    assert any(k.startswith("ddp/step-000000000015/") for k in keys)  # the partial upload, invisible
    job("ddp", 2, url, out, *s3)
    for ref, got in zip(uninterrupted, results(out)):
        assert got["start"] == 10
        assert got["losses"] == ref["losses"][10:] and got["params"] == ref["params"]
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="ddp/")["Contents"]}
    assert {k.split("/")[1] for k in keys if k.split("/")[1].startswith("step-")} == {
        "step-000000000015",
        "step-000000000020",
    }  # keep_last=2: the leftover was replaced by a committed step 15


def test_ddp_rank_killed_between_saves_resumes_exactly(tmp_path: Path, uninterrupted: list[dict[str, Any]]) -> None:
    run, out = tmp_path / "run", tmp_path / "out"
    killed = job("ddp", 2, run, out, "--kill-rank", 0, "--kill-step", 12, check=False)
    assert killed.returncode != 0
    job("ddp", 2, run, out)
    for ref, got in zip(uninterrupted, results(out)):
        assert got["start"] == 10
        assert got["losses"] == ref["losses"][10:] and got["params"] == ref["params"]


def test_ddp_weights_only_resume_differs(tmp_path: Path, uninterrupted: list[dict[str, Any]]) -> None:
    """Negative control: the comparison above can tell a resume that misses state."""
    run, out = tmp_path / "run", tmp_path / "out"
    job("ddp", 2, run, out, "--kill-rank", 1, "--kill-step", 12, check=False)
    job("ddp", 2, run, out, "--variant", "weights-only")
    got = results(out)
    assert got[0]["start"] == 10
    assert got[0]["params"] != uninterrupted[0]["params"]
    assert got[0]["losses"] != uninterrupted[0]["losses"][10:]


def test_ddp_damaged_per_rank_file_falls_back_on_every_rank(tmp_path: Path) -> None:
    run, out = tmp_path / "run", tmp_path / "out"
    job("ddp", 2, run, out, "--steps", 10)
    damaged = run / "step-000000000010" / "data_rank1.safetensors"
    raw = bytearray(damaged.read_bytes())
    raw[-1] ^= 0xFF
    damaged.write_bytes(bytes(raw))
    job("ddp", 2, run, out, "--steps", 12)
    assert [r["start"] for r in results(out)] == [5, 5]  # both ranks restored the same older step
    assert (run / "step-000000000010").exists()  # a damaged checkpoint is never deleted


@pytest.fixture(scope="module")
def saved_sharded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("fsdp")
    job("sharded", 2, d / "run2", d / "s2.json", "--fsdp", "--action", "save")
    job("sharded", 1, d / "run1", d / "s1.json", "--action", "save")
    return {
        "dir": d,
        "2": json.loads((d / "s2.json").read_text()),
        "1": json.loads((d / "s1.json").read_text()),
    }


@pytest.mark.parametrize(
    ("saved_on", "restored_on", "fsdp"),
    [("2", 2, True), ("2", 1, False), ("2", 1, True), ("1", 2, True)],
    ids=["2->2 fsdp", "2->1 plain", "2->1 fsdp", "1->2 fsdp"],
)
def test_sharded_state_reshards_exactly(saved_sharded: dict[str, Any], saved_on: str, restored_on: int, fsdp: bool) -> None:
    d = saved_sharded["dir"]
    out = d / f"restore-{saved_on}-{restored_on}-{fsdp}.json"
    job("sharded", restored_on, d / f"run{saved_on}", out, "--action", "restore", *(["--fsdp"] if fsdp else []))
    got = json.loads(out.read_text())
    ref = saved_sharded[saved_on]
    assert got["step"] == "3"
    assert got["n"] == ref["n"] == "16"  # 4 params + 4 x (step, exp_avg, exp_avg_sq)
    assert got["digest"] == ref["digest"]  # every tensor of model and optimizer, whole
    assert got["after"] == ref["after"]  # and training goes on identically
    assert ("Shard" in got["placements"]) == fsdp


def test_sharded_checkpoints_are_equal_across_world_sizes(saved_sharded: dict[str, Any]) -> None:
    """The same training saved by 1 process and by 2 FSDP2 processes holds the same values."""
    assert saved_sharded["1"]["digest"] == saved_sharded["2"]["digest"]
    d = saved_sharded["dir"]
    two = d / "run2" / "step-000000000003"
    manifest = json.loads((two / "manifest.json").read_text())
    chunks = manifest["items"]["model"]["chunks"]
    assert len(chunks["0.weight"]["parts"]) == 2  # one block per rank
    assert {p.name for p in two.iterdir()} >= {"model.rank00000.safetensors", "model.rank00001.safetensors"}
    assert runstate.verify(two).ok
    contents = runstate.inspect(two)  # the CLI's view: whole tensors, blocks in the index
    assert contents.items["model"].value["0.weight"].shape == (32, 12)
    assert "0.weight@16,0" in {t.name for t in contents.items["model"].tensors}
    # without torch.distributed, the blocks are assembled whole (here: as plain tensors)
    a = runstate.load(two)["model"]
    b = runstate.load(d / "run1" / "step-000000000003")["model"]
    for k in b:
        assert torch.equal(a[k], b[k]), k


def test_sharded_block_damage_is_detected(saved_sharded: dict[str, Any], tmp_path: Path) -> None:
    import shutil

    src = saved_sharded["dir"] / "run2" / "step-000000000003"
    ckpt = tmp_path / "ckpt"
    shutil.copytree(src, ckpt)
    f = ckpt / "optimizer.rank00001.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-3] ^= 0x01
    f.write_bytes(bytes(raw))
    report = runstate.verify(ckpt)
    assert not report.ok and report.problems[0].file == "optimizer.rank00001.safetensors"
    with pytest.raises(CorruptCheckpointError):
        runstate.load(ckpt)


def test_per_rank_items_at_another_world_size(tmp_path: Path) -> None:
    job("resize", 2, tmp_path / "run", tmp_path / "x.json", "--action", "save")
    job("resize", 1, tmp_path / "run", tmp_path / "r.json", "--action", "restore")
    got = json.loads((tmp_path / "r.json").read_text())
    assert "per-rank item saved by 2 process(es), restored by 1" in got["strict"]
    assert "runstate.PerRank(value, on_resize='skip')" in got["strict"]
    assert got["skip"] == 1


def _entry(name: str, shape: tuple[int, ...], begin: int) -> TensorEntry:
    n = int(np.prod(shape)) * 4
    return TensorEntry("x.safetensors", "F32", shape, begin, begin + n, "0" * 16, "torch")


@pytest.mark.parametrize(
    ("parts", "ok"),
    [
        ([((0, 0), (2, 4)), ((2, 0), (2, 4))], True),
        ([((0, 0), (4, 2)), ((0, 2), (4, 2))], True),
        ([((0, 0), (2, 4)), ((1, 0), (2, 4))], False),  # overlap (and a gap)
        ([((0, 0), (2, 4))], False),  # half missing
        ([((0, 0), (2, 4)), ((3, 0), (2, 4))], False),  # outside the tensor
        ([((0, 0), (2, 4)), ((2, 0), (2, 4)), ((2, 0), (0, 4))], True),  # an empty block is harmless
    ],
)
def test_chunked_tensor_parts_must_tile_the_tensor(parts: list[Any], ok: bool) -> None:
    tensors = {f"t@{i}": _entry(f"t@{i}", shape, 0) for i, (_, shape) in enumerate(parts)}
    obj = {"dtype": "F32", "shape": [4, 4], "lib": "torch", "parts": [{"offsets": list(o), "tensor": f"t@{i}"} for i, (o, _) in enumerate(parts)]}
    if ok:
        assert ChunkedTensor.from_json(obj, tensors).shape == (4, 4)
    else:
        with pytest.raises(ValueError):
            ChunkedTensor.from_json(obj, tensors)


def test_per_rank_in_one_process_saves_and_restores_the_value(tmp_path: Path) -> None:
    counter = runstate.PerRank({"seen": 3})
    runstate.save(tmp_path / "c", {"counter": counter})
    assert runstate.load(tmp_path / "c")["counter"] == {"seen": 3}
    live = runstate.PerRank({"seen": 0})
    runstate.load(tmp_path / "c", {"counter": live})
    assert live.value == {"seen": 3}
    with pytest.raises(runstate.CheckpointConfigError, match="on_resize"):
        runstate.PerRank(1, on_resize="average")


def test_damaged_block_of_a_sharded_item_falls_back_on_every_rank(tmp_path: Path) -> None:
    run = tmp_path / "run"
    job("edge", 2, run, tmp_path / "saved", "--action", "shard-fallback-save")
    saved = results(tmp_path / "saved")
    damaged = run / "step-000000000002" / "model.rank00001.safetensors"
    raw = bytearray(damaged.read_bytes())
    raw[-2] ^= 0x10
    damaged.write_bytes(bytes(raw))
    job("edge", 2, run, tmp_path / "restored", "--action", "shard-fallback-restore")
    for got in results(tmp_path / "restored"):
        assert got["step"] == 1  # DCP's failure on rank 1 is recognised as damage, on both ranks
        assert got["digest"] == saved[0]["digest1"]


def test_different_items_on_the_ranks_raise_on_every_rank(tmp_path: Path) -> None:
    job("edge", 2, tmp_path / "run", tmp_path / "out", "--action", "differ")
    for got in results(tmp_path / "out"):
        assert got["save"] == "StateMismatchError"  # not a hang, not a silently dropped item
        assert got["restore"] == "StateMismatchError"
        assert got["steps"] == [1]


def test_one_rank_failing_to_write_fails_every_rank_and_commits_nothing(tmp_path: Path) -> None:
    job("edge", 2, tmp_path / "run", tmp_path / "out", "--action", "write-fails")
    for got in results(tmp_path / "out"):
        assert got["save"] == "CheckpointWriteError"
        assert got["steps"] == [] and got["leftovers"] == []


def test_mismatch_on_one_rank_and_damage_on_another_raise_the_same_error(tmp_path: Path) -> None:
    job("edge", 2, tmp_path / "run", tmp_path / "out", "--action", "mismatch-and-corrupt")
    assert [got["restore"] for got in results(tmp_path / "out")] == ["StateMismatchError"] * 2


def test_sharded_item_holding_a_numpy_array(tmp_path: Path) -> None:
    job("edge", 2, tmp_path / "run", tmp_path / "out", "--action", "numpy-in-sharded")
    for got in results(tmp_path / "out"):
        assert got["verify"] is True and got["restore"] == "ok"
        assert got["table"] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
