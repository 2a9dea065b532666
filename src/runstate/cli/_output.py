"""Output helpers shared by the commands: tables, JSON, sizes, progress bars, errors.

Every line of human output goes through :func:`echo`, :func:`print_table` or :func:`fail`,
which escape control characters (:func:`escape`): names come from checkpoints, and a
checkpoint is untrusted input, so an item named with an OSC 52 clipboard write
(``ESC ] 52 ; c ; ... BEL``) prints as text and never reaches the terminal as an escape
sequence. ``--json`` output is exact (JSON escapes control characters itself).

rich is optional (the ``cli`` extra): with it, tables are drawn by rich (in colour on a
terminal) and long operations show a progress bar on a terminal's stderr; without it,
tables are plain aligned text and there is no progress bar. Nothing here imports rich at
module import time, so ``runstate --help`` stays fast.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as _dt
import functools
import json
import math
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

__all__ = [
    "Cell",
    "Progress",
    "echo",
    "escape",
    "fail",
    "format_time",
    "format_value",
    "guarded",
    "human_bytes",
    "jsonable",
    "print_json",
    "print_table",
    "rich_available",
]

#: A table cell: its text, or ``(text, style)`` where style is a rich style (ignored without rich).
Cell = str | tuple[str, str]


def rich_available() -> bool:
    """True when rich can be imported."""
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(char: str) -> str:
    if char.isprintable():
        return char
    named = _NAMED_ESCAPES.get(char)
    if named is not None:
        return named
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def escape(text: str) -> str:
    """``text`` with every non-printable character written as a Python escape (``\\x1b``).

    Covers C0 controls (ESC, CR, BEL...), DEL, C1 controls, and the invisible format
    characters that reorder or hide text (bidi overrides such as U+202E, zero-width
    characters, line separators): what ``str.isprintable`` rejects, as in ``repr``.
    """
    return text if text.isprintable() else "".join(_escape_char(c) for c in text)


def echo(text: str = "", *, err: bool = False) -> None:
    """Print one line of human output, control characters escaped."""
    print(escape(text), file=sys.stderr if err else sys.stdout)


def fail(command: str, message: str, code: int = 2) -> int:
    """Print ``runstate COMMAND: error: MESSAGE`` on one line of stderr; return ``code``."""
    echo(f"runstate {command}: error: {' '.join(message.split())}", err=True)
    return code


def guarded(command: str) -> Callable[[Callable[[Any], int]], Callable[[Any], int]]:
    """Decorate a command so OS errors become one line on stderr, never a traceback.

    ``runstate.CheckpointError`` is left to ``runstate.cli.main``, which reports it the
    same way. A closed pipe (``runstate ls DIR | head -1``) ends the command quietly.
    """

    def wrap(func: Callable[[Any], int]) -> Callable[[Any], int]:
        @functools.wraps(func)
        def run(args: Any) -> int:
            import runstate

            try:
                return func(args)
            except runstate.CheckpointError:
                raise
            except BrokenPipeError:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
                return 1
            except OSError as exc:
                where = f"{exc.filename}: " if exc.filename else ""
                return fail(command, f"{where}{exc.strerror or exc}")

        return run

    return wrap


def human_bytes(n: int) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1024 or unit == "PiB":
            break
    return f"{value:.1f} {unit}"


def format_time(iso: str) -> str:
    """An ISO 8601 time as ``YYYY-MM-DD HH:MM:SS`` in UTC (unchanged if unparsable)."""
    try:
        when = _dt.datetime.fromisoformat(iso)
    except ValueError:
        return iso
    if when.tzinfo is not None:
        when = when.astimezone(_dt.timezone.utc)
    return when.strftime("%Y-%m-%d %H:%M:%S")


def _int_text(value: int) -> str | None:
    """``str(value)``, or None when Python refuses (more than ``sys.get_int_max_str_digits()``
    digits: the conversion is quadratic, so a hostile manifest could otherwise stall us)."""
    try:
        return str(value)
    except ValueError:
        return None


def _huge_int(value: int) -> str:
    """A number too long to print in decimal, as ``~1.23457e+5000 (5001 digits)``."""
    exponent = math.log10(abs(value))  # exact enough for any int, and linear in its size
    whole = math.floor(exponent)
    mantissa = f"{10 ** (exponent - whole):.6g}"
    if mantissa == "10":
        mantissa, whole = "1", whole + 1
    sign = "-" if value < 0 else ""
    return f"~{sign}{mantissa}e+{whole} ({whole + 1} digits)"


def format_value(value: Any) -> str:
    """A short human form of a decoded value (numbers, tuples, tensor summaries...)."""
    import runstate

    if isinstance(value, int) and not isinstance(value, bool):
        text = _int_text(value)
        return _huge_int(value) if text is None else text
    if isinstance(value, float):
        return repr(value) if len(repr(value)) <= 12 else f"{value:.6g}"
    if isinstance(value, runstate.TensorSummary):
        return f"<tensor {value.dtype} {list(value.shape)}>"
    if isinstance(value, runstate.ObjectSummary):
        return f"<{value.kind}>"
    if isinstance(value, tuple):
        inner = ", ".join(format_value(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if isinstance(value, list):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{format_value(k)}: {format_value(v)}" for k, v in value.items()) + "}"
    return repr(value) if isinstance(value, (str, bytes)) else str(value)


def jsonable(value: Any) -> Any:
    """Convert a value to JSON-serializable data (finite floats only; bytes as base64; an int
    too long for decimal conversion as a ``"0x..."`` string)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k if isinstance(k, str) else format_value(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool) and _int_text(value) is None:
        return hex(value)  # exact, and linear to write: decimal would exceed Python's limit
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "shape", None) == ():
        return jsonable(item())
    return str(value)


