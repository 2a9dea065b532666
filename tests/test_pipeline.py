"""The one save pipeline (runstate._impl.pipeline, parts, savers) without starting processes.

A scripted peer group plays rank 1 of 2: what rank 0 broadcasts and whether another process
failed are given, so every agreed decision is checked in one process. Real multi-process
saves are in test_distributed.py; the on-disk result in test_format_spec.py.
"""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pytest

import runstate
import runstate._impl.parts as parts_module
from runstate._impl.group import SingleProcess, agree
from runstate._impl.pipeline import capture, save_checkpoint
from runstate._impl.savers import AsyncSaver, SyncSaver, make_saver
from runstate.storage import open_store


class ScriptedPeer:
    """Rank 1 of 2: rank 0 broadcasts ``text``; ``others_fail`` makes every agreement fail."""

    rank, size, distributed = 1, 2, True

    def __init__(self, text: str = "", *, others_fail: bool = False) -> None:
        self.text = text
        self.others_fail = others_fail

    def all_min(self, value: int) -> int:
        return 0 if self.others_fail else value

    def all_max(self, value: int) -> int:
        return value

    def broadcast_text(self, text: str, root: int = 0) -> str:
        return self.text


def test_agree_raises_this_process_error_or_the_others() -> None:
    own = ValueError("mine")
    with pytest.raises(ValueError, match="mine"):
        agree(ScriptedPeer(others_fail=True), own, lambda: RuntimeError("theirs"))
    with pytest.raises(RuntimeError, match="theirs"):
        agree(ScriptedPeer(others_fail=True), None, lambda: RuntimeError("theirs"))
    agree(ScriptedPeer(), None, lambda: RuntimeError("theirs"))  # nobody failed: nothing raised
    agree(SingleProcess(), None, lambda: RuntimeError("theirs"))


class Fixed(ScriptedPeer):
    """The other process's outcome is ``theirs`` (what it passes to ``all_min``)."""

    def __init__(self, theirs: int) -> None:
        super().__init__()
        self.theirs = theirs

    def all_min(self, value: int) -> int:
        return min(value, self.theirs)


def test_agree_with_kinds_makes_every_process_raise_the_winning_kind() -> None:
    kinds = ((KeyError, lambda: KeyError("a peer's key")), (IndexError, lambda: IndexError("a peer's index")))
    # outcomes: 0 any other error, 1 KeyError, 2 IndexError, 3 success
    with pytest.raises(KeyError, match="a peer's key"):  # this IndexError loses to a peer's KeyError
        agree(Fixed(1), IndexError("mine"), lambda: RuntimeError("theirs"), kinds=kinds)
    with pytest.raises(IndexError, match="mine"):  # this IndexError wins over a peer's success
        agree(Fixed(3), IndexError("mine"), lambda: RuntimeError("theirs"), kinds=kinds)
    with pytest.raises(IndexError, match="a peer's index"):  # succeeded, a peer raised IndexError
        agree(Fixed(2), None, lambda: RuntimeError("theirs"), kinds=kinds)
    with pytest.raises(RuntimeError, match="theirs"):  # an unlisted error of a peer wins
        agree(Fixed(0), KeyError("mine"), lambda: RuntimeError("theirs"), kinds=kinds)
    with pytest.raises(ValueError, match="mine"):  # an unlisted error of this process is its own
        agree(Fixed(1), ValueError("mine"), lambda: RuntimeError("theirs"), kinds=kinds)
    agree(Fixed(3), None, lambda: RuntimeError("theirs"), kinds=kinds)


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("StepExistsError", runstate.StepExistsError),
        ("LockError", runstate.LockError),
        ("CheckpointConfigError", runstate.CheckpointConfigError),
        ("CorruptCheckpointError", runstate.CorruptCheckpointError),
        ("RuntimeError", runstate.CheckpointWriteError),
    ],
)
def test_an_error_of_rank_0_is_raised_as_the_same_kind_on_the_others(
    tmp_path: Path, kind: str, expected: type[Exception]
) -> None:
    peer = ScriptedPeer(f"\0{kind}\0disk says no")
    captured = capture({"w": np.arange(4.0)}, None, peer)
    with pytest.raises(expected, match="rank 0 could not start the checkpoint: disk says no") as err:
        save_checkpoint(open_store(tmp_path), "ck", captured, group=peer, step=1)
    if expected is runstate.LockError:
        assert err.value.errno == errno.EWOULDBLOCK
    if expected is runstate.CheckpointWriteError:
        assert err.value.errno is None  # not an OS error: no made-up errno 0
    assert list(tmp_path.iterdir()) == []


