"""Where does the time of runstate's save and load paths go? cProfile of each, top functions.

Not part of ``make bench``: a tool for whoever optimizes the write and read paths. Profiles,
after one untimed warm-up run of each:

    save        runstate.save of the ~0.75 GiB AdamW state (durable)
    async       CheckpointManager(async_save=True).save: the blocking part, warm manager
    load-warm   runstate.load in place, warm page cache
    load-cold   the same after dropping the page cache (when permitted)
    tiny-save   runstate.save of 10,000 tensors of 64 float32
    tiny-load   runstate.load of them into a dict

For each: wall time with and without the profiler, then the functions with the most own
time (``tottime``) and cumulative time. cProfile adds a little per call, which matters only
for the tiny-tensor paths; GC pauses land in whatever function allocates when they hit.

    python benchmarks/profile_paths.py                    # all of them
    python benchmarks/profile_paths.py --only tiny-save --top 25
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import os
import pstats
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from common import build_state, drop_caches, fresh_copy, remove, runstate, scratch_dir

PATHS = ("save", "async", "load-warm", "load-cold", "tiny-save", "tiny-load")


def profile(name: str, run: Callable[[], Any], before: Callable[[], Any], top: int) -> None:
    before()
    run()  # warm-up: first-touch page faults and allocator growth are not what is profiled
    before()
    t0 = time.perf_counter()
    run()
    plain = time.perf_counter() - t0
    before()
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    run()
    prof.disable()
    profiled = time.perf_counter() - t0
    print(f"\n{'=' * 100}\n{name}: {plain:.3f} s ({profiled:.3f} s under cProfile)")
    for key in ("tottime", "cumulative"):
        out = io.StringIO()
        pstats.Stats(prof, stream=out).strip_dirs().sort_stats(key).print_stats(top)
        lines = [line for line in out.getvalue().splitlines() if line.strip()]
        start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls"))
        print(f"-- by {key}")
        print("\n".join(lines[start:]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=0.75, help="state size in GiB (default 0.75)")
    parser.add_argument("--only", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument("--top", type=int, default=12, help="functions shown per table")
    parser.add_argument("--dir", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model, opt, width = build_state(args.gib)
    model2, opt2 = fresh_copy(width)
    state = {"model": model, "optimizer": opt}
    torch.manual_seed(0)
    many = {f"t{i:05d}": torch.randn(64) for i in range(10_000)}
    template = {k: torch.zeros_like(v) for k, v in many.items()}
    gc.collect()
    gc.freeze()
    with scratch_dir(args.dir, int(4 * args.gib * 1024**3), "profile-") as work:
        ck = os.path.join(work, "ckpt")
        tiny = os.path.join(work, "tiny")
        runstate.save(ck, state, step=1)
        runstate.save(tiny, {"tensors": many})

        def fresh(path: str) -> Callable[[], None]:
            def before() -> None:
                remove(path)
                os.sync()

            return before

        mgr = runstate.CheckpointManager(os.path.join(work, "run"), async_save=True, keep_last=1)
        steps = iter(range(1, 1_000_000))
        mgr.save(next(steps), state, force=True)  # warm: the snapshot buffers exist
        mgr.wait()

        def async_save() -> None:
            mgr.save(next(steps), state, force=True)

        runs: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {
            "save": (lambda: runstate.save(ck + "-2", state, step=1), fresh(ck + "-2")),
            "async": (async_save, mgr.wait),
            "load-warm": (lambda: runstate.load(ck, {"model": model2, "optimizer": opt2}), lambda: None),
            "load-cold": (lambda: runstate.load(ck, {"model": model2, "optimizer": opt2}), drop_caches),
            "tiny-save": (lambda: runstate.save(tiny + "-2", {"tensors": many}), fresh(tiny + "-2")),
            "tiny-load": (lambda: runstate.load(tiny, {"tensors": dict(template)}), lambda: None),
        }
        for name in args.only:
            run, before = runs[name]
            profile(name, run, before, args.top)
        mgr.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
