"""PyTorch helpers: exactly resumable data loading, and resuming with changes.

A torchdata ``StatefulDataLoader`` in the state resumes exactly without any of these (runstate
prepares it at ``mgr.restore(state)``, even when there is nothing to restore yet);
:func:`exact` does the same by hand, for a program that iterates before calling ``restore``.

It imports torch and torchdata, which ``import runstate`` never does: ``runstate.torch`` is
imported on first use (``import runstate`` then ``runstate.torch.resumable_loader(...)``).
"""

from runstate.adapters.torch_data import exact
from runstate.torch.data import ResumableSampler, SampleIndex, SeededDataset, resumable_loader
from runstate.torch.hparams import Rewarm, extend_schedule, reset_optimizer_state, set_hparams

__all__ = [
    "ResumableSampler",
    "Rewarm",
    "SampleIndex",
    "SeededDataset",
    "exact",
    "extend_schedule",
    "reset_optimizer_state",
    "resumable_loader",
    "set_hparams",
]
