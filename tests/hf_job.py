"""Tiny Hugging Face training jobs for tests/test_hf.py, each run in its own process.

``python tests/hf_job.py --serve`` imports transformers once (it takes seconds) and forks one
process per job (see :func:`serve`); ``python tests/hf_job.py RUN_DIR MODE [options]`` runs one.

MODE:
  trainer     a transformers.Trainer (tiny GPT-2 with dropout, AdamW, warmup + cosine, gradient
              accumulation 2, 12 batches = 6 optimizer steps per epoch, 2 epochs) attached to
              CheckpointManager(RUN_DIR/ckpt, save_every_steps=--every): resumes by itself;
  weights     the negative control: the same Trainer, resumed from the weights only;
  own         the same Trainer with its own checkpoints and resume_from_checkpoint=True;
  accelerate  a plain Accelerate loop (prepare model, optimizer, stateful data loader and
              scheduler; accelerator.accumulate) saved with runstate.hf.accelerate_state;
  doc         a docs/huggingface.md example (--example), run as printed;
  refusals    what attach refuses, with the messages (RUN_DIR/errors.json).

Each training process appends its first global step to RUN_DIR/starts.txt; at the end a job
writes RUN_DIR/final.safetensors (parameters and AdamW moments) and RUN_DIR/log.json (the
logged losses). --kill-at STEP: SIGKILL itself at the end of STEP, before that step's save;
--term-at STEP: SIGTERM itself there (an attached Trainer saves that step, stops, exits 75);
--kill-in-save STEP: SIGKILL itself in the middle of the checkpoint of STEP (accelerate
modes: with the file being written half on disk, RUN_DIR/at_kill.json listing the checkpoint
folder then); --term-in-save STEP: SIGTERM itself during the save of STEP. Under
``runstate run`` only the first start is killed and only the second SIGTERMed. A Trainer job
writes RUN_DIR/seen.json: the steps its stateful callback (``Seen``) has seen, restored on
resume with the rest of the TrainerState.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import random
import re
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from datasets import Dataset
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
    get_cosine_schedule_with_warmup,
)
from transformers.trainer_callback import ExportableState

import runstate
import runstate.hf

VOCAB, LENGTH, SAMPLES, BATCH = 61, 12, 48, 4  # 12 batches per epoch = 6 updates (gas 2)
UPDATES_PER_EPOCH = SAMPLES // BATCH // 2


class Augmented(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Token rows, shifted by a random amount drawn from Python's, NumPy's and torch's global RNGs."""

    def __init__(self, rows: list[list[int]], *, augment: bool = True) -> None:
        self.rows, self.augment = rows, augment

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        shift = 0
        if self.augment:
            shift = random.randrange(VOCAB) + int(np.random.randint(VOCAB)) + int(torch.randint(0, VOCAB, ()).item())
        ids = (torch.tensor(self.rows[index]) + shift) % VOCAB
        return {"input_ids": ids, "labels": ids.clone()}


class Probe(TrainerCallback):  # type: ignore[misc]
    """Records where this process started; SIGKILLs it at the end of a given step."""

    def __init__(self, run_dir: Path, kill_at: int | None, term_at: int | None) -> None:
        self.run_dir, self.kill_at, self.term_at = run_dir, kill_at, term_at

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        with open(self.run_dir / "starts.txt", "a") as f:
            f.write(f"{state.global_step}\n")

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        restarts = os.environ.get("RUNSTATE_RESTART_COUNT")
        if restarts is not None and state.global_step in (self.kill_at, self.term_at):
            # Under `runstate run`: the first start is killed, the second preempted, then no more.
            if (restarts, state.global_step) == ("0", self.kill_at):
                os.kill(os.getpid(), signal.SIGKILL)
            if (restarts, state.global_step) == ("1", self.term_at):
                os.kill(os.getpid(), signal.SIGTERM)
            return
        if state.global_step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if state.global_step == self.term_at:
            os.kill(os.getpid(), signal.SIGTERM)  # a preemption notice: save at this step's end, stop


