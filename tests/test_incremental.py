"""Incremental checkpoints (``CheckpointManager(incremental=True)``, docs/format.md section 15).

Every check is paired with the case that must fail it: a frozen tensor is not written again,
a changed one is; retention never removes a blob a checkpoint still refers to, and removes
every other; a manifest that cannot be read stops the collection; verify follows the
references and names a damaged blob; an older reader refuses the format; the independent
reader of tests/test_format_spec.py reads an incremental checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import runstate
from runstate.format.manifest import _canonical_checksum
from tests.test_format_spec import FormatError, read_checkpoint


def _model(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    base = torch.nn.Linear(32, 32)
    base.requires_grad_(False)
    model = torch.nn.Sequential(base, torch.nn.Linear(32, 4))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return model, opt


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    model(torch.randn(8, 32)).sum().backward()
    opt.step()
    opt.zero_grad()


def _manifest(ckpt: Path | str) -> dict[str, Any]:
    return json.loads((Path(ckpt) / "manifest.json").read_bytes())


def _blobs(run: Path) -> set[str]:
    return set(os.listdir(run / "blobs")) if (run / "blobs").exists() else set()


def _referenced(run: Path) -> set[str]:
    found: set[str] = set()
    for entry in run.iterdir():
        if entry.name.startswith("step-") and (entry / "manifest.json").exists():
            found |= set(_manifest(entry).get("blobs", {}))
    return found


def _equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_frozen_tensors_are_written_once_and_every_step_loads_exactly(tmp_path: Path) -> None:
    run = tmp_path / "run"
    model, opt = _model()
    saved: dict[int, dict[str, torch.Tensor]] = {}
    with runstate.CheckpointManager(run, keep_last=None, incremental=True) as mgr:
        for step in range(1, 5):
            _train(model, opt)
            mgr.save(step, {"model": model, "optimizer": opt})
            saved[step] = {k: v.clone() for k, v in model.state_dict().items()}
            written = mgr._incremental.last  # type: ignore[union-attr]
            assert written is not None
            if step == 1:
                assert written.reused_bytes == 0
            else:  # the frozen base (32x32 + 32 floats) is referred to, not written
                assert written.reused_bytes == (32 * 32 + 32) * 4
                assert not any("frozen" in name for name in written.own)
    m = _manifest(run / "step-000000000004")
    assert m["format_version"] == 2 and m["requires"] == ["blobs"] and m["files"] == {}
    assert os.listdir(run / "step-000000000004") == ["manifest.json"]
    base_file = m["items"]["model"]["tensors"]["0.weight"]["file"]
    assert base_file.startswith("000000000001-") and base_file.endswith("model.frozen.safetensors")
    assert (
        not m["blobs"][base_file].get("own") and m["blobs"][m["items"]["model"]["tensors"]["1.weight"]["file"]]["own"]
    )
    for step, values in saved.items():
        assert runstate.verify(run / f"step-{step:012d}").ok
        fresh, _ = _model(seed=99)
        runstate.load(run / f"step-{step:012d}", {"model": fresh}, exclude=["optimizer"])
        assert all(torch.equal(fresh.state_dict()[k], v) for k, v in values.items())


def test_a_changed_frozen_tensor_is_written_again(tmp_path: Path) -> None:
    """Negative control of the fast path: an in-place write moves the version counter."""
    run = tmp_path / "run"
    model, _opt = _model()
    with runstate.CheckpointManager(run, keep_last=None, incremental="versions") as mgr:
        mgr.save(1, {"model": model})
        with torch.no_grad():
            model[0].weight.add_(1.0)
        mgr.save(2, {"model": model})
        assert any("frozen" in name for name in mgr._incremental.last.own)  # type: ignore[union-attr]
    fresh, _ = _model(seed=5)
    runstate.load(run / "step-000000000002", {"model": fresh})
    assert _equal(fresh, model)


def test_writes_through_data_are_caught_by_default(tmp_path: Path) -> None:
    """The documented hazard: ``.data`` writes move no version counter. The default (``True``,
    also spelled ``"hash"``) hashes and catches them; ``"versions"`` trusts the counter and
    keeps the old bytes (the negative control: the opt-in shortcut really skips the read)."""
    for mode, caught in ((True, True), ("hash", True), ("versions", False)):
        run = tmp_path / f"run-{mode}"
        model, _ = _model()
        with runstate.CheckpointManager(run, keep_last=None, incremental=mode) as mgr:
            mgr.save(1, {"model": model})
            model[0].weight.data.add_(1.0)
            mgr.save(2, {"model": model})
        fresh, _ = _model(seed=5)
        runstate.load(run / "step-000000000002", {"model": fresh})
        assert _equal(fresh, model) is caught


def test_numpy_state_is_deduplicated_by_checksum(tmp_path: Path) -> None:
    run = tmp_path / "run"
    frozen = np.arange(4096, dtype=np.float32)
    with runstate.CheckpointManager(run, keep_last=None, incremental=True) as mgr:
        for step in range(1, 4):
            mgr.save(step, {"model": {"frozen": frozen.copy(), "moving": np.full(16, step, np.int64)}, "epoch": step})
            if step > 1:
                assert mgr._incremental.last.reused_bytes == frozen.nbytes  # type: ignore[union-attr]
    got = runstate.load(run / "step-000000000003")
    assert np.array_equal(got["model"]["frozen"], frozen) and got["model"]["moving"].tolist() == [3] * 16


def test_retention_keeps_referenced_blobs_and_removes_the_rest(tmp_path: Path) -> None:
    run = tmp_path / "run"
    model, opt = _model()
    with runstate.CheckpointManager(run, keep_last=2, incremental=True) as mgr:
        for step in range(1, 8):
            _train(model, opt)
            mgr.save(step, {"model": model, "optimizer": opt})
            mgr.wait()  # retention runs in the background after save returns
            assert _blobs(run) == _referenced(run), step  # nothing unreferenced stays, nothing referenced goes
        assert mgr.steps() == [6, 7]
    assert any("frozen" in b and b.startswith("000000000001-") for b in _blobs(run))  # step 1 is gone, its base stays
    for step in (6, 7):
        assert runstate.verify(run / f"step-{step:012d}").ok


def test_a_manager_that_restored_refers_to_the_restored_blobs(tmp_path: Path) -> None:
    run = tmp_path / "run"
    model, opt = _model()
    with runstate.CheckpointManager(run, keep_last=None, incremental=True) as mgr:
        mgr.save(1, {"model": model, "optimizer": opt})
    model2, opt2 = _model(seed=3)
    with runstate.CheckpointManager(run, keep_last=None, incremental=True) as mgr:
        assert mgr.restore({"model": model2, "optimizer": opt2}) == 1
        _train(model2, opt2)
        mgr.save(2, {"model": model2, "optimizer": opt2})
        assert mgr._incremental.last.reused_bytes == (32 * 32 + 32) * 4  # type: ignore[union-attr]
    # without restoring first, nothing is known: everything is written (safe)
    with runstate.CheckpointManager(run, keep_last=None, incremental=True) as mgr:
        mgr.save(3, {"model": model2, "optimizer": opt2})
        assert mgr._incremental.last.reused_bytes == 0  # type: ignore[union-attr]


def test_a_blob_removed_behind_the_managers_back_is_written_again(tmp_path: Path) -> None:
    run = tmp_path / "run"
    model, _ = _model()
    with runstate.CheckpointManager(run, keep_last=None, incremental=True) as mgr:
        mgr.save(1, {"model": model})
        for blob in _blobs(run):
            os.unlink(run / "blobs" / blob)
        mgr.save(2, {"model": model})
    assert runstate.verify(run / "step-000000000002").ok
    assert not runstate.verify(run / "step-000000000001").ok


def test_set_aside_checkpoints_keep_their_blobs_until_removed(tmp_path: Path) -> None:
    run = tmp_path / "run"
    model, opt = _model()
    with runstate.CheckpointManager(run, keep_last=None, incremental=True) as mgr:
        for step in (1, 2, 3):
            _train(model, opt)
            mgr.save(step, {"model": model, "optimizer": opt})
        mgr.restore({"model": model, "optimizer": opt}, step=1)  # 2 and 3 become abandoned
        _train(model, opt)
        mgr.save(2, {"model": model, "optimizer": opt})
        mgr.clean()
        abandoned = [Path(p) for _, p in mgr.abandoned()]
        assert len(abandoned) == 2 and all(runstate.verify(p).ok for p in abandoned)
        mgr.clean(abandoned=True)
        assert _blobs(run) == _referenced(run)
    assert runstate.verify(run / "step-000000000002").ok


def test_an_unreadable_manifest_stops_the_collection(tmp_path: Path) -> None:
    run = tmp_path / "run"
    model, opt = _model()
    with runstate.CheckpointManager(run, keep_last=None, incremental=True) as mgr:
        mgr.save(1, {"model": model, "optimizer": opt})
        _train(model, opt)
        mgr.save(2, {"model": model, "optimizer": opt})
        (run / "step-000000000001" / "manifest.json").write_bytes(b"{not json")
        shutil.rmtree(run / "step-000000000002")  # its own blobs are now unreferenced, but...
        before = _blobs(run)
        assert mgr.clean() == []  # ...step 1's references are unknown: nothing is removed
        assert _blobs(run) == before
        (run / "step-000000000001" / "manifest.json").unlink()  # no longer a checkpoint
        removed = mgr.clean()
        assert removed and _blobs(run) == set()


def test_a_damaged_manifest_still_protects_the_blobs_it_lists(tmp_path: Path) -> None:
    run = tmp_path / "run"
    model, _ = _model()
    with runstate.CheckpointManager(run, keep_last=None, incremental=True) as mgr:
        mgr.save(1, {"model": model})
        path = run / "step-000000000001" / "manifest.json"
        body = json.loads(path.read_bytes())
        body["step"] = 5  # checksum now wrong: damaged, but still JSON listing its blobs
        path.write_text(json.dumps(body))
        assert not runstate.verify(run / "step-000000000001").ok
        assert mgr.clean() == [] and _blobs(run) == set(body["blobs"])


def test_verify_follows_references_and_names_the_damaged_blob(tmp_path: Path) -> None:
    run = tmp_path / "run"
    model, opt = _model()
    with runstate.CheckpointManager(run, keep_last=None, incremental=True) as mgr:
        mgr.save(1, {"model": model, "optimizer": opt})
        _train(model, opt)
        mgr.save(2, {"model": model, "optimizer": opt})
    base = next(b for b in _blobs(run) if "frozen" in b)
    raw = bytearray((run / "blobs" / base).read_bytes())
    raw[-1] ^= 1
    (run / "blobs" / base).write_bytes(bytes(raw))
    report = runstate.verify(run / "step-000000000002")  # step 2 wrote no frozen bytes, yet reads them
    assert not report.ok and {p.file for p in report.problems} == {base}
    with pytest.raises(runstate.CorruptCheckpointError, match="checksum mismatch"):
        runstate.load(run / "step-000000000002")
    (run / "blobs" / base).unlink()
    report = runstate.verify(run / "step-000000000002")
    assert not report.ok and any("missing" in p.reason for p in report.problems)


def test_restore_falls_back_when_a_blob_is_gone(tmp_path: Path) -> None:
    run = tmp_path / "run"
    model, opt = _model()
    with runstate.CheckpointManager(run, keep_last=None, incremental=True) as mgr:
        mgr.save(1, {"model": model, "optimizer": opt})
        _train(model, opt)
        mgr.save(2, {"model": model, "optimizer": opt})
    own2 = [b for b, e in _manifest(run / "step-000000000002")["blobs"].items() if e.get("own")]
    for b in own2:
        os.unlink(run / "blobs" / b)
    model2, opt2 = _model(seed=4)
    with runstate.CheckpointManager(run, read_only=True) as mgr:
        assert mgr.restore({"model": model2, "optimizer": opt2}) == 1


def test_format_version_and_requires(tmp_path: Path) -> None:
    """A checkpoint without references is written as before (version 1); one with references
    is version 2 with requires ["blobs"]; an unknown feature is refused, naming it."""
    model, _ = _model()
    with runstate.CheckpointManager(tmp_path / "plain", keep_last=None) as mgr:
        mgr.save(1, {"model": model})
    plain = _manifest(tmp_path / "plain" / "step-000000000001")
    assert plain["format_version"] == 1 and "requires" not in plain and "blobs" not in plain
    with runstate.CheckpointManager(tmp_path / "inc", keep_last=None, incremental=True) as mgr:
        mgr.save(1, {"model": model})
        mgr.save(2, {"epoch": 3})  # no tensor at all: nothing to refer to, version 1
    assert _manifest(tmp_path / "inc" / "step-000000000002")["format_version"] == 1
    ckpt = tmp_path / "inc" / "step-000000000001"
    body = _manifest(ckpt)
    body.pop("checksum")
    body["requires"] = ["blobs", "teleport"]
    body["checksum"] = _canonical_checksum(body)
    (ckpt / "manifest.json").write_text(json.dumps(body))
    with pytest.raises(runstate.FormatVersionError, match="teleport.*upgrade runstate"):
        runstate.load(ckpt)
    with pytest.raises(FormatError, match="teleport"):
        read_checkpoint(ckpt)


def test_blobs_without_requires_are_corrupt(tmp_path: Path) -> None:
    run = tmp_path / "run"
    model, _ = _model()
    with runstate.CheckpointManager(run, keep_last=None, incremental=True) as mgr:
        mgr.save(1, {"model": model})
    ckpt = run / "step-000000000001"
    body = _manifest(ckpt)
    body.pop("checksum")
    del body["requires"]
    body["checksum"] = _canonical_checksum(body)
    (ckpt / "manifest.json").write_text(json.dumps(body))
    with pytest.raises(runstate.CorruptCheckpointError, match="requires"):
        runstate.load(ckpt)


def test_the_independent_reader_follows_references(tmp_path: Path) -> None:
    run = tmp_path / "run"
    model, opt = _model()
    with runstate.CheckpointManager(run, keep_last=2, incremental=True) as mgr:
        for step in (1, 2, 3):
            _train(model, opt)
            mgr.save(step, {"model": model, "optimizer": opt, "epoch": step})
    manifest, values = read_checkpoint(run / "step-000000000003")
    assert manifest["blobs"] and values["epoch"] == 3
    state = values["model"]["state"]
    for name, tensor in model.state_dict().items():
        assert np.array_equal(state[name], tensor.numpy()), name
    # negative control: the reader notices a referenced blob changed under it
    base = next(b for b in _blobs(run) if "frozen" in b)
    raw = bytearray((run / "blobs" / base).read_bytes())
    raw[-1] ^= 1
    (run / "blobs" / base).write_bytes(bytes(raw))
    with pytest.raises(FormatError, match="checksum"):
        read_checkpoint(run / "step-000000000003")


def test_verify_on_save_reads_referenced_bytes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    model, opt = _model()
    with runstate.CheckpointManager(run, keep_last=None, incremental=True) as mgr:
        mgr.save(1, {"model": model, "optimizer": opt})
        base = next(b for b in _blobs(run) if "frozen" in b)
        raw = bytearray((run / "blobs" / base).read_bytes())
        raw[-1] ^= 1
        (run / "blobs" / base).write_bytes(bytes(raw))
        _train(model, opt)
        with pytest.raises(runstate.CorruptCheckpointError, match="read-back verification failed"):
            mgr.save(2, {"model": model, "optimizer": opt}, verify=True)
        assert mgr.steps() == [1]


def test_async_incremental_saves(tmp_path: Path) -> None:
    run = tmp_path / "run"
    model, opt = _model()
    with runstate.CheckpointManager(run, keep_last=2, incremental=True, async_save=True) as mgr:
        for step in range(1, 5):
            _train(model, opt)
            mgr.save(step, {"model": model, "optimizer": opt})
        mgr.wait()
        assert mgr._incremental.last.reused_bytes == (32 * 32 + 32) * 4  # type: ignore[union-attr]
    fresh, fopt = _model(seed=7)
    runstate.load(run / "step-000000000004", {"model": fresh, "optimizer": fopt})
    assert _equal(fresh, model)
    assert _blobs(run) == _referenced(run)


def test_bad_options_are_refused(tmp_path: Path) -> None:
    with pytest.raises(runstate.CheckpointConfigError, match="incremental must be"):
        runstate.CheckpointManager(tmp_path / "r", incremental="yes")


# ------------------------------------------------------------------------------------------------
# CLI: copy, ls, gc (through the installed entry point, in a subprocess)


def _cli(*args: Any) -> Any:
    from tests.test_cli import run

    return run(*args)


def test_copy_makes_a_standalone_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    model, opt = _model()
    with runstate.CheckpointManager(run, keep_last=None, incremental=True) as mgr:
        for step in (1, 2):
            _train(model, opt)
            mgr.save(step, {"model": model, "optimizer": opt}, metrics={"loss": 0.5})
    proc = _cli("copy", run / "step-000000000002", tmp_path / "alone")
    assert proc.returncode == 0 and "self-contained" in proc.stdout, proc.stderr
    shutil.rmtree(run)  # the copy needs nothing of the run
    m = _manifest(tmp_path / "alone")
    assert m["format_version"] == 1 and "blobs" not in m and "requires" not in m and m["step"] == 2
    assert runstate.verify(tmp_path / "alone").ok
    fresh, fopt = _model(seed=8)
    runstate.load(tmp_path / "alone", {"model": fresh, "optimizer": fopt})
    assert _equal(fresh, model) and runstate.inspect(tmp_path / "alone").metrics == {"loss": 0.5}
    assert read_checkpoint(tmp_path / "alone")[1]["optimizer"]  # the independent reader: plain version 1
    proc = _cli("copy", tmp_path / "alone", tmp_path / "alone")  # negative control: DEST exists
    assert proc.returncode != 0 and "exists" in proc.stderr


def test_copy_refuses_a_damaged_source(tmp_path: Path) -> None:
    run = tmp_path / "run"
    model, _ = _model()
    with runstate.CheckpointManager(run, keep_last=None, incremental=True) as mgr:
        mgr.save(1, {"model": model})
    blob = next(iter(_blobs(run)))
    raw = bytearray((run / "blobs" / blob).read_bytes())
    raw[-1] ^= 1
    (run / "blobs" / blob).write_bytes(bytes(raw))
    proc = _cli("copy", run, tmp_path / "alone", "--step", "latest")
    assert proc.returncode != 0 and "checksum mismatch" in proc.stderr
    assert not (tmp_path / "alone").exists()


def test_ls_shows_referenced_bytes_and_gc_removes_only_unreferenced_blobs(tmp_path: Path) -> None:
    run = tmp_path / "run"
    model, opt = _model()
    with runstate.CheckpointManager(run, keep_last=None, incremental=True) as mgr:
        for step in (1, 2):
            _train(model, opt)
            mgr.save(step, {"model": model, "optimizer": opt})
    listed = json.loads(_cli("ls", run, "--json").stdout)["checkpoints"]
    base_bytes = (run / "blobs" / next(b for b in _blobs(run) if "frozen" in b)).stat().st_size
    assert [e["referenced_nbytes"] for e in listed] == [0, base_bytes]
    assert listed[1]["nbytes"] > base_bytes
    assert "referenced" in _cli("ls", run).stdout
    stray = run / "blobs" / "000000000009-0123abcd-model.safetensors"  # a killed save's blob
    stray.write_bytes((run / "blobs" / next(iter(_blobs(run)))).read_bytes())
    shutil.rmtree(run / "step-000000000001")  # its own blobs are unreferenced now; the base is not
    referenced = _referenced(run)
    dry = _cli("gc", run, "--dry-run")
    assert dry.returncode == 0 and "would remove" in dry.stdout and stray.exists()
    proc = _cli("gc", run)
    assert proc.returncode == 0 and str(stray) in proc.stdout, proc.stdout
    assert _blobs(run) == referenced and runstate.verify(run / "step-000000000002").ok


# ------------------------------------------------------------------------------------------------
# Object stores (moto's S3 server)


def test_incremental_run_on_s3(s3_endpoint: str, s3_bucket: str) -> None:
    from tests.conftest import s3_options

    url, options = f"s3://{s3_bucket}/inc", s3_options(s3_endpoint)
    model, opt = _model()
    with runstate.CheckpointManager(url, storage_options=options, keep_last=2, incremental=True) as mgr:
        for step in range(1, 5):
            _train(model, opt)
            mgr.save(step, {"model": model, "optimizer": opt})
            if step > 1:
                assert mgr._incremental.last.reused_bytes == (32 * 32 + 32) * 4  # type: ignore[union-attr]
        assert mgr.steps() == [3, 4]
        store = mgr._run.store
        blobs = set(store.list_blobs())
        referenced: set[str] = set()
        for step in mgr.steps():
            referenced |= set(runstate.inspect(mgr.path(step), storage_options=options).blobs)
        assert blobs == referenced and any(b.startswith("000000000001-") for b in blobs)
        assert runstate.verify(mgr.path(4), storage_options=options).ok
    fresh, fopt = _model(seed=9)
    with runstate.CheckpointManager(url, storage_options=options, incremental=True) as mgr:
        assert mgr.restore({"model": fresh, "optimizer": fopt}) == 4
        assert _equal(fresh, model)
        _train(fresh, fopt)
        mgr.save(5, {"model": fresh, "optimizer": fopt})
        assert mgr._incremental.last.reused_bytes == (32 * 32 + 32) * 4  # type: ignore[union-attr]


def test_readme_example_runs_as_printed(tmp_path: Path) -> None:
    import re
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    section = (root / "README.md").read_text().split("## Incremental checkpoints", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match
    env = {**os.environ, "PYTHONPATH": str(root / "src"), "PYTHONWARNINGS": "ignore"}
    first = subprocess.run(
        [sys.executable, "-c", match.group(1)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert first.returncode == 0, first.stderr
    written = [int(line.split()[1]) for line in first.stdout.splitlines()]
    assert len(written) == 5 and all(w < written[0] / 4 for w in written[1:]), written
    second = subprocess.run(
        [sys.executable, "-c", match.group(1)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert second.returncode == 0 and second.stdout.split()[0] == "6", second.stdout  # resumed after step 5


def test_the_collection_rereads_a_manifest_changed_on_disk(tmp_path: Path) -> None:
    """The writer remembers which blobs each manifest lists (keyed by the manifest's bytes, so
    that a collection after every save decodes nothing it has seen): a manifest edited while
    the manager is open is read again, and the blob it now lists is kept."""
    from runstate._impl.incremental import BlobReferences

    run = tmp_path / "run"
    model, opt = _model()
    with runstate.CheckpointManager(run, keep_last=2, incremental=True) as mgr:
        for step in (1, 2):
            _train(model, opt)
            mgr.save(step, {"model": model, "optimizer": opt})
        mgr.wait()  # retention runs in the background after save returns
        step2 = run / "step-000000000002"
        raw = (step2 / "manifest.json").read_bytes()
        refs = mgr._incremental.references  # type: ignore[union-attr]
        # what the commit told it is what decoding the manifest gives
        assert refs.listed(step2.name, raw, "m") == BlobReferences().listed(step2.name, raw, "m")
        assert refs.listed(step2.name, raw, "m") == set(_manifest(step2)["blobs"])
        stray = run / "blobs" / "000000000099-0123abcd-model.safetensors"
        shutil.copy(run / "blobs" / next(iter(_blobs(run))), stray)
        body = _manifest(step2)
        body["blobs"][stray.name] = {"nbytes": stray.stat().st_size}
        body.pop("checksum")
        body["checksum"] = _canonical_checksum(body)
        (step2 / "manifest.json").write_text(json.dumps(body))
        _train(model, opt)
        mgr.save(3, {"model": model, "optimizer": opt})  # deletes step 1, collects
        assert mgr.steps() == [2, 3] and stray.exists()
        assert _blobs(run) == _referenced(run)
        (step2 / "manifest.json").write_bytes(raw)  # negative control: no longer listed, removed
        _train(model, opt)
        mgr.save(4, {"model": model, "optimizer": opt})
        mgr.wait()
        assert not stray.exists() and _blobs(run) == _referenced(run)


def test_blob_listing_of_manifests_nothing_can_be_known_about(tmp_path: Path) -> None:
    """A manifest of a newer format, or naming a feature this runstate does not know, or not
    JSON: its blobs are unknown, so no collection removes anything (None)."""
    from runstate._impl.incremental import BlobReferences

    run = tmp_path / "run"
    model, _ = _model()
    with runstate.CheckpointManager(run, keep_last=None, incremental=True) as mgr:
        mgr.save(1, {"model": model})
    body = _manifest(run / "step-000000000001")
    refs = BlobReferences()
    assert refs.listed("a", json.dumps(body).encode(), "m") == set(body["blobs"])
    assert refs.listed("b", json.dumps({**body, "format_version": 3}).encode(), "m") is None
    assert refs.listed("c", json.dumps({**body, "requires": ["blobs", "future"]}).encode(), "m") is None
    assert refs.listed("d", b"{not json", "m") is None
    damaged = json.dumps({**body, "checksum": "0" * 16}).encode()  # the names in its bytes still count
    assert refs.listed("e", damaged, "m") == set(body["blobs"])


class _TwoProcesses:
    """A group of two processes, as far as the manager's option check can tell (no collective is run)."""

    rank, size, distributed = 0, 2, True

    def all_min(self, value: int) -> int:
        return value

    def all_max(self, value: int) -> int:
        return value

    def broadcast_text(self, text: str, root: int = 0) -> str:
        return text


