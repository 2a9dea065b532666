"""``runstate diff A B``: what differs between two checkpoints.

Both checkpoints are loaded (every checksum verified) and their trees walked side by side.
Each tensor is equal, changed (with the largest absolute difference, and that difference
relative to the largest magnitude in A's tensor), only in A or only in B; every other value
that differs is listed with both sides. By default tensors must be bit-identical; with
``--atol X`` tensor values within X count as equal (NaN equals NaN). Other values (floats
included: 0.0 is not -0.0) are always compared bit for bit. ``--ignore PATTERN`` leaves out
the items or keys whose path matches the glob (``rng``, ``config.out_dir``, ``config/out_*``).
A and B are checkpoints, or run directories with ``--step`` (both) or ``--step-a`` /
``--step-b``. Exit code 0 when the checkpoints are equal, 1 when they differ, 2 on error.
"""

from __future__ import annotations

import argparse
import fnmatch
import math
import random
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

import runstate
from runstate.cli._commands import add_command, add_json_option
from runstate.cli._output import Progress, echo, fail, format_value, guarded, print_json, print_table
from runstate.cli._paths import add_step_option, is_checkpoint, resolve_checkpoint

__all__ = ["Comparison", "TensorDiff", "ValueDiff", "c_array", "compare", "register", "same_value"]

EQUAL, CHANGED, ONLY_A, ONLY_B = "equal", "changed", "only in A", "only in B"


@dataclass(frozen=True)
class TensorDiff:
    """How one tensor compares."""

    path: str
    status: str
    dtype: str | None = None
    shape: list[int] | None = None
    max_abs: float | None = None
    max_rel: float | None = None
    note: str | None = None


@dataclass(frozen=True)
class ValueDiff:
    """A non-tensor value that differs."""

    path: str
    status: str
    a: str | None
    b: str | None


def _torch_tensor(x: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _is_tensor(x: Any) -> bool:
    return isinstance(x, (np.ndarray, np.generic)) or _torch_tensor(x)


def _as_state(x: Any) -> Any:
    """Generators compare by their state."""
    if isinstance(x, random.Random):
        return x.getstate()
    if isinstance(x, np.random.Generator):
        return x.bit_generator.state
    if isinstance(x, np.random.RandomState):
        return x.get_state(legacy=False)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Generator):
        return x.get_state()
    return x


def c_array(x: Any) -> np.ndarray:
    """A C-contiguous NumPy array of ``x``, keeping a 0-d shape (``np.ascontiguousarray`` would not)."""
    a = np.asarray(x)
    return a if a.flags.c_contiguous else a.copy(order="C")


def _arrays(x: Any) -> tuple[str, list[int], np.ndarray, np.ndarray | None]:
    """dtype name, shape, raw bytes (uint8) and values (float64 or complex128; None if not convertible)."""
    values: np.ndarray | None
    if _torch_tensor(x):
        import torch

        t = x.detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy()
        try:
            values = t.to(torch.complex128 if t.is_complex() else torch.float64).numpy()
        except (RuntimeError, TypeError):  # a dtype without arithmetic: compare its bytes only
            values = None
        return str(t.dtype).removeprefix("torch."), list(t.shape), raw, values
    a = c_array(x)
    try:
        values = a.astype(np.complex128 if np.iscomplexobj(a) else np.float64)
    except (TypeError, ValueError):
        values = None
    return str(a.dtype), list(a.shape), a.reshape(-1).view(np.uint8), values


