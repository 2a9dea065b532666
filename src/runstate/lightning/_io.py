"""``runstate.lightning.CheckpointIO``: Lightning's checkpoints as runstate checkpoint directories.

Why this exists: Lightning's default ``TorchCheckpointIO`` writes each checkpoint as one
``torch.save`` zip, in place: a kill while ``last.ckpt`` is being overwritten leaves a broken
file and no older one to fall back to, nothing is checksummed, and loading unpickles the file
(torch's ``weights_only`` unpickler narrows what can run, but it is still an unpickler reading
a file anyone could have replaced).

Here the path Lightning asks for (``.../epoch=0-step=100.ckpt``, ``.../last.ckpt``) becomes a
runstate checkpoint directory, written by ``runstate.save``: the top-level keys of Lightning's
checkpoint dict are the items (``state_dict``, ``optimizer_states``, ``loops``, ``callbacks``...),
tensors go to safetensors files, everything else to the typed JSON manifest, every byte is
checksummed, and the directory appears only when it is complete and fsynced. Overwriting an
existing name (``last.ckpt`` at every save) writes the new checkpoint under a hidden temporary
name next to it and then swaps the two names in one atomic step (``renameat2`` with
``RENAME_EXCHANGE`` on Linux), so at every instant the name holds either the previous complete
checkpoint or the new one.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch
from lightning.pytorch.plugins.io import CheckpointIO as _LightningCheckpointIO

import runstate
from runstate import storage
from runstate.errors import CheckpointConfigError, CheckpointNotFoundError, UnsupportedTypeError

__all__ = ["CheckpointIO"]

logger = logging.getLogger("runstate")


class CheckpointIO(_LightningCheckpointIO):  # type: ignore[misc]
    """A Lightning ``CheckpointIO`` plugin that writes runstate checkpoints.

    Install it with ``Trainer(plugins=[runstate.lightning.CheckpointIO()])``; ``ModelCheckpoint``,
    ``trainer.save_checkpoint`` and ``ckpt_path=`` (``"last"``, ``"best"`` or a path) work as
    before, and ``AsyncCheckpointIO(runstate.lightning.CheckpointIO())`` saves in a thread.

    * Saving writes a checkpoint directory at the path Lightning chooses, atomically; a value
      that cannot be stored without pickle raises :class:`runstate.UnsupportedTypeError`
      naming its key, and nothing is written.
    * Overwriting a name (``last.ckpt``) is crash-safe: the previous checkpoint stays in place
      until the new one is complete, then the two are swapped atomically.
    * Loading reads only runstate checkpoint directories: a file at that path (a Lightning
      ``.ckpt`` zip, or anything renamed to look like one) is refused without being read.

    Paths are local (a URL raises :class:`runstate.CheckpointConfigError`).

    Example:
        >>> trainer = pl.Trainer(plugins=[runstate.lightning.CheckpointIO()])  # doctest: +SKIP
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` as a runstate checkpoint directory at ``path``.

        Args:
            checkpoint: Lightning's checkpoint dict.
            path: where Lightning wants the checkpoint (its name is kept as the directory name).
            storage_options: not supported; must be None.

        Raises:
            TypeError: ``storage_options`` was given.
            UnsupportedTypeError: a value cannot be stored without pickle (nothing is written).
            CheckpointWriteError: the disk failed; the previous checkpoint at ``path`` is intact.
        """
        if storage_options is not None:
            raise TypeError(
                "runstate.lightning.CheckpointIO.save_checkpoint takes no storage_options "
                f"(got {storage_options!r}); pass storage_options=None"
            )
        target = _local(path)
        for leftover in storage.remove_leftovers_beside(target):  # of a save or removal that was killed
            logger.info("runstate.lightning: removed %s, left by an interrupted save", leftover)
        step = checkpoint.get("global_step")
        step = step if type(step) is int and step >= 0 else None
        storage.replace_directory(target, lambda at: _save(at, checkpoint, step))

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Read the runstate checkpoint directory at ``path`` back into Lightning's dict.

        Args:
            path: a checkpoint directory written by this plugin.
            map_location: None (tensors on the CPU), a device (``"cuda:0"``, ``torch.device``),
                or a dict mapping a device name to another (``{"cpu": "cuda:0"}``).
            weights_only: ignored: nothing is unpickled whatever its value.

        Returns:
            The checkpoint dict, with the types it was saved with (``OrderedDict``, tuples,
            integer keys, tensors).

        Raises:
            CheckpointNotFoundError: ``path`` does not exist, or is a file (never read).
            CorruptCheckpointError: a checksum, size or header does not match.
        """
        target = _local(path)
        if storage.LocalStore(target).kind() not in (None, "directory"):
            raise CheckpointNotFoundError(
                f"{target} is a file, not a runstate checkpoint directory: runstate.lightning.CheckpointIO "
                "never reads it (a Lightning .ckpt file is a pickle, and unpickling runs code). If it is a "
                "checkpoint you wrote yourself with Lightning's default CheckpointIO and you trust it, load it "
                "with a Trainer without runstate.lightning.CheckpointIO"
            )
        tree = runstate.load(target)
        if map_location is not None:
            tree = _map_tensors(tree, _device_mapper(map_location))
        return tree

    def remove_checkpoint(self, path: Any) -> None:
        """Remove the checkpoint at ``path`` (a directory, or a file or link left by Lightning).

        The directory is first renamed to a hidden name, so it disappears in one step and a kill
        during the removal never leaves a half-deleted checkpoint under its name.
        """
        storage.remove_entry(_local(path))

    def teardown(self) -> None:
        """Nothing to release: every save and load is complete when it returns."""


def _local(path: Any) -> str:
    text: str = os.fspath(path)
    if "://" in text:
        if not text.startswith("file://"):
            raise CheckpointConfigError(
                f"runstate.lightning.CheckpointIO writes local paths only, got {text!r}: give ModelCheckpoint "
                "(or Trainer.default_root_dir) a local directory"
            )
        text = text[len("file://") :]
    return storage.absolute_path(text)


def _save(path: str, checkpoint: Mapping[str, Any], step: int | None) -> None:
    try:
        runstate.save(path, checkpoint, step=step)
    except UnsupportedTypeError as exc:
        raise UnsupportedTypeError(
            f"cannot save the Lightning checkpoint {path}: {exc} (state[...] is Lightning's checkpoint dict; "
            "runstate stores no pickle). Nothing was written. Store a plain value instead (str, number, list, "
            "dict, tensor), or remove it in on_save_checkpoint"
        ) from exc


def _device_mapper(map_location: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    if isinstance(map_location, (str, torch.device)):
        device = torch.device(map_location)
        return lambda t: t.to(device)
    if isinstance(map_location, Mapping):
        table = {str(k): v for k, v in map_location.items()}
        return lambda t: t.to(table[str(t.device)]) if str(t.device) in table else t
    raise TypeError(
        f"runstate.lightning.CheckpointIO: map_location must be a device, a device name or a dict "
        f"of device names, got {type(map_location).__name__}"
    )


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if type(value) is dict:
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    if type(value) is OrderedDict:
        return OrderedDict((k, _map_tensors(v, fn)) for k, v in value.items())
    if type(value) is list:
        return [_map_tensors(v, fn) for v in value]
    if type(value) is tuple:
        return tuple(_map_tensors(v, fn) for v in value)
    return value
