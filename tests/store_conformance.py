"""Conformance of the Store methods that stand in for ``os`` calls outside ``runstate/storage``.

The manager, the reader and the CLI ask the store what is at a location (``kind``,
``check_directory``), how large it is (``size``), when it changed (``modified``), to drop
caches before a read-back, and what else lies in a run (``list_extras``). Every backend runs
these through :class:`tests.storage_conformance.StorageConformance`, which inherits them.
"""

from __future__ import annotations

import errno
import os
import time
from typing import TYPE_CHECKING

import pytest

import runstate
from runstate.storage import (
    ABANDONED,
    DAMAGED,
    INTERRUPTED_SAVE,
    MISNAMED,
    AttachedStaging,
    BegunStaging,
    Store,
    parent_store,
)

if TYPE_CHECKING:
    from tests.storage_conformance import Backend


def _commit(store: Store, name: str, files: dict[str, bytes], manifest: bytes = b"{}") -> str:
    staging = store.begin(name)
    for file, data in files.items():
        with staging.open_write(file) as f:
            f.write(data)
    return staging.commit(manifest)


class StoreConformance:
    """What a Store says about its entries, on every backend."""

    def test_kind_and_size_of_what_is_there(self, backend: Backend) -> None:
        store = backend.store()
        assert store.kind() is None and store.size() == 0  # the run does not exist yet
        assert store.kind("nothing") is None and store.size("nothing") == 0
        _commit(store, "ckpt", {"a.bin": b"x" * 1000, "b.bin": b"y" * 24})
        assert store.kind() == "directory" and store.kind("ckpt") == "directory"
        assert store.kind("ckpt/a.bin") == "file"
        assert store.size("ckpt/a.bin") == 1000
        assert store.size("ckpt") == 1000 + 24 + len(b"{}")  # the manifest counts too
        assert store.size() == store.size("ckpt")

    def test_check_directory_refuses_a_file_where_the_run_should_be(self, backend: Backend) -> None:
        store = backend.store()
        _commit(store, "ckpt", {"weights.bin": b"w"})
        store.check_directory("a CheckpointManager needs a directory")  # a directory: accepted
        store.child("not-yet").check_directory("a CheckpointManager needs a directory")  # missing: accepted
        a_file = store.child("ckpt").child("weights.bin")
        assert a_file.kind() == "file"
        with pytest.raises(runstate.CheckpointWriteError, match="is a file; a CheckpointManager needs") as err:
            a_file.check_directory("a CheckpointManager needs a directory")
        assert err.value.errno == errno.ENOTDIR and a_file.location in str(err.value)

    def test_modified_is_a_recent_time_or_unknown(self, backend: Backend) -> None:
        store = backend.store()
        before = time.time()
        _commit(store, "ckpt", {"a.bin": b"a"})
        stamp = store.modified("ckpt")
        if store.is_local:
            assert stamp is not None and before - 5 <= stamp <= time.time() + 5
        assert stamp is None or abs(stamp - before) < 3600
        assert store.modified("nothing") is None

    def test_drop_caches_drops_local_pages_of_every_file_and_only_there(
        self, backend: Backend, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        dropped: list[str] = []
        real = getattr(os, "posix_fadvise", None)

        def fadvise(fd: int, offset: int, length: int, advice: int) -> None:
            dropped.append(os.readlink(f"/proc/self/fd/{fd}"))
            if real is not None:
                real(fd, offset, length, advice)

        monkeypatch.setattr(os, "posix_fadvise", fadvise, raising=False)
        store = backend.store()
        staging = store.begin("ckpt")
        for name in ("a.bin", "b.bin"):
            with staging.open_write(name) as f:
                f.write(name.encode())
        staging.drop_caches()
        staging.commit(b"{}")
        store.drop_caches("ckpt")
        if store.is_local:
            tmp, final = staging.location, store.join("ckpt")
            written = [f"{tmp}/a.bin", f"{tmp}/b.bin"]
            committed = [f"{final}/{n}" for n in ("a.bin", "b.bin", "manifest.json")]
            assert sorted(dropped) == sorted(written + committed)
        else:
            assert dropped == []  # nothing cached on this side
        f, size = store.child("ckpt").open_read("a.bin")
        with f:
            assert f.read() == b"a.bin" and size == 5

    def test_list_extras_names_each_kind_and_lists_no_committed_step(self, backend: Backend) -> None:
        with backend.manager() as mgr:
            for step in (1, 2, 3):
                mgr.save(step, {"x": step}, force=True)
        store = backend.store()
        interrupted = store.begin(4)  # a writer that died before committing
        with interrupted.open_write("x.safetensors") as f:
            f.write(b"half")
        del interrupted
        damaged = store.set_aside_damaged("step-000000000002")
        abandoned = store.set_aside("step-000000000003", ABANDONED)
        _commit(store, "step-7", {"a.bin": b"a"})  # not the run's name for step 7
        extras = store.list_extras()
        assert {(e.kind, e.step) for e in extras} == {(INTERRUPTED_SAVE, 4), (DAMAGED, 2), (ABANDONED, 3), (MISNAMED, 7)}
        by_kind = {e.kind: e for e in extras}
        assert by_kind[DAMAGED].location == damaged and damaged.rsplit(".corrupt-", 1)[1].isdigit()
        assert by_kind[ABANDONED].location == abandoned
        assert by_kind[MISNAMED].location == store.join("step-7") == store.join(by_kind[MISNAMED].name)
        assert [by_kind[INTERRUPTED_SAVE].location] == store.list_leftovers()
        assert store.list_committed() == {1: store.join("step-000000000001")}
        assert backend.manager(read_only=True).steps() == [1]

    def test_a_begun_staging_commits_and_an_attached_one_only_adds_files(self, backend: Backend) -> None:
        store = backend.store()
        owner = store.begin(5)
        assert isinstance(owner, BegunStaging)
        with owner.open_write("mine.bin") as f:
            f.write(b"m")
        with store.attach(owner.location) as other:  # a normal exit leaves its files to the owner
            assert isinstance(other, AttachedStaging)
            with other.open_write("theirs.bin") as f:
                f.write(b"t")
        failed = store.attach(owner.location)
        with failed.open_write("broken.bin") as f:
            f.write(b"b")
        failed.abort()  # removes only what it wrote
        reader = owner.reader()
        assert reader.exists("mine.bin") and reader.exists("theirs.bin") and not reader.exists("broken.bin")
        owner.commit(b"{}")
        assert sorted(store.list_committed()) == [5] and store.size("step-000000000005") == 2 + len(b"{}")

    def test_parent_store_of_a_standalone_checkpoint(self, backend: Backend) -> None:
        location = backend.store().join("exports/single")
        store, name = parent_store(location, backend.options)
        assert name == "single" and store.join(name) == location
        assert store.location == backend.store().join("exports")
        with store.begin(name) as staging:
            with staging.open_write("a.bin") as f:
                f.write(b"a")
            staging.commit(b"{}")
        assert backend.store().child("exports").exists("single/manifest.json")
