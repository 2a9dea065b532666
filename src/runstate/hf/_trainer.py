"""``attach(trainer, manager)``: a ``transformers.Trainer`` that saves and resumes through runstate.

Why this module exists: the Trainer's own checkpoints are written in place with ``torch.save``
(pickle), carry no checksums and have no fallback; its resume replays the data position with
``skip_first_batches`` and puts the RNGs back only after the first resumed batches were fetched.
This module keeps the Trainer's training loop as it is and replaces, on one Trainer instance
only, the places where it saves and resumes:

* ``get_train_dataloader`` returns a torchdata ``StatefulDataLoader`` over the same dataset,
  sampler, collator and worker settings, so the data position is stored, not replayed;
* ``_init_training_state`` reads the ``TrainerState`` of the newest intact checkpoint (global
  step, epoch, log history, best metric, stateful callbacks): the loop derives its epoch and
  its position in the epoch from it, as it does on its own resume;
* ``_prepare_for_training`` restores model, optimizer, scheduler, grad scaler, every RNG and
  the data loader once they all exist, from that same step;
* ``_run_epoch`` is the Trainer's own function with one name rebound for this instance:
  ``skip_first_batches`` leaves the restored loader alone (it already stands where the run
  stopped); nothing global is patched;
* ``_save_checkpoint`` writes one runstate checkpoint through the manager;
* a callback decides when to save (the manager's cadence, else the Trainer's strategy), turns
  a signal from ``save_on_signals`` into a save and a stop, and puts back the loss accumulated
  since the last log, so the first logged loss after a resume is the uninterrupted one.

Invariant: the state a checkpoint holds is everything the Trainer's next step reads, captured
at the point where the Trainer saves (after logging and evaluation of a step).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
import types
from typing import Any

import torch
import transformers
import transformers.trainer_utils as trainer_utils
from accelerate import skip_first_batches
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers.trainer_callback import ExportableState, TrainerCallback, TrainerState

import runstate
from runstate.errors import CheckpointConfigError

logger = logging.getLogger("runstate.hf")

# The items of a Trainer checkpoint. "trainer" holds the TrainerState as JSON and the loss
# accumulated since the last log.
ITEMS = ("model", "optimizer", "scheduler", "scaler", "rng", "loader", "trainer")
_ATTACHED = "_runstate_attachment"
# The Trainer methods replaced on the instance (private: they can change between versions).
HOOKED = (
    "get_train_dataloader",
    "_inner_training_loop",
    "_init_training_state",
    "_prepare_for_training",
    "_run_epoch",
    "_save_checkpoint",
    "_load_rng_state",
    "_load_callback_state",
)
TESTED = "5.24"


class TrainerLoader(StatefulDataLoader):  # type: ignore[misc]
    """The Trainer's training loader as a ``StatefulDataLoader``, with the ``set_epoch`` the Trainer calls.

    ``set_epoch`` reaches the sampler (accelerate's ``SeedableRandomSampler`` orders each epoch
    by ``seed + epoch``) and a dataset that has one (a Hugging Face ``IterableDataset``). The
    loader counts its passes itself: the Trainer's count is not the pass after a resume over an
    ``IterableDataset`` (it counts a ``max_steps`` run as one epoch, so a run resumed in its
    second pass is in its "epoch 0" again). The first call sets the count, each later call
    adds one, and the first call after a restore in the middle of a pass keeps the restored one.
    """

    epoch: int | None = None
    keep_next = False

    def set_epoch(self, epoch: int) -> None:
        """The Trainer starts a pass: set the epoch of the sampler and of the dataset."""
        if self.keep_next:
            self.keep_next = False
            return
        self.epoch = epoch if self.epoch is None else self.epoch + 1
        self._apply(self.epoch)

    def restore_epoch(self, epoch: int | None, *, mid_pass: bool) -> None:
        """Put back the pass of the checkpoint, before the loader's position is restored."""
        self.epoch, self.keep_next = epoch, mid_pass and epoch is not None
        if epoch is not None:
            self._apply(epoch)

    def _apply(self, epoch: int) -> None:
        for target in (self.sampler, self.dataset):
            if callable(getattr(target, "set_epoch", None)):
                target.set_epoch(epoch)


