"""The storage conformance suite: every backend (local disk, ``memory://``, ``file://``, S3) passes it.

A test module subclasses :class:`StorageConformance` and provides a ``backend`` fixture
returning a :class:`Backend`; every test below then runs against that backend for free.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

import runstate
from runstate._impl.group import SingleProcess
from runstate._impl.parts import merge, write_part
from runstate._impl.pipeline import capture
from runstate.format.manifest import Manifest
from runstate.storage import Store, open_store
from tests.store_conformance import StoreConformance


@dataclass
class Backend:
    """A run location on one backend and how to damage a stored file behind runstate's back."""

    name: str
    url: str
    options: Mapping[str, Any] | None
    read_raw: Callable[[str], bytes]
    write_raw: Callable[[str], Callable[[bytes], None]]

    def store(self) -> Store:
        return open_store(self.url, storage_options=self.options)

    def manager(self, **kwargs: Any) -> runstate.CheckpointManager:
        return runstate.CheckpointManager(self.url, storage_options=self.options, **kwargs)

    def flip(self, location: str, offset: int = -1) -> None:
        data = bytearray(self.read_raw(location))
        data[offset] ^= 0xFF
        self.write_raw(location)(bytes(data))


def make_state(step: int) -> dict[str, Any]:
    rng = np.random.default_rng(step)
    return {
        "model": {"w": rng.standard_normal((64, 32), dtype=np.float32), "b": np.full(32, step, np.float32)},
        "optimizer": {"m": rng.standard_normal(100).astype(np.float64)},
        "step": step,
    }


def assert_state(got: Mapping[str, Any], step: int) -> None:
    want = make_state(step)
    assert got["step"] == step
    for item in ("model", "optimizer"):
        for key, value in want[item].items():
            np.testing.assert_array_equal(got[item][key], value)


