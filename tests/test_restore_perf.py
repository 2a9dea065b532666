"""The fast restore path keeps every guarantee of the slow one (issue 20, targets 4 and 5).

A restore now reads the tensors of an item several at a time, hashing each piece while it is
in the CPU cache (``runstate._impl.parallel_reads``), into memory torch allocated; in phase
two a module's parameters and buffers take over those buffers instead of copying them
(``runstate.adapters.torch_adopt``). These tests pin what must not change: nothing live
changes unless everything verified, the live objects stay the same Python objects, memory
shared with anything else is still copied into, and mismatches are refused before any change.
Every test runs with the read-ahead on (``MIN_BYTES`` = 0) and off (tensor by tensor).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import runstate
from runstate._impl import parallel_reads, reader


@pytest.fixture(params=["read-ahead", "one-by-one"], autouse=True)
def read_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setattr(reader, "MIN_BYTES", 0 if request.param == "read-ahead" else 1 << 62)
    yield request.param


def trained(seed: int, width: int = 64) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(width, width), nn.BatchNorm1d(width), nn.Linear(width, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, width)).square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Values, storage addresses and objects of everything live (to prove nothing changed)."""
    out: dict[str, Any] = {}
    for k, v in model.state_dict(keep_vars=True).items():
        out[f"model.{k}"] = (v, v.data_ptr(), v.detach().clone())
    for p, s in opt.state.items():
        for k, v in s.items():
            out[f"opt.{id(p)}.{k}"] = (v, v.data_ptr(), v.detach().clone())
    return out


def assert_unchanged(before: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer) -> None:
    after = snapshot(model, opt)
    assert after.keys() == before.keys()
    for key, (obj, ptr, value) in before.items():
        now_obj, now_ptr, now_value = after[key]
        assert now_obj is obj and now_ptr == ptr and torch.equal(now_value, value), key


def flip_last_byte(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        byte = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_restore_puts_the_values_into_the_same_objects(tmp_path: Path, read_mode: str) -> None:
    model, opt = trained(0)
    runstate.save(tmp_path / "ck", {"model": model, "optimizer": opt})
    live, live_opt = trained(1)
    params = list(live.parameters())
    ptrs = [p.data_ptr() for p in params]
    runstate.load(tmp_path / "ck", {"model": live, "optimizer": live_opt})
    assert all(a is b for a, b in zip(params, live.parameters(), strict=True))
    assert all(a is b for a, b in zip(params, live_opt.param_groups[0]["params"], strict=True))
    assert all(isinstance(p, nn.Parameter) and p.requires_grad and p.is_leaf for p in params)
    for (k, a), b in zip(model.state_dict().items(), live.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    for p, q in zip(model.parameters(), params, strict=True):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][key], live_opt.state[q][key])
    # the restored buffers of tensors large enough were taken over, not copied (the zero-copy
    # path is in use); small ones were copied into...
    large = [p.nbytes >= reader.FRAMEWORK_MEMORY_FROM for p in params]
    assert large == [True, False, False, False, False, False]
    assert [p.data_ptr() != ptr for p, ptr in zip(params, ptrs, strict=True)] == large
    # ...and training goes on with them: the optimizer updates what the model computes with
    x = torch.randn(4, 64)
    for m, o in ((model, opt), (live, live_opt)):
        m(x).square().mean().backward()
        o.step()
    for a, b in zip(model.parameters(), live.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_second_restore_takes_over_the_buffers_again(tmp_path: Path) -> None:
    """The buffers read into are torch's own memory: the tensors that took them over can take
    over the next restore's buffers too (memory exported to NumPy could not)."""
    model, _ = trained(0)
    runstate.save(tmp_path / "ck", {"model": model})
    live, _ = trained(1)
    runstate.load(tmp_path / "ck", {"model": live})
    ptr = live[0].weight.data_ptr()
    assert live[0].weight.untyped_storage().resizable()
    runstate.load(tmp_path / "ck", {"model": live})
    assert live[0].weight.data_ptr() != ptr
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), live.parameters(), strict=True))


