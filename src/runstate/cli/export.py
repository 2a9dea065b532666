"""``runstate export CKPT ITEM -o FILE``: one item's tensors as a standalone safetensors file.

Typically the model weights alone, for inference: the tensor names are the item's tensor
names (a module's ``state_dict`` keys), so ``model.load_state_dict(load_file(FILE))`` works.
Only ITEM's tensors are read (and their checksums verified); non-tensor values of the item
(an optimizer's learning rates...) are left out. ``--dtype`` casts floating-point tensors
(integer and bool tensors keep their dtype). The file is written to a temporary name and
renamed when complete; an existing FILE is only replaced with ``--force``. CKPT is a checkpoint
directory, or a run directory with ``--step N`` or ``--step latest``. With ``--hf``, ``-o``
names a directory that gets ``config.json`` and ``model.safetensors`` for Hugging Face's
``from_pretrained`` (ITEM defaults to model; see docs/huggingface.md).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from typing import Any

import numpy as np

import runstate
from runstate.cli._commands import add_command
from runstate.cli._output import Progress, echo, fail, guarded, human_bytes
from runstate.cli._paths import add_step_option, resolve_checkpoint
from runstate.cli.diff import c_array
from runstate.storage import LocalStore, atomic_file

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
    with atomic_file(path) as tmp:  # a reader sees the old file or the whole new one
        if fmt == "pt":
            from safetensors.torch import save_file as save_torch

            save_torch(tensors, tmp, metadata={"format": "pt", **metadata})
        else:
            from safetensors.numpy import save_file as save_numpy

            save_numpy(tensors, tmp, metadata={"format": "np", **metadata})


def _export_hf(ckpt: str, args: argparse.Namespace) -> int:
    """``--hf``: ``config.json`` + ``model.safetensors`` for ``from_pretrained`` (runstate.hf.export_pretrained)."""
    from runstate.hf import export_pretrained

    out: str = args.output
    target = LocalStore(out)
    if target.kind() == "file":
        return fail("export", f"{out} is a file; --hf writes a directory (config.json and model.safetensors)")
    if target.exists("model.safetensors") and not args.force:
        return fail("export", f"{out} already holds a model.safetensors; pass --force to replace it")
    if args.dtype:
        return fail("export", "--dtype cannot be combined with --hf: the export keeps the stored dtypes")
    item = args.item or "model"
    try:
        export_pretrained(ckpt, out, item=item)
    except runstate.CheckpointConfigError as exc:
        return fail("export", str(exc))
    echo(f"wrote {out}: config.json and model.safetensors of item {item!r}, for from_pretrained")
    return 0


@guarded("export")
def _export(args: argparse.Namespace) -> int:
    ckpt = resolve_checkpoint("export", args.ckpt, args.step)
    if isinstance(ckpt, int):
        return ckpt
    if args.hf:
        return _export_hf(ckpt, args)
    if args.item is None:
        return fail("export", "give the ITEM to export, e.g. model (or --hf for a from_pretrained directory)")
    contents = runstate.inspect(ckpt)  # reads the manifest only: fails fast, before any tensor
    if args.item not in contents.items:
        return fail("export", f"{ckpt} has no item {args.item!r}; its items are {', '.join(contents.items)}")
    item = contents.items[args.item]
    if not item.tensors:
        return fail("export", f"item {args.item!r} of {ckpt} holds no tensors ({item.type}); nothing to export")
    out: str = args.output
    target = LocalStore(out)
    if target.kind() == "directory":
        return fail("export", f"{out} is a directory; give the file to write, e.g. {target.join('model.safetensors')}")
    if target.exists() and not args.force:
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
    size = target.size()
    cast = f", floating tensors as {dtype}" if dtype else ""
    echo(f"wrote {out}: {len(converted)} tensors of item {args.item!r}, {human_bytes(size)}{cast}")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``export`` subcommand."""
    p = add_command(
        sub,
        "export",
        _export,
        help="write one item's tensors (e.g. the model weights) to a safetensors file",
        doc=__doc__,
    )
    p.add_argument("ckpt", metavar="CKPT", help="a checkpoint directory, or a run directory with --step")
    p.add_argument("item", metavar="ITEM", nargs="?", help="the item to export, e.g. model (--hf: default model)")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="the .safetensors file to write")
    p.add_argument(
        "--dtype", choices=sorted(_DTYPES), help="cast floating-point tensors (bf16 needs torch); default: as stored"
    )
    p.add_argument("--force", action="store_true", help="replace FILE if it exists")
    p.add_argument(
        "--hf",
        action="store_true",
        help="write a Hugging Face from_pretrained directory (config.json + model.safetensors) to -o DIR",
    )
    add_step_option(p)
