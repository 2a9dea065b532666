"""PyTorch adapter: tensors, ``torch.Generator``, and the checks that make restores safe.

Imported only when a torch value is met, so ``import runstate`` never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from runstate.errors import UnsupportedTypeError
from runstate.format.tensors import TensorBlob

__all__ = ["CODEC", "OBJECTS", "TorchCodec", "TorchObjects", "check_optimizer", "place_like"]

_TORCH_TO_CODE: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.complex64: "C64",
}
for _name, _code in (
    ("float8_e4m3fn", "F8_E4M3"),
    ("float8_e4m3fnuz", "F8_E4M3FNUZ"),
    ("float8_e5m2", "F8_E5M2"),
    ("float8_e5m2fnuz", "F8_E5M2FNUZ"),
    ("uint16", "U16"),
    ("uint32", "U32"),
    ("uint64", "U64"),
):
    if hasattr(torch, _name):
        _TORCH_TO_CODE[getattr(torch, _name)] = _code
_CODE_TO_TORCH = {v: k for k, v in _TORCH_TO_CODE.items()}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _cpu_bytes(t: torch.Tensor) -> memoryview:
    flat = t.detach().to("cpu").resolve_conj().resolve_neg().contiguous().reshape(-1)
    data: memoryview = flat.view(torch.uint8).numpy().data
    return data


class TorchCodec:
    """Codec for ``torch.Tensor`` (and ``nn.Parameter``) on any device."""

    lib = "torch"

    def to_blob(self, value: Any, where: str) -> TensorBlob:
        t: torch.Tensor = value
        if t.layout != torch.strided or t.is_quantized or t.is_nested:
            raise UnsupportedTypeError(
                f"{where}: a {t.layout} tensor cannot be stored; convert it to a dense tensor "
                "(tensor.to_dense() / dequantize())"
            )
        if t.device.type == "meta":
            raise UnsupportedTypeError(f"{where}: a tensor on the meta device has no data to store")
        if is_dtensor(t):
            return _dtensor_blob(t, where)
        meta: dict[str, Any] = {"device": str(t.device)}
        code = _TORCH_TO_CODE.get(t.dtype)
        shape = tuple(int(s) for s in t.shape)
        nbytes = t.numel() * t.element_size()
        if code is None:
            # A dtype safetensors lacks (complex128, float8_e8m0fnu...): stored as raw bytes.
            meta["lib_dtype"] = _dtype_name(t.dtype)
            meta["lib_shape"] = list(shape)
            code, shape = "U8", (nbytes,)
        identity = None
        if t.numel() > 0:
            identity = (
                "torch",
                t.device.type,
                t.device.index,
                t.untyped_storage().data_ptr(),
                t.storage_offset(),
                tuple(t.shape),
                t.stride(),
                t.dtype,
                t.is_conj(),
                t.is_neg(),
            )
        return TensorBlob(code, shape, nbytes, self.lib, lambda: _cpu_bytes(t), meta, identity)

    def from_bytes(self, data: np.ndarray, dtype: str, shape: tuple[int, ...], meta: dict[str, Any]) -> Any:
        if "lib_dtype" in meta:
            target = getattr(torch, str(meta["lib_dtype"]), None)
            if not isinstance(target, torch.dtype):
                raise UnsupportedTypeError(
                    f"torch {torch.__version__} has no dtype {meta['lib_dtype']!r}; upgrade torch"
                )
            tdtype, shape = target, tuple(meta["lib_shape"])
        else:
            found = _CODE_TO_TORCH.get(dtype)
            if found is None:
                raise UnsupportedTypeError(f"torch {torch.__version__} has no dtype for {dtype!r}; upgrade torch")
            tdtype = found
        if data.size == 0:
            return torch.empty(shape, dtype=tdtype)
        return torch.from_numpy(data).view(tdtype).reshape(shape)


def is_dtensor(value: Any) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (checked without importing it)."""
    return type(value).__name__ == "DTensor" and type(value).__module__.startswith("torch.distributed")


