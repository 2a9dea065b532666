"""Evidence for resuming with changes: raising the LR 3x naively spikes the loss;
set_hparams + Rewarm does not. Runs examples/resume_with_changes.py's real training."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import resume_with_changes as example  # noqa: E402

MARGIN = 1.5  # (b) may exceed the pre-resume loss level by at most 50% (smoothed over 10 steps)


def test_rewarm_avoids_the_spike_that_a_naive_lr_change_causes(tmp_path: Path) -> None:
    curves = example.run(str(tmp_path))
    peaks = example.peaks(curves)
    assert peaks["careful"] <= MARGIN * peaks["before"], peaks
    assert peaks["naive"] >= 5 * peaks["before"], peaks  # the negative control spikes
    # (b) really trains at the higher LR: by the end it is below where it started.
    assert sum(curves["careful"][-10:]) / 10 < peaks["before"]
    example.plot(curves, str(tmp_path / "plot.png"))
    assert (tmp_path / "plot.png").stat().st_size > 10_000
