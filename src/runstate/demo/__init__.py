"""``runstate demo``: the project's claim, checked in one command.

Four runs of the same small training job (``runstate.demo.job``), each in child processes:

(a) an uninterrupted reference run;
(b) the same run under the ``runstate run`` supervisor, hit by a SIGKILL at a random step and
    by a SIGTERM (graceful preemption) at another, resuming by itself each time;
(c) interrupted at the same step as (b)'s SIGKILL and resumed with the model weights only
    (the naive approach);
(d) the same, resumed with model and optimizer but without scheduler, RNG and data position.

It prints a table (interruptions, final held-out loss, max |delta parameter| against (a),
bit-identical or not), draws the loss curves to ``loss.png`` when matplotlib is installed (the
``demo`` extra; without it the demo says so in one line and skips the picture), and exits
non-zero unless (b) is bit-identical to (a) and (c), (d) are not: it is a self-check, not a
slideshow.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runstate.errors import CheckpointConfigError

__all__ = ["MIN_STEPS", "Variant", "run_demo"]

SAVE_EVERY = 25
MIN_STEPS = 4 * SAVE_EVERY


@dataclass
class Variant:
    """One demo run and what came out of it."""

    key: str
    label: str
    out: Path
    interruptions: list[tuple[str, int]] = field(default_factory=list)
    eval_loss: float = float("nan")
    max_delta: float = float("nan")
    identical: bool = False
    losses: dict[int, float] = field(default_factory=dict)


def _job(run_dir: Path, out_dir: Path, steps: int, seed: int, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "runstate.demo.job", str(run_dir), str(out_dir),
        "--steps", str(steps), "--seed", str(seed), "--save-every", str(SAVE_EVERY), *extra,
    ]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONWARNINGS": "ignore"}


def _last_step(out_dir: Path) -> int:
    try:
        with open(out_dir / "losses.jsonl", "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 200))
            lines = f.read().splitlines()
        return int(json.loads(lines[-1])["step"]) if lines else 0
    except (FileNotFoundError, ValueError, IndexError, KeyError):
        return 0


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (FileNotFoundError, ValueError):
        return []


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, check=False)
    if proc.returncode not in (0, -signal.SIGKILL):
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")


def _supervised(v: Variant, steps: int, seed: int, kill_at: int, term_at: int, log: Callable[[str], None]) -> None:
    """Run (b) under the supervisor and interrupt its child at two steps."""
    cmd = [sys.executable, "-m", "runstate", "run", "--backoff", "0", "--max-restarts", "5", "--"]
    sup = subprocess.Popen(cmd + _job(v.out / "run", v.out, steps, seed), env=_env(), stderr=subprocess.PIPE, text=True)
    for name, signum, at in (("SIGKILL", signal.SIGKILL, kill_at), ("SIGTERM", signal.SIGTERM, term_at)):
        while _last_step(v.out) < at and sup.poll() is None:
            time.sleep(0.002)
        pids = _children(sup.pid)
        if not pids:
            break
        os.kill(pids[0], signum)
        step = _last_step(v.out)
        v.interruptions.append((name, step))
        log(f"  (b) {name} sent to the training process at step {step}")
        while _children(sup.pid) == pids and sup.poll() is None:
            time.sleep(0.002)
    _, err = sup.communicate()
    if sup.returncode != 0:
        raise RuntimeError(f"supervised run failed ({sup.returncode}):\n{err[-2000:]}")


def _load_results(v: Variant, reference: dict[str, Any] | None) -> dict[str, Any]:
    from safetensors.torch import load_file

    result = json.loads((v.out / "result.json").read_text())
    v.eval_loss = float(result["eval_loss"])
    for line in (v.out / "losses.jsonl").read_text().splitlines():
        rec = json.loads(line)
        v.losses[int(rec["step"])] = float(rec["loss"])  # a resumed run's record for a step wins
    weights: dict[str, Any] = load_file(v.out / "final.safetensors")
    if reference is not None:
        v.max_delta = max(float((weights[k] - reference[k]).abs().max()) for k in reference)
        v.identical = weights.keys() == reference.keys() and all(
            bool((weights[k] == reference[k]).all()) for k in reference
        )
    return weights


PICTURE_HINT = "pip install 'runstate[demo]'"


def _plot(variants: list[Variant], path: Path, resume_step: int) -> bool:
    """Draw the loss curves to ``path``; False (nothing drawn) when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(12, 4.8), dpi=110, gridspec_kw={"width_ratios": [3, 2]})
    colors = {"a": "#444444", "b": "#1f77b4", "c": "#d62728", "d": "#ff7f0e"}
    styles = {"a": ("-", 3.2), "b": ("--", 1.4), "c": ("-", 1.2), "d": ("-", 1.2)}
    lo, hi = max(1, resume_step - 15), resume_step + 60
    for v in variants:
        steps = sorted(v.losses)
        values = [v.losses[s] for s in steps]
        smooth, acc = [], values[0]
        for x in values:
            acc = 0.7 * acc + 0.3 * x
            smooth.append(acc)
        ls, lw = styles[v.key]
        ax.plot(steps, smooth, ls, color=colors[v.key], lw=lw, label=v.label, zorder=3 if v.key == "b" else 2)
        window = [(s, x) for s, x in zip(steps, values, strict=True) if lo <= s <= hi]
        zoom.plot([s for s, _ in window], [x for _, x in window], ls, color=colors[v.key], lw=lw, marker=".", ms=3)
    marks = {step: name for v in variants for name, step in v.interruptions}
    for step, name in sorted(marks.items()):
        for axis in (ax, zoom):
            if axis is ax or lo <= step <= hi:
                axis.axvline(step, color="#777777", ls=":", lw=1)
                axis.text(
                    step, 0.97, f" {name}", transform=axis.get_xaxis_transform(), fontsize=8, va="top", color="#555555"
                )
    zoom.axvline(resume_step, color="#bbbbbb", lw=0.8)
    zoom.text(
        resume_step,
        0.90,
        " last checkpoint",
        transform=zoom.get_xaxis_transform(),
        fontsize=8,
        va="top",
        color="#888888",
    )
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (EMA 0.7)")
    ax.set_title("Whole run")
    ax.legend(fontsize=8, loc="lower left")
    zoom.set_xlabel("step")
    zoom.set_ylabel("training loss (per step)")
    zoom.set_title("Around the SIGKILL: the naive resumes jump")
    fig.suptitle("Resuming after interruptions: full state (runstate) vs. partial state")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _variants(out_dir: Path) -> list[Variant]:
    """The four runs, each with a fresh, empty output directory."""
    variants = [
        Variant("a", "(a) uninterrupted", out_dir / "a-reference"),
        Variant("b", "(b) runstate: SIGKILL + SIGTERM, auto-resumed", out_dir / "b-runstate"),
        Variant("c", "(c) resumed with weights only", out_dir / "c-weights-only"),
        Variant("d", "(d) resumed without scheduler, RNG, data position", out_dir / "d-no-sched-rng-data"),
    ]
    for v in variants:
        shutil.rmtree(v.out, ignore_errors=True)
        v.out.mkdir(parents=True)
    return variants