def _tensor_diff(path: str, a: Any, b: Any, atol: float) -> TensorDiff:
    dtype_a, shape_a, raw_a, va = _arrays(a)
    dtype_b, shape_b, raw_b, vb = _arrays(b)
    if shape_a != shape_b:
        return TensorDiff(path, CHANGED, dtype_a, shape_a, note=f"shape {shape_a} -> {shape_b}")
    note = None if dtype_a == dtype_b else f"dtype {dtype_a} -> {dtype_b}"
    if va is None or vb is None:
        same = note is None and bool(np.array_equal(raw_a, raw_b))
        return TensorDiff(path, EQUAL if same else CHANGED, dtype_a, shape_a, note=note)
    with np.errstate(all="ignore"):
        both_nan = np.isnan(va) & np.isnan(vb)
        d = np.where((va == vb) | both_nan, 0.0, np.abs(va - vb))
        max_abs = float(d.max()) if d.size else 0.0
        scale = float(np.nanmax(np.abs(va))) if va.size and not np.isnan(va).all() else 0.0
        max_rel = 0.0 if max_abs == 0 else (max_abs / scale if scale > 0 else math.inf)
    if atol == 0:
        same = note is None and raw_a.shape == raw_b.shape and bool(np.array_equal(raw_a, raw_b))
        if not same and note is None and max_abs == 0:
            note = "same values, different bits (-0.0 vs 0.0 or NaN payloads)"
    else:
        same = note is None and not math.isnan(max_abs) and max_abs <= atol
    return TensorDiff(path, EQUAL if same else CHANGED, dtype_a, shape_a, max_abs, max_rel, note)


def same_value(a: Any, b: Any) -> bool:
    """Whether two non-tensor leaves are the same: same type, and for floats the same bits.

    ``==`` would call 0.0 and -0.0 equal and NaN unequal to itself, where tensors are
    compared by their bytes: a float (or complex) value is compared by its IEEE 754 bits,
    like a tensor, so both answer alike.
    """
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b)
    if isinstance(a, complex):
        return struct.pack("<dd", a.real, a.imag) == struct.pack("<dd", b.real, b.imag)
    try:
        return bool(a == b)
    except (TypeError, ValueError):
        return False


class _Walker:
    """Collects the comparison of two trees.

    A node is named by its path of keys from the item down (``("config", "out_dir")``),
    shown as ``config.out_dir``; ``--ignore`` globs match it joined by ``.`` or by ``/``.
    """

    def __init__(self, atol: float, advance: Any, ignore: Sequence[str] = ()) -> None:
        self.atol = atol
        self.advance = advance
        self.ignore = tuple(ignore)
        self.tensors: list[TensorDiff] = []
        self.values: list[ValueDiff] = []
        self.ignored: list[str] = []
        self.matched: set[str] = set()

    def skip(self, keys: tuple[str, ...]) -> bool:
        """True (and the path recorded) when an ``--ignore`` pattern matches this node."""
        if not self.ignore:
            return False
        dotted, slashed = ".".join(keys), "/".join(keys)
        hits = [p for p in self.ignore if fnmatch.fnmatchcase(dotted, p) or fnmatch.fnmatchcase(slashed, p)]
        if not hits:
            return False
        self.matched.update(hits)
        self.ignored.append(dotted)
        return True

    def only(self, x: Any, keys: tuple[str, ...], status: str) -> None:
        if self.skip(keys):
            return
        path = ".".join(keys)
        x = _as_state(x)
        if _is_tensor(x):
            dtype, shape, _, _ = _arrays(x)
            self.tensors.append(TensorDiff(path, status, dtype, shape))
            self.advance(1)
        elif isinstance(x, dict) and x:
            for k, v in x.items():
                self.only(v, (*keys, str(k)), status)
        elif isinstance(x, (list, tuple)) and x:
            for i, v in enumerate(x):
                self.only(v, (*keys, str(i)), status)
        else:
            shown = format_value(x)
            self.values.append(
                ValueDiff(path, status, shown if status == ONLY_A else None, shown if status == ONLY_B else None)
            )

    def walk(self, a: Any, b: Any, keys: tuple[str, ...]) -> None:
        if self.skip(keys):
            return
        path = ".".join(keys)
        a, b = _as_state(a), _as_state(b)
        if _is_tensor(a) and _is_tensor(b):
            self.tensors.append(_tensor_diff(path, a, b, self.atol))
            self.advance(1)
        elif isinstance(a, dict) and isinstance(b, dict):
            for k, v in a.items():
                if k in b:
                    self.walk(v, b[k], (*keys, str(k)))
                else:
                    self.only(v, (*keys, str(k)), ONLY_A)
            for k, v in b.items():
                if k not in a:
                    self.only(v, (*keys, str(k)), ONLY_B)
        elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and type(a) is type(b):
            for i, (x, y) in enumerate(zip(a, b, strict=False)):
                self.walk(x, y, (*keys, str(i)))
            for i in range(len(b), len(a)):
                self.only(a[i], (*keys, str(i)), ONLY_A)
            for i in range(len(a), len(b)):
                self.only(b[i], (*keys, str(i)), ONLY_B)
        elif _is_tensor(a) or _is_tensor(b) or not same_value(a, b):
            self.values.append(ValueDiff(path, CHANGED, format_value(a), format_value(b)))