def test_damage_in_the_last_file_read_changes_nothing(tmp_path: Path) -> None:
    model, opt = trained(0)
    runstate.save(tmp_path / "ck", {"model": model, "optimizer": opt})
    flip_last_byte(tmp_path / "ck" / "optimizer.safetensors")  # read last: the model was read and checked first
    live, live_opt = trained(1)
    before = snapshot(live, live_opt)
    with pytest.raises(runstate.CorruptCheckpointError, match="checksum mismatch") as info:
        runstate.load(tmp_path / "ck", {"model": live, "optimizer": live_opt})
    assert info.value.file == "optimizer.safetensors" and info.value.tensor is not None
    assert_unchanged(before, live, live_opt)


def test_a_read_error_during_the_read_ahead_is_not_damage_and_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, read_mode: str
) -> None:
    if read_mode == "one-by-one":
        pytest.skip("the tensor-by-tensor read does not use preadv (covered by test_hardening_format)")
    model, opt = trained(0)
    runstate.save(tmp_path / "ck", {"model": model, "optimizer": opt})
    live, live_opt = trained(1)
    before = snapshot(live, live_opt)
    real_preadv = os.preadv
    calls = []

    def failing_preadv(fd: int, buffers: Any, offset: int) -> int:
        calls.append(offset)
        if len(calls) > 3:
            raise OSError(errno.EIO, "Input/output error")
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(parallel_reads.os, "preadv", failing_preadv)
    with pytest.raises(runstate.CheckpointReadError, match="Input/output error"):
        runstate.load(tmp_path / "ck", {"model": live, "optimizer": live_opt})
    assert_unchanged(before, live, live_opt)


def test_a_mismatch_is_refused_before_anything_changes(tmp_path: Path) -> None:
    model, opt = trained(0)
    runstate.save(tmp_path / "ck", {"model": model, "optimizer": opt})
    live, live_opt = trained(1)
    live[2].bias = nn.Parameter(live[2].bias.detach().double())  # dtype differs
    before = snapshot(live, live_opt)
    with pytest.raises(runstate.StateMismatchError, match="dtype"):
        runstate.load(tmp_path / "ck", {"model": live, "optimizer": live_opt})
    assert_unchanged(before, live, live_opt)
    wider, wider_opt = trained(1, width=72)  # shapes differ
    before = snapshot(wider, wider_opt)
    with pytest.raises(runstate.StateMismatchError, match="shape"):
        runstate.load(tmp_path / "ck", {"model": wider, "optimizer": wider_opt})
    assert_unchanged(before, wider, wider_opt)


