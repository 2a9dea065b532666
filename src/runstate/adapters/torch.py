"""PyTorch adapter: tensors, ``torch.Generator``, and the checks that make restores safe.

Active once the program imports torch (``import runstate`` never imports it). Optimizer and
scheduler checks live in :mod:`runstate.adapters.torch_optim`, process groups and sharded
tensors in :mod:`runstate.adapters.torch_dist`.
"""

from __future__ import annotations

import logging
import warnings
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from runstate.adapters import torch_adopt, torch_optim
from runstate.adapters.base import Adapter, RestoreContext, StatefulRule, Unavailable
from runstate.errors import UnsupportedTypeError
from runstate.format.tensors import TensorBlob, TensorCodec
from runstate.format.tree import ObjectCodec, StatefulState

__all__ = [
    "ADAPTER",
    "CODEC",
    "OBJECTS",
    "TorchAdapter",
    "TorchCodec",
    "TorchObjects",
    "UnavailableGenerator",
]

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
    """The tensor's bytes in C order on the host: a view of its memory when it already is there
    (a contiguous CPU tensor), else a copy."""
    # Through __array_interface__ (_Memory), not Tensor.numpy(): a storage once exported with
    # numpy() is marked not resizable for good, which would break a program that frees a
    # parameter's memory after a save (resize_(0), as FSDP1 and ZeRO-3 do) and keep a restore
    # after a save from taking the zero-copy path (torch_adopt).
    if t.is_cpu and t.is_contiguous() and not t.is_conj() and not t.is_neg():
        # the common case, 3x faster than the general path below (a save of many tiny tensors)
        data: memoryview = np.asarray(_Memory(t)).data
        return data
    flat = t.detach().to("cpu").resolve_conj().resolve_neg().contiguous().reshape(-1)
    data = np.asarray(_Memory(flat)).data
    return data


def _token(t: torch.Tensor) -> tuple[Any, Any] | None:
    """Same storage object (held weakly) and same version counter: provably the same bytes,
    unless written through ``.data`` (a separate counter): see docs/format.md section 15."""
    if t.numel() == 0 or t.is_inference():  # an inference tensor has no version counter
        return None
    version = (t._version, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, str(t.device))
    return (weakref.ref(t.untyped_storage()), version)


class TorchCodec:
    """Codec for ``torch.Tensor`` (and ``nn.Parameter``) on any device."""

    lib = "torch"

    def to_blob(self, value: Any, where: str) -> TensorBlob:
        # Called once per tensor of the state: kept to cheap attribute reads (a state of 10,000
        # tiny tensors spends much of its save here).
        t: torch.Tensor = value
        if t.layout != torch.strided or t.is_quantized or t.is_nested:
            raise UnsupportedTypeError(
                f"{where}: a {t.layout} tensor cannot be stored; convert it to a dense tensor "
                "(tensor.to_dense() / dequantize())"
            )
        device = "cpu" if t.is_cpu else str(t.device)
        if device == "meta":
            raise UnsupportedTypeError(f"{where}: a tensor on the meta device has no data to store")
        if type(t) not in _PLAIN_TENSOR_TYPES and is_dtensor(t):
            return _dtensor_blob(t, where)
        meta: dict[str, Any] = {"device": device}
        dtype = t.dtype
        code = _TORCH_TO_CODE.get(dtype)
        shape = tshape = tuple(map(int, t.shape))
        nbytes = t.nbytes
        if code is None:
            # A dtype safetensors lacks (complex128, float8_e8m0fnu...): stored as raw bytes.
            meta["lib_dtype"] = _dtype_name(dtype)
            meta["lib_shape"] = list(shape)
            code, shape = "U8", (nbytes,)
        identity = None
        if nbytes:
            # Equal for two views of the same memory with the same layout (tied weights): the
            # address of the first element (on the device), shape, strides, dtype and the lazy
            # conjugate / negative bits. A view at another offset has another address.
            identity = ("torch", device, t.data_ptr(), tshape, t.stride(), dtype, t.is_conj(), t.is_neg())
        return TensorBlob(code, shape, nbytes, self.lib, lambda: _cpu_bytes(t), meta, identity, token=lambda: _token(t))

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
        return _uint8_tensor(data).view(tdtype).reshape(shape)


class _Memory:
    """A contiguous CPU tensor's bytes as NumPy sees them (``__array_interface__``, uint8);
    keeps the tensor alive, and leaves its storage resizable (``Tensor.numpy()`` does not)."""

    __slots__ = ("__array_interface__", "tensor")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.__array_interface__ = {
            "data": (tensor.data_ptr(), False),
            "shape": (tensor.numel() * tensor.element_size(),),
            "typestr": "|u1",
            "version": 3,
        }


def _empty_bytes(nbytes: int) -> np.ndarray | None:
    """A uint8 array on a new tensor's memory (the array keeps the tensor).

    The array is made through ``__array_interface__``, not ``Tensor.numpy()``: a storage once
    exported with ``numpy()`` is marked not resizable, and :mod:`.torch_adopt` lets a live
    tensor take over only memory that is like any tensor's.
    """
    if nbytes <= 0:
        return None
    # No madvise(MADV_HUGEPAGE) as NumPy does: measured, it made restores stall for seconds in
    # memory compaction on a busy VM (notes of issue 20), and small pages were faster there.
    try:
        memory = torch.empty(nbytes, dtype=torch.uint8)
    except RuntimeError as exc:  # torch's allocator says so with a RuntimeError: not damage
        raise MemoryError(f"cannot allocate {nbytes} bytes to restore a tensor into: {exc}") from exc
    return np.asarray(_Memory(memory))


