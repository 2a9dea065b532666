"""``runstate demo``: train, interrupt, resume, and prove the result is bit-identical."""

from __future__ import annotations

import argparse

__all__ = ["register"]


def _demo(args: argparse.Namespace) -> int:
    from runstate.cli._output import fail
    from runstate.demo import MIN_STEPS, run_demo

    if args.steps < MIN_STEPS:
        return fail("demo", f"--steps must be at least {MIN_STEPS} (got {args.steps}): the SIGKILL has to fall after the first checkpoint")
    return run_demo(args.out, steps=args.steps, seed=args.seed)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``demo`` subcommand."""
    p = sub.add_parser(
        "demo",
        help="train, SIGKILL/SIGTERM and auto-resume a run; check it is bit-identical (needs torch)",
        description=(
            "Trains a small MLP four ways in child processes: (a) uninterrupted, (b) under the "
            "supervisor with a SIGKILL and a SIGTERM at random steps, (c) resumed from weights only, "
            "(d) resumed without scheduler, RNG and data position. Prints a table, writes loss.png "
            "(needs matplotlib: pip install 'runstate[demo]'), and exits 1 unless (b) is bit-identical "
            "to (a) and (c), (d) are not."
        ),
    )
    p.add_argument("--out", default="runstate-demo", metavar="DIR", help="output folder (default ./runstate-demo)")
    p.add_argument("--steps", type=int, default=600, help="training steps per run (default 600)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, model and interruption steps (default 0)")
    p.set_defaults(func=_demo)