def _count_tensors(x: Any) -> int:
    x = _as_state(x)
    if _is_tensor(x):
        return 1
    if isinstance(x, dict):
        return sum(_count_tensors(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return sum(_count_tensors(v) for v in x)
    return 0


@dataclass(frozen=True)
class Comparison:
    """What :func:`compare` found."""

    tensors: list[TensorDiff]
    values: list[ValueDiff]
    ignored: list[str]
    unmatched: list[str]

    @property
    def equal(self) -> bool:
        """True when every compared tensor and value is the same."""
        return all(t.status == EQUAL for t in self.tensors) and not self.values


def compare(
    a: dict[str, Any],
    b: dict[str, Any],
    *,
    atol: float = 0.0,
    ignore: Sequence[str] = (),
    progress: Progress | None = None,
) -> Comparison:
    """Walk two loaded checkpoints: every tensor's comparison, and every non-tensor value that differs.

    Args:
        a: the first checkpoint, as ``runstate.load`` returns it.
        b: the second.
        atol: tensor values within ``atol`` are equal (0: the bytes must be identical).
        ignore: ``fnmatch`` globs; a node whose path (``item.key``, or ``item/key``) matches
            one is left out with everything under it.
        progress: shows a bar while tensors are compared.
    """
    advance = progress.task("comparing tensors", total=_count_tensors(a)) if progress else (lambda n=1: None)
    walker = _Walker(atol, advance, ignore)
    for name, value in a.items():
        if name in b:
            walker.walk(value, b[name], (name,))
        else:
            walker.only(value, (name,), ONLY_A)
    for name, value in b.items():
        if name not in a:
            walker.only(value, (name,), ONLY_B)
    unmatched = [p for p in dict.fromkeys(ignore) if p not in walker.matched]
    return Comparison(walker.tensors, walker.values, walker.ignored, unmatched)


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.3g}"


def _resolve(args: argparse.Namespace) -> tuple[str, str] | int:
    """The two checkpoints to compare (a run directory resolved with its step option), or an exit code."""
    out = []
    shared_used = False
    for label, path, own in (("a", args.a, args.step_a), ("b", args.b, args.step_b)):
        if own is not None:
            found = resolve_checkpoint("diff", path, own, option=f"--step-{label}")
        elif args.step is not None and not is_checkpoint(path):  # the shared --step picks steps of run dirs
            found, shared_used = resolve_checkpoint("diff", path, args.step), True
        else:
            found = resolve_checkpoint("diff", path, None)
        if isinstance(found, int):
            return found
        out.append(found)
    if args.step is not None and not shared_used:
        return fail("diff", "--step picks a step of A or B where it is a run directory, but neither is one here")
    return out[0], out[1]


def _print_human(
    paths: tuple[str, str],
    steps: tuple[int | None, int | None],
    atol: float,
    ignore: Sequence[str],
    result: Comparison,
    counts: dict[str, int],
) -> None:
    """The tables of ``runstate diff`` (without ``--json``), but the closing "equal" line."""
    for label, path, step in zip("AB", paths, steps, strict=True):
        echo(f"{label}  {path}  ({'no step' if step is None else f'step {format_value(step)}'})")
    tolerance = "bit-exact" if atol == 0 else f"atol {atol:g}"
    echo(f"tensors ({tolerance}): " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    if ignore:
        shown = ", ".join(result.ignored[:8]) + (", ..." if len(result.ignored) > 8 else "")
        echo(f"ignored ({len(result.ignored)}): {shown or 'nothing'}")
        for pattern in result.unmatched:
            echo(f"note: --ignore {pattern!r} matched nothing")
    differing = [t for t in result.tensors if t.status != EQUAL]
    notes = any(t.note for t in differing)
    rows = [
        [t.path, t.status, t.dtype or "", str(t.shape), _fmt(t.max_abs), _fmt(t.max_rel)]
        + ([t.note or ""] if notes else [])
        for t in differing
    ]
    if rows:
        print_table(
            ["tensor", "status", "dtype", "shape", "max abs diff", "max rel diff"] + (["note"] if notes else []),
            rows,
            title="tensors that differ",
            right=(4, 5),
        )
    if result.values:
        rows = [[v.path, v.status, v.a or "", v.b or ""] for v in result.values]
        print_table(["value", "status", "A", "B"], rows, title="other values that differ")


@guarded("diff")
def _diff(args: argparse.Namespace) -> int:
    if not (args.atol >= 0 and math.isfinite(args.atol)):
        return fail("diff", f"--atol must be a finite number >= 0, got {args.atol}")
    found = _resolve(args)
    if isinstance(found, int):
        return found
    path_a, path_b = found
    steps = (runstate.inspect(path_a).step, runstate.inspect(path_b).step)  # cheap: fails fast on a bad path
    ignore: list[str] = args.ignore or []
    with Progress() as progress:
        with progress.phase(f"loading {path_a}"):
            a = runstate.load(path_a)
        with progress.phase(f"loading {path_b}"):
            b = runstate.load(path_b)
        result = compare(a, b, atol=args.atol, ignore=ignore, progress=progress)
    tensors, values = result.tensors, result.values
    differs = not result.equal
    counts = {s: sum(t.status == s for t in tensors) for s in (EQUAL, CHANGED, ONLY_A, ONLY_B)}
    if args.json:
        print_json(
            {
                "a": {"path": path_a, "step": steps[0]},
                "b": {"path": path_b, "step": steps[1]},
                "atol": args.atol,
                "ignore": ignore,
                "equal": not differs,
                "counts": counts,
                "tensors": tensors,
                "values": values,
                "ignored": result.ignored,
                "unmatched_ignore": result.unmatched,
            }
        )
        return 1 if differs else 0
    _print_human((path_a, path_b), steps, args.atol, ignore, result, counts)
    if not differs:
        echo("the checkpoints are equal" + (" (apart from what --ignore left out)" if result.ignored else ""))
    return 1 if differs else 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``diff`` subcommand."""
    p = add_command(
        sub, "diff", _diff, help="compare two checkpoints tensor by tensor (exit 0 when equal, 1 when not)", doc=__doc__
    )
    p.add_argument("a", metavar="A", help="a checkpoint directory, or a run directory with --step / --step-a")
    p.add_argument("b", metavar="B", help="another checkpoint directory, or a run directory with --step / --step-b")
    add_step_option(p, help="the step (N or latest) to compare in A and B where they are run directories")
    add_step_option(p, "--step-a", help="the step of run directory A (overrides --step)")
    add_step_option(p, "--step-b", help="the step of run directory B (overrides --step)")
    p.add_argument(
        "--ignore",
        action="append",
        metavar="PATTERN",
        help="leave out items or keys whose path matches this glob (item, item.key or item/key; repeatable), "
        "e.g. --ignore rng --ignore 'config.out_*'",
    )
    p.add_argument(
        "--atol",
        type=float,
        default=0.0,
        metavar="X",
        help="tensors whose values differ by at most X are equal (default 0: bit-exact)",
    )
    add_json_option(p)