class Shared(nn.Module):
    """Tensors whose memory is shared: a view, two parameters on one buffer, a tied weight,
    a transposed (non-contiguous) parameter, a buffer whose memory NumPy also sees, one on a
    NumPy array's memory."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(64, 64))
        flat = torch.randn(8192)
        self.first = nn.Parameter(flat[:4096])
        self.second = nn.Parameter(flat[4096:])
        self.tied_a = nn.Linear(64, 64, bias=False)
        self.tied_b = nn.Linear(64, 64, bias=False)
        self.tied_b.weight = self.tied_a.weight
        self.transposed = nn.Parameter(torch.randn(64, 80).t())
        self.register_buffer("seen_by_numpy", torch.randn(4096))
        self.array = np.random.default_rng(int(torch.randint(100, ()))).random(4096).astype(np.float32)
        self.register_buffer("on_array", torch.from_numpy(self.array))  # NumPy's memory, not torch's


def test_shared_and_non_contiguous_tensors_are_copied_into(tmp_path: Path) -> None:
    torch.manual_seed(0)
    saved = Shared()
    runstate.save(tmp_path / "ck", {"model": saved})
    torch.manual_seed(1)
    live = Shared()
    view = live.weight.view(-1)  # someone holds a view: the weight's memory must stay the one restored into
    flat = live.first.untyped_storage()
    numpy_view = live.seen_by_numpy.numpy()
    transposed_stride = live.transposed.stride()
    runstate.load(tmp_path / "ck", {"model": live})
    for k, v in saved.state_dict().items():
        assert torch.equal(live.state_dict()[k], v), k
    assert torch.equal(view, saved.weight.detach().view(-1))
    assert live.first.untyped_storage().data_ptr() == flat.data_ptr() == live.second.untyped_storage().data_ptr()
    assert live.tied_b.weight is live.tied_a.weight and torch.equal(live.tied_a.weight, saved.tied_a.weight)
    assert live.transposed.stride() == transposed_stride
    assert np.array_equal(numpy_view, saved.seen_by_numpy.numpy())
    assert np.array_equal(live.array, saved.array) and live.on_array.data_ptr() == live.array.ctypes.data


def test_tied_weights_are_copied_into(tmp_path: Path) -> None:
    """A live tensor under two keys is left to load_state_dict (its last key wins, even when
    the stored values differ per key): it keeps its memory and gets the values."""
    torch.manual_seed(0)
    saved = nn.Sequential(nn.Embedding(500, 16), nn.Linear(16, 500, bias=False))
    saved[1].weight = saved[0].weight
    runstate.save(tmp_path / "ck", {"model": saved})
    torch.manual_seed(1)
    live = nn.Sequential(nn.Embedding(500, 16), nn.Linear(16, 500, bias=False))
    live[1].weight = live[0].weight
    tied = live[0].weight
    ptr = tied.data_ptr()
    runstate.load(tmp_path / "ck", {"model": live})
    assert live[0].weight is tied and live[1].weight is tied and tied.data_ptr() == ptr
    assert torch.equal(tied, saved[0].weight)


def test_shared_memory_pinned_and_hooked_modules_keep_their_memory(tmp_path: Path) -> None:
    """Memory other processes see (``share_memory_``), and modules that load their own way
    (a load pre-hook), are copied into as before."""
    model, _ = trained(0)
    runstate.save(tmp_path / "ck", {"model": model})
    shared, _ = trained(1)
    shared.share_memory()
    hooked, _ = trained(2)
    seen = []
    hooked[0]._register_load_state_dict_pre_hook(lambda *args: seen.append(args[1]))
    for live in (shared, hooked):
        ptrs = [p.data_ptr() for p in live[0].parameters()]
        runstate.load(tmp_path / "ck", {"model": live})
        assert [p.data_ptr() for p in live[0].parameters()] == ptrs
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), live.state_dict().values()))
    assert all(p.is_shared() for p in shared.parameters())
    assert seen == ["0."]


def test_plain_tensors_are_replaced_and_the_old_ones_left_alone(tmp_path: Path) -> None:
    torch.manual_seed(0)
    stored = {"a": torch.randn(64, 64), "b": torch.arange(10), "c": np.arange(5.0)}
    runstate.save(tmp_path / "ck", {"tensors": stored, "step": 3})
    old: dict[str, Any] = {"a": torch.zeros(64, 64), "b": torch.zeros(10, dtype=torch.int64), "c": np.zeros(5)}
    held = dict(old)
    state: dict[str, Any] = {"tensors": old, "step": 0}
    runstate.load(tmp_path / "ck", state)
    assert state["step"] == 3
    assert torch.equal(state["tensors"]["a"], stored["a"]) and torch.equal(state["tensors"]["b"], stored["b"])
    assert np.array_equal(state["tensors"]["c"], stored["c"])
    assert torch.count_nonzero(held["a"]) == 0 and not held["c"].any()  # replaced, as documented: not written into
    state["tensors"]["a"].add_(1)  # the restored tensors are ordinary, writable tensors
    assert state["tensors"]["a"].untyped_storage().resizable()


def test_a_tree_load_and_a_large_item_read_ahead(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Above MIN_BYTES (8 MiB) with the real threshold: read ahead in batches by several threads."""
    monkeypatch.setattr(reader, "MIN_BYTES", parallel_reads.MIN_BYTES)
    torch.manual_seed(0)
    big = {f"t{i}": torch.randn(256, 1024) for i in range(9)}  # 9 MiB
    big.update({f"small{i}": torch.randn(7) for i in range(100)})
    runstate.save(tmp_path / "ck", {"big": big})
    tree = runstate.load(tmp_path / "ck")
    assert tree["big"].keys() == big.keys()
    assert all(torch.equal(tree["big"][k], v) for k, v in big.items())


