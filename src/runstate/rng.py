"""``runstate.RNG``: the global random number generators as one Stateful item.

Dropout masks, augmentation and shuffling draw from Python's ``random``, NumPy's global
RNG and torch's CPU and CUDA generators. Resuming without them changes every random draw
after the resume point, so the run is no longer the same run.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np

from runstate import adapters

__all__ = ["RNG"]


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
        out.update(adapters.rng_states())  # {"torch": {"cpu": ..., "cuda": [...]}} once torch is imported
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
        for name, saved in state_dict.items():
            if name not in ("python", "numpy"):
                adapters.set_rng_state(name, saved)  # the run that saved used that framework; this one will too

    def __repr__(self) -> str:
        return "runstate.RNG()"
