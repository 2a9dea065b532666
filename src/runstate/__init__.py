"""runstate: save and restore the whole state of a training run, and resume it exactly.

The public API is what ``__all__`` lists. Importing runstate imports no ML framework: the
framework subpackages (``runstate.torch``, ``runstate.keras``) are imported on first attribute
access (PEP 562), so ``import runstate`` then ``runstate.torch.resumable_loader`` works and
imports torch only at that moment.
"""

import importlib
from typing import TYPE_CHECKING, Any

from runstate._impl.pipeline import CheckpointInfo
from runstate._impl.restore import Mismatch, RestoreReport
from runstate._impl.restore_result import RestoreResult
from runstate._version import __version__
from runstate.api import load, save
from runstate.distributed import PerRank
from runstate.errors import (
    AsyncSaveError,
    CheckpointConfigError,
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointReadError,
    CheckpointWriteError,
    CorruptCheckpointError,
    FormatVersionError,
    LockError,
    PartialRestoreError,
    StateMismatchError,
    StepExistsError,
    UnsupportedTypeError,
)
from runstate.format.compress import Compression
from runstate.inspect import CheckpointContents, ItemContents, ObjectSummary, TensorSummary, inspect
from runstate.manager import CheckpointManager
from runstate.policies import Retention, SaveCadence
from runstate.registry import Registry, register, registry
from runstate.rng import RNG
from runstate.stateful import Stateful
from runstate.verify import Problem, VerifyReport, verify

if TYPE_CHECKING:
    from runstate import hf as hf
    from runstate import jax as jax
    from runstate import keras as keras
    from runstate import lightning as lightning
    from runstate import torch as torch

# Subpackages named after the framework they need, imported when first accessed. A new one
# (e.g. runstate.jax) is added here; tests/test_first_contact.py checks this list is complete.
_FRAMEWORK_SUBPACKAGES = ("hf", "jax", "keras", "lightning", "torch")

__all__ = [
    "RNG",
    "AsyncSaveError",
    "CheckpointConfigError",
    "CheckpointContents",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointReadError",
    "CheckpointWriteError",
    "Compression",
    "CorruptCheckpointError",
    "FormatVersionError",
    "ItemContents",
    "LockError",
    "Mismatch",
    "ObjectSummary",
    "PartialRestoreError",
    "PerRank",
    "Problem",
    "Registry",
    "RestoreReport",
    "RestoreResult",
    "Retention",
    "SaveCadence",
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


def __getattr__(name: str) -> Any:
    """Import a framework subpackage on first access (``runstate.torch``, ``runstate.keras``)."""
    if name in _FRAMEWORK_SUBPACKAGES:
        return importlib.import_module(f"runstate.{name}")
    raise AttributeError(f"module 'runstate' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_FRAMEWORK_SUBPACKAGES})