def _stateful_copy(prepared: Any) -> StatefulDataLoader:
    """A ``TrainerLoader`` equal to ``prepared`` (the Trainer's loader, prepared by accelerate)."""
    if isinstance(prepared, StatefulDataLoader):
        return prepared
    batch_sampler = getattr(prepared, "batch_sampler", None)
    common: dict[str, Any] = {
        "collate_fn": prepared.collate_fn,
        "num_workers": prepared.num_workers,
        "pin_memory": prepared.pin_memory,
        "worker_init_fn": prepared.worker_init_fn,
        "multiprocessing_context": prepared.multiprocessing_context,
        "persistent_workers": prepared.persistent_workers,
    }
    if prepared.num_workers > 0:
        common["prefetch_factor"] = prepared.prefetch_factor
    if isinstance(prepared.dataset, torch.utils.data.IterableDataset):
        return TrainerLoader(prepared.dataset, batch_size=prepared.batch_size, drop_last=prepared.drop_last, **common)
    if type(batch_sampler) is not torch.utils.data.BatchSampler:
        raise CheckpointConfigError(
            f"runstate.hf.attach: the Trainer's training loader uses a {type(batch_sampler).__qualname__}, which "
            "runstate cannot make resumable; set train_sampling_strategy to 'random' or 'sequential', or "
            "override get_train_dataloader to return a torchdata StatefulDataLoader"
        )
    sampler = batch_sampler.sampler
    if isinstance(sampler, torch.utils.data.RandomSampler) and not callable(getattr(sampler, "set_epoch", None)):
        # A plain RandomSampler draws each epoch's order from the global RNG when its iterator
        # starts; torchdata's shuffle=True does the same and saves it.
        return TrainerLoader(
            prepared.dataset,
            batch_size=batch_sampler.batch_size,
            shuffle=True,
            drop_last=batch_sampler.drop_last,
            **common,
        )
    return TrainerLoader(
        prepared.dataset,
        batch_size=batch_sampler.batch_size,
        sampler=sampler,
        drop_last=batch_sampler.drop_last,
        **common,
    )


def _inner_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer``."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


def _numbers(entries: list[dict[str, Any]], step: int) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for entry in entries:
        if entry.get("step") == step:
            metrics.update(
                (k, float(v)) for k, v in entry.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            )
    metrics.pop("step", None)
    return metrics


