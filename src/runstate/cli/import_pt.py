"""``runstate import FILE.pt -o CKPT``: convert a ``torch.save`` or TensorFlow checkpoint, safely.

FILE.pt is read with ``torch.load(weights_only=True)``: only tensors and plain containers
(dict, list, tuple, numbers, strings) are accepted, so a pickle that needs arbitrary code is
refused before any of it runs (exit code 1, nothing written). The top-level dict's keys
become the checkpoint's items (``{"model": ..., "optimizer": ..., "epoch": 3}`` gives
three items); a dict holding only tensors (a bare ``state_dict``) becomes the one item
``model``. Dict items are stored as plain dicts, which ``runstate.load(CKPT, state)`` loads
into live modules, optimizers and schedulers (``load_state_dict``). The step recorded is
``--step``, else the first non-negative integer among the dict's ``step``, ``global_step``,
``iter_num`` and ``iteration`` entries, else its ``epoch``, else none; the output line says
which. A CKPT named like a run's checkpoint (``runs/exp/step-1200``) is written under the name
the run reads (``runs/exp/step-000000001200``) and records that step.

A TensorFlow checkpoint (a prefix such as ``ckpts/ckpt-5``, its ``.index`` or ``.data-*`` file,
or a ``tf.train.CheckpointManager`` directory, whose latest checkpoint is read) is read with
``tf.train.load_checkpoint``, values only; each key becomes a nested entry without its
``/.ATTRIBUTES/VARIABLE_VALUE`` suffix (``optimizer/_iterations`` is
``state["optimizer"]["_iterations"]``), strings become bytes, and TensorFlow's object graph and
a tf.data iterator's variant state are skipped with a note (see ``runstate.cli.import_tf``).
"""

from __future__ import annotations

import argparse
import importlib.util
import pickle
import re
import struct
import sys
import warnings
from collections.abc import Mapping
from typing import Any

import runstate
from runstate.cli import import_tf
from runstate.cli._commands import add_command
from runstate.cli._output import echo, fail, guarded, human_bytes
from runstate.storage import LocalStore, local_path, split_path

__all__ = ["register"]

#: The step counters training scripts save, most specific first; ``epoch`` only as a fallback.
_STEP_KEYS = ("step", "global_step", "iter_num", "iteration", "epoch")

#: What ``torch.load`` raises on bytes that are not a ``torch.save`` file (besides ``UnpicklingError``).
_NOT_A_TORCH_FILE = (
    RuntimeError,
    EOFError,
    ValueError,
    TypeError,
    AttributeError,
    ImportError,
    KeyError,
    IndexError,
    struct.error,
)

#: An output directory named like a checkpoint of a run (``step-1200``, ``step-000000001200``).
_STEP_DIR = re.compile(r"^step-([0-9]+)\Z")


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