def test_incremental_under_several_processes_is_refused(tmp_path: Path) -> None:
    with pytest.raises(runstate.CheckpointConfigError, match="torch.distributed"):
        runstate.CheckpointManager(tmp_path / "r", incremental=True, group=_TwoProcesses())
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_incremental_run_through_fsspec(tmp_path: Path, scheme: str) -> None:
    url = f"memory://inc-{tmp_path.name}" if scheme == "memory" else f"file://{tmp_path}/run"
    model, opt = _model()
    with runstate.CheckpointManager(url, keep_last=2, incremental=True) as mgr:
        for step in range(1, 5):
            _train(model, opt)
            mgr.save(step, {"model": model, "optimizer": opt})
        referenced = set().union(*(runstate.inspect(mgr.path(s)).blobs for s in mgr.steps()))
        assert set(mgr._run.store.list_blobs()) == referenced
        assert all(runstate.verify(mgr.path(s)).ok for s in mgr.steps())
    fresh, fopt = _model(seed=11)
    runstate.load(f"{url}/step-000000000004", {"model": fresh, "optimizer": fopt})
    assert _equal(fresh, model)


def test_async_save_does_not_copy_the_frozen_base(tmp_path: Path) -> None:
    model, opt = _model()
    frozen_bytes = (32 * 32 + 32) * 4
    with runstate.CheckpointManager(tmp_path / "run", keep_last=2, incremental="versions", async_save=True) as mgr:
        mgr.save(1, {"model": model, "optimizer": opt})
        mgr.wait()
        assert mgr._saver.pool.nbytes > frozen_bytes  # type: ignore[attr-defined]  # the first save copies it
        _train(model, opt)
        mgr.save(2, {"model": model, "optimizer": opt})
        mgr.wait()
        trainable = [p for p in model.parameters() if p.requires_grad]
        moments = [t for s in opt.state.values() for t in s.values()]
        expected = sum(t.numel() * t.element_size() for t in trainable + moments)
        assert mgr._saver.pool.nbytes == expected  # type: ignore[attr-defined]  # the base is not copied