class Attachment:
    """What ``attach`` installs on one Trainer: its saves, its restore and its callback."""

    def __init__(self, trainer: Any, manager: runstate.CheckpointManager) -> None:
        self.trainer = trainer
        self.manager = manager
        self.loader: StatefulDataLoader | None = None
        self.resume_step: int | None = None
        self.stored: dict[str, Any] | None = None  # the restored "trainer" item
        self.last_save = time.monotonic()
        self.last_saved_step: int | None = None
        self.batches_into_epoch = 0  # where the Trainer's count puts the restored step
        cadence = manager.cadence
        self.manager_cadence = cadence.every_steps is not None or cadence.every_seconds is not None
        self._originals: dict[str, Any] = {}

    # -- installation ---------------------------------------------------------------------

    def install(self) -> None:
        """Replace the Trainer's save and resume methods on this instance, and add the callback."""
        trainer = self.trainer
        missing = [name for name in HOOKED if not callable(getattr(trainer, name, None))]
        if missing:
            raise CheckpointConfigError(
                f"runstate.hf.attach: transformers {transformers.__version__} has no Trainer.{', '.join(missing)}; "
                f"runstate.hf is tested with transformers {TESTED}: install that version"
            )
        run_epoch = type(trainer)._run_epoch
        if run_epoch is not transformers.Trainer._run_epoch:
            raise CheckpointConfigError(
                f"runstate.hf.attach: {type(trainer).__qualname__} overrides Trainer._run_epoch, whose resume "
                "runstate takes over; attach to a Trainer that keeps the Trainer's epoch loop"
            )
        if type(trainer)._save_checkpoint is not transformers.Trainer._save_checkpoint:
            logger.warning(
                "runstate.hf.attach: %s overrides Trainer._save_checkpoint; runstate saves through the manager "
                "instead, so that override (e.g. writing a model card) no longer runs",
                type(trainer).__qualname__,
            )
        for name in ("train", "get_train_dataloader", "_init_training_state", "_prepare_for_training"):
            self._originals[name] = getattr(trainer, name)
        trainer.train = self.train
        trainer.get_train_dataloader = self.get_train_dataloader
        trainer._init_training_state = self.init_training_state
        trainer._prepare_for_training = self.prepare_for_training
        trainer._save_checkpoint = self.save_checkpoint
        trainer._load_rng_state = self.load_rng_state
        # The Trainer's own _run_epoch, reading `skip_first_batches` from a copy of its module's
        # names in which the restored loader is not skipped again.
        names = dict(run_epoch.__globals__)
        names["skip_first_batches"] = self.skip_first_batches
        epoch_fn = types.FunctionType(
            run_epoch.__code__, names, run_epoch.__name__, run_epoch.__defaults__, run_epoch.__closure__
        )
        epoch_fn.__kwdefaults__ = run_epoch.__kwdefaults__
        trainer._run_epoch = types.MethodType(epoch_fn, trainer)
        trainer.add_callback(_Callback(self))
        setattr(trainer, _ATTACHED, self)

    # -- what is saved ----------------------------------------------------------------------

    def state(self, trainer_item: Any) -> dict[str, Any]:
        """The state dict saved and restored: the Trainer's live objects, and ``trainer_item``."""
        t = self.trainer
        state: dict[str, Any] = {
            "model": t.model,
            "optimizer": _inner_optimizer(t.optimizer),
            "scheduler": t.lr_scheduler,
            "rng": runstate.RNG(),
            "loader": self.loader,
            "trainer": trainer_item,
        }
        scaler = getattr(t.accelerator, "scaler", None)
        if scaler is not None:
            state["scaler"] = scaler
        return state

    # -- the Trainer's entry points, replaced on this instance ------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``, resuming from the manager's newest intact checkpoint."""
        if resume_from_checkpoint not in (None, False):
            raise CheckpointConfigError(
                "runstate.hf.attach: this Trainer resumes from its CheckpointManager by itself "
                f"({self.manager.directory}); call trainer.train() without resume_from_checkpoint"
            )
        self.find_checkpoint()
        self.last_save = time.monotonic()
        try:
            return self._originals["train"](None, *args, **kwargs)
        finally:
            self.trainer.__dict__.pop("_inner_training_loop", None)

    def find_checkpoint(self) -> None:
        """Read the TrainerState of the newest intact checkpoint (every byte of it is checked)."""
        self.resume_step, self.stored = None, None
        step = self.manager.latest_step(verified=True)
        if step is None:
            logger.info("runstate: no checkpoint in %s, training from the start", self.manager.directory)
            return
        peek: dict[str, Any] = {"trainer": None}
        self.manager.restore(peek, step=step, exclude=[name for name in ITEMS if name != "trainer"])
        self.resume_step, self.stored = step, peek["trainer"]
        # The loop passes this "checkpoint" on; only the methods replaced here read it.
        inner = self.trainer._inner_training_loop
        path = self.manager.path(step)

        @functools.wraps(inner)
        def resume(*args: Any, **kwargs: Any) -> Any:
            kwargs["resume_from_checkpoint"] = path
            self.trainer.__dict__.pop("_inner_training_loop", None)  # back to the class's method
            return inner(*args, **kwargs)

        self.trainer._inner_training_loop = resume

    def get_train_dataloader(self) -> Any:
        """The Trainer's training loader, as a ``StatefulDataLoader``."""
        self.loader = _stateful_copy(self._originals["get_train_dataloader"]())
        return self.loader

    def init_training_state(
        self, max_steps: int, num_update_steps_per_epoch: int, num_train_epochs: int, resume: Any, trial: Any
    ) -> tuple[int, int]:
        """``Trainer._init_training_state``, with the stored ``TrainerState``: (epochs done, batches into the epoch)."""
        t = self.trainer
        self._originals["_init_training_state"](max_steps, num_update_steps_per_epoch, num_train_epochs, None, trial)
        if resume is None or self.stored is None:
            return 0, 0
        t.state = TrainerState(**json.loads(self.stored["state"]))
        t.state.best_model_checkpoint = None
        compare: Any = trainer_utils.compare_trainer_and_checkpoint_args  # logs what differs from the stored run
        compare(t.args, t.state)
        t._load_callback_state()
        t.state.init_training_references(t, max_steps, num_train_epochs, trial)
        # The Trainer's own arithmetic for its resume (Trainer._init_training_state).
        epochs = t.state.global_step // num_update_steps_per_epoch
        batches = (t.state.global_step % num_update_steps_per_epoch) * t.args.gradient_accumulation_steps
        self.batches_into_epoch = batches
        logger.info(
            "runstate: resuming from %s (global step %d, epoch %d, %d batches into it)",
            self.manager.path(self.resume_step or 0),
            t.state.global_step,
            epochs,
            batches,
        )
        return epochs, batches

    def prepare_for_training(self, max_steps: int, train_dataloader: Any, resume: Any) -> tuple[Any, Any]:
        """``Trainer._prepare_for_training``, then the restore of everything else, from the same step."""
        model, loader = self._originals["_prepare_for_training"](max_steps, train_dataloader, None)
        if loader is not self.loader:
            raise CheckpointConfigError(
                "runstate.hf.attach: the Trainer replaced its training loader after get_train_dataloader "
                f"({type(loader).__qualname__}); runstate cannot keep its position"
            )
        if resume is None or self.resume_step is None:
            runstate.torch.exact(self.loader, "loader")
            return model, loader
        at_epoch_end = self._at_epoch_end()
        if isinstance(self.loader, TrainerLoader) and self.stored is not None:
            self.loader.restore_epoch(self.stored.get("loader_epoch"), mid_pass=not at_epoch_end)
        state = self.state(None)
        self.manager.restore(state, step=self.resume_step)
        self.stored = state["trainer"]
        if at_epoch_end:
            self._finish_epoch()
        return model, loader

    def _at_epoch_end(self) -> bool:
        """Whether the restored step is an epoch's last, as the Trainer counts (len-ed loaders only)."""
        assert self.loader is not None
        try:
            len(self.loader)
        except TypeError:  # an IterableDataset without __len__: the Trainer counts by max_steps
            return False
        return self.batches_into_epoch == 0

    def _finish_epoch(self) -> None:
        """The checkpoint is at an epoch's last step: end the restored epoch, as the loop had."""
        assert self.loader is not None
        rng = runstate.RNG()
        saved = rng.state_dict()
        try:
            for _ in self.loader:
                raise CheckpointConfigError(
                    f"runstate.hf: the checkpoint of step {self.trainer.state.global_step} is at an epoch end by "
                    "the Trainer's count, yet its data loader still has batches; was the batch size or the "
                    "dataset changed?"
                )
        finally:
            rng.load_state_dict(saved)

    def skip_first_batches(self, dataloader: Any, num_batches: int = 0) -> Any:
        """accelerate's ``skip_first_batches``, except for the restored loader (it stands where the run was)."""
        if dataloader is self.loader:
            return dataloader
        return skip_first_batches(dataloader, num_batches)

    def load_rng_state(self, checkpoint: str | None) -> None:
        """Nothing to do: the RNGs came back with the rest of the state."""

    def save_checkpoint(self, model: Any, trial: Any) -> None:
        """``Trainer._save_checkpoint``: one runstate checkpoint of the whole state, through the manager."""
        t = self.trainer
        step = int(t.state.global_step)
        if step == self.last_saved_step:
            return  # saved at this step already (a step end, then the epoch end)
        if t.hp_search_backend is None and trial is None:
            t.store_flos()
        for cb in [*t.callback_handler.callbacks, t.control]:
            if isinstance(cb, ExportableState):
                name = cb.__class__.__name__
                if isinstance(t.state.stateful_callbacks.get(name), list):
                    t.state.stateful_callbacks[name].append(cb.state())
                else:
                    t.state.stateful_callbacks[name] = cb.state()
        item = {
            "state": json.dumps(dataclasses.asdict(t.state), sort_keys=True),  # as TrainerState.save_to_json
            "tr_loss": t._tr_loss.detach().clone(),
            "globalstep_last_logged": int(t._globalstep_last_logged),
            "loader_epoch": getattr(self.loader, "epoch", None),
        }
        config: Any = getattr(t.model, "config", None)
        if callable(getattr(config, "to_json_string", None)):
            item["model_config"] = config.to_json_string()  # for runstate.hf.export_pretrained
        self.manager.save(step, self.state(item), metrics=_numbers(t.state.log_history, step), force=True)
        self.last_saved_step = step
        self.last_save = time.monotonic()

    def restore_counters(self) -> None:
        """Put back the loss accumulated since the last log (the loop has just zeroed it)."""
        if self.stored is None:
            return
        t = self.trainer
        t._tr_loss = self.stored["tr_loss"].to(t._tr_loss.device)
        t._globalstep_last_logged = int(self.stored["globalstep_last_logged"])
        self.stored = None


