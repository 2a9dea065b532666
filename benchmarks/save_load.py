"""Benchmark runstate.save / runstate.load against reference ways of writing the same bytes.

Builds an AdamW training state (a stack of ``nn.Linear`` layers after one optimizer step:
parameters, ``exp_avg`` and ``exp_avg_sq`` in fp32) and times, in the same run:

saves (all durable: the file(s) and their directory are fsynced)
    raw write        every tensor's bytes into one file with ``os.write``, then fsync (the limit)
    safetensors      ``safetensors.torch.save_file`` of the flattened tensors, then fsync
    torch.save       ``torch.save({"model": sd, "optimizer": opt_sd})``, then fsync
    DCP save         ``torch.distributed.checkpoint.save`` of ``get_state_dict(model, opt)``
                     (single process; its FileSystemWriter fsyncs every file, the directory
                     is fsynced after it)
    runstate.save    ``runstate.save(dir, {"model": model, "optimizer": opt}, step=1)``
    runstate async   ``CheckpointManager(async_save=True).save(...)``: the time ``save()``
                     blocks (and of it, the snapshot: ``mgr.last_blocking_seconds``), and the
                     total until ``mgr.wait()`` returns; the manager is warm (its snapshot
                     buffers exist) except in the "first save" rows (a fresh manager, and
                     one after ``mgr.warmup(state)`` where the manager has it)
    DCP async        ``torch.distributed.checkpoint.async_save`` of ``get_state_dict(model, opt)``
                     (FileSystemWriter, ``sync_files=True``; the directory fsynced after), in
                     DCP's two modes: thread (its default: a fresh ``DefaultStager`` per call,
                     staging synchronously into new memory) and process (the way torchtitan's
                     ``async_with_pinned_mem`` calls it: one ``DefaultStager`` kept across saves,
                     shared-memory staging in a background thread; pinned memory and
                     non-blocking copies need an accelerator, so on a CPU-only machine they are
                     off). "blocks" is until the state may change again: ``async_save`` returned
                     and, with background staging, ``staging_completion`` is done. The process
                     mode needs a process group when its checkpoint process starts: a
                     single-process gloo group is created for its first save and destroyed
                     right after, so every other row runs without one, as a single-process job does

the async reference (in memory, no I/O)
    clone            ``[t.clone() for t in tensors]``: a fresh copy of every tensor
    copy_ into buffers  ``b.copy_(t)`` into buffers allocated once (what a warm snapshot does)

loads (cold page cache when ``/proc/sys/vm/drop_caches`` is writable, and warm)
    raw read         the raw file read back into fresh buffers (the limit)
    raw read live    the raw file read straight into the live tensors (the in-place bound)
    safetensors      ``safetensors.torch.load_file``: lazy mmap (default) and backend="pread"
    torch.load       ``torch.load(weights_only=True)``, alone and + ``load_state_dict``
    DCP load         ``torch.distributed.checkpoint.load`` in place + ``set_state_dict``
    runstate.load    in place into a second model and optimizer; and without a state (tree)

Every figure is the median of ``--reps`` runs (the best is shown too), as seconds, GB/s of
state bytes and ``vs raw``: the speed as a fraction of the raw write (saves) or raw read
(loads) of the same run, i.e. raw time / time (1.00 = as fast as raw, 0.50 = twice as slow).
The async rows are also compared with the clone: clone time / time. ``peak RSS`` is how far
the process's resident memory rose above where it was when the operation started (VmHWM,
reset through /proc/self/clear_refs), from one extra untimed run of each operation at the
end with glibc set to map every big buffer freshly.

    python benchmarks/save_load.py            # ~0.75 GiB state, about 2-3 minutes
    python benchmarks/save_load.py --quick    # ~0.1 GiB state, CI smoke run
    python benchmarks/save_load.py --gib 2 --reps 5 --dir /mnt/nvme/tmp --json out.json
    python benchmarks/save_load.py --no-dcp-process   # skip DCP's process mode (spawns a process)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import os
import socket
import sys
import time
import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from common import (
    GIB,
    MIB,
    N_LAYERS,
    Op,
    build_state,
    drop_caches,
    flat_tensors,
    fresh_copy,
    fsync_dir,
    fsync_path,
    machine,
    malloc_trim,
    measure_peak_rss,
    op_record,
    output_to,
    pin_malloc_mmap_threshold,
    print_machine,
    print_table,
    raw_read,
    raw_read_into,
    raw_write,
    remove,
    reset_peak_rss,
    run_loads,
    run_saves,
    runstate,
    same_state,
    scratch_dir,
    status_kib,
    write_json,
)
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType, AsyncSaveResponse

# DCP says once per call that it runs without a process group: that is the intent here.
warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled")


# --------------------------------------------------------------------------- the operations


def safetensors_save(path: str, flat: dict[str, torch.Tensor]) -> None:
    save_file(flat, path)
    fsync_path(path)
    fsync_dir(os.path.dirname(path))


def torch_save(path: str, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    with open(path, "xb") as f:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, f)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(os.path.dirname(path))


def torch_load_into(path: str, model: nn.Module, opt: torch.optim.Optimizer) -> Any:
    sd = torch.load(path, weights_only=True)
    model.load_state_dict(sd["model"])
    opt.load_state_dict(sd["optimizer"])
    return sd


def dcp_save(path: str, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """DCP's documented single-process use: FQN-keyed state dicts, FileSystemWriter (sync_files=True)."""
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
    fsync_dir(path)  # DCP fsyncs its files but not the directories: same durability as the other rows
    fsync_dir(os.path.dirname(path))


