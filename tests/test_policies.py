"""Save cadence and retention are pure functions of numbers."""

from __future__ import annotations

from runstate.policies import Retention, SaveCadence


def test_cadence() -> None:
    assert SaveCadence().should_save(7, 0.0)
    steps = SaveCadence(every_steps=10)
    assert [s for s in range(0, 35) if steps.should_save(s, 0.0)] == [0, 10, 20, 30]
    secs = SaveCadence(every_seconds=5.0)
    assert not secs.should_save(3, 4.9) and secs.should_save(3, 5.0)
    both = SaveCadence(every_steps=10, every_seconds=5.0)
    assert both.should_save(10, 0.0) and both.should_save(3, 6.0) and not both.should_save(3, 1.0)


def test_keep_last_only() -> None:
    assert Retention(keep_last=2).to_keep([1, 2, 3, 4], {}) == {3, 4}
    assert Retention(keep_last=None).to_keep([1, 2, 3], {}) == {1, 2, 3}
    assert Retention(keep_last=5).to_keep([], {}) == set()


def test_union_with_every_and_best() -> None:
    r = Retention(keep_last=1, keep_every=4, keep_best=2, best_metric="loss")
    metrics = {1: {"loss": 0.3}, 2: {"loss": 0.1}, 3: {"loss": float("nan")}, 5: {}, 6: {"loss": 0.2}, 7: {"loss": 9.0}}
    assert r.to_keep([1, 2, 3, 4, 5, 6, 7], metrics) == {7, 4, 2, 6}


def test_best_ties_prefer_the_newer_step_and_max_mode() -> None:
    r = Retention(keep_last=1, keep_best=1, best_metric="acc", best_mode="max")
    assert r.to_keep([1, 2, 3], {1: {"acc": 0.9}, 2: {"acc": 0.9}, 3: {"acc": 0.1}}) == {2, 3}


def test_protected_and_newest_always_kept() -> None:
    r = Retention(keep_last=1)
    assert r.to_keep([1, 5, 9], {}, protected=[1]) == {1, 9}


def test_policies_are_public_and_refuse_bad_values_with_the_config_error() -> None:
    import pytest

    import runstate

    assert runstate.Retention is Retention and runstate.SaveCadence is SaveCadence
    bad = [
        lambda: Retention(keep_last=0),
        lambda: Retention(keep_last=True),
        lambda: Retention(keep_every=-4),
        lambda: Retention(keep_best=1),  # no best_metric
        lambda: Retention(keep_best=1, best_metric=["loss"]),  # type: ignore[arg-type]
        lambda: Retention(best_mode="lowest"),
        lambda: SaveCadence(every_steps=2.5),  # type: ignore[arg-type]
        lambda: SaveCadence(every_seconds=float("nan")),
        lambda: SaveCadence(every_seconds="60"),  # type: ignore[arg-type]
    ]
    for make in bad:
        with pytest.raises(runstate.CheckpointConfigError):
            make()
    assert SaveCadence(every_seconds=1).every_seconds == 1  # an int is a number of seconds too