class _Callback(TrainerCallback):  # type: ignore[misc]
    """Save cadence, signals, and the loss counters at ``on_train_begin``."""

    def __init__(self, attachment: Attachment) -> None:
        self.attachment = attachment

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.attachment.restore_counters()

    def _decide(self, state: Any, control: Any, *, step_end: bool) -> None:
        a = self.attachment
        mgr = a.manager
        if mgr.signal_received is not None and not mgr.preempted:
            if int(state.global_step) != a.last_saved_step:
                control.should_save = True
                control.should_training_stop = True
            # else: the signal came during the save of this very step, which then did not count as
            # the preemption save: train on to the next step boundary, save there and stop (exit 75)
            return
        if not a.manager_cadence:
            return  # the Trainer's save_strategy / save_steps decided
        due = step_end and mgr.cadence.should_save(int(state.global_step), time.monotonic() - a.last_save)
        finished = step_end and state.max_steps > 0 and state.global_step >= state.max_steps
        control.should_save = due or finished

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._decide(state, control, step_end=True)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._decide(state, control, step_end=False)


def attach(trainer: Any, manager: runstate.CheckpointManager) -> None:
    """See :func:`runstate.hf.attach`."""
    if not isinstance(trainer, transformers.Trainer):
        raise CheckpointConfigError(
            f"runstate.hf.attach: expected a transformers.Trainer (or a subclass), got {type(trainer).__qualname__}"
        )
    if not isinstance(manager, runstate.CheckpointManager):
        raise CheckpointConfigError(
            f"runstate.hf.attach: expected a runstate.CheckpointManager, got {type(manager).__qualname__}"
        )
    if getattr(trainer, _ATTACHED, None) is not None:
        raise CheckpointConfigError("runstate.hf.attach: this Trainer is attached already")
    if manager.read_only:
        raise CheckpointConfigError("runstate.hf.attach: the manager is read-only; a Trainer needs a writing manager")
    args = trainer.args
    problems: list[str] = []
    if args.world_size > 1:
        problems.append(f"world_size={args.world_size} (one process only for now)")
    if getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False):
        problems.append("DeepSpeed/FSDP")
    if args.load_best_model_at_end:
        problems.append("load_best_model_at_end=True (keep the best with CheckpointManager(keep_best=...))")
    if args.ignore_data_skip:
        problems.append("ignore_data_skip=True (runstate resumes the data position exactly)")
    if args.save_only_model:
        problems.append("save_only_model=True (runstate saves the whole state)")
    if trainer.model_init is not None:
        problems.append("model_init (the model is re-created by train())")
    strategy = str(getattr(args, "train_sampling_strategy", "random"))
    if strategy not in ("random", "sequential"):
        problems.append(
            f"train_sampling_strategy={strategy!r} (its order is not resumable; use 'random' or 'sequential')"
        )
    if problems:
        raise CheckpointConfigError("runstate.hf.attach does not support " + "; ".join(problems))
    if args.save_total_limit is not None:
        logger.info(
            "runstate: save_total_limit=%s is ignored; the CheckpointManager's retention decides what is kept",
            args.save_total_limit,
        )
    Attachment(trainer, manager).install()


def attachment(trainer: Any) -> Attachment | None:
    """The attachment installed on ``trainer``, if any."""
    found = getattr(trainer, _ATTACHED, None)
    return found if isinstance(found, Attachment) else None