class Seen(TrainerCallback, ExportableState):  # type: ignore[misc]
    """A stateful callback: the global steps it has seen, saved in ``TrainerState.stateful_callbacks``."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.steps.append(int(state.global_step))

    def state(self) -> dict[str, Any]:
        return {"args": {}, "attributes": {"steps": list(self.steps)}}


def rows() -> list[list[int]]:
    return torch.randint(0, VOCAB, (SAMPLES, LENGTH), generator=torch.Generator().manual_seed(1234)).tolist()


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=LENGTH, n_embd=64, n_layer=2, n_head=2, resid_pdrop=0.1, embd_pdrop=0.1
    )
    return GPT2LMHeadModel(config)


def write_final(run_dir: Path, model: torch.nn.Module, optimizer: Any, losses: list[Any]) -> None:
    tensors = {f"param.{k}": v.detach().clone().contiguous() for k, v in model.named_parameters()}
    inner = getattr(optimizer, "optimizer", optimizer)
    for i, (_, param) in enumerate(model.named_parameters()):
        for key, value in inner.state[param].items():
            tensors[f"opt.{i}.{key}"] = value.detach().clone().reshape(-1).contiguous()
    save_file(tensors, str(run_dir / "final.safetensors"))
    (run_dir / "log.json").write_text(json.dumps(losses))


def kill_in_save(trainer: Trainer, step: int, signum: int = signal.SIGKILL) -> None:
    """Send ``signum`` to this process in the middle of the checkpoint of ``step``, after the model's part."""
    sent: list[int] = []

    def die_at(step_now: int) -> None:
        if step_now == step and not sent:
            sent.append(signum)
            os.kill(os.getpid(), signum)

    # The Trainer's own save writes the model, then calls this; runstate's save reads the model's
    # state_dict while it writes the checkpoint.
    own = trainer._save_optimizer_and_scheduler

    def save_optimizer_and_scheduler(output_dir: str) -> None:
        die_at(trainer.state.global_step)
        own(output_dir)

    trainer._save_optimizer_and_scheduler = save_optimizer_and_scheduler  # type: ignore[method-assign]
    trainer.model.register_state_dict_post_hook(lambda *_: die_at(trainer.state.global_step))


def run_trainer(run_dir: Path, opts: argparse.Namespace) -> int:
    dataset: Any = Augmented(rows()) if opts.augment else Dataset.from_dict({"input_ids": rows(), "labels": rows()})
    if opts.iterable:  # a Hugging Face IterableDataset, shuffled per epoch (set_epoch)
        dataset = dataset.to_iterable_dataset(num_shards=4).shuffle(seed=0, buffer_size=1)  # shard order per epoch
    model = tiny_gpt2()
    args = TrainingArguments(
        output_dir=str(run_dir / "hf"),
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=2,
        num_train_epochs=2,
        learning_rate=3e-3,
        warmup_steps=2,
        lr_scheduler_type="cosine",
        logging_steps=2,
        save_strategy="steps",
        save_steps=opts.every,
        report_to=[],
        disable_tqdm=True,
        seed=0,
        use_cpu=True,
        dataloader_num_workers=opts.workers,
        max_steps=2 * UPDATES_PER_EPOCH if opts.iterable else -1,
        restore_callback_states_from_checkpoint=True,  # Seen's steps come back (with runstate, from its checkpoint)
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=default_data_collator,
        callbacks=[Probe(run_dir, opts.kill_at, opts.term_at), Seen()],
    )
    if opts.kill_in_save is not None:
        kill_in_save(trainer, opts.kill_in_save)
    if opts.term_in_save is not None:
        kill_in_save(trainer, opts.term_in_save, signal.SIGTERM)
    with runstate.CheckpointManager(
        run_dir / "ckpt",
        keep_last=3,
        save_every_steps=None if opts.no_cadence else opts.every,  # None: at the Trainer's save_steps
        save_on_signals=(signal.SIGTERM,),
        async_save=opts.async_save,
    ) as mgr:
        if opts.mode == "trainer":
            runstate.hf.attach(trainer, mgr)
            trainer.train()
        elif opts.mode == "own":  # the Trainer's own checkpoints (checkpoint-N, torch.save) and resume
            resume = any(p.name.startswith("checkpoint-") for p in (run_dir / "hf").glob("*"))
            trainer.train(resume_from_checkpoint=True if resume else None)
        else:  # the naive resume: the weights come back, the rest of the run starts over
            done = mgr.restore({"model": model}, exclude=["optimizer", "scheduler", "rng", "loader", "trainer"])
            trainer.args.max_steps = 2 * UPDATES_PER_EPOCH - int(done or 0)
            trainer.train()
    write_final(run_dir, model, trainer.optimizer, [e["loss"] for e in trainer.state.log_history if "loss" in e])
    # The resume replaced the callback with a new instance holding the restored steps.
    seen = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, Seen))
    (run_dir / "seen.json").write_text(json.dumps(seen.steps))
    if opts.export:  # the newest checkpoint (the last step) for from_pretrained, loaded back and compared
        export = runstate.hf.export_pretrained(mgr.path(mgr.latest_step() or 0), run_dir / "export")
        loaded = AutoModelForCausalLM.from_pretrained(export)
        mine, theirs = dict(model.named_parameters()), dict(loaded.named_parameters())
        equal = mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
        (run_dir / "export.json").write_text(json.dumps({"equal": equal, "parameters": len(theirs)}))
    return mgr.exit_code