def test_peft_style_merge_through_data_is_saved_by_default(tmp_path: Path) -> None:
    """PEFT merges and unmerges a LoRA delta into the frozen base through ``.data``: the
    float round trip changes the base's bytes without moving its version counter."""
    run = tmp_path / "run"
    model, _ = _model()
    delta = torch.randn(32, 32) * 1e-3
    with runstate.CheckpointManager(run, keep_last=None, incremental=True) as mgr:
        mgr.save(1, {"model": model})
        model[0].weight.data += delta  # merge_adapter
        model[0].weight.data -= delta  # unmerge_adapter: not bit-identical to before
        mgr.save(2, {"model": model})
    fresh, _ = _model(seed=5)
    runstate.load(run / "step-000000000002", {"model": fresh})
    assert _equal(fresh, model)


def test_a_step_copied_or_renamed_in_the_run_keeps_its_blobs(tmp_path: Path) -> None:
    """A user keeps a step from retention by copying it to ``best/`` (or a step-like name):
    retention's collection must count its manifest, or the copy loses its bytes."""
    run = tmp_path / "run"
    model, opt = _model()
    with runstate.CheckpointManager(run, keep_last=2, incremental=True) as mgr:
        mgr.save(1, {"model": model, "optimizer": opt})
        shutil.copytree(run / "step-000000000001", run / "best")
        shutil.copytree(run / "step-000000000001", run / "step-1")
        for step in range(2, 5):
            _train(model, opt)
            mgr.save(step, {"model": model, "optimizer": opt})
        assert not (run / "step-000000000001").exists()  # retention removed the original
    for kept in ("best", "step-1"):
        assert runstate.verify(run / kept).ok, kept
        assert set(_manifest(run / kept)["blobs"]) <= _blobs(run)