def _counter(value: Any) -> int | None:
    """``value`` as a step counter: a non-negative int, or a 0-d integer tensor or array holding one."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            return None
        value = int(value.item())
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(value, numpy.ndarray):  # a TensorFlow checkpoint's int64 step
        if value.ndim != 0 or value.dtype.kind not in "iu":
            return None
        value = int(value)
    return value if type(value) is int and value >= 0 else None


def _step(obj: Mapping[str, Any]) -> tuple[int | None, str]:
    """The step counter found in the loaded dict, and where it was found (for the output line)."""
    for key in _STEP_KEYS:
        value = _counter(obj.get(key))
        if value is not None:
            fallback = "; no step counter found, pass --step N to record another" if key == "epoch" else ""
            return value, f"from {key!r}{fallback}"
    return None, f"no {', '.join(_STEP_KEYS)} entry found; pass --step N to record one"


def _run_checkpoint(out: str) -> tuple[str, int] | None:
    """When ``out`` is named like a run's checkpoint (``step-N``): the run's own name for step N, and N."""
    parent, name = split_path(out)
    m = _STEP_DIR.match(name)
    if m is None:
        return None
    step = int(m.group(1))
    with runstate.CheckpointManager(parent, read_only=True) as run:
        return run.path(step), step


@guarded("import")
def _import(args: argparse.Namespace) -> int:
    src: str = local_path(args.file)  # ~ expanded also where no shell did it (-o=~/ckpt, quoted)
    out: str = local_path(args.output)
    kind = LocalStore(src).kind()
    tf_location = import_tf.find(src)
    if tf_location is None and kind is None:
        return fail("import", f"no such file: {src}")
    if tf_location is None and kind != "file":
        return fail(
            "import",
            f"{src} is not a file; give the file torch.save wrote, or a TensorFlow checkpoint "
            "(a prefix such as ckpts/ckpt-5, or the directory holding its 'checkpoint' file)",
        )
    if args.step is not None and args.step < 0:
        return fail("import", f"--step must be >= 0, got {args.step}")
    named = _run_checkpoint(out)
    if named is not None:  # one name per step: the run lists and reads step N only as its own name
        if args.step is not None and args.step != named[1]:
            return fail(
                "import",
                f"--step {args.step} disagrees with the output name {split_path(out)[1]} "
                f"(step {named[1]}); drop --step, or name the output step-{args.step}",
            )
        out = named[0]
    if LocalStore(out).exists():
        return fail("import", f"{out} already exists; choose a new checkpoint directory")
    if tf_location is not None:
        try:
            tf_checkpoint = import_tf.read(tf_location)
        except ImportError as exc:
            if not (exc.name or "").startswith("tensorflow"):
                raise
            return fail("import", "reading a TensorFlow checkpoint needs tensorflow (pip install tensorflow-cpu)")
        for note in tf_checkpoint.notes:
            echo(f"note: {note}")
        return _write(args, tf_checkpoint.prefix, out, named, tf_checkpoint.state)
    if importlib.util.find_spec("torch") is None:
        return fail("import", "reading a .pt file needs torch (pip install torch)")
    import torch

    try:
        with warnings.catch_warnings():  # torch warns about odd pickle protocols: the error line says it all
            warnings.simplefilter("ignore")
            obj = torch.load(src, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        print(
            f"runstate import: refused: {_refusal(src, exc)}; only tensors and plain containers are accepted",
            file=sys.stderr,
        )
        return 1
    except _NOT_A_TORCH_FILE as exc:
        why = _first_sentence(str(exc)) if not isinstance(exc, KeyError) else ""
        return fail("import", f"cannot read {src} as a torch.save file: {why or type(exc).__name__}")
    if not isinstance(obj, Mapping):
        return fail(
            "import",
            f"{src} holds a {type(obj).__name__}, not a dict; runstate import expects a dict such as "
            "{'model': model.state_dict(), 'optimizer': opt.state_dict(), 'epoch': 3}",
        )
    state: dict[str, Any] = dict(obj)
    if state and all(isinstance(v, torch.Tensor) for v in state.values()):
        state = {"model": obj}
    return _write(args, src, out, named, state, obj)


def _write(
    args: argparse.Namespace,
    src: str,
    out: str,
    named: tuple[str, int] | None,
    state: dict[str, Any],
    counters: Mapping[str, Any] | None = None,
) -> int:
    """Save the converted ``state`` at ``out`` with its step, and print the one-line summary."""
    if args.step is not None:
        step, source = args.step, "from --step"
    elif named is not None:
        step, source = named[1], f"from the output name {split_path(args.output)[1]}"
    else:
        step, source = _step(state if counters is None else counters)
    info = runstate.save(out, state, step=step)  # a dict restores into a live object's load_state_dict
    names = f"{len(state)} item{'s' if len(state) != 1 else ''} ({', '.join(state)})"
    at = "no step" if step is None else f"step {step}"
    echo(f"imported {src} into {out}: {names}, {at} ({source}), {human_bytes(info.nbytes)}")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``import`` subcommand."""
    p = add_command(
        sub,
        "import",
        _import,
        help="convert a torch.save (.pt) or TensorFlow checkpoint into a runstate checkpoint, never running its code",
        doc=__doc__,
    )
    p.add_argument(
        "file",
        metavar="FILE.pt",
        help="a file written by torch.save, or a TensorFlow checkpoint: its prefix (ckpts/ckpt-5), "
        "or the directory of a tf.train.CheckpointManager (its latest checkpoint)",
    )
    p.add_argument("-o", "--output", required=True, metavar="CKPT", help="the checkpoint directory to create")
    p.add_argument(
        "--step",
        type=int,
        metavar="N",
        help="the step to record (default: the file's step, global_step, iter_num, iteration or epoch entry)",
    )
