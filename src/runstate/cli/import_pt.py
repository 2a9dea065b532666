"""``runstate import FILE.pt -o CKPT``: convert a ``torch.save`` checkpoint, safely.

FILE.pt is read with ``torch.load(weights_only=True)``: only tensors and plain containers
(dict, list, tuple, numbers, strings) are accepted, so a pickle that needs arbitrary code is
refused before any of it runs (exit code 1, nothing written). The top-level dict's keys
become the checkpoint's items (``{"model": ..., "optimizer": ..., "epoch": 3}`` gives
three items); a dict holding only tensors (a bare ``state_dict``) becomes the one item
``model``. Dict items are stored as state dicts, so ``runstate.load(CKPT, state)`` restores
them into live modules, optimizers and schedulers (``load_state_dict``). The step recorded is ``--step``, else the dict's integer ``step`` or
``global_step`` entry, else none.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pickle
import re
import sys
from collections.abc import Mapping
from typing import Any

import runstate
from runstate.cli._output import fail, guarded, human_bytes

__all__ = ["register"]

_STEP_KEYS = ("step", "global_step")


class StateDict:
    """A dict read from a ``.pt`` file, saved as a Stateful so it restores into live objects."""

    def __init__(self, state: Mapping[str, Any]) -> None:
        self._state = state

    def state_dict(self) -> Mapping[str, Any]:
        """The dict as read."""
        return self._state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Replace the dict."""
        self._state = state_dict


def _first_sentence(text: str) -> str:
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return line.split(". ", 1)[0].rstrip(".")[:200]


def _refusal(src: str, exc: pickle.UnpicklingError) -> str:
    """Why torch's safe unpickler refused ``src``: the global it would have imported, if any."""
    text = str(exc)
    m = re.search(r"GLOBAL ([\w.]+)", text)
    if m:
        return f"{src} needs arbitrary code to unpickle (it references {m.group(1)})"
    detail = text.split("WeightsUnpickler error:", 1)[-1]
    return f"{src} cannot be unpickled safely ({_first_sentence(detail) or type(exc).__name__})"


def _step(obj: Mapping[str, Any], given: int | None) -> int | None:
    if given is not None:
        return given
    for key in _STEP_KEYS:
        value = obj.get(key)
        if type(value) is int and value >= 0:
            return value
    return None


@guarded("import")
def _import(args: argparse.Namespace) -> int:
    src: str = args.file
    out: str = args.output
    if not os.path.exists(src):
        return fail("import", f"no such file: {src}")
    if not os.path.isfile(src):
        return fail("import", f"{src} is not a file; give the file torch.save wrote")
    if os.path.lexists(out):
        return fail("import", f"{out} already exists; choose a new checkpoint directory")
    if args.step is not None and args.step < 0:
        return fail("import", f"--step must be >= 0, got {args.step}")
    if importlib.util.find_spec("torch") is None:
        return fail("import", "reading a .pt file needs torch (pip install torch)")
    import torch

    try:
        obj = torch.load(src, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        print(
            f"runstate import: refused: {_refusal(src, exc)}; only tensors and plain containers are accepted",
            file=sys.stderr,
        )
        return 1
    except (RuntimeError, EOFError, ValueError, TypeError, AttributeError, ImportError) as exc:
        return fail("import", f"cannot read {src} as a torch.save file: {_first_sentence(str(exc))}")
    if not isinstance(obj, Mapping):
        return fail(
            "import",
            f"{src} holds a {type(obj).__name__}, not a dict; runstate import expects a dict such as "
            "{'model': model.state_dict(), 'optimizer': opt.state_dict(), 'epoch': 3}",
        )
    state: dict[str, Any] = dict(obj)
    if state and all(isinstance(v, torch.Tensor) for v in state.values()):
        state = {"model": obj}
    step = _step(obj, args.step)
    items = {k: StateDict(v) if isinstance(v, Mapping) else v for k, v in state.items()}
    info = runstate.save(out, items, step=step)
    names = f"{len(state)} item{'s' if len(state) != 1 else ''} ({', '.join(state)})"
    at = "no step" if step is None else f"step {step}"
    print(f"imported {src} into {out}: {names}, {at}, {human_bytes(info.nbytes)}")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``import`` subcommand."""
    p = sub.add_parser(
        "import",
        help="convert a torch.save checkpoint (.pt) into a runstate checkpoint, never running its code",
        description=(__doc__ or "").split("\n\n")[1],
    )
    p.add_argument("file", metavar="FILE.pt", help="a file written by torch.save")
    p.add_argument("-o", "--output", required=True, metavar="CKPT", help="the checkpoint directory to create")
    p.add_argument("--step", type=int, metavar="N", help="the step to record (default: the file's 'step' entry)")
    p.set_defaults(func=_import)
