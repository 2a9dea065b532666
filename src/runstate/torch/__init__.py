"""PyTorch helpers: exactly resumable data loading, and resuming with changes.

Import explicitly (``import runstate.torch``): it imports torch and torchdata, which
``import runstate`` never does.
"""

from runstate.torch.data import ResumableSampler, SampleIndex, SeededDataset, resumable_loader
from runstate.torch.hparams import Rewarm, extend_schedule, reset_optimizer_state, set_hparams

__all__ = [
    "ResumableSampler",
    "Rewarm",
    "SampleIndex",
    "SeededDataset",
    "extend_schedule",
    "reset_optimizer_state",
    "resumable_loader",
    "set_hparams",
]