def dcp_load_into(path: str, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    msd, osd = get_state_dict(model, opt)
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=path)  # in place, into the tensors of the state dicts
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


class AsyncSaver:
    """A warm ``CheckpointManager(async_save=True)`` saving step 1, 2, 3... of one state.

    Each call saves and waits; the time ``save()`` blocked and the snapshot part of it are
    recorded. ``clean()`` (called before each timed run, untimed) removes committed steps so the
    disk holds one checkpoint at a time and retention never runs inside the timing.
    """

    def __init__(self, run_dir: str, state: dict[str, Any]) -> None:
        self.run_dir = run_dir
        self.state = state
        self.mgr = runstate.CheckpointManager(run_dir, async_save=True, keep_last=None)
        self.step = 0
        self.blocking: list[float] = []
        self.snapshot: list[float] = []

    def clean(self) -> None:
        for name in os.listdir(self.run_dir) if os.path.isdir(self.run_dir) else []:
            if name.startswith("step-"):
                remove(os.path.join(self.run_dir, name))

    def __call__(self) -> None:
        self.step += 1
        t0 = time.perf_counter()
        self.mgr.save(self.step, self.state, force=True)
        self.blocking.append(time.perf_counter() - t0)
        self.snapshot.append(self.mgr.last_blocking_seconds)
        self.mgr.wait()

    def close(self) -> None:
        self.mgr.close()
        self.clean()


def first_async_save(run_dir: str, state: dict[str, Any], *, warm: bool = False) -> tuple[float, float, float, float]:
    """A fresh manager's first async save: blocking, snapshot, total, and the untimed ``warmup`` before it.

    Without ``warm`` the save allocates the snapshot buffers; with it, ``mgr.warmup(state)`` runs
    first (its seconds are the fourth figure) and the save only copies.
    """
    with runstate.CheckpointManager(run_dir, async_save=True, keep_last=None) as mgr:
        warmup_s = 0.0
        if warm:
            w0 = time.perf_counter()
            mgr.warmup(state)
            warmup_s = time.perf_counter() - w0
        t0 = time.perf_counter()
        mgr.save(1, state, force=True)
        blocking = time.perf_counter() - t0
        mgr.wait()
        total = time.perf_counter() - t0
        snapshot = mgr.last_blocking_seconds
    remove(run_dir)
    return blocking, snapshot, total, warmup_s


