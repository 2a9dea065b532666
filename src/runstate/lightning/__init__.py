"""PyTorch Lightning: pickle-free, crash-safe checkpoints and an exact resume, in two lines.

    trainer = pl.Trainer(plugins=[runstate.lightning.CheckpointIO()],
                         callbacks=[ModelCheckpoint(...), runstate.lightning.ExactResume()])

* :class:`CheckpointIO` is a ``CheckpointIO`` plugin: every checkpoint Lightning writes
  becomes a runstate checkpoint directory (safetensors + a typed JSON manifest, checksummed,
  committed atomically, no pickle), ``last.ckpt`` is replaced without a window in which a kill
  loses it, and loading never unpickles anything.
* :class:`ExactResume` is a callback that adds what Lightning's checkpoint leaves out for a
  bit-identical resume (the random generators).

This module imports lightning, on first use of ``runstate.lightning`` (``import runstate``
imports no framework). See docs/lightning.md.
"""

from runstate.lightning._io import CheckpointIO
from runstate.lightning._resume import ExactResume

__all__ = ["CheckpointIO", "ExactResume"]