# -- review findings: memory the tensor object is known by outside Python, live ties, layout, OOM --


def test_a_tensor_exported_through_dlpack_keeps_its_memory(tmp_path: Path) -> None:
    """A DLPack export (NumPy, JAX) holds the tensor itself, not a view of its storage: taking
    the tensor off its memory would free what the export still points at (DDP's reducer holds
    parameters alike, and hooks their gradient accumulators, which ``set_`` replaces)."""

    class Holder(nn.Module):
        def __init__(self, value: float) -> None:
            super().__init__()
            self.register_buffer("big", torch.full((8192,), value))  # 32 KiB: read into torch memory

    runstate.save(tmp_path / "ck", {"model": Holder(7.0)})
    live = Holder(1.0)
    exported = np.from_dlpack(live.big)
    runstate.load(tmp_path / "ck", {"model": live})
    assert np.shares_memory(exported, live.big.numpy())
    assert (exported == 7.0).all()
    control = Holder(1.0)  # negative control: not exported, it takes the restored buffer over
    ptr = control.big.data_ptr()
    runstate.load(tmp_path / "ck", {"model": control})
    assert control.big.data_ptr() != ptr and (control.big == 7.0).all()


def test_live_tied_weights_restore_like_load_state_dict(tmp_path: Path) -> None:
    """Tied in the live model, untied (other values) in the checkpoint: the last key wins, as
    with torch's own load_state_dict."""
    torch.manual_seed(0)
    src = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False))
    runstate.save(tmp_path / "ck", {"model": src})
    live = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False))
    live[1].weight = live[0].weight
    runstate.load(tmp_path / "ck", {"model": live})
    assert live[0].weight is live[1].weight
    assert torch.equal(live[1].weight, src[1].weight)


def test_a_channels_last_weight_keeps_its_layout(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = nn.Conv2d(64, 64, 1).to(memory_format=torch.channels_last)
    runstate.save(tmp_path / "ck", {"model": src})
    live = nn.Conv2d(64, 64, 1).to(memory_format=torch.channels_last)
    strides = live.weight.stride()
    runstate.load(tmp_path / "ck", {"model": live})
    assert live.weight.stride() == strides
    assert torch.equal(live.weight, src.weight)


def test_running_out_of_memory_is_not_called_damage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, _opt = trained(0)
    runstate.save(tmp_path / "ck", {"model": model})

    live, _ = trained(1)
    real_empty = torch.empty

    def no_memory(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("dtype") is torch.uint8:  # the restore's buffers
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", no_memory)
    with pytest.raises(runstate.CheckpointError) as info:
        runstate.load(tmp_path / "ck", {"model": live})
    assert not isinstance(info.value, runstate.CorruptCheckpointError), info.value
    assert "damaged" not in str(info.value)


def test_a_saved_tensor_stays_resizable_and_a_later_restore_takes_it_over(tmp_path: Path) -> None:
    """Saving exports a tensor's bytes without Tensor.numpy(), which would mark its storage not
    resizable for good: FSDP1/ZeRO-3 free parameter memory with resize_(0) after a save, and a
    rollback in the same process should still take the zero-copy path."""
    model, _opt = trained(0, width=128)
    runstate.save(tmp_path / "ck", {"model": model})
    weight = model[0].weight
    assert weight.untyped_storage().resizable()
    ptr = weight.data_ptr()
    runstate.load(tmp_path / "ck", {"model": model})
    assert model[0].weight is weight and weight.data_ptr() != ptr  # taken over
    spare = torch.ones(4096)
    runstate.save(tmp_path / "ck2", {"spare": spare})
    spare.untyped_storage().resize_(0)  # raised "Trying to resize storage that is not resizable"
