"""A process that saves checkpoints until it is killed; run as a subprocess by the fault tests.

    python kill_saver.py RUN_DIR numpy|torch [TARGET N before|after]

It resumes after the newest committed step of RUN_DIR and saves step after step through a
``CheckpointManager(keep_last=2)``, so retention deletes a checkpoint at every save. After
each ``save`` returns it prints the step: a printed step is one the process was promised.
Every value encodes its step (:func:`make_state`), so a reader can tell exactly what a step
must hold. The test kills the process with SIGKILL at a random moment, or, with TARGET, the
process SIGKILLs itself right before (or after) the N-th call of one function of the write
path, which reaches phases too short to hit by chance.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

#: What TARGET names: (module, attribute) of the function whose N-th call kills the process.
TARGETS: dict[str, tuple[str, str]] = {
    "tensor": ("runstate.format.safetensors_io", "checksum"),  # before each tensor's bytes are written
    "file": ("runstate._impl.parts", "write_safetensors"),  # around a whole tensor file
    "fsync": ("os", "fsync"),  # tensor files, manifest, directories
    "rename": ("os", "rename"),  # the commit, and the first step of a deletion
    "mkdir": ("os", "mkdir"),  # the temporary directory
    "unlink": ("os", "unlink"),  # inside retention deletions and leftover removal
    "rmdir": ("os", "rmdir"),
    "delete": ("runstate.storage.local", "delete_directory"),  # retention
    "write": ("", ""),  # in the middle of a tensor file's bytes: half a buffer written
}
MAX_SAVES = 500


def make_state(step: int, lib: str = "numpy") -> dict[str, Any]:
    """The state saved at ``step``: about 0.8 MB in three tensor files, every value derived from ``step``."""
    rng = np.random.default_rng(step)
    model = {f"layer{i}.weight": rng.standard_normal((64, 256), dtype=np.float32) for i in range(4)}
    optimizer = {
        "exp_avg": rng.standard_normal((256, 256), dtype=np.float32),
        "count": np.full((3,), step, dtype=np.int64),
        "lr": 1.0 / (step + 1),
    }
    state: dict[str, Any] = {"model": model, "optimizer": optimizer, "step": step, "tag": f"step {step}"}
    if lib == "torch":
        import torch

        state["model"] = {k: torch.from_numpy(v) for k, v in model.items()}
        optimizer["exp_avg"] = torch.from_numpy(optimizer["exp_avg"])
    return state


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_on_call(target: str, n: int, when: str) -> None:
    """Make the process SIGKILL itself at the ``n``-th call (1-based) of ``target``."""
    import importlib

    calls = [0]
    if target == "write":
        from runstate.storage import local as local_storage  # opens the tensor files and the manifest

        real_open = open

        class _Half:
            def __init__(self, f: Any) -> None:
                self._f = f

            def write(self, data: Any) -> int:
                calls[0] += 1
                if calls[0] == n:
                    flat = memoryview(data).cast("B")
                    self._f.write(flat[: len(flat) // 2])
                    _die()
                written: int = self._f.write(data)
                return written

            def __enter__(self) -> _Half:
                return self

            def __exit__(self, *exc: object) -> None:
                self._f.close()

            def __getattr__(self, name: str) -> Any:
                return getattr(self._f, name)

        local_storage.open = lambda *a, **k: _Half(real_open(*a, **k))  # type: ignore[attr-defined]
        return
    module_name, attr = TARGETS[target]
    module = importlib.import_module(module_name)
    real: Callable[..., Any] = getattr(module, attr)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        mine = calls[0] == n
        if mine and when == "before":
            _die()
        try:
            return real(*args, **kwargs)
        finally:  # also when the call raised (os.makedirs tries mkdir on existing directories)
            if mine:
                _die()

    setattr(module, attr, wrapper)


def main(argv: list[str]) -> None:
    run_dir, lib = argv[0], argv[1]
    if lib == "torch":
        import torch  # noqa: F401  (imported first, as a training script would)
    import runstate

    if len(argv) > 2:
        _kill_on_call(argv[2], int(argv[3]), argv[4])
    print("ready", flush=True)
    mgr = runstate.CheckpointManager(run_dir, keep_last=2)
    step = (mgr.latest_step() or 0) + 1
    for _ in range(MAX_SAVES):
        mgr.save(step, make_state(step, lib))
        print(step, flush=True)
        step += 1


if __name__ == "__main__":
    main(sys.argv[1:])