def _dtensor_blob(t: Any, where: str) -> TensorBlob:
    """The blob of this process's block of a DTensor, with where the block lies in the whole.

    ``meta["dtensor"]`` holds the whole shape, the block's offsets and whether this process
    writes it: of the processes holding the same replicated block, only the one at
    coordinate 0 along every replicated mesh dimension does.
    """
    (chunk,) = t.__create_chunk_list__()  # the block DCP itself would save for this process
    local = t.to_local()
    coordinate = t.device_mesh.get_coordinate()
    owner = coordinate is not None and all(
        c == 0 for c, p in zip(coordinate, t.placements, strict=True) if not p.is_shard()
    )
    if any(p.is_partial() for p in t.placements):
        raise UnsupportedTypeError(f"{where}: a DTensor with a Partial placement holds no final values; reduce it first")
    blob = CODEC.to_blob(local, where)
    if "lib_dtype" in blob.meta:
        raise UnsupportedTypeError(f"{where}: a sharded {t.dtype} tensor cannot be stored (no safetensors dtype)")
    blob.meta["dtensor"] = {
        "shape": [int(s) for s in t.shape],
        "offsets": [int(o) for o in chunk.offsets],
        "owner": bool(owner),
    }
    blob.identity = None
    blob.source = t
    return blob


class TorchObjects:
    """Object codec for ``torch.Generator`` (its state is a uint8 tensor)."""

    def get(self, value: Any) -> tuple[str, Any, dict[str, Any]] | None:
        if isinstance(value, torch.Generator):
            return "torch.Generator", value.get_state(), {"device": str(value.device)}
        return None

    def make(self, kind: str, state: Any, attrs: dict[str, Any]) -> Any:
        if kind != "torch.Generator":
            raise KeyError(kind)
        device = str(attrs.get("device", "cpu"))
        missing = _missing_device(device)
        if missing is not None:  # not damage: restore decides (strict: an error; else skipped)
            return UnavailableGenerator(device, missing)
        gen = torch.Generator(device=device)
        gen.set_state(state)
        return gen

    def copy_into(self, target: Any, source: Any) -> bool:
        if isinstance(target, torch.Generator) and isinstance(source, torch.Generator):
            target.set_state(source.get_state())
            return True
        return False


@dataclass(frozen=True)
class UnavailableGenerator:
    """What a stored ``torch.Generator`` of a device this machine lacks decodes to.

    A CUDA generator's state cannot be put into a CPU generator (the states differ in size and
    meaning), so it is not rebuilt at all: restoring reports it (``strict=True``: an error;
    ``strict=False``: the live value is kept, with a warning).

    Attributes:
        device: the stored generator's device (``"cuda:0"``).
        reason: why it cannot be rebuilt here, as a sentence.
    """

    device: str
    reason: str


def _missing_device(device: str) -> str | None:
    """Why a generator of ``device`` cannot be created here, or None when it can."""
    if not device.startswith("cuda"):
        return None
    if not torch.cuda.is_available():
        return f"a torch.Generator on {device} is stored, but CUDA is not available on this machine"
    _, colon, index_text = device.partition(":")
    index = int(index_text) if index_text.isdigit() else (-1 if colon else 0)
    if not 0 <= index < torch.cuda.device_count():
        count = torch.cuda.device_count()
        return f"a torch.Generator on {device} is stored, but this machine has {count} CUDA device(s)"
    return None


def is_lazy(value: Any) -> bool:
    """True for an uninitialized parameter or buffer of a lazy module (``nn.LazyLinear``)."""
    return isinstance(value, torch.Tensor) and bool(torch.nn.parameter.is_lazy(value))


CODEC = TorchCodec()
OBJECTS = TorchObjects()

# Optimizer state buffers that always have the shape of their parameter.
_PARAM_SHAPED = (
    "exp_avg",
    "exp_avg_sq",
    "max_exp_avg_sq",
    "momentum_buffer",
    "square_avg",
    "sum",
    "acc_delta",
    "grad_avg",
    "ax",
    "prev",
)


def is_module(obj: Any) -> bool:
    return isinstance(obj, torch.nn.Module)


def is_optimizer(obj: Any) -> bool:
    return isinstance(obj, torch.optim.Optimizer)


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def is_optimizer_state(stored: Any) -> bool:
    """True when ``stored`` has the shape of an optimizer state_dict (checkpoints are untrusted)."""
    groups = stored.get("param_groups") if isinstance(stored, dict) else None
    return (
        isinstance(groups, list)
        and all(isinstance(g, dict) and isinstance(g.get("params", []), list) for g in groups)
        and isinstance(stored.get("state"), dict)
        and all(_hashable(i) for g in groups for i in g.get("params", []))
    )


