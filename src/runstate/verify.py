"""``runstate.verify``: check every byte of a checkpoint without loading it into anything.

It reports *all* problems it can find (not just the first): the manifest, each file's
presence, type and size, each safetensors header against the manifest, every tensor
checksum, and every tensor the typed trees refer to. Tensors are hashed as a stream, so
memory stays small whatever their size. A failure that is not damage (too many open files,
no memory, an I/O or permission error) is not reported as a problem: it raises
``CheckpointReadError``, since nothing can be said about the checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from runstate._impl.reader import CheckpointReader
from runstate._impl.verify import Problem, VerifyReport, problem_of, verify_reader
from runstate.errors import CheckpointError, CheckpointReadError
from runstate.format.manifest import MANIFEST_NAME
from runstate.storage import open_store

__all__ = ["Problem", "VerifyReport", "verify"]


def verify(
    path: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None
) -> VerifyReport:
    """Check a checkpoint directory completely.

    Args:
        path: a checkpoint directory (``runs/exp/step-000000001000``) or URL
            (``s3://bucket/exp/step-000000001000``).
        storage_options: fsspec options for a URL (credentials, endpoint...).

    Returns:
        A :class:`VerifyReport`; ``report.ok`` is False when anything is wrong.

    Raises:
        CheckpointReadError: the checkpoint could not be read for a reason that is not damage
            (open-file limit, memory, I/O, network or permissions): no verdict.

    Example:
        >>> report = runstate.verify("runs/exp/step-000000001000")  # doctest: +SKIP
        >>> for problem in report.problems:
        ...     print(problem)
    """
    store = open_store(path, storage_options=storage_options)
    path = store.location
    try:
        reader = CheckpointReader(store)
    except CheckpointReadError:
        raise
    except CheckpointError as exc:
        return VerifyReport(path, (problem_of(exc, path, MANIFEST_NAME),))
    return verify_reader(reader)
