"""runstate: save and restore the whole state of a training run, and resume it exactly.

The public API is what ``__all__`` lists. Importing runstate imports no ML framework.
"""

from runstate._version import __version__
from runstate.api import load, save
from runstate.checkpoint import CheckpointInfo
from runstate.distributed import PerRank
from runstate.errors import (
    AsyncSaveError,
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    CorruptCheckpointError,
    FormatVersionError,
    LockError,
    StateMismatchError,
    StepExistsError,
    UnsupportedTypeError,
)
from runstate.inspect import CheckpointContents, ItemContents, ObjectSummary, TensorSummary, inspect
from runstate.manager import CheckpointManager
from runstate.registry import Registry, register, registry
from runstate.restore import Mismatch, RestoreReport
from runstate.rng import RNG
from runstate.stateful import Stateful
from runstate.verify import Problem, VerifyReport, verify

__all__ = [
    "RNG",
    "AsyncSaveError",
    "CheckpointContents",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointWriteError",
    "CorruptCheckpointError",
    "FormatVersionError",
    "ItemContents",
    "LockError",
    "Mismatch",
    "ObjectSummary",
    "PerRank",
    "Problem",
    "Registry",
    "RestoreReport",
    "StateMismatchError",
    "Stateful",
    "StepExistsError",
    "TensorSummary",
    "UnsupportedTypeError",
    "VerifyReport",
    "__version__",
    "inspect",
    "load",
    "register",
    "registry",
    "save",
    "verify",
]