def print_json(value: Any) -> None:
    """Print ``value`` as indented JSON on stdout."""
    print(json.dumps(jsonable(value), indent=2, allow_nan=False))


def _rich_console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=False)


def print_table(
    columns: Sequence[str],
    rows: Sequence[Sequence[Cell]],
    *,
    title: str | None = None,
    right: Sequence[int] = (),
    header: bool = True,
) -> None:
    """Print a table on stdout: drawn by rich when available, else aligned plain text.

    Args:
        columns: the column headings.
        rows: the cells, row by row.
        title: a line printed above the table, after an empty line.
        right: indices of the columns aligned to the right (numbers).
        header: print the column headings.
    """
    if title:
        print()
        title = escape(title)
    rows = [[escape(c) if isinstance(c, str) else (escape(c[0]), c[1]) for c in row] for row in rows]
    columns = [escape(c) for c in columns]
    if rich_available():
        _rich_table(columns, rows, title, right, header)
    else:
        _plain_table(columns, rows, title, right, header)


def _text(cell: Cell) -> str:
    return cell if isinstance(cell, str) else cell[0]


def _plain_table(
    columns: Sequence[str], rows: Sequence[Sequence[Cell]], title: str | None, right: Sequence[int], header: bool
) -> None:
    lines = [[_text(c) for c in row] for row in rows]
    if header:
        lines.insert(0, list(columns))
    widths = [max((len(line[i]) for line in lines if i < len(line)), default=0) for i in range(len(columns))]
    if header:
        lines.insert(1, ["-" * w for w in widths])
    if title:
        print(title)
    for line in lines:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths, strict=False))]
        print("  ".join(cells).rstrip())


def _rich_table(
    columns: Sequence[str], rows: Sequence[Sequence[Cell]], title: str | None, right: Sequence[int], header: bool
) -> None:
    from rich import box
    from rich.table import Table
    from rich.text import Text

    table = Table(box=box.SIMPLE_HEAD, show_header=header, header_style="bold", show_edge=False, pad_edge=False)
    for i, name in enumerate(columns):
        # Numbers never wrap; on a narrow terminal long text wraps inside its cell rather than being cut.
        table.add_column(name, justify="right" if i in right else "left", no_wrap=i in right, overflow="fold")
    for row in rows:
        table.add_row(*(Text(c) if isinstance(c, str) else Text(c[0], style=c[1]) for c in row))
    console = _rich_console()
    if console.is_terminal:
        if title:
            console.print(Text(title, style="bold"))
        console.print(table)
        return
    # A pipe or a file: plain text (no colour), never wrapped or cut whatever COLUMNS says.
    console.width = 100_000
    with console.capture() as captured:
        if title:
            console.print(Text(title))
        console.print(table)
    for line in captured.get().splitlines():
        print(line.rstrip())


class Progress:
    """A progress bar on stderr, shown only when rich is available and stderr is a terminal.

    Use as a context manager; :meth:`task` adds a bar (``total=None`` for one of unknown
    length) and returns the function that advances it.
    """

    def __init__(self) -> None:
        self._bar: Any = None
        if rich_available() and sys.stderr.isatty():
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
            )
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=_rich_console(stderr=True),
                transient=True,
            )

    @property
    def shown(self) -> bool:
        """True when a bar is actually drawn."""
        return self._bar is not None

    def __enter__(self) -> Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def task(self, description: str, total: int | None = None) -> Callable[[int], None]:
        """Add a bar; returns ``advance(n)``."""
        if self._bar is None:
            return _ignore
        bar = self._bar
        task_id = bar.add_task(_bar_text(description), total=total)

        def advance(n: int = 1) -> None:
            bar.advance(task_id, n)

        return advance

    @contextmanager
    def phase(self, description: str) -> Iterator[None]:
        """A bar of unknown length shown while the block runs, then marked done."""
        if self._bar is None:
            yield
            return
        task_id = self._bar.add_task(_bar_text(description), total=None)
        try:
            yield
        finally:
            self._bar.update(task_id, total=1, completed=1)


def _bar_text(description: str) -> str:
    """A description for a rich bar: control characters escaped, and no rich markup (a path
    such as ``runs/[red]`` is shown as written)."""
    from rich.markup import escape as markup_escape

    return markup_escape(escape(description))


def _ignore(n: int = 1) -> None:
    return None