def accelerate_parts(accelerator: Any, opts: argparse.Namespace) -> tuple[Any, Any, Any, Any, int]:
    """The prepared model, optimizer, loader and scheduler of the Accelerate loop, and its step count."""
    model = tiny_gpt2()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    total = 2 * UPDATES_PER_EPOCH
    scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=2, num_training_steps=total)
    dataset = Augmented(rows(), augment=opts.augment)
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=opts.workers)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    return model, optimizer, loader, scheduler, total


def tear_and_kill(run_dir: Path, fd: int, folder: Path) -> None:
    """Cut the file open at ``fd`` to half its bytes, list ``folder`` in RUN_DIR/at_kill.json, SIGKILL.

    What a kill in the middle of writing that file leaves: a torn file in a folder without the
    files that were to come after it."""
    os.ftruncate(fd, os.fstat(fd).st_size // 2)
    os.fdatasync(fd)  # not os.fsync, which kill_in_runstate_save replaces
    listing = {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}
    (run_dir / "at_kill.json").write_text(json.dumps({"folder": folder.name, "files": listing}))
    os.kill(os.getpid(), signal.SIGKILL)


def kill_in_runstate_save(run_dir: Path, step: int) -> None:
    """SIGKILL this job while runstate writes the optimizer's file of the checkpoint of ``step``."""
    fsync = os.fsync
    staging = f".tmp-step-{step:012d}-"

    def fsync_or_die(fd: int) -> None:
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if path.name == "optimizer.safetensors" and path.parent.name.startswith(staging):
            tear_and_kill(run_dir, fd, path.parent)
        fsync(fd)

    os.fsync = fsync_or_die


def kill_in_accelerate_save(run_dir: Path, step: int, name: str) -> None:
    """SIGKILL this job in the middle of accelerate's save_state of ``step``, writing its file ``name``."""
    save = torch.save

    def save_or_die(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        path = Path(f) if isinstance(f, (str, os.PathLike)) else None
        if path is not None and path.name == name and path.parent.name == f"step-{step}":
            with open(path, "wb") as out:
                save(obj, out, *args, **kwargs)
                out.flush()
                tear_and_kill(run_dir, out.fileno(), path.parent)
        save(obj, f, *args, **kwargs)

    torch.save = save_or_die


def run_accelerate(run_dir: Path, opts: argparse.Namespace) -> int:
    set_seed(0)
    accelerator = Accelerator(
        cpu=True,
        gradient_accumulation_steps=2,
        dataloader_config=DataLoaderConfiguration(use_stateful_dataloader=True, use_seedable_sampler=True),
    )
    model, optimizer, loader, scheduler, total = accelerate_parts(accelerator, opts)
    losses: list[float] = []
    state = runstate.hf.accelerate_state(
        accelerator, model=model, optimizer=optimizer, scheduler=scheduler, dataloader=loader, losses=losses
    )
    if opts.kill_in_save is not None:
        kill_in_runstate_save(run_dir, opts.kill_in_save)
    with runstate.CheckpointManager(run_dir / "ckpt", keep_last=3, save_every_steps=opts.every) as mgr:
        step = mgr.restore(state) or 0
        losses = state["losses"]  # replaced by the stored list
        with open(run_dir / "starts.txt", "a") as f:
            f.write(f"{step}\n")
        model.train()
        while step < total:
            for batch in loader:
                loss = update(accelerator, model, optimizer, scheduler, batch)
                if loss is None:
                    continue
                step += 1
                losses.append(loss)
                kill_at(step, opts)
                state["losses"] = losses
                mgr.save(step, state)
                if step == total:
                    break
    write_final(run_dir, accelerator.unwrap_model(model), optimizer, losses)
    return 0


def update(accelerator: Any, model: Any, optimizer: Any, scheduler: Any, batch: Any) -> float | None:
    """One micro-batch of the Accelerate loop; the loss when the optimizer stepped, else None."""
    with accelerator.accumulate(model):
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return float(loss.item()) if accelerator.sync_gradients else None


def kill_at(step: int, opts: argparse.Namespace) -> None:
    """SIGKILL this job right after step ``--kill-at``."""
    if step == opts.kill_at:
        os.kill(os.getpid(), signal.SIGKILL)


def run_accelerate_own(run_dir: Path, opts: argparse.Namespace) -> int:
    """The same Accelerate loop with accelerate's own accelerator.save_state / load_state + skip_first_batches."""
    set_seed(0)
    accelerator = Accelerator(
        cpu=True, gradient_accumulation_steps=2, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True)
    )
    model, optimizer, loader, scheduler, total = accelerate_parts(accelerator, opts)
    if opts.kill_in_save is not None:
        kill_in_accelerate_save(run_dir, opts.kill_in_save, opts.in_file)
    # What load_state reports (it logs a file it could not load at INFO) goes to output.txt.
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("accelerate.checkpointing").setLevel(logging.INFO)
    saved = sorted((run_dir / "acc_state").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    step, losses = 0, []
    if saved:
        accelerator.load_state(str(saved[-1]))
        step = int(saved[-1].name.split("-")[1])
        losses = json.loads((saved[-1] / "losses.json").read_text())
    with open(run_dir / "starts.txt", "a") as f:
        f.write(f"{step}\n")
    skip = (2 * step) % len(loader)
    loader.set_epoch((2 * step) // len(loader))
    model.train()
    while step < total:
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        skip = 0
        for batch in batches:
            loss = update(accelerator, model, optimizer, scheduler, batch)
            if loss is None:
                continue
            step += 1
            losses.append(loss)
            kill_at(step, opts)
            if step % opts.every == 0:
                target = run_dir / "acc_state" / f"step-{step}"
                target.mkdir(parents=True)
                (target / "losses.json").write_text(json.dumps(losses))  # first: the test is about save_state
                accelerator.save_state(str(target))
            if step == total:
                break
    write_final(run_dir, accelerator.unwrap_model(model), optimizer, losses)
    return 0


def run_refusals(run_dir: Path, opts: argparse.Namespace) -> int:
    """What attach and an attached Trainer refuse, and the messages: RUN_DIR/errors.json."""
    dataset = Dataset.from_dict({"input_ids": rows(), "labels": rows()})

    def trainer(**options: Any) -> Trainer:
        args = TrainingArguments(
            output_dir=str(run_dir / "hf"), report_to=[], use_cpu=True, max_steps=2, disable_tqdm=True, **options
        )
        return Trainer(model=tiny_gpt2(), args=args, train_dataset=dataset)

    found: dict[str, list[str]] = {}

    def attempt(name: str, fn: Any) -> None:
        try:
            fn()
            found[name] = ["no error", ""]
        except Exception as exc:
            found[name] = [f"{type(exc).__module__}.{type(exc).__name__}", str(exc)]

    with runstate.CheckpointManager(run_dir / "ckpt") as mgr:
        attempt("not_a_trainer", lambda: runstate.hf.attach(object(), mgr))
        attempt("ignore_data_skip", lambda: runstate.hf.attach(trainer(ignore_data_skip=True), mgr))
        attempt(
            "group_by_length",
            lambda: runstate.hf.attach(trainer(train_sampling_strategy="group_by_length"), mgr),
        )
        attached = trainer()
        runstate.hf.attach(attached, mgr)
        attempt("twice", lambda: runstate.hf.attach(attached, mgr))
        attempt("resume_argument", lambda: attached.train(resume_from_checkpoint=True))
    (run_dir / "errors.json").write_text(json.dumps(found))
    return 0


def run_doc_example(run_dir: Path, opts: argparse.Namespace) -> int:
    """Run a docs/huggingface.md example as printed, after a prelude that defines its inputs."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "huggingface.md").read_text()
    code = dict(re.findall(r"<!-- example: (\w+) -->\n```python\n(.*?)```", text, re.S))[opts.example]
    os.chdir(run_dir)
    ns: dict[str, Any] = {"__name__": "__main__"}
    if opts.example == "trainer":
        ns["model"], ns["dataset"] = tiny_gpt2(), Dataset.from_dict({"input_ids": rows(), "labels": rows()})
        ns["args"] = TrainingArguments(
            output_dir="hf", per_device_train_batch_size=BATCH, num_train_epochs=1, report_to=[], use_cpu=True
        )
    else:
        set_seed(0)
        model = tiny_gpt2()
        ns["model"], ns["total_steps"] = model, 2 * UPDATES_PER_EPOCH
        ns["optimizer"] = torch.optim.AdamW(model.parameters(), lr=3e-3)
        ns["scheduler"] = get_cosine_schedule_with_warmup(ns["optimizer"], 2, ns["total_steps"])
        ns["loader"] = torch.utils.data.DataLoader(Augmented(rows(), augment=False), batch_size=BATCH, shuffle=True)
    code_status = 0
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            exec(compile(code, "docs/huggingface.md", "exec"), ns)
    except SystemExit as exc:  # the example ends with sys.exit(mgr.exit_code)
        code_status = int(exc.code or 0)
    mgr = ns["mgr"]
    if opts.example == "trainer":
        first = ns["trainer"]._initial_global_step
    else:
        first = int(re.findall(r"starting at step (\d+)", printed.getvalue())[0])
    with open(run_dir / "doc.jsonl", "a") as f:
        f.write(json.dumps({"first_step": int(first), "steps": mgr.steps(), "exit": code_status}) + "\n")
    return code_status


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument(
        "mode", choices=["trainer", "weights", "own", "accelerate", "accelerate-own", "doc", "refusals"]
    )
    parser.add_argument("--example", default="trainer")
    parser.add_argument("--kill-at", type=int, default=None)
    parser.add_argument("--term-at", type=int, default=None)
    parser.add_argument("--kill-in-save", type=int, default=None)
    parser.add_argument("--in-file", default="optimizer.bin")  # accelerate-own: the file torn by --kill-in-save
    parser.add_argument("--term-in-save", type=int, default=None)
    parser.add_argument("--no-cadence", action="store_true")  # the manager saves at the Trainer's save_steps
    parser.add_argument("--async-save", action="store_true")
    parser.add_argument("--iterable", action="store_true")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--augment", action="store_true")
    parser.add_argument("--every", type=int, default=3)
    parser.add_argument("--export", action="store_true")
    opts = parser.parse_args(argv)
    torch.set_num_threads(1)
    run_dir = Path(opts.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if opts.mode == "accelerate":
        return run_accelerate(run_dir, opts)
    if opts.mode == "doc":
        return run_doc_example(run_dir, opts)
    if opts.mode == "refusals":
        return run_refusals(run_dir, opts)
    if opts.mode == "accelerate-own":
        return run_accelerate_own(run_dir, opts)
    return run_trainer(run_dir, opts)


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        import forkserver  # tests/forkserver.py (run as a script, tests/ is on sys.path)

        forkserver.serve(main)
    else:
        sys.exit(main(sys.argv[1:]))
