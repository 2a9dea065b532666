"""What does checkpointing cost a ``transformers.Trainer`` run: runstate (async) vs the Trainer's own?

A tiny GPT-2 built from a config (no download; dropout on), a dataset built with
``datasets.Dataset.from_dict``, AdamW, one process on the CPU, trains ``--steps`` optimizer
steps four ways, the three checkpointing ones saving at the same steps (every ``--every``):

    none     ``save_strategy="no"``: no checkpointing at all
    trainer  the Trainer's own: ``save_strategy="steps"``, ``save_steps=--every``,
             ``save_total_limit=2`` (``checkpoint-N`` folders written with ``torch.save``; no fsync)
    async    ``runstate.hf.attach(trainer, CheckpointManager(async_save=True, keep_last=2))`` with
             the same ``save_steps`` (the manager has no cadence of its own, so the Trainer's
             decides): ``save()`` snapshots, a background thread writes while training goes on
    sync     the same with a synchronous manager: every file written, fsynced and checksummed
             before training goes on

A run is ``trainer.train()`` plus, for runstate, closing the manager (its last checkpoint on
disk): what checkpointing costs the job, end to end, on one torch thread (``--threads``; the
tiny model gains nothing from more, and on a loaded machine more threads make every figure
noise). Each variant runs ``--reps`` times round-robin (a fresh model, Trainer and directory
each time, rotated order) after one untimed warm-up run. A run is cut into positions: the
start, each step together with the save after it, the end (the last write). A variant's time
is the sum over positions of the median across its runs, so a load spike from another process
(one step 10x slower now and then) drops out as an outlier of a median. Overhead = (time -
time of ``none``) / time of ``none``; per save = that difference over the number of saves.
``blocked`` is the median time the loop waited in one ``Trainer._save_checkpoint`` call (for
``async``: the snapshot). The whole-run medians, spikes included, are printed too.

    python benchmarks/bench_hf.py            # 1.3M parameters, 20 steps, a save every 5, 5 reps: ~1 min (2 idle cores)
    python benchmarks/bench_hf.py --quick    # 0.7M parameters, 12 steps, a save every 4, 1 rep: ~15 s
"""

from __future__ import annotations

import argparse
import gc
import itertools
import logging
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from common import machine, print_machine, remove, runstate, scratch_dir, write_json

VARIANTS = ("none", "trainer", "async", "sync")


def build_inputs(args: argparse.Namespace) -> tuple[Any, Any]:
    """The dataset (one epoch = ``--steps`` batches) and the model config."""
    from datasets import Dataset
    from transformers import GPT2Config

    generator = torch.Generator().manual_seed(1234)
    rows = torch.randint(0, args.vocab, (args.steps * args.batch, args.length), generator=generator).tolist()
    dataset = Dataset.from_dict({"input_ids": rows, "labels": rows})
    config = GPT2Config(
        vocab_size=args.vocab,
        n_positions=args.length,
        n_embd=args.embd,
        n_layer=args.layers,
        n_head=4,
        resid_pdrop=0.1,
        embd_pdrop=0.1,
        attn_pdrop=0.1,
    )
    return dataset, config


def make_trainer(variant: str, run_dir: str, dataset: Any, config: Any, args: argparse.Namespace) -> Any:
    from transformers import GPT2LMHeadModel, PrinterCallback, Trainer, TrainingArguments, default_data_collator

    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    training = TrainingArguments(
        output_dir=os.path.join(run_dir, "hf"),
        per_device_train_batch_size=args.batch,
        max_steps=args.steps,
        learning_rate=1e-3,
        warmup_steps=2,
        lr_scheduler_type="cosine",
        logging_strategy="no",
        save_strategy="no" if variant == "none" else "steps",
        save_steps=args.every,
        save_total_limit=2,
        report_to=[],
        disable_tqdm=True,
        seed=0,
        use_cpu=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=training, train_dataset=dataset, data_collator=default_data_collator)
    trainer.remove_callback(PrinterCallback)  # no metrics printed at the end of each run
    return trainer


