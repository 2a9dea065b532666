"""Zero-copy restore of a module's tensors: the live tensors take over the verified buffers.

A restore reads and verifies every tensor into a buffer of its own before anything live
changes (two-phase restore). ``Module.load_state_dict`` then copies each buffer into its
parameter: a second copy of every byte. Just before that call (phase two: everything was
verified), :func:`adopt_storages` points each parameter and buffer whose memory nothing else
shares at the restored tensor's memory instead (``Tensor.set_``). ``load_state_dict`` still
runs as usual, with its hooks and checks; its ``copy_`` of a tensor into itself returns at
once. The live objects stay the same Python objects, so an optimizer holding the parameters
sees the restored values.

A tensor is adopted only when taking over its memory cannot be told apart from copying
into it: a plain CPU ``Tensor``/``Parameter`` that owns the whole of memory torch allocated
(contiguous, offset 0, not shared with another tensor or view, not in shared or pinned
memory), of the stored tensor's dtype and shape, in a module that loads the standard way, as
do its ancestors (no ``load_state_dict`` override, no load pre-hooks, the
``_load_from_state_dict`` of ``nn.Module`` or of the batch norms). Every restored buffer is adopted by at most one live tensor; a tensor seen
twice (tied weights) adopts once. Anything else is copied as before.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["adopt_storages"]

_STANDARD_LOADS = frozenset({nn.Module._load_from_state_dict, nn.modules.batchnorm._NormBase._load_from_state_dict})
_PLAIN_TYPES = (torch.Tensor, nn.Parameter)
_use_count = getattr(torch._C, "_storage_Use_Count", None)  # absent: nothing is adopted

# A live tensor's storage is referenced by the tensor and by the Python storage object made
# to ask; one reference more is another tensor or view sharing the memory.
_SOLE_OWNER_REFS = 2


def _standard(module: nn.Module) -> bool:
    return (
        type(module)._load_from_state_dict in _STANDARD_LOADS
        and not module._load_state_dict_pre_hooks
        and type(module).load_state_dict is nn.Module.load_state_dict
    )


def _live_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(state_dict key, tensor)`` of every parameter and persistent buffer that
    ``load_state_dict`` copies into, visiting modules as it does. A module that loads another
    way (or has load pre-hooks, which may change any key) is skipped with its children."""
    stack: list[tuple[str, nn.Module]] = [("", module)]
    while stack:
        prefix, m = stack.pop()
        if not _standard(m):
            continue
        for name, p in m._parameters.items():
            if p is not None:
                yield prefix + name, p
        for name, b in m._buffers.items():
            if b is not None and name not in m._non_persistent_buffers_set:
                yield prefix + name, b
        stack.extend((f"{prefix}{name}.", child) for name, child in m._modules.items() if child is not None)


def _owns_storage(t: torch.Tensor) -> bool:
    """True when ``t`` is the only tensor on memory of exactly its size that torch allocated."""
    storage = t.untyped_storage()
    return (
        t.is_contiguous()
        and t.storage_offset() == 0
        and storage.nbytes() == t.numel() * t.element_size()
        and _use_count is not None
        and _use_count(storage._cdata) == _SOLE_OWNER_REFS
    )


def _can_adopt(live: torch.Tensor, stored: Any) -> bool:
    return (
        type(live) in _PLAIN_TYPES
        and type(stored) is torch.Tensor
        and live.device.type == "cpu"
        and stored.device == live.device
        and live.dtype == stored.dtype
        and live.shape == stored.shape
        and live.numel() > 0
        and live.layout == torch.strided
        and not live.is_inference()
        and not live.is_conj()
        and not live.is_neg()
        and not stored.is_conj()
        and not stored.is_neg()
        and not stored.requires_grad
        and not live.is_shared()  # type: ignore[no-untyped-call]
        and not live.is_pinned()
        and live.untyped_storage().resizable()  # memory torch allocated, not a mapped file or array
        and stored.untyped_storage().resizable()  # read into memory torch allocated (empty_bytes)
        and stored.is_contiguous()
        and live.stride() == stored.stride()  # a contiguous channels_last weight (1x1 conv) keeps its layout
        and stored.storage_offset() == 0
        and stored.untyped_storage().nbytes() == stored.numel() * stored.element_size()
        and _owns_storage(live)
        and _sole_tensor(live)
    )


def _sole_tensor(t: torch.Tensor) -> bool:
    """True when nothing outside Python holds the tensor itself: DDP's reducer (which hooks its
    gradient accumulator, replaced by ``set_``), a DLPack export (NumPy, JAX: it would keep the
    old memory's address after it is freed) count as users; a module's and an optimizer's
    Python references do not."""
    count = getattr(t, "_use_count", None)
    return count is not None and count() == 1


def adopt_storages(module: Any, state: Any, adopted: set[int]) -> int:
    """Before ``module.load_state_dict(state)``: let live tensors take over the restored ones' memory.

    Call it only in phase two (the stored tensors were verified, and they are not used
    elsewhere: ``adopted`` collects the buffers taken, over the whole restore).

    Args:
        module: the live object about to load ``state`` (anything but a ``nn.Module`` is left alone).
        state: the state_dict it is about to load: restored tensors, read into buffers of their own.
        adopted: the data pointers of restored buffers already taken; updated.

    Returns:
        How many tensors now use a restored buffer.
    """
    if (
        not isinstance(module, nn.Module)
        or not isinstance(state, Mapping)
        or type(module).load_state_dict is not nn.Module.load_state_dict
        or torch.__future__.get_swap_module_params_on_conversion()
    ):
        return 0
    # A live tensor reached under several keys (weights tied in the live model) is left to
    # load_state_dict, whose last key wins even when the stored values differ per key.
    live_tensors = list(_live_tensors(module))
    keys_of: dict[int, int] = {}
    for _key, live in live_tensors:
        keys_of[id(live)] = keys_of.get(id(live), 0) + 1
    count = 0
    for key, live in live_tensors:
        stored = state.get(key)
        if keys_of[id(live)] != 1 or stored is None or not _can_adopt(live, stored):
            continue
        ptr = stored.untyped_storage().data_ptr()
        if ptr in adopted:
            continue
        adopted.add(ptr)
        with torch.no_grad():
            live.set_(stored.untyped_storage(), 0, stored.shape, stored.stride())
        count += 1
    return count