def _partial_resumes(c: Variant, d: Variant, steps: int, seed: int, crash: int) -> None:
    """Run (c) and (d): crash at ``crash``, then resume each with only part of the state."""
    c.interruptions.append(("SIGKILL", crash))
    d.interruptions.append(("SIGKILL", crash))
    with ThreadPoolExecutor(max_workers=2) as pool:
        jobs = [pool.submit(_run, _job(v.out / "run", v.out, steps, seed, "--crash-at", str(crash))) for v in (c, d)]
        for j in jobs:
            j.result()
        jobs = [
            pool.submit(_run, _job(v.out / "run", v.out, steps, seed, "--resume", mode))
            for v, mode in ((c, "weights_only"), (d, "model_optimizer"))
        ]
        for j in jobs:
            j.result()


def _print_table(variants: list[Variant], log: Callable[[str], None]) -> None:
    rows = [("variant", "interruptions", "final loss", "max |Δ param| vs (a)", "bit-identical")]
    for v in variants:
        interrupts = ", ".join(f"{n}@{s}" for n, s in v.interruptions) or "none"
        rows.append((v.label, interrupts, f"{v.eval_loss:.5f}", f"{v.max_delta:.3g}", "yes" if v.identical else "no"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    log("")
    for i, r in enumerate(rows):
        log("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)))
        if i == 0:
            log("  ".join("-" * w for w in widths))


def _verdict(b: Variant, c: Variant, d: Variant, log: Callable[[str], None]) -> int:
    """The exit code: 0 when (b) is bit-identical to (a) and the partial resumes are not."""
    ok = b.identical and not c.identical and not d.identical
    if not b.identical:
        log("FAILED: (b) is not bit-identical to the uninterrupted run")
    elif ok:
        log("OK: (b) is bit-identical to (a); the partial resumes (c) and (d) are not")
    else:
        log("FAILED: a partial resume came out identical; the comparison cannot tell the difference")
    return 0 if ok else 1


def run_demo(
    out: str | os.PathLike[str], *, steps: int = 600, seed: int = 0, log: Callable[[str], None] = print
) -> int:
    """Run the four variants, print the table, write ``loss.png`` (with matplotlib); return the exit code.

    Raises:
        CheckpointConfigError: ``steps`` is below :data:`MIN_STEPS`.
    """
    t0 = time.monotonic()
    out_dir = Path(out).resolve()
    if steps < MIN_STEPS:
        raise CheckpointConfigError(
            f"runstate demo needs at least {MIN_STEPS} steps (got {steps}): the SIGKILL must fall after the first "
            f"checkpoint (saved every {SAVE_EVERY} steps) for the comparison to mean anything"
        )
    rnd = random.Random(seed)
    # The SIGKILL lands after the first checkpoint, so (c) and (d) really resume from one.
    kill_at = rnd.randint(max(SAVE_EVERY + 1, int(0.15 * steps)), int(0.45 * steps))
    term_at = rnd.randint(int(0.55 * steps), int(0.85 * steps))
    variants = _variants(out_dir)
    log(f"runstate demo: {steps} steps, seed {seed}; output in {out_dir}")
    a, b, c, d = variants
    with ThreadPoolExecutor(max_workers=2) as pool:
        ref = pool.submit(_run, _job(a.out / "run", a.out, steps, seed))
        _supervised(b, steps, seed, kill_at, term_at, log)
        ref.result()
    crash = b.interruptions[0][1] if b.interruptions else kill_at
    _partial_resumes(c, d, steps, seed, crash)
    reference = _load_results(a, None)
    a.max_delta, a.identical = 0.0, True
    for v in (b, c, d):
        _load_results(v, reference)
    _print_table(variants, log)
    png = out_dir / "loss.png"
    if _plot(variants, png, resume_step=crash - crash % SAVE_EVERY):
        picture = f"loss curves: {png}"
    else:
        picture = f"loss curves: not drawn, matplotlib is not installed ({PICTURE_HINT} draws them)"
    log(f"\n{picture}\nfinal loss = cross-entropy on 1024 held-out points; wall time {time.monotonic() - t0:.0f} s")
    return _verdict(b, c, d, log)