def test_a_manifest_with_a_mangled_blobs_key_still_protects_its_blobs(tmp_path: Path) -> None:
    """A damaged manifest that is still JSON: its blob names are read from its bytes, not
    from its (mangled) ``blobs`` table, so repairing the byte gives back a whole checkpoint."""
    run = tmp_path / "run"
    model, opt = _model()
    with runstate.CheckpointManager(run, keep_last=None, incremental=True) as mgr:
        mgr.save(1, {"model": model, "optimizer": opt})
        _train(model, opt)
        mgr.save(2, {"model": model, "optimizer": opt})
        path = run / "step-000000000001" / "manifest.json"
        raw = path.read_bytes()
        path.write_bytes(raw.replace(b'"blobs":', b'"blobz":'))
        mgr.clean()
        path.write_bytes(raw)  # repaired
    assert runstate.verify(run / "step-000000000001").ok


def test_inference_tensors_save_incrementally(tmp_path: Path) -> None:
    """A tensor made under ``torch.inference_mode()`` has no version counter."""
    with torch.inference_mode():
        stats = torch.arange(64, dtype=torch.float32)
    with runstate.CheckpointManager(tmp_path / "run", keep_last=None, incremental="versions") as mgr:
        mgr.save(1, {"eval": {"stats": stats}})
        mgr.save(2, {"eval": {"stats": stats}})
        assert mgr._incremental.last.reused_bytes == stats.nbytes  # type: ignore[union-attr]
    assert torch.equal(runstate.load(tmp_path / "run" / "step-000000000002")["eval"]["stats"], stats)


