"""runstate.save / runstate.load: round trips, restore semantics and bad input."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import runstate
from runstate.format.manifest import _canonical_checksum
from tests.conftest import fresh_training_state, make_training_state


def test_import_runstate_imports_no_framework() -> None:
    code = "import sys, runstate; bad = [m for m in ('torch', 'jax', 'tensorflow', 'keras') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_full_training_state_round_trip(tmp_path: Path) -> None:
    state = make_training_state()
    info = runstate.save(tmp_path / "ck", state, step=7, metrics={"loss": torch.tensor(0.25)})
    assert info.step == 7 and info.metrics == {"loss": 0.25} and info.nbytes > 0
    assert info.path == str(tmp_path / "ck")

    target = fresh_training_state()
    runstate.load(tmp_path / "ck", target)
    for k, v in state["model"].state_dict().items():
        assert torch.equal(v, target["model"].state_dict()[k])
    a, b = state["optimizer"].state_dict(), target["optimizer"].state_dict()
    assert a["param_groups"] == b["param_groups"]
    for pid in a["state"]:
        for key in a["state"][pid]:
            assert torch.equal(a["state"][pid][key], b["state"][pid][key])
    assert target["scheduler"].state_dict() == state["scheduler"].state_dict()
    assert target["optimizer"].param_groups[0]["lr"] == state["optimizer"].param_groups[0]["lr"]


def test_model_file_feeds_load_state_dict_directly(tmp_path: Path) -> None:
    state = make_training_state()
    runstate.save(tmp_path / "ck", state)
    fresh = fresh_training_state()["model"]
    fresh.load_state_dict(load_file(tmp_path / "ck" / "model.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), state["model"].state_dict().values()))


def test_plain_values_are_replaced_and_exact(tmp_path: Path) -> None:
    values = {
        "ints": [0, -1, 2**100, -(2**70)],
        "floats": (-0.0, math.inf, -math.inf, 1e-310, 0.1),
        "nan": math.nan,
        "flags": [True, False, None],
        "text": "héllo\u2603\ud800",
        "raw": b"\x00\xff",
        "keys": OrderedDict(
            [(3, "int"), ("3", "str"), (3.5, "float"), (True, "bool"), (None, "none"), ((1, "a"), "tuple")]
        ),
        "nested": {"a": [(1, 2), [3, (4,)]], "empty": {}, "empty_list": [], "empty_tuple": ()},
        "np": np.arange(6, dtype=np.int16).reshape(2, 3),
        "np_scalar": np.float32(1.5),
        "np_int": np.int64(-3),
        "tensor0d": torch.tensor(3.0),
    }
    runstate.save(tmp_path / "ck", {"v": values, "epoch": 4})
    target = {"v": None, "epoch": None}
    runstate.load(tmp_path / "ck", target)
    got = target["v"]
    assert target["epoch"] == 4 and type(target["epoch"]) is int
    assert got["ints"] == values["ints"]
    assert type(got["floats"]) is tuple and math.copysign(1, got["floats"][0]) == -1.0
    assert got["floats"][1:] == values["floats"][1:]
    assert math.isnan(got["nan"])
    assert got["flags"] == [True, False, None] and type(got["flags"][0]) is bool
    assert got["text"] == values["text"] and got["raw"] == values["raw"]
    assert type(got["keys"]) is OrderedDict and list(got["keys"].items()) == list(values["keys"].items())
    assert [type(k) for k in got["keys"]] == [type(k) for k in values["keys"]]
    assert got["nested"] == values["nested"] and type(got["nested"]["a"][0]) is tuple
    assert got["np"].dtype == np.int16 and np.array_equal(got["np"], values["np"])
    assert type(got["np_scalar"]) is np.float32 and got["np_scalar"] == 1.5
    assert type(got["np_int"]) is np.int64 and got["np_int"] == -3
    assert got["tensor0d"].shape == () and got["tensor0d"].item() == 3.0


DTYPES = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.uint16,
    torch.uint32,
    torch.uint64,
    torch.complex64,
    torch.complex128,
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_dtype_round_trips_bit_exactly(tmp_path: Path, dtype: torch.dtype) -> None:
    t = torch.randint(0, 255, (480,), dtype=torch.uint8).view(dtype).reshape(2, -1)
    if dtype == torch.bool:
        t = t.view(torch.uint8) % 2 == 1
    runstate.save(tmp_path / "ck", {"t": {"x": t, "zero_dim": t.reshape(-1)[0].clone(), "empty": t[:0]}})
    got = runstate.load(tmp_path / "ck")["t"]
    for key, ref in (("x", t), ("zero_dim", t.reshape(-1)[0]), ("empty", t[:0])):
        assert got[key].dtype == dtype and got[key].shape == ref.shape
        assert torch.equal(got[key].reshape(-1).view(torch.uint8), ref.reshape(-1).view(torch.uint8))


def test_views_and_tied_tensors(tmp_path: Path) -> None:
    base = torch.arange(24.0).reshape(4, 6)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight  # tied
    state = {"views": {"t": base.t(), "strided": base[:, ::2], "same": base, "again": base}, "model": model}
    runstate.save(tmp_path / "ck", state)
    plain = runstate.load(tmp_path / "ck")
    assert torch.equal(plain["views"]["t"], base.t()) and torch.equal(plain["views"]["strided"], base[:, ::2])
    assert plain["views"]["same"] is plain["views"]["again"]
    header = json.loads((tmp_path / "ck" / "model.safetensors").read_bytes()[8:].split(b"}}", 1)[0] + b"}}")
    assert len([k for k in header if k != "__metadata__"]) == 1  # the tied weight is stored once
    fresh = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    fresh[1].weight = fresh[0].weight
    runstate.load(tmp_path / "ck", {"views": None, "model": fresh})
    assert torch.equal(fresh[0].weight, model[0].weight) and fresh[1].weight is fresh[0].weight


def test_generators_are_restored_in_place(tmp_path: Path) -> None:
    tg, ng, pr = torch.Generator().manual_seed(1), np.random.default_rng(2), random.Random(3)
    torch.rand(3, generator=tg), ng.random(3), pr.random()
    runstate.save(tmp_path / "ck", {"g": {"torch": tg, "numpy": ng, "python": pr}})
    expected = (torch.rand(4, generator=tg), ng.random(4), [pr.random() for _ in range(4)])
    tg2, ng2, pr2 = torch.Generator().manual_seed(9), np.random.default_rng(9), random.Random(9)
    state = {"g": {"torch": tg2, "numpy": ng2, "python": pr2}}
    runstate.load(tmp_path / "ck", state)
    assert state["g"]["torch"] is tg2 and state["g"]["numpy"] is ng2 and state["g"]["python"] is pr2
    assert torch.equal(torch.rand(4, generator=tg2), expected[0])
    assert np.array_equal(ng2.random(4), expected[1])
    assert [pr2.random() for _ in range(4)] == expected[2]


def test_rng_captures_every_global_generator(tmp_path: Path) -> None:
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    runstate.save(tmp_path / "ck", {"rng": runstate.RNG()})
    expected = (random.random(), np.random.rand(), torch.rand(()).item())
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    runstate.load(tmp_path / "ck", {"rng": runstate.RNG()})
    assert (random.random(), np.random.rand(), torch.rand(()).item()) == expected


def test_strict_mismatch_lists_every_problem_and_changes_nothing(tmp_path: Path) -> None:
    runstate.save(tmp_path / "ck", {**make_training_state(), "epoch": 3})
    target = fresh_training_state(hidden=16)
    target["extra"] = 1
    before = {k: v.clone() for k, v in target["model"].state_dict().items()}
    with pytest.raises(runstate.StateMismatchError) as err:
        runstate.load(tmp_path / "ck", target)
    msg = str(err.value)
    assert "state['model']['0.weight']: shape (8, 4) in checkpoint, (16, 4) live" in msg
    assert "state['model']['2.weight']" in msg and "state['optimizer']" in msg
    assert "state['extra']: item missing from the checkpoint" in msg
    assert "state['epoch']: item in the checkpoint but not in the state" in msg
    assert "strict=False" in msg
    assert all(torch.equal(before[k], v) for k, v in target["model"].state_dict().items())
    assert target["extra"] == 1


def test_non_strict_restores_what_matches_and_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src = make_training_state()
    runstate.save(tmp_path / "ck", {"model": src["model"], "epoch": 3})
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 5))  # new head
    target = {"model": model, "epoch": None, "other": "kept"}
    with caplog.at_level(logging.WARNING, logger="runstate"):
        runstate.load(tmp_path / "ck", target, strict=False)
    assert torch.equal(model[0].weight, src["model"][0].weight)
    assert target["epoch"] == 3 and target["other"] == "kept"
    assert "state['model']['2.weight']: shape (2, 8) in checkpoint, (5, 8) live" in caplog.text


def test_unsupported_value_names_its_path_and_writes_nothing(tmp_path: Path) -> None:
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=[lambda e: 0.9**e])
    sched.lr_lambdas[0] = lambda e: 0.5  # LambdaLR keeps callables that are objects
    state = {"model": model, "opt": opt, "misc": {"fn": [len]}, "obj": {"x": object()}}
    with pytest.raises(runstate.UnsupportedTypeError) as err:
        runstate.save(tmp_path / "ck", {"misc": {"f": [lambda: 1]}})
    assert "state['misc']['f'][0]: a function cannot be stored without pickle" in str(err.value)
    with pytest.raises(runstate.UnsupportedTypeError, match=r"state\['obj'\]\['x'\]: a value of type builtins.object"):
        runstate.save(tmp_path / "ck", {"obj": state["obj"]})
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("bad", [[("model", 1)], "state", 3, None])
def test_state_must_be_a_dict(tmp_path: Path, bad: object) -> None:
    with pytest.raises(runstate.UnsupportedTypeError, match="state must be a dict"):
        runstate.save(tmp_path / "ck", bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("step", [-1, 1.0, "3", True])
def test_step_must_be_a_non_negative_int(tmp_path: Path, step: object) -> None:
    with pytest.raises(runstate.UnsupportedTypeError, match="step must be a non-negative int"):
        runstate.save(tmp_path / "ck", {"a": 1}, step=step)  # type: ignore[arg-type]


def test_existing_path_is_never_overwritten(tmp_path: Path) -> None:
    runstate.save(tmp_path / "ck", {"a": 1})
    with pytest.raises(runstate.StepExistsError):
        runstate.save(tmp_path / "ck", {"a": 2})
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError):
        runstate.save(tmp_path / "file", {"a": 2})
    assert runstate.load(tmp_path / "ck") == {"a": 1}
    assert (tmp_path / "file").read_text() == "x"


def test_loading_a_file_or_run_directory_explains(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(runstate.CheckpointNotFoundError, match="is a file, not a checkpoint directory"):
        runstate.load(tmp_path / "file")
    with runstate.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(5, {"a": 1})
    with pytest.raises(runstate.CheckpointNotFoundError, match="is a run directory"):
        runstate.load(tmp_path / "run")
    with pytest.raises(FileNotFoundError):
        runstate.load(tmp_path / "missing")


def _rewrite_manifest(ck: Path, edit) -> None:
    body = json.loads((ck / "manifest.json").read_text())
    body.pop("checksum")
    edit(body)
    body["checksum"] = _canonical_checksum(body)
    (ck / "manifest.json").write_text(json.dumps(body))


def test_newer_format_version_is_refused(tmp_path: Path) -> None:
    runstate.save(tmp_path / "ck", {"a": 1})
    _rewrite_manifest(tmp_path / "ck", lambda b: b.update(format_version=3))
    with pytest.raises(runstate.FormatVersionError, match="format version 3.*upgrade runstate"):
        runstate.load(tmp_path / "ck")


def test_flipped_tensor_byte_is_detected_naming_file_and_tensor(tmp_path: Path) -> None:
    state = make_training_state()
    runstate.save(tmp_path / "ck", state)
    path = tmp_path / "ck" / "optimizer.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    target = fresh_training_state()
    before = target["model"][0].weight.clone()
    with pytest.raises(
        runstate.CorruptCheckpointError,
        match=r"optimizer.safetensors: checksum mismatch in tensor 'state\.3\.exp_avg_sq'",
    ):
        runstate.load(tmp_path / "ck", target)
    assert torch.equal(target["model"][0].weight, before)  # nothing restored


def test_edited_manifest_is_detected(tmp_path: Path) -> None:
    runstate.save(tmp_path / "ck", {"epoch": 3})
    text = (tmp_path / "ck" / "manifest.json").read_text().replace('"v": "3"', '"v": "4"')
    (tmp_path / "ck" / "manifest.json").write_text(text)
    with pytest.raises(runstate.CorruptCheckpointError, match="manifest checksum mismatch"):
        runstate.load(tmp_path / "ck")


def test_sharded_item_round_trips(tmp_path: Path) -> None:
    from runstate._impl.group import SingleProcess
    from runstate._impl.pipeline import capture, save_checkpoint
    from runstate.storage import open_store

    tensors = {f"w{i}": torch.full((1000,), float(i)) for i in range(5)}
    one = SingleProcess()
    captured = capture({"model": tensors}, None, one)
    save_checkpoint(open_store(tmp_path), "ck", captured, group=one, step=1, shard_bytes=8000)
    names = sorted(os.listdir(tmp_path / "ck"))
    assert names[:3] == ["manifest.json", "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors"]
    got = runstate.load(tmp_path / "ck")["model"]
    assert all(torch.equal(got[k], v) for k, v in tensors.items())


def test_conjugate_and_negative_views_are_resolved(tmp_path: Path) -> None:
    x = torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64)
    state = {"c": {"x": x, "conj": x.conj(), "neg": x._neg_view()}}
    runstate.save(tmp_path / "ck", state)
    got = runstate.load(tmp_path / "ck")["c"]
    assert torch.equal(got["x"], x) and torch.equal(got["conj"], x.conj().resolve_conj())
    assert torch.equal(got["neg"], -x)


def test_shard_names_never_collide_with_other_items(tmp_path: Path) -> None:
    from runstate._impl.group import SingleProcess
    from runstate._impl.pipeline import capture, save_checkpoint
    from runstate.storage import open_store

    state = {"a": {"x": torch.zeros(100), "y": torch.ones(100)}, "a-00001-of-00002": torch.full((3,), 2.0)}
    one = SingleProcess()
    captured = capture(state, None, one)
    save_checkpoint(open_store(tmp_path), "ck", captured, group=one, step=None, shard_bytes=400)
    got = runstate.load(tmp_path / "ck")
    assert torch.equal(got["a"]["y"], torch.ones(100)) and torch.equal(got["a-00001-of-00002"], torch.full((3,), 2.0))


def test_ints_past_the_decimal_digit_limit(tmp_path: Path) -> None:
    huge = 7**20000
    runstate.save(tmp_path / "ck", {"n": [huge, -huge]})
    assert runstate.load(tmp_path / "ck")["n"] == [huge, -huge]


def test_a_plain_state_dict_is_loaded_into_a_live_object(tmp_path: Path) -> None:
    src = make_training_state()
    runstate.save(tmp_path / "ck", {"model": dict(src["model"].state_dict()), "optimizer": src["optimizer"].state_dict()})
    target = fresh_training_state()
    model, opt = target["model"], target["optimizer"]
    runstate.load(tmp_path / "ck", {"model": model, "optimizer": opt})
    assert torch.equal(model[0].weight, src["model"][0].weight)  # loaded in place, not replaced by a dict
    assert torch.equal(opt.state[model[0].weight]["exp_avg"], src["optimizer"].state[src["model"][0].weight]["exp_avg"])
    with pytest.raises(runstate.StateMismatchError, match="missing from the checkpoint"):
        runstate.load(tmp_path / "ck", {"model": nn.Linear(4, 8), "optimizer": torch.optim.SGD(nn.Linear(4, 8).parameters(), lr=0.1)})


def test_reading_a_numpy_only_checkpoint_does_not_import_torch(tmp_path: Path) -> None:
    runstate.save(tmp_path / "ck", {"a": np.arange(4), "rng": np.random.default_rng(1), "n": 3})
    code = (
        "import sys, runstate\n"
        f"got = runstate.load({str(tmp_path / 'ck')!r})\n"
        f"assert runstate.verify({str(tmp_path / 'ck')!r}).ok\n"
        "print(list(got['a']), 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[np.int64(0), np.int64(1), np.int64(2), np.int64(3)] False"
