"""``runstate export CKPT ITEM -o FILE``: one item's tensors as a standalone safetensors file.

Typically the model weights alone, for inference: the tensor names are the item's tensor
names (a module's ``state_dict`` keys), so ``model.load_state_dict(load_file(FILE))`` works.
Only ITEM's tensors are read (and their checksums verified); non-tensor values of the item
(an optimizer's learning rates...) are left out. ``--dtype`` casts floating-point tensors
(integer and bool tensors keep their dtype). The file is written to a temporary name and
renamed when complete; an existing FILE is only replaced with ``--force``. CKPT is a checkpoint
directory, or a run directory with ``--step N`` or ``--step latest``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import os
import sys
import uuid
from typing import Any

import numpy as np

import runstate
from runstate.cli._output import Progress, echo, fail, guarded, human_bytes
from runstate.cli._paths import add_step_option, resolve_checkpoint
from runstate.cli.diff import c_array

__all__ = ["flatten", "register"]

_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _torch_tensor(x: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    """Collect the tensors of a loaded item under their dotted tensor names (``0.weight``)."""
    if _torch_tensor(value) or isinstance(value, (np.ndarray, np.generic)):
        name, n = prefix, 1
        while name in out:
            n += 1
            name = f"{prefix}#{n}"
        out[name] = value
    elif isinstance(value, dict):
        for k, v in value.items():
            flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            flatten(v, f"{prefix}.{i}" if prefix else str(i), out)


class _OnlyThisItem(logging.Filter):
    """Hides the warning that ``load(..., strict=False)`` gives for the items left out on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "restoring only what matches" not in str(record.msg)


def _load_item(path: str, item: str) -> Any:
    """Load one item (only its files are read), through the public ``runstate.load``."""
    logger = logging.getLogger("runstate")
    quiet = _OnlyThisItem()
    logger.addFilter(quiet)
    try:
        state: dict[str, Any] = {item: None}
        runstate.load(path, state, strict=False)
    finally:
        logger.removeFilter(quiet)
    return state[item]


def _convert(tensors: dict[str, Any], dtype: str | None) -> tuple[dict[str, Any], str]:
    """Cast floating tensors to ``dtype``; make every tensor one framework's contiguous tensor."""
    use_torch = dtype == "bfloat16" or any(_torch_tensor(t) for t in tensors.values())
    out: dict[str, Any] = {}
    seen: set[int] = set()
    if use_torch:
        import torch

        for name, t in tensors.items():
            x = t if isinstance(t, torch.Tensor) else torch.from_numpy(c_array(t))
            if dtype is not None and x.is_floating_point():
                x = x.to(getattr(torch, dtype))
            x = x.detach().cpu().contiguous()
            if x.untyped_storage().data_ptr() in seen:  # tied weights: safetensors wants each stored once
                x = x.clone()
            seen.add(x.untyped_storage().data_ptr())
            out[name] = x
        return out, "pt"
    for name, t in tensors.items():
        a = c_array(t)
        if dtype is not None and np.issubdtype(a.dtype, np.floating):
            a = a.astype(dtype)
        out[name] = a
    return out, "np"


def _why_not_written(tensors: dict[str, Any], exc: Exception) -> str:
    """Why safetensors refused to write ``tensors``: the tensor of a dtype it cannot store, if any."""
    for name, t in tensors.items():
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype == "complex128":
            return f"tensor {name!r} is complex128, which safetensors cannot store (complex64 it can)"
    return str(exc) or type(exc).__name__


def _write(tensors: dict[str, Any], fmt: str, path: str, metadata: dict[str, str]) -> None:
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        if fmt == "pt":
            from safetensors.torch import save_file as save_torch

            save_torch(tensors, tmp, metadata={"format": "pt", **metadata})
        else:
            from safetensors.numpy import save_file as save_numpy

            save_numpy(tensors, tmp, metadata={"format": "np", **metadata})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


@guarded("export")
def _export(args: argparse.Namespace) -> int:
    ckpt = resolve_checkpoint("export", args.ckpt, args.step)
    if isinstance(ckpt, int):
        return ckpt
    contents = runstate.inspect(ckpt)  # reads the manifest only: fails fast, before any tensor
    if args.item not in contents.items:
        return fail("export", f"{ckpt} has no item {args.item!r}; its items are {', '.join(contents.items)}")
    item = contents.items[args.item]
    if not item.tensors:
        return fail("export", f"item {args.item!r} of {ckpt} holds no tensors ({item.type}); nothing to export")
    out: str = args.output
    if os.path.isdir(out):
        return fail(
            "export", f"{out} is a directory; give the file to write, e.g. {os.path.join(out, 'model.safetensors')}"
        )
    if os.path.lexists(out) and not args.force:
        return fail("export", f"{out} already exists; pass --force to replace it")
    dtype = _DTYPES[args.dtype] if args.dtype else None
    if dtype == "bfloat16" and importlib.util.find_spec("torch") is None:
        return fail("export", "--dtype bf16 needs torch (pip install torch)")
    with Progress() as progress:
        with progress.phase(f"reading {args.item} ({human_bytes(item.nbytes)})"):
            value = _load_item(ckpt, args.item)
        tensors: dict[str, Any] = {}
        flatten(value, "" if item.kind != "tensor" else args.item, tensors)
        if not tensors:
            return fail("export", f"item {args.item!r} ({item.type}) holds no tensor that can be exported")
        with progress.phase(f"writing {out}"):
            converted, fmt = _convert(tensors, dtype)
            metadata = {"runstate_item": args.item}
            if contents.step is not None:
                metadata["runstate_step"] = str(contents.step)
            from safetensors import SafetensorError

            try:
                _write(converted, fmt, out, metadata)
            except (ValueError, TypeError, RuntimeError, KeyError, SafetensorError) as exc:  # refusing a dtype...
                return fail("export", f"cannot write {out}: {_why_not_written(converted, exc)}")
    size = os.path.getsize(out)
    cast = f", floating tensors as {dtype}" if dtype else ""
    echo(f"wrote {out}: {len(converted)} tensors of item {args.item!r}, {human_bytes(size)}{cast}")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``export`` subcommand."""
    p = sub.add_parser(
        "export",
        help="write one item's tensors (e.g. the model weights) to a safetensors file",
        description=(__doc__ or "").split("\n\n")[1],
    )
    p.add_argument("ckpt", metavar="CKPT", help="a checkpoint directory, or a run directory with --step")
    p.add_argument("item", metavar="ITEM", help="the item to export, e.g. model")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="the .safetensors file to write")
    p.add_argument(
        "--dtype", choices=sorted(_DTYPES), help="cast floating-point tensors (bf16 needs torch); default: as stored"
    )
    p.add_argument("--force", action="store_true", help="replace FILE if it exists")
    add_step_option(p)
    p.set_defaults(func=_export)