def time_saves(trainer: Any, blocked: list[float]) -> None:
    """From now on, record in ``blocked`` how long each ``Trainer._save_checkpoint`` call held up the loop."""
    inner: Callable[..., Any] = trainer._save_checkpoint

    def save_checkpoint(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return inner(*a, **k)
        finally:
            blocked.append(time.perf_counter() - t0)

    trainer._save_checkpoint = save_checkpoint


def step_clock(trainer: Any, marks: list[float]) -> None:
    """Append the time to ``marks`` at the start of every optimizer step."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):  # type: ignore[misc]
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            marks.append(time.perf_counter())

    trainer.add_callback(Clock())


def one_run(variant: str, run_dir: str, dataset: Any, config: Any, args: argparse.Namespace) -> dict[str, Any]:
    """One whole training run of ``variant``: its segments (start, each step with what follows it
    (a save), the end) and the time each save blocked the loop."""
    from runstate.hf import attach

    trainer = make_trainer(variant, run_dir, dataset, config, args)
    blocked: list[float] = []
    marks: list[float] = []
    step_clock(trainer, marks)
    gc.collect()
    os.sync()
    try:
        marks.append(time.perf_counter())
        if variant in ("async", "sync"):
            mgr = runstate.CheckpointManager(os.path.join(run_dir, "ckpt"), keep_last=2, async_save=variant == "async")
            with mgr:
                attach(trainer, mgr)
                time_saves(trainer, blocked)  # around attach's save_checkpoint
                trainer.train()
            saved = mgr.steps()  # after close: the last checkpoint is on disk
        else:
            time_saves(trainer, blocked)
            trainer.train()
            hf = os.path.join(run_dir, "hf")
            saved = sorted(int(n.split("-")[1]) for n in os.listdir(hf)) if os.path.isdir(hf) else []
        marks.append(time.perf_counter())
    finally:
        remove(run_dir)
    segments = [b - a for a, b in itertools.pairwise(marks)]
    return {"total_s": marks[-1] - marks[0], "segments_s": segments, "blocked_s": blocked, "kept": saved}


def robust_total(runs: list[dict[str, Any]]) -> float:
    """The sum, over the positions in a run, of the median time of that position across runs."""
    return sum(statistics.median(seg) for seg in zip(*(r["segments_s"] for r in runs)))


def report(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Print the table; return the figures by variant."""
    base = robust_total(runs["none"])
    base_median = statistics.median(r["total_s"] for r in runs["none"])
    print(
        f"\n  {'variant':<9}{'run':>9}{'overhead':>10}{'per save':>10}{'blocked':>10}{'start':>8}{'end':>8}{'saves':>7}"
        f"{'whole runs (median, each)':>30}"
    )
    result: dict[str, Any] = {}
    for variant, rs in runs.items():
        total = robust_total(rs)
        med = statistics.median(r["total_s"] for r in rs)
        saves = len(rs[0]["blocked_s"])
        blocked = [b for r in rs for b in r["blocked_s"]]
        row = {
            "robust_s": total,
            "median_s": med,
            "runs_s": [r["total_s"] for r in rs],
            "saves": saves,
            "kept": rs[0]["kept"],
            "overhead_pct": 100 * (total - base) / base,
            "overhead_pct_whole_runs": 100 * (med - base_median) / base_median,
            "per_save_ms": 1000 * (total - base) / saves if saves else None,
            "blocked_ms_median": 1000 * statistics.median(blocked) if blocked else None,
            "start_ms": 1000 * statistics.median(r["segments_s"][0] for r in rs),
            "end_ms": 1000 * statistics.median(r["segments_s"][-1] for r in rs),
        }
        result[variant] = row
        per_save = f"{row['per_save_ms']:.0f} ms" if row["per_save_ms"] is not None else "-"
        block = f"{row['blocked_ms_median']:.0f} ms" if row["blocked_ms_median"] is not None else "-"
        whole = f"{row['overhead_pct_whole_runs']:+.1f}% ({' '.join(f'{t:.2f}' for t in row['runs_s'])})"
        ends = f"{row['start_ms']:>5.0f} ms{row['end_ms']:>5.0f} ms"
        print(
            f"  {variant:<9}{total:>7.2f} s{row['overhead_pct']:>+9.1f}%{per_save:>10}{block:>10}{ends}{saves:>7}  {whole}"
        )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 20)")
    parser.add_argument("--every", type=int, default=None, help="save every N steps (default 5)")
    parser.add_argument("--reps", type=int, default=None, help="timed runs per variant (default 5)")
    parser.add_argument("--embd", type=int, default=None, help="GPT-2 n_embd (default 192)")
    parser.add_argument("--layers", type=int, default=None, help="GPT-2 n_layer (default 2)")
    parser.add_argument("--vocab", type=int, default=2048, help="vocabulary size (default 2048)")
    parser.add_argument("--length", type=int, default=64, help="tokens per sample (default 64)")
    parser.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="run only these")
    parser.add_argument("--quick", action="store_true", help="smoke run: 0.7M parameters, 12 steps, 1 rep")
    parser.add_argument("--dir", default=None, help="scratch directory (default ROOT/.bench-tmp)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    args.steps = args.steps or (12 if args.quick else 20)
    args.every = args.every or (4 if args.quick else 5)
    args.reps = args.reps or (1 if args.quick else 5)
    args.embd = args.embd or (128 if args.quick else 192)
    args.layers = args.layers or 2
    if "none" not in args.variants:
        args.variants.insert(0, "none")  # the baseline of every ratio
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import accelerate
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # "Writing model shards" at each of the Trainer's own saves
    logging.getLogger("runstate").setLevel(logging.WARNING)
    dataset, config = build_inputs(args)
    with scratch_dir(args.dir, 1024**3, "hf-") as work:
        n_params = sum(p.numel() for p in transformers.GPT2LMHeadModel(config).parameters())
        print(
            f"bench_hf: transformers.Trainer, GPT-2 {args.layers} layers x {args.embd} ({n_params / 1e6:.1f}M params, "
            f"AdamW), batch {args.batch} x {args.length} tokens, {args.steps} steps, a save every {args.every}; "
            f"{torch.get_num_threads()} torch threads; transformers {transformers.__version__}, "
            f"accelerate {accelerate.__version__}"
        )
        print_machine(work)
        one_run("none", os.path.join(work, "warmup"), dataset, config, args)  # imports, allocator, threads
        runs: dict[str, list[dict[str, Any]]] = {v: [] for v in args.variants}
        for rep in range(args.reps):
            k = rep % len(args.variants)
            for variant in args.variants[k:] + args.variants[:k]:  # rotate: no variant always runs first
                runs[variant].append(one_run(variant, os.path.join(work, f"{variant}-{rep}"), dataset, config, args))
                print(f"  run {rep + 1}/{args.reps} {variant}: {runs[variant][-1]['total_s']:.2f} s", flush=True)
        result = report(runs)
    print(
        "\nrun = the sum over a run's positions (start, step k with the save after it, end) of the median time of"
        "\n  that position across runs: load spikes from other processes drop out, as outliers of a median;"
        "\noverhead = (run - run of 'none') / run of 'none'; per save = that difference / saves;"
        "\nblocked = median time one save held up the training loop (async: the snapshot; the write then"
        "\n  competes with training for the CPU, which the overhead includes);"
        "\nstart / end = median time from train() to the first step (attach: the restore check, the loader) and"
        "\n  from the last step's start to the end (the last step, its save, async: waiting for its write);"
        "\nwhole runs = the same overhead from whole-run medians, spikes included, and each run's time."
    )
    info = machine()
    info["versions"] += f", transformers {transformers.__version__}, accelerate {accelerate.__version__}"
    write_json(
        args.json,
        {"benchmark": "bench_hf", "machine": info, "args": vars(args), "params": n_params, "variants": result},
    )
    print(f"bench_hf time {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
