"""``runstate.RNG``: the global random number generators as one Stateful item.

Dropout masks, augmentation and shuffling draw from Python's ``random``, NumPy's global
RNG and torch's CPU and CUDA generators. Resuming without them changes every random draw
after the resume point, so the run is no longer the same run.
"""

from __future__ import annotations

import logging
import random
import sys
from typing import Any

import numpy as np

__all__ = ["RNG"]

logger = logging.getLogger("runstate")


class RNG:
    """A Stateful capturing the process-wide random number generators.

    Captures Python's ``random`` module, NumPy's global ``numpy.random`` state, and, when
    torch has been imported, torch's CPU generator and the generator of every CUDA device.
    Restoring sets all of them. Put it in the state next to the model::

        state = {"model": model, "optimizer": opt, "rng": runstate.RNG()}

    Example:
        >>> import random, runstate
        >>> rng = runstate.RNG()
        >>> saved = rng.state_dict()
        >>> a = random.random()
        >>> rng.load_state_dict(saved)
        >>> random.random() == a
        True
    """

    def state_dict(self) -> dict[str, Any]:
        """Return the current state of every global generator."""
        version, internal, gauss = random.getstate()
        out: dict[str, Any] = {
            "python": {"version": version, "state": np.asarray(internal, dtype=np.uint32), "gauss_next": gauss},
            "numpy": np.random.get_state(legacy=False),
        }
        torch = sys.modules.get("torch")
        if torch is not None:
            cuda = []
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                cuda = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
            out["torch"] = {"cpu": torch.get_rng_state(), "cuda": cuda}
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Set every global generator from ``state_dict``.

        CUDA generators are set for the devices this machine has; the states of devices it
        lacks (a checkpoint from a GPU machine restored on a CPU one) are skipped with a
        WARNING: nothing here can draw from them.

        Raises:
            KeyError: ``state_dict`` lacks the Python or NumPy part.
        """
        py = state_dict["python"]
        random.setstate((int(py["version"]), tuple(int(x) for x in py["state"]), py["gauss_next"]))
        np.random.set_state(state_dict["numpy"])
        saved_torch = state_dict.get("torch")
        if saved_torch is not None:
            import torch  # the run that saved used torch; this one will too

            torch.set_rng_state(saved_torch["cpu"].to("cpu"))
            cuda = saved_torch.get("cuda") or []
            here = torch.cuda.device_count() if torch.cuda.is_available() else 0
            for i, s in enumerate(cuda[:here]):
                torch.cuda.set_rng_state(s.to("cpu"), i)
            if len(cuda) > here:
                # Nothing here draws from a device this machine lacks, so the rest still resumes
                # exactly; a later checkpoint no longer holds those devices' states.
                logger.warning(
                    "runstate.RNG: the checkpoint holds the random state of %d CUDA device(s), this machine "
                    "has %d: the state of %d device(s) is not restored",
                    len(cuda),
                    here,
                    len(cuda) - here,
                )

    def __repr__(self) -> str:
        return "runstate.RNG()"