def check_optimizer(opt: torch.optim.Optimizer, stored: Any, where: str) -> list[str]:
    """Problems that would make ``opt.load_state_dict(stored)`` wrong or fail."""
    problems: list[str] = []
    if not is_optimizer_state(stored):  # a checkpoint is data from anywhere: its shape is checked before use
        return [f"{where}: the checkpoint does not hold an optimizer state_dict"]
    groups = stored["param_groups"]
    if len(groups) != len(opt.param_groups):
        return [
            f"{where}['param_groups']: checkpoint has {len(groups)} param groups, "
            f"the optimizer has {len(opt.param_groups)}"
        ]
    params: dict[Any, torch.Tensor] = {}
    for i, (saved, live) in enumerate(zip(groups, opt.param_groups, strict=True)):
        ids = saved.get("params", [])
        if len(ids) != len(live["params"]):
            problems.append(
                f"{where}['param_groups'][{i}]: checkpoint has {len(ids)} parameters, "
                f"the optimizer has {len(live['params'])}"
            )
            continue
        params.update(zip(ids, live["params"], strict=True))
    for pid, buffers in stored["state"].items():
        param = params.get(pid)
        if param is None or not isinstance(buffers, dict):
            continue
        for key in _PARAM_SHAPED:
            buf = buffers.get(key)
            if isinstance(buf, torch.Tensor) and buf.dim() > 0 and tuple(buf.shape) != tuple(param.shape):
                problems.append(
                    f"{where}['state'][{pid!r}][{key!r}]: shape {tuple(buf.shape)} in checkpoint, "
                    f"parameter has shape {tuple(param.shape)}"
                )
    return problems


def check_scheduler(sched: Any, stored: Any, where: str) -> list[str]:
    """Problems of an LR scheduler's stored state: its per-group lists must fit the optimizer.

    A scheduler's ``base_lrs`` (``min_lrs`` for ``ReduceLROnPlateau``) has one entry per param
    group; loaded for another number of groups it is accepted, and wrong at the next step.
    """
    optimizer = getattr(sched, "optimizer", None)
    if not isinstance(optimizer, torch.optim.Optimizer) or not isinstance(stored, dict):
        return []
    groups = len(optimizer.param_groups)
    return [
        f"{where}[{key!r}]: the checkpoint's scheduler drives {len(stored[key])} param groups, the live "
        f"optimizer has {groups}"
        for key in ("base_lrs", "min_lrs")
        if isinstance(stored.get(key), list) and len(stored[key]) != groups
    ]


def place_like(stored: Any, template: Any) -> Any:
    """Move a restored tensor to the template's device (restored tensors load on CPU)."""
    if isinstance(stored, torch.Tensor) and isinstance(template, torch.Tensor) and stored.device != template.device:
        return stored.to(template.device)
    return stored


def module_param_names(state: Any) -> dict[int, str]:
    """``id(parameter) -> "item.name"`` for every module among the state's top-level items."""
    names: dict[int, str] = {}
    for item, value in state.items():
        if isinstance(value, torch.nn.Module):
            for name, param in value.named_parameters(remove_duplicate=False):
                names.setdefault(id(param), f"{item}.{name}")
    return names


def optimizer_param_names(value: Any, state: Any) -> list[list[str | None]] | None:
    """The names of an optimizer's parameters, group by group, or None if not an optimizer
    or none of its parameters belongs to a module of the state."""
    if not isinstance(value, torch.optim.Optimizer):
        return None
    names = module_param_names(state)
    out = [[names.get(id(p)) for p in group["params"]] for group in value.param_groups]
    return out if any(n is not None for group in out for n in group) else None


def valid_param_names(names: Any) -> bool:
    """True for a well-formed list of groups of str-or-None names (checkpoints are untrusted)."""
    return isinstance(names, list) and all(
        isinstance(g, list) and all(n is None or isinstance(n, str) for n in g) for g in names
    )