def _uint8_tensor(data: np.ndarray) -> torch.Tensor:
    """``data`` as a uint8 tensor, without copying: the tensor :func:`_empty_bytes` made it on,
    else a tensor on the array's memory."""
    memory = data.base
    if (
        isinstance(memory, _Memory)
        and data.ndim == 1
        and memory.tensor.numel() == data.size
        and memory.tensor.data_ptr() == data.ctypes.data
    ):
        return memory.tensor
    return torch.from_numpy(data)


_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


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
        raise UnsupportedTypeError(
            f"{where}: a DTensor with a Partial placement holds no final values; reduce it first"
        )
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
            return UnavailableGenerator(f"a torch.Generator on {device}", missing, device)
        gen = torch.Generator(device=device)
        gen.set_state(state)
        return gen

    def copy_into(self, target: Any, source: Any) -> bool:
        if isinstance(target, torch.Generator) and isinstance(source, torch.Generator):
            target.set_state(source.get_state())
            return True
        return False


@dataclass(frozen=True)
class UnavailableGenerator(Unavailable):
    """What a stored ``torch.Generator`` of a device this machine lacks decodes to.

    A CUDA generator's state cannot be put into a CPU generator (the states differ in size and
    meaning), so it is not rebuilt at all: restoring reports it (``strict=True``: an error;
    ``strict=False``: the live value is kept, with a warning).

    Attributes:
        device: the stored generator's device (``"cuda:0"``).
    """

    device: str = ""


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


logger = logging.getLogger("runstate")

_MODULE_RULE = StatefulRule(check_class=False, compare_kinds=True, partial_load=True)
_COPY_THREADS_FROM = 1 << 20  # torch copies buffers this large with several threads


class TorchAdapter(Adapter):
    """torch tensors, generators, modules, optimizers, schedulers and data loaders."""

    name = "torch"
    lib = "torch"
    key_prefixes = ("module.", "_orig_mod.")  # DDP / FSDP1, torch.compile

    def tensor_codec(self, value: Any) -> TensorCodec | None:
        return CODEC if isinstance(value, torch.Tensor) else None

    def object_codec(self) -> ObjectCodec | None:
        return OBJECTS

    def item_extras(self, name: str, value: Any, state: Mapping[str, Any]) -> dict[str, Any]:
        names = torch_optim.optimizer_param_names(value, state)
        return {} if names is None else {"param_names": names}  # a changed model keeps matching moments

    def frozen_tensors(self, value: Any) -> frozenset[str]:
        if not isinstance(value, torch.nn.Module):
            return frozenset()
        return frozenset(n for n, p in value.named_parameters(remove_duplicate=False) if not p.requires_grad)

    def versions(self) -> dict[str, str]:
        return {"torch": str(torch.__version__)}

    def is_per_rank_value(self, value: Any) -> bool:
        return isinstance(value, torch.utils.data.DataLoader)  # torchdata's StatefulDataLoader too

    def copy_bytes(self, dst: np.ndarray, src: memoryview) -> bool:
        if dst.nbytes < _COPY_THREADS_FROM:
            return False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a read-only source buffer is fine to copy from
            torch.from_numpy(dst).copy_(torch.frombuffer(src, dtype=torch.uint8))
        return True

    def rng_state(self) -> Any:
        cuda = []
        cuda_module: Any = torch.cuda  # is_initialized() has no type hints
        if cuda_module.is_available() and cuda_module.is_initialized():
            cuda = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
        return {"cpu": torch.get_rng_state(), "cuda": cuda}

    def set_rng_state(self, state: Any) -> None:
        torch.set_rng_state(state["cpu"].to("cpu"))
        cuda = state.get("cuda") or []
        here = torch.cuda.device_count() if torch.cuda.is_available() else 0
        for i, s in enumerate(cuda[:here]):
            torch.cuda.set_rng_state(s.to("cpu"), i)
        if len(cuda) > here:
            # Nothing here draws from a device this machine lacks, so the rest still resumes
            # exactly; a later checkpoint no longer holds those devices' states.
            logger.warning(
                "runstate.RNG: the checkpoint holds the random state of %d CUDA device(s), this machine "
                "has %d: the state of %d device(s) is not restored",
                len(cuda),
                here,
                len(cuda) - here,
            )

    def codec(self) -> TensorCodec | None:
        return CODEC

    def is_lazy(self, value: Any) -> bool:
        return is_lazy(value)

    def stateful_rule(self, obj: Any) -> StatefulRule | None:
        # A module is checked by its keys, shapes and dtypes, not its class: wrappers (DDP,
        # torch.compile), lazy modules that change class, and renamed model classes load fine.
        return _MODULE_RULE if isinstance(obj, torch.nn.Module) else None

    def stateful_source(self, obj: Any, stored: StatefulState, path: tuple[Any, ...], ctx: RestoreContext) -> Any:
        return torch_optim.restore_source(obj, stored, path, ctx)

    def place_like(self, stored: Any, template: Any) -> Any:
        """Move a restored tensor to the template's device (restored tensors load on CPU)."""
        if isinstance(stored, torch.Tensor) and isinstance(template, torch.Tensor) and stored.device != template.device:
            return stored.to(template.device)
        return stored

    def empty_bytes(self, nbytes: int) -> np.ndarray | None:
        """A buffer torch allocated, so that the restored tensor can be taken over by a live one."""
        return _empty_bytes(nbytes)

    def adopt_restored(self, obj: Any, state: Any, adopted: set[int]) -> None:
        """A module's parameters and buffers take over the restored buffers (see :mod:`.torch_adopt`)."""
        torch_adopt.adopt_storages(obj, state, adopted)


ADAPTER = TorchAdapter()
