"""runstate.inspect: a checkpoint described from its manifest alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import xxhash

import runstate
from tests.conftest import make_training_state


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    state = {
        **make_training_state(),
        "rng": runstate.RNG(),
        "gen": torch.Generator().manual_seed(3),
        "np_gen": np.random.default_rng(5),
        "ema": torch.arange(6, dtype=torch.float16).reshape(2, 3),
        "wide": torch.zeros(3, dtype=torch.complex128),
        "epoch": 3,
        "notes": {"tags": ("a", "b"), "lr_history": [0.1, 0.05]},
    }
    runstate.save(tmp_path / "ck", state, step=40, metrics={"loss": 0.5, "tag": "x"})
    return tmp_path / "ck"


def test_contents_match_the_checkpoint(ckpt: Path) -> None:
    c = runstate.inspect(ckpt)
    assert (c.step, c.metrics, c.format_version) == (40, {"loss": 0.5, "tag": "x"}, 1)
    assert c.versions["torch"] == torch.__version__ and c.created.endswith("+00:00")
    files = sorted(p.name for p in ckpt.iterdir())
    assert sorted([*c.files, "manifest.json"]) == files
    assert c.nbytes == sum(p.stat().st_size for p in ckpt.iterdir())
    assert list(c.items) == ["model", "optimizer", "scheduler", "rng", "gen", "np_gen", "ema", "wide", "epoch", "notes"]

    model = c.items["model"]
    assert (model.kind, model.type) == ("stateful", "torch.nn.modules.container.Sequential")
    assert [t.name for t in model.tensors] == list(model.value) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    w = model.value["0.weight"]
    assert w == runstate.TensorSummary("model", "0.weight", "F32", (8, 4), 128, "model.safetensors", "torch")
    assert model.nbytes == (32 + 8 + 16 + 2) * 4 and model.files == ("model.safetensors",)

    opt = c.items["optimizer"]
    assert opt.type == "torch.optim.adamw.AdamW"
    group = opt.value["param_groups"][0]
    assert group["betas"] == (0.9, 0.999) and group["params"] == [0, 1, 2, 3]
    assert opt.value["state"][0]["exp_avg"].shape == (8, 4)
    assert c.items["scheduler"].value["_last_lr"] == [pytest.approx(0.0025)]

    gen = c.items["gen"]
    assert (gen.kind, gen.type) == ("object", "torch.Generator")
    assert isinstance(gen.value, runstate.ObjectSummary) and gen.value.attrs == {"device": "cpu"}
    assert gen.value.state.dtype == "U8"
    assert c.items["np_gen"].value.attrs == {"bit_generator": "PCG64"}

    assert (c.items["ema"].kind, c.items["ema"].value.name, c.items["ema"].value.dtype) == ("tensor", "ema", "F16")
    wide = c.items["wide"].value
    assert (wide.dtype, wide.shape, wide.nbytes) == ("complex128", (3,), 48)  # raw bytes, real dtype shown
    assert (c.items["epoch"].kind, c.items["epoch"].type, c.items["epoch"].value) == ("value", "int", 3)
    assert c.items["notes"].value == {"tags": ("a", "b"), "lr_history": [0.1, 0.05]}
    assert len(c.tensors) == sum(len(i.tensors) for i in c.items.values())


def test_damaged_or_missing_manifest(ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(runstate.CheckpointNotFoundError, match="no checkpoint at"):
        runstate.inspect(tmp_path / "missing")
    manifest = ckpt / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"step": 40', '"step": 41'))
    with pytest.raises(runstate.CorruptCheckpointError, match="manifest checksum mismatch"):
        runstate.inspect(ckpt)


def test_reference_to_a_tensor_missing_from_the_index(ckpt: Path) -> None:
    body = json.loads((ckpt / "manifest.json").read_text())
    body.pop("checksum")
    body["items"]["model"]["tree"]["v"]["v"][0][1]["name"] = "ghost"
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    body["checksum"] = xxhash.xxh3_64_hexdigest(canonical.encode("ascii"))
    (ckpt / "manifest.json").write_text(json.dumps(body))
    with pytest.raises(runstate.CorruptCheckpointError, match="unknown tensor 'ghost'") as err:
        runstate.inspect(ckpt)
    assert err.value.tensor == "ghost"


def test_reads_no_tensor_and_imports_no_framework(ckpt: Path) -> None:
    for f in ckpt.glob("*.safetensors"):
        f.write_bytes(b"\0" * f.stat().st_size)  # tensor bytes are never read
    code = (
        "import sys, runstate\n"
        f"c = runstate.inspect({str(ckpt)!r})\n"
        "assert c.items['model'].value['0.weight'].shape == (8, 4)\n"
        "print(sorted(m for m in ('torch', 'rich', 'safetensors') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"