def test_another_process_failing_to_write_fails_this_one_and_removes_its_files(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    begun = store.begin("ck")  # what rank 0 did
    captured = capture({"w": np.arange(4.0), "rng": runstate.PerRank(runstate.RNG())}, None, ScriptedPeer())
    assert list(captured.items) == ["rng@rank1"]  # rank 1 writes its per-rank copy only
    peer = ScriptedPeer(begun.location, others_fail=True)
    with pytest.raises(runstate.CheckpointWriteError, match="another process failed to write its files"):
        save_checkpoint(store, "ck", captured, group=peer, step=1)
    assert list(Path(begun.location).iterdir()) == []  # its files and its part are gone
    begun.abort()


def test_processes_saving_different_items_raise_before_writing(tmp_path: Path) -> None:
    class Disagreeing(ScriptedPeer):
        def all_max(self, value: int) -> int:
            return value + 1  # another process's layout hashes differently

    with pytest.raises(runstate.StateMismatchError, match="the processes save different items"):
        capture({"w": np.arange(4.0)}, None, Disagreeing(), where=str(tmp_path / "ck"))


def test_one_process_writes_no_part_file_and_no_ranks(tmp_path: Path) -> None:
    state = {"w": np.arange(4.0), "data": runstate.PerRank({"pos": 3})}
    info = runstate.save(tmp_path / "ck", state, step=2)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["manifest.json", "w.safetensors"]
    assert info.path == str(tmp_path / "ck") and info.step == 2
    raw = (tmp_path / "ck" / "manifest.json").read_text()
    assert '"ranks"' not in raw and '"data"' in raw and "@rank" not in raw


def test_read_back_catches_a_byte_changed_before_the_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = parts_module.write_part

    def damaging(staging, *args, **kwargs):  # type: ignore[no-untyped-def]
        part = real(staging, *args, **kwargs)
        damaged = Path(staging.location) / "w.safetensors"  # after it was fsynced: the disk lied
        raw = bytearray(damaged.read_bytes())
        raw[-1] ^= 0x01
        damaged.write_bytes(bytes(raw))
        return part

    monkeypatch.setattr(parts_module, "write_part", damaging)
    with runstate.CheckpointManager(tmp_path / "run") as mgr:
        with pytest.raises(
            runstate.CorruptCheckpointError, match="read-back verification failed, nothing was committed"
        ):
            mgr.save(1, {"w": np.arange(100.0)}, verify=True)
        assert mgr.steps() == [] and mgr.leftovers() == []
        assert mgr.save(2, {"w": np.arange(100.0)})  # control: without verify the damage is committed
        assert not runstate.verify(mgr.path(2)).ok


def test_make_saver_picks_one_strategy(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    assert type(make_saver(store, SingleProcess(), async_save=False)) is SyncSaver
    assert type(make_saver(store, ScriptedPeer(), async_save=False)) is SyncSaver  # the collective case
    saver = make_saver(store, SingleProcess(), async_save=True)
    assert type(saver) is AsyncSaver
    saver.close()
    with pytest.raises(
        runstate.CheckpointConfigError, match="async_save=True is not supported under torch.distributed"
    ):
        make_saver(store, ScriptedPeer(), async_save=True)