class DcpAsyncSaver:
    """``torch.distributed.checkpoint.async_save`` of one model and optimizer, step 1, 2, 3...

    ``process=False``: DCP's default, thread mode with a fresh ``DefaultStager`` per call (staging
    synchronously into new memory). ``process=True``: process mode with one ``DefaultStager``
    kept across saves (shared memory, staging in a background thread), as torchtitan's
    ``async_with_pinned_mem`` does minus what needs an accelerator (pinned memory,
    non-blocking copies). Each call saves, records how long the state was held (until
    ``async_save`` returned and staging completed), waits for the upload, and fsyncs the
    checkpoint's directory and its parent (DCP fsyncs its files, ``sync_files=True``).
    """

    def __init__(self, run_dir: str, model: nn.Module, opt: torch.optim.Optimizer, *, process: bool) -> None:
        self.run_dir = run_dir
        self.model = model
        self.opt = opt
        self.process = process
        os.makedirs(run_dir, exist_ok=True)
        self.stager = (
            DefaultStager(StagingOptions(False, True, True, False))  # pinned, shared, async staging, non-blocking
            if process
            else None
        )
        self.step = 0
        self.blocking: list[float] = []

    def clean(self) -> None:
        for name in os.listdir(self.run_dir):
            remove(os.path.join(self.run_dir, name))

    def __call__(self) -> float:
        """Save one step; returns the seconds the state was held."""
        self.step += 1
        path = os.path.join(self.run_dir, f"step-{self.step}")
        t0 = time.perf_counter()
        msd, osd = get_state_dict(self.model, self.opt)
        kind = AsyncCheckpointerType.PROCESS if self.process else AsyncCheckpointerType.THREAD
        if self.stager is not None:
            response = dcp.async_save(
                {"model": msd, "optim": osd}, checkpoint_id=path, async_checkpointer_type=kind, async_stager=self.stager
            )
        else:
            response = dcp.async_save({"model": msd, "optim": osd}, checkpoint_id=path, async_checkpointer_type=kind)
        if isinstance(response, AsyncSaveResponse):
            response.staging_completion.result()
            upload = response.upload_completion
        else:
            upload = response
        held = time.perf_counter() - t0
        self.blocking.append(held)
        upload.result()
        fsync_dir(path)
        fsync_dir(self.run_dir)
        return held

    def close(self) -> None:
        if self.stager is not None:
            self.stager.close()
        self.clean()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_dcp_process(saver: DcpAsyncSaver, log: str) -> tuple[float, float]:
    """DCP's first process-mode save, which spawns its checkpoint process: (held, total) seconds.

    The checkpoint process reads the rank and world size of a process group when it starts, so
    a single-process gloo group exists for this save only; later saves go to the running
    checkpoint process and need none (DCP only asks for the group when it has no process yet).
    """
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        with output_to(log):
            t0 = time.perf_counter()
            held = saver()
            total = time.perf_counter() - t0
    finally:
        dist.destroy_process_group()
    saver.clean()
    return held, total


def dcp_process_pid() -> int | None:
    """The pid of DCP's checkpoint process (a private global of torch), None when unknown."""
    from torch.distributed.checkpoint import _async_process_executor as executor

    proc = getattr(getattr(executor, "_CHECKPOINT_PROCESS", None), "_save_process", None)
    return getattr(proc, "pid", None)


def proc_status_kib(pid: int, key: str) -> int | None:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


def peak_with_child(run: Any, pid: int | None) -> tuple[int, int | None]:
    """Bytes this process's and ``pid``'s resident memory rose during ``run()`` (child: None if unknown).

    Shared memory counts in both processes' resident memory once each touched it.
    """
    child0 = None
    if pid is not None:
        try:
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")
            child0 = proc_status_kib(pid, "VmRSS")
        except OSError:
            child0 = None
    mine = peak_of(run)
    child = None
    if pid is not None and child0 is not None:
        child = max(0, (proc_status_kib(pid, "VmHWM") or 0) - child0) * 1024
    return mine, child