def test_a_damaged_blob_of_the_base_is_written_again_after_a_failed_read_back(tmp_path: Path) -> None:
    """Bit rot in a blob of the base: ``save(verify=True)`` refuses the checkpoint that refers
    to it, and the next save writes every tensor again instead of failing forever."""
    run = tmp_path / "run"
    model, opt = _model()
    with runstate.CheckpointManager(run, keep_last=None, incremental=True) as mgr:
        mgr.save(1, {"model": model, "optimizer": opt})
        frozen = next(p for p in (run / "blobs").iterdir() if p.name.endswith("model.frozen.safetensors"))
        data = bytearray(frozen.read_bytes())
        data[-1] ^= 0xFF
        frozen.write_bytes(bytes(data))
        with pytest.raises(runstate.CheckpointError):
            mgr.save(2, {"model": model, "optimizer": opt}, verify=True)
        mgr.save(3, {"model": model, "optimizer": opt}, verify=True)
        assert mgr._incremental.last.reused_bytes == 0  # type: ignore[union-attr]
    assert runstate.verify(run / "step-000000000003").ok


def test_the_blob_area_is_durable_before_the_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The blob area's fsync runs while the manifest is built, but the commit waits for it;
    a failed fsync commits nothing, and the next save writes every tensor again."""
    import errno
    import threading
    import time

    from runstate.storage.local import LocalStaging, LocalStore

    events: list[str] = []
    fail = threading.Event()
    real_sync, real_commit = LocalStore.sync_blobs, LocalStaging.commit

    def slow_sync(self: LocalStore) -> None:
        time.sleep(0.3)
        if fail.is_set():
            events.append("sync failed")
            raise OSError(errno.EIO, "injected")
        real_sync(self)
        events.append("synced")

    def commit(self: LocalStaging, manifest: bytes) -> str:
        events.append("commit")
        return real_commit(self, manifest)

    monkeypatch.setattr(LocalStore, "sync_blobs", slow_sync)
    monkeypatch.setattr(LocalStaging, "commit", commit)
    run = tmp_path / "run"
    model, opt = _model()
    with runstate.CheckpointManager(run, keep_last=None, incremental=True) as mgr:
        mgr.save(1, {"model": model, "optimizer": opt})
        assert events == ["synced", "commit"]
        fail.set()
        _train(model, opt)
        with pytest.raises(runstate.CheckpointWriteError, match="nothing was committed") as raised:
            mgr.save(2, {"model": model, "optimizer": opt})
        assert raised.value.errno == errno.EIO and events[2:] == ["sync failed"] and mgr.steps() == [1]
        fail.clear()
        mgr.save(2, {"model": model, "optimizer": opt})
        assert mgr._incremental.last.reused_bytes == 0  # type: ignore[union-attr]  # the base forgotten
    assert runstate.verify(run / "step-000000000002").ok


def test_a_save_goes_on_when_no_thread_can_be_started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The blob area's fsync runs in a thread of its own; where none can be started (a thread
    limit, or Python 3.12.0-3.12.2 finishing an async save at interpreter exit) it runs inline."""
    import threading
    import types

    from runstate._impl import incremental as incremental_module

    class NoThread(threading.Thread):
        def start(self) -> None:
            raise RuntimeError("can't start new thread")

    monkeypatch.setattr(incremental_module, "threading", types.SimpleNamespace(Thread=NoThread))
    with runstate.CheckpointManager(tmp_path, incremental=True, keep_last=None) as mgr:
        mgr.save(1, {"m": {"w": torch.ones(1000), "b": torch.zeros(10)}})
        mgr.save(2, {"m": {"w": torch.ones(1000), "b": torch.ones(10)}})
    assert runstate.CheckpointManager(tmp_path, read_only=True).steps() == [1, 2]
    assert torch.equal(runstate.load(tmp_path / "step-000000000002")["m"]["b"], torch.ones(10))


def test_copy_refuses_the_name_of_another_step(tmp_path: Path) -> None:
    """A copy of step 1 named step-...9 inside the run would pass for step 9 and be restored as
    the newest step; named after its own step (or anything else) it is fine."""
    run = tmp_path / "run"
    with runstate.CheckpointManager(run, keep_last=None, incremental=True) as mgr:
        mgr.save(1, {"m": {"w": torch.ones(10)}})
    proc = _cli("copy", run / "step-000000000001", run / "step-000000000009")
    assert proc.returncode != 0 and "would pass for that step" in proc.stderr, proc.stderr
    assert not (run / "step-000000000009").exists()
    assert runstate.CheckpointManager(run, read_only=True).steps() == [1]
    proc = _cli("copy", run / "step-000000000001", tmp_path / "step-000000000001")  # its own step
    assert proc.returncode == 0, proc.stderr
