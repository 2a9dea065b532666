"""Hugging Face: ``transformers.Trainer`` and Accelerate runs saved and resumed by runstate.

* :func:`attach` makes a ``Trainer`` (any subclass that keeps the Trainer's epoch loop) save
  through a :class:`runstate.CheckpointManager` and resume from its newest intact checkpoint
  by itself: crash-safe, checksummed, pickle-free, optionally async.
* :func:`accelerate_state` is the state dict of a plain Accelerate loop.
* :func:`export_pretrained` writes a checkpoint's model as ``config.json`` +
  ``model.safetensors`` for ``from_pretrained``.

``import runstate.hf`` imports neither transformers nor accelerate: each function imports what
it needs when called. See docs/huggingface.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from runstate.hf._export import export_pretrained  # imports neither torch nor transformers until called

if TYPE_CHECKING:
    from runstate.manager import CheckpointManager

__all__ = ["accelerate_state", "attach", "export_pretrained"]


def attach(trainer: Any, manager: CheckpointManager) -> None:
    """Make ``trainer`` save through ``manager`` and resume from it by itself.

    Call it once, after constructing the Trainer and before ``trainer.train()``. From then on
    ``trainer.train()`` restores the newest intact checkpoint of ``manager`` (every byte
    checked; a damaged newest one is skipped with a WARNING; none: a fresh start) and saves
    through the manager: at the manager's cadence (``save_every_steps``/``save_every_seconds``)
    when it has one, plus the last step, else where the Trainer's ``save_strategy`` /
    ``save_steps`` say. Retention is the manager's (``save_total_limit`` is ignored, with a log
    line). With ``CheckpointManager(..., save_on_signals=(signal.SIGTERM,))`` a SIGTERM makes
    the Trainer save at the next step boundary and stop; end the script with
    ``sys.exit(manager.exit_code)``.

    A checkpoint holds the model, optimizer, LR scheduler, grad scaler (if any), the
    ``TrainerState`` (global step, epoch, log history, best metric, stateful callbacks), the
    loss accumulated since the last log, every RNG, and the position of the training data
    loader, which becomes a torchdata ``StatefulDataLoader`` over the Trainer's own dataset,
    sampler, collator and worker settings.

    Args:
        trainer: a ``transformers.Trainer`` or a subclass, in one process.
        manager: a writing :class:`runstate.CheckpointManager`.

    Raises:
        CheckpointConfigError: ``trainer`` is not a Trainer, is attached already, or uses
            something runstate cannot resume exactly (several processes, DeepSpeed/FSDP,
            ``load_best_model_at_end``, ``ignore_data_skip``, ``save_only_model``, ``model_init``,
            a length-grouped sampler); the message names it.

    Example:
        >>> trainer = Trainer(model=model, args=args, train_dataset=ds)  # doctest: +SKIP
        >>> with runstate.CheckpointManager("runs/hf", keep_last=2, save_every_steps=50) as mgr:  # doctest: +SKIP
        ...     runstate.hf.attach(trainer, mgr)
        ...     trainer.train()
    """
    from runstate.hf._trainer import attach as _attach

    _attach(trainer, manager)


def accelerate_state(
    accelerator: Any,
    *,
    model: Any,
    optimizer: Any = None,
    scheduler: Any = None,
    dataloader: Any = None,
    **extra: Any,
) -> dict[str, Any]:
    """The state of an Accelerate loop, for ``mgr.save(step, state)`` / ``mgr.restore(state)``.

    Build it once after ``accelerator.prepare(...)`` and before the first batch. It names what
    the loop's next step reads: the unwrapped model, the torch optimizer and scheduler inside
    accelerate's wrappers, the grad scaler, every RNG, the accelerator's micro-step counter
    (``accelerator.step``, which decides when ``accumulate`` syncs) and the data position.

    Args:
        accelerator: the ``accelerate.Accelerator``, in one process.
        model: the prepared model.
        optimizer: the prepared optimizer.
        scheduler: the prepared LR scheduler.
        dataloader: a torchdata ``StatefulDataLoader``, or a loader prepared by an Accelerator
            created with ``dataloader_config=DataLoaderConfiguration(use_stateful_dataloader=True,
            use_seedable_sampler=True)``.
        **extra: more items, stored as given (your own counters, an EMA model...).

    Returns:
        A dict of named items: ``model``, ``rng``, ``accelerator``, and ``optimizer``,
        ``scheduler``, ``scaler``, ``dataloader`` when present, then ``extra``.

    Raises:
        CheckpointConfigError: ``dataloader`` cannot resume its position exactly (a plain
            ``DataLoader``, prepared without those two options or not), or a name in ``extra``
            is taken.

    Example:
        >>> state = runstate.hf.accelerate_state(  # doctest: +SKIP
        ...     accelerator, model=model, optimizer=opt, scheduler=sched, dataloader=loader)
        >>> step = mgr.restore(state) or 0  # doctest: +SKIP
    """
    from runstate.hf._accelerate import build_state

    parts = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "dataloader": dataloader}
    return build_state(accelerator, parts, extra)