def peak_of(run: Any) -> int:
    """Bytes resident memory rose above its level at the start of ``run()``."""
    gc.collect()
    malloc_trim()
    if not reset_peak_rss():
        return -1
    rss0 = status_kib("VmRSS") or 0
    run()
    return max(0, (status_kib("VmHWM") or 0) - rss0) * 1024


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=None, help="total state size in GiB (default 0.75)")
    parser.add_argument("--quick", action="store_true", help="CI smoke run: ~0.1 GiB unless --gib is given")
    parser.add_argument("--reps", type=int, default=None, help="measured runs per operation (default 5, --quick 3)")
    parser.add_argument("--dir", default=None, help="scratch directory on the disk to test (default ROOT/.bench-tmp)")
    parser.add_argument("--no-cold", action="store_true", help="skip the cold-page-cache loads")
    parser.add_argument("--no-dcp-process", action="store_true", help="skip DCP's async save in process mode")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    gib = args.gib if args.gib is not None else (0.1 if args.quick else 0.75)
    reps = args.reps if args.reps is not None else (3 if args.quick else 5)
    if gib <= 0 or reps < 1:
        parser.error("--gib and --reps must be positive")
    started = time.perf_counter()

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model, opt, width = build_state(gib)
    flat = flat_tensors(model, opt)
    tensors = list(flat.values())
    sizes = [t.nbytes for t in tensors]
    nbytes = sum(sizes)
    model2, opt2 = fresh_copy(width)
    n_params = sum(p.numel() for p in model.parameters())
    gc.collect()
    gc.freeze()  # the many objects torch created at import: later gc.collect() calls need not scan them

    with scratch_dir(args.dir, 8 * nbytes, "save_load-") as work:
        cold_reason = "disabled by --no-cold" if args.no_cold else drop_caches()
        track_rss = reset_peak_rss()
        print(
            f"save_load: {nbytes / GIB:.3f} GiB of state ({N_LAYERS} x nn.Linear({width}, {width}) + AdamW after "
            f"1 step: {n_params / 1e6:.1f}M params, {len(tensors)} tensors); {reps} reps, median (best also shown)"
        )
        print_machine(work)
        p_raw = os.path.join(work, "raw.bin")
        p_st = os.path.join(work, "state.safetensors")
        p_pt = os.path.join(work, "state.pt")
        p_dcp = os.path.join(work, "dcp-ckpt")
        p_rs = os.path.join(work, "runstate-ckpt")
        state = {"model": model, "optimizer": opt}
        saver = AsyncSaver(os.path.join(work, "async-run"), state)
        first = first_async_save(os.path.join(work, "async-first"), state)
        first_warm = first_async_save(os.path.join(work, "async-first"), state, warm=True)
        saver()  # warm: the manager's snapshot buffers now exist
        saver.blocking.clear()
        saver.snapshot.clear()
        dcp_thread = DcpAsyncSaver(os.path.join(work, "dcp-async-thread"), model, opt, process=False)
        dcp_proc = (
            None
            if args.no_dcp_process
            else DcpAsyncSaver(os.path.join(work, "dcp-async-process"), model, opt, process=True)
        )
        dcp_first: tuple[float, float] | None = None
        if dcp_proc is not None:
            try:
                dcp_first = start_dcp_process(dcp_proc, os.path.join(work, "dcp-process.log"))
            except (RuntimeError, OSError, AssertionError) as exc:  # no loopback gloo group here, ...
                print(f"DCP async process mode skipped: {type(exc).__name__}: {exc}")
                dcp_proc.close()
                dcp_proc = None
        if dcp_proc is not None:
            dcp_proc()  # its staging buffers exist since the first save; one more, as for runstate
            dcp_proc.clean()
            dcp_proc.blocking.clear()
        buffers = [torch.empty_like(t) for t in tensors]

        def copy_into_buffers() -> None:
            for b, t in zip(buffers, tensors):
                b.copy_(t)

        async_total = Op("runstate async: save() to wait()", saver, clear=saver.clean)
        clone = Op("clone: [t.clone() for t in tensors]", lambda: [t.clone() for t in tensors])
        copy_op = Op("copy_ into buffers allocated once", copy_into_buffers)
        saves = [
            Op("raw write (os.write+fsync)", lambda: raw_write(p_raw, tensors), p_raw),
            Op("safetensors save_file+fsync", lambda: safetensors_save(p_st, flat), p_st),
            Op("torch.save+fsync", lambda: torch_save(p_pt, model, opt), p_pt),
            Op("torch.distributed.checkpoint.save", lambda: dcp_save(p_dcp, model, opt), p_dcp),
            Op("runstate.save (sync)", lambda: runstate.save(p_rs, state, step=1), p_rs),
            async_total,
            Op("DCP async, thread: save to durable", dcp_thread, clear=dcp_thread.clean),
        ]
        if dcp_proc is not None:
            saves.append(Op("DCP async, process: save to durable", dcp_proc, clear=dcp_proc.clean))
        run_saves([*saves, clone, copy_op], reps)  # round-robin: saves and in-memory copies interleaved
        async_block = Op("runstate async: save() blocks", lambda: None)
        async_block.seconds = list(saver.blocking)
        async_snap = Op("  of which snapshot (last_blocking_s)", lambda: None)
        async_snap.seconds = list(saver.snapshot)
        dcp_blocks = [Op("DCP async, thread: blocks", lambda: None)]
        dcp_blocks[0].seconds = list(dcp_thread.blocking)
        if dcp_proc is not None:
            dcp_blocks.append(Op("DCP async, process: blocks (+staging)", lambda: None))
            dcp_blocks[1].seconds = list(dcp_proc.blocking)
        first_ops = []
        labels = ("first async save(): blocks", "  of which snapshot", "  save() to wait()")
        for label, value in zip(labels, first):
            op = Op(label, lambda: None, note="(1 run, fresh manager)")
            op.seconds = [value]
            first_ops.append(op)
        warm_labels = (
            "first save after warmup(): blocks",
            "  of which snapshot (warm)",
            "  save() to wait() (warm)",
        )
        for label, value in zip(warm_labels, first_warm):
            op = Op(label, lambda: None)
            op.note = f"(1 run; warmup took {first_warm[3]:.3f} s before it)"
            op.seconds = [value]
            first_ops.append(op)
        if dcp_first is not None:
            for label, value in zip(("DCP process, first: blocks", "  save to durable"), dcp_first):
                op = Op(label, lambda: None, note="(1 run: spawns its process)")
                op.seconds = [value]
                first_ops.append(op)

        # sanity: runstate and DCP restore exactly what was saved
        runstate.load(p_rs, {"model": model2, "optimizer": opt2})
        if not same_state(flat_tensors(model2, opt2), flat):
            print("error: runstate.load did not restore the saved state")
            return 1
        model3, opt3 = fresh_copy(width)
        dcp_load_into(p_dcp, model3, opt3)
        if not same_state(flat_tensors(model3, opt3), flat):
            print("error: torch.distributed.checkpoint.load did not restore the saved state")
            return 1
        del model3, opt3

        def loads() -> list[Op]:
            ops = [
                Op("raw read (readinto)", lambda: raw_read(p_raw, sizes)),
                Op(
                    "raw read into live tensors",
                    lambda: raw_read_into(p_raw, list(flat_tensors(model2, opt2).values())),
                ),
                Op("safetensors load_file (lazy mmap)", lambda: load_file(p_st)),
                Op("torch.load(weights_only)", lambda: torch.load(p_pt, weights_only=True)),
                Op("torch.load+load_state_dict", lambda: torch_load_into(p_pt, model2, opt2)),
                Op("torch.distributed.checkpoint.load", lambda: dcp_load_into(p_dcp, model2, opt2)),
                Op("runstate.load (tree, no state)", lambda: runstate.load(p_rs)),
                Op("runstate.load (in place)", lambda: runstate.load(p_rs, {"model": model2, "optimizer": opt2})),
            ]
            if "backend" in inspect.signature(load_file).parameters:  # safetensors >= 0.8
                ops.insert(3, Op("safetensors load_file (pread)", lambda: load_file(p_st, backend="pread")))
            return ops

        cold_loads: list[Op] = []
        if cold_reason is None:
            cold_loads = loads()
            run_loads(cold_loads, reps, cold=True)
        warm_loads = loads()
        run_loads(warm_loads, reps, cold=False)

        if track_rss:  # last: it changes malloc settings for the rest of the process
            pin_malloc_mmap_threshold()
            measure_peak_rss(saves)
            if dcp_proc is not None:  # DCP's checkpoint process: its own memory, measured on one more save
                dcp_proc.clean()
                pid = dcp_process_pid()
                _, child = peak_with_child(dcp_proc, pid)
                if child is not None and pid is not None:
                    resident = (proc_status_kib(pid, "VmRSS") or 0) / 1024
                    saves[-1].note = f"DCP's checkpoint process: +{child / MIB:.0f} MiB, {resident:.0f} MiB resident"
            first_ops[2].peaks.append(peak_of(lambda: first_async_save(os.path.join(work, "async-first"), state)))
            measure_peak_rss([clone])
            measure_peak_rss(warm_loads)
        saver.close()
        dcp_thread.close()
        if dcp_proc is not None:
            dcp_proc.close()

        raw = saves[0]
        print_table(
            "SAVE (durable: files + directory fsynced)", [*saves, async_block, async_snap, *dcp_blocks], nbytes, raw
        )
        print_table(
            "ASYNC SAVE vs in-memory copies of the state (no I/O)",
            [clone, copy_op, async_block, async_snap, *dcp_blocks, *first_ops],
            nbytes,
            clone,
            ref_label="vs clone",
        )
        if cold_loads:
            print_table("LOAD, cold page cache (drop_caches before each)", cold_loads, nbytes, cold_loads[0])
        else:
            print(f"\nLOAD, cold page cache: skipped, cannot drop the page cache ({cold_reason}); warm figures only")
        print_table("LOAD, warm page cache", warm_loads, nbytes, warm_loads[0])
        print(
            f"\nvs raw = raw time / time in this run (1.00 = as fast as the raw write or read); vs clone likewise."
            f"\npeak RSS = highest resident memory during the operation minus resident memory at its start"
            f"\n  (one extra untimed run per operation, warm cache, every buffer >= 1 MiB freshly mapped; state "
            f"= {nbytes / MIB:.0f} MiB);"
            "\n  the async row is a warm manager (buffers reused); the first-save row allocates its buffers."
            "\nDCP async blocks = until async_save returned and staging completed (the state may change again);"
            "\n  its process mode stages in a background thread into shared memory kept across saves."
            "\nlazy mmap = safetensors' default: tensors map the file and no byte is read until used."
        )
        if not track_rss:
            print("  (peak RSS not shown: /proc/self/clear_refs is not available)")
        write_json(
            args.json,
            {
                "benchmark": "save_load",
                "machine": machine(),
                "nbytes": nbytes,
                "tensors": len(tensors),
                "reps": reps,
                "cold": cold_reason is None,
                "save": {op.name: op_record(op, nbytes, raw) for op in [*saves, async_block, async_snap, *dcp_blocks]},
                "async": {
                    op.name: op_record(op, nbytes, clone)
                    for op in [clone, copy_op, async_block, *dcp_blocks, *first_ops]
                },
                "warmup": True,
                "load_cold": {op.name: op_record(op, nbytes, cold_loads[0]) for op in cold_loads},
                "load_warm": {op.name: op_record(op, nbytes, warm_loads[0]) for op in warm_loads},
            },
        )
    print(f"save_load time {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
