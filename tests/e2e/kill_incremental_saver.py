"""An incremental saver that runs until it is killed; run as a subprocess by tests/test_incremental_faults.py.

    python kill_incremental_saver.py RUN_DIR numpy|torch[+zstd] [TARGET N before|after]

Like ``kill_saver.py`` (whose kill points it reuses), but through
``CheckpointManager(keep_last=2, incremental=True)``: it restores the newest step first (so
its first save refers to the blobs already there), then saves step after step; retention
deletes a checkpoint and collects the blobs no checkpoint refers to at every save. Half of
the state is the same at every step (a frozen base, never written again), half changes.
Extra target: ``gc`` (the blob collection after retention). ``numpy+zstd`` saves the numpy
state with ``compression="zstd"`` (compressed blobs, compared decoded).
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import kill_saver

kill_saver.TARGETS.update(
    {
        "gc": ("runstate._impl.housekeeping", "collect_blobs"),
    }
)


_MODULE: list[Any] = []


def frozen_module() -> Any:
    """(torch) One module of frozen parameters per process, saved at every step: its tensors
    keep their storage and version counter, so an incremental save proves them unchanged
    without reading them (the fast path)."""
    if not _MODULE:
        import torch

        torch.manual_seed(7)
        _MODULE.append(torch.nn.Linear(256, 128).requires_grad_(False))
    return _MODULE[0]


def make_state(step: int, lib: str = "numpy", *, live: bool = False) -> dict[str, Any]:
    """A frozen base (the same at every step) and trainable values derived from ``step``.

    With torch, also a frozen module: the live module when ``live`` (what the saver saves),
    else its state dict (what loading the checkpoint gives).
    """
    state = kill_saver.make_state(step, lib)
    base = np.random.default_rng(12345)
    frozen = {f"base{i}.weight": base.standard_normal((128, 256), dtype=np.float32) for i in range(3)}
    if lib == "torch":
        import torch

        frozen = {k: torch.from_numpy(v) for k, v in frozen.items()}
    state["frozen"] = frozen
    if lib == "torch":
        state["frozen_module"] = frozen_module() if live else frozen_module().state_dict()
    return state


def main(argv: list[str]) -> None:
    run_dir, (lib, _, codec) = argv[0], argv[1].partition("+")
    if lib == "torch":
        import torch  # noqa: F401  (imported first, as a training script would)
    import runstate

    if len(argv) > 2:
        kill_saver._kill_on_call(argv[2], int(argv[3]), argv[4])
    print("ready", flush=True)
    mgr = runstate.CheckpointManager(run_dir, keep_last=2, incremental=True, compression=codec or None)
    target: dict[str, Any] = {"model": None, "optimizer": None, "step": None, "tag": None, "frozen": None}
    if lib == "torch":
        target["frozen_module"] = frozen_module()
    step = int(mgr.restore(target) or 0) + 1
    for _ in range(kill_saver.MAX_SAVES):
        mgr.save(step, make_state(step, lib, live=True))
        print(step, flush=True)
        step += 1


if __name__ == "__main__":
    main(sys.argv[1:])