class StorageConformance(StoreConformance):
    """Backend-independent tests of the commit protocol (and, inherited, of what a Store says about its entries)."""

    def test_nothing_is_visible_before_commit_and_everything_after(self, backend: Backend) -> None:
        store = backend.store()
        staging = store.begin(7)
        with staging.open_write("a.bin") as f:
            f.write(b"x" * 1000)
        assert store.list_committed() == {}
        assert backend.manager().steps() == []
        with pytest.raises(runstate.CheckpointNotFoundError):
            runstate.load(store.join("step-000000000007"), storage_options=backend.options)
        location = staging.commit(b"{}")
        assert store.list_committed() == {7: location} == {7: store.join("step-000000000007")}
        f2, size = store.child("step-000000000007").open_read("a.bin")
        with f2:
            assert size == 1000 and f2.read() == b"x" * 1000
        with pytest.raises(runstate.StepExistsError, match="already exists"):
            store.begin(7)

    def test_abort_leaves_nothing(self, backend: Backend) -> None:
        store = backend.store()
        staging = store.begin(3)
        with staging.open_write("a.bin") as f:
            f.write(b"data")
        staging.abort()
        assert store.list_committed() == {} and store.list_leftovers() == []
        assert not store.exists("step-000000000003")

    def test_an_exception_in_the_staging_block_commits_nothing(self, backend: Backend) -> None:
        store = backend.store()
        with pytest.raises(RuntimeError, match="boom"), store.begin(4) as staging:
            with staging.open_write("a.bin") as f:
                f.write(b"data")
            raise RuntimeError("boom")
        assert store.list_committed() == {} and not store.exists("step-000000000004")

    def test_leftovers_are_ignored_by_readers_and_removed_by_the_next_writer(self, backend: Backend) -> None:
        with backend.manager() as mgr:
            mgr.save(1, make_state(1), force=True)
        interrupted = backend.store().begin(2)  # a writer that died before committing
        with interrupted.open_write("model.safetensors") as f:
            f.write(b"half a file")
        del interrupted  # its process is gone (locally: so is its flock on the temporary directory)
        reader = backend.manager(read_only=True)
        assert reader.steps() == [1]
        assert len(reader.leftovers()) == 1
        state = make_state(0)
        assert reader.restore(state) == 1
        assert_state(state, 1)
        with backend.manager() as mgr:
            mgr.save(3, make_state(3), force=True)
            assert mgr.leftovers() == []
            assert mgr.steps() == [1, 3]

    def test_resaving_a_step_over_its_partial_leftover(self, backend: Backend) -> None:
        interrupted = backend.store().begin(5)
        with interrupted.open_write("junk.safetensors") as f:
            f.write(b"junk")
        with backend.manager() as mgr:
            assert mgr.steps() == []
            mgr.save(5, make_state(5), force=True)
            assert mgr.steps() == [5] and mgr.leftovers() == []
            path = mgr.path(5)
        assert set(runstate.inspect(path, storage_options=backend.options).files) == {
            "model.safetensors",
            "optimizer.safetensors",
        }
        assert runstate.verify(path, storage_options=backend.options).ok
        assert not backend.store().child("step-000000000005").exists("junk.safetensors")
        assert_state(runstate.load(path, storage_options=backend.options), 5)

    def test_clean_removes_leftovers(self, backend: Backend) -> None:
        interrupted = backend.store().begin(9)
        with interrupted.open_write("a.safetensors") as f:
            f.write(b"a")
        del interrupted  # its process is gone (locally: so is its flock on the temporary directory)
        with backend.manager() as mgr:
            assert len(mgr.clean(dry_run=True)) == 1
            assert len(mgr.clean()) == 1
            assert mgr.leftovers() == [] and mgr.clean() == []

    def test_retention_deletes_old_steps_completely(self, backend: Backend) -> None:
        with backend.manager(keep_last=2) as mgr:
            for step in (1, 2, 3, 4):
                mgr.save(step, make_state(step), force=True)
            assert mgr.steps() == [3, 4]
            assert mgr.leftovers() == []
            assert mgr.info(4).step == 4
        store = backend.store()
        assert not store.exists("step-000000000001") and not store.exists("step-000000000002")

    def test_attached_writers_land_in_the_same_checkpoint(self, backend: Backend) -> None:
        state = make_state(11)
        captured = capture(state, {"loss": 0.5}, SingleProcess())
        staging = backend.store().begin(11)
        other = backend.store().attach(staging.location)  # as another process would
        assert other.location == staging.location
        mine = {name: item for name, item in captured.items.items() if name in ("model", "step")}
        written = write_part(staging, mine, frozenset(), rank=0, publish=False)
        written_elsewhere = write_part(other, {"optimizer": captured.items["optimizer"]}, frozenset(), rank=1, publish=True)
        with pytest.raises(runstate.CheckpointError, match="cannot commit"):
            other.commit(b"{}")
        assert backend.store().list_committed() == {}
        items, files = merge([written, written_elsewhere], staging.final)
        manifest = Manifest(11, "2026-11-30T00:00:00+00:00", captured.metrics_node, {"runstate": "test"}, items, files)
        staging.commit(manifest.to_json_bytes())
        with backend.manager() as mgr:
            assert mgr.steps() == [11]
            assert mgr.info(11).metrics == {"loss": 0.5}
            assert runstate.verify(mgr.path(11), storage_options=backend.options).ok
            assert_state(runstate.load(mgr.path(11), storage_options=backend.options), 11)

    def test_reading_ranges(self, backend: Backend) -> None:
        payload = np.random.default_rng(0).integers(0, 256, 9 * 1024 * 1024 + 13, dtype=np.uint8).tobytes()
        store = backend.store()
        staging = store.begin("blob")
        with staging.open_write("data.bin") as f:
            f.write(payload)
        staging.commit(b"{}")
        f2, size = store.child("blob").open_read("data.bin")
        with f2:
            assert size == len(payload)
            f2.seek(5)
            assert f2.read(10) == payload[5:15]
            f2.seek(1000)
            out = bytearray(len(payload) - 1000)  # large: fetched as parallel ranges on object stores
            assert f2.readinto(out) == len(out)
            assert bytes(out) == payload[1000:]
        with pytest.raises(FileNotFoundError):
            store.child("blob").open_read("missing.bin")

    def test_a_flipped_byte_is_detected_and_restore_falls_back(self, backend: Backend) -> None:
        with backend.manager(keep_last=None) as mgr:
            mgr.save(1, make_state(1), force=True)
            mgr.save(2, make_state(2), force=True)
            newest = mgr.path(2)
        backend.flip(f"{newest}/model.safetensors")
        with pytest.raises(runstate.CorruptCheckpointError, match="checksum mismatch"):
            runstate.load(newest, storage_options=backend.options)
        report = runstate.verify(newest, storage_options=backend.options)
        assert not report.ok and report.problems[0].file == "model.safetensors"
        assert runstate.verify(backend.manager(read_only=True).path(1), storage_options=backend.options).ok  # control
        state = make_state(0)
        with backend.manager() as mgr:
            with pytest.raises(runstate.CorruptCheckpointError):
                mgr.restore(make_state(0), fallback=False)
            assert mgr.restore(state, fallback=True) == 1
            assert_state(state, 1)
            mgr.save(2, make_state(2), force=True)  # the damaged step is moved aside, not deleted
            assert mgr.steps() == [1, 2]
            assert runstate.verify(mgr.path(2), storage_options=backend.options).ok

    def test_a_second_writer_gets_a_lock_error(self, backend: Backend) -> None:
        with backend.manager() as first:
            first.save(1, make_state(1), force=True)
            with pytest.raises(runstate.LockError, match="one writer"):
                backend.manager()  # when it is created, not at its first save
            assert backend.manager(read_only=True).steps() == [1]  # a reader takes no lock
        with backend.manager() as third:  # released by close()
            assert third.save(2, make_state(2), force=True)

    def test_verify_before_commit(self, backend: Backend) -> None:
        with backend.manager() as mgr:
            assert mgr.save(1, make_state(1), force=True, verify=True)
            assert mgr.steps() == [1]

    def test_standalone_save_and_load(self, backend: Backend) -> None:
        path = backend.store().join("single")
        info = runstate.save(path, make_state(4), step=4, storage_options=backend.options)
        assert info.path == path and info.step == 4
        assert_state(runstate.load(path, storage_options=backend.options), 4)
        assert runstate.inspect(path, storage_options=backend.options).step == 4
        with pytest.raises(runstate.StepExistsError):
            runstate.save(path, make_state(4), storage_options=backend.options)


def local_flip_helpers() -> tuple[Callable[[str], bytes], Callable[[str], Callable[[bytes], None]]]:
    def read(path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def write(path: str) -> Callable[[bytes], None]:
        def put(data: bytes) -> None:
            os.chmod(path, 0o644)
            with open(path, "r+b") as f:
                f.write(data)

        return put

    return read, write