def _match_groups(
    live_names: list[list[str | None]], stored_names: list[list[str | None]]
) -> list[int | str]:
    """For each live param group, the stored group it restores from, or why there is none.

    Groups are matched by their parameters' names, never by position: a live group matches
    the one stored group that holds all of its named parameters (parameters new to the model
    do not count), when no other live group matches it too. A group of parameters outside
    every module (no names at all) matches the stored group at its position if that one has
    no names either.
    """
    group_of: dict[str, int] = {}
    for gi, names in enumerate(stored_names):
        for name in names:
            if name is not None:
                group_of[name] = gi
    found: list[set[int]] = [{group_of[n] for n in names if n is not None and n in group_of} for names in live_names]
    out: list[int | str] = []
    for gi, (names, groups) in enumerate(zip(live_names, found, strict=True)):
        if len(groups) == 1:
            out.append(next(iter(groups)))
        elif len(groups) > 1:
            out.append(f"its parameters come from {len(groups)} param groups of the checkpoint {sorted(groups)}")
        elif all(n is None for n in names) and gi < len(stored_names) and all(n is None for n in stored_names[gi]):
            out.append(gi)
        else:
            out.append("none of its parameters is in the checkpoint")
    claims: dict[int, list[int]] = {}
    for gi, match in enumerate(out):
        if isinstance(match, int):
            claims.setdefault(match, []).append(gi)
    for match, live_groups in claims.items():
        if len(live_groups) > 1:
            for gi in live_groups:
                out[gi] = f"live groups {live_groups} all come from param group {match} of the checkpoint"
    return out


def remap_optimizer_state(
    opt: torch.optim.Optimizer,
    stored: dict[str, Any],
    stored_names: list[list[str | None]],
    live_names: list[list[str | None]],
) -> tuple[dict[str, Any], list[str], list[str], list[str], list[tuple[int, str]]]:
    """Rebuild a stored optimizer state_dict for the live parameters, matching by name.

    Parameters and param groups are both matched by name: the hyper-parameters (``lr``,
    ``weight_decay``...) of a live group come from the stored group holding its parameters,
    wherever the groups are in the list. A live group that matches no stored group
    one-to-one keeps its live hyper-parameters and is reported.

    Returns:
        The state_dict to load; the names of the parameters that kept their state, that are
        new (fresh state) and that are gone (their state dropped); and, per live group that
        matches no stored group, its index and why.
    """
    stored_groups = stored["param_groups"]
    stored_state = stored["state"]
    stored_names = [list(names) for names in stored_names[: len(stored_groups)]]
    stored_names += [[] for _ in range(len(stored_groups) - len(stored_names))]
    by_name: dict[str, Any] = {}
    for names, group in zip(stored_names, stored_groups, strict=True):
        for name, pid in zip(names, group.get("params", []), strict=False):
            if name is not None:
                by_name[name] = pid
    sources = _match_groups(live_names, stored_names)
    kept: list[str] = []
    new: list[str] = []
    groups: list[dict[str, Any]] = []
    state: dict[int, Any] = {}
    unmatched: list[tuple[int, str]] = []
    index = 0
    for gi, live in enumerate(opt.param_groups):
        match = sources[gi]
        if isinstance(match, int):
            source = stored_groups[match]
        else:
            source = live
            unmatched.append((gi, match))
        ids = []
        for param, name in zip(live["params"], live_names[gi], strict=True):
            ids.append(index)
            pid = by_name.get(name) if name is not None else None
            buffers = stored_state.get(pid) if pid is not None else None
            if isinstance(buffers, dict) and all(
                not (
                    isinstance(buffers.get(k), torch.Tensor)
                    and buffers[k].dim() > 0
                    and tuple(buffers[k].shape) != tuple(param.shape)
                )
                for k in _PARAM_SHAPED
            ):
                state[index] = buffers
                kept.append(str(name))
            else:
                new.append(str(name) if name is not None else f"group {gi} #{len(ids) - 1}")
            index += 1
        groups.append({**{k: v for k, v in source.items() if k != "params"}, "params": ids})
    live_set = {n for g in live_names for n in g if n is not None}
    gone = sorted(n for n in by_name if n not in live_set)
    return {"state": state, "param_groups": groups}, kept, new, gone, unmatched
