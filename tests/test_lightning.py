"""runstate.lightning: pickle-free, crash-safe Lightning checkpoints and an exact resume.

The end-to-end tests run tests/lightning_job.py (dropout, AdamW with a step-interval and an
epoch-interval scheduler, a shuffled StatefulDataLoader whose dataset draws from Python's,
NumPy's and torch's global RNGs, 10 batches per epoch, 25 steps) in real processes that
SIGKILL themselves, and compare every logged loss, learning rate and epoch, and the final
parameters and optimizer state, bit for bit with a run that was never stopped. The negative
control is the same run with Lightning's default checkpointing: it must differ.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest

from tests.forkserver import Jobs, job_env

pl = pytest.importorskip("lightning.pytorch")
torch = pytest.importorskip("torch")

import runstate  # noqa: E402
import runstate.lightning  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "tests" / "lightning_job.py"
ENV = job_env()


# -- end to end: SIGKILL mid-epoch and at an epoch end, resume with ckpt_path="last" ---------------


def log_of(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The reference run, the runstate chain and the default chain, run side by side."""
    base = tmp_path_factory.mktemp("lightning")
    every = ("--every", "5")  # checkpoints at steps 5, 10 (the last batch of epoch 0), 15, 20, 25
    streams = {
        "reference": [((*every,), False)],
        # killed at step 13: resumes from step 10, an epoch's last batch; the resumed run saves
        # asynchronously and is killed at step 18: resumes from step 15, mid-epoch.
        "runstate": [
            ((*every, "--kill-at", "13"), True),
            ((*every, "--resume", "--io", "async", "--kill-at", "18"), True),
            ((*every, "--resume"), False),
        ],
        "default": [
            ((*every, "--io", "default", "--no-exact", "--kill-at", "13"), True),
            ((*every, "--io", "default", "--no-exact", "--resume"), False),
        ],
        # StatefulDataLoader(generator=g): the loader's own generator is restored too.
        "generator/reference": [((*every, "--generator", "7"), False)],
        "generator/runstate": [
            ((*every, "--generator", "7", "--kill-at", "13"), True),
            ((*every, "--generator", "7", "--resume"), False),
        ],
        # ExactResume also works with Lightning's own (torch.save) checkpoints.
        "default+exact": [
            ((*every, "--io", "default", "--kill-at", "13"), True),
            ((*every, "--io", "default", "--resume"), False),
        ],
    }
    errors: list[BaseException] = []
    jobs = Jobs(JOB, ENV)

    def run_stream(name: str) -> None:
        try:
            for args, killed in streams[name]:
                jobs.run(base / name, *args, killed=killed)
        except BaseException as exc:  # reported in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=run_stream, args=(name,)) for name in streams]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    jobs.close()
    if errors:
        raise errors[0]
    return {name: base / name for name in streams}


def by_step(log: list[dict[str, Any]]) -> dict[int, tuple[int, str, float]]:
    """The last record of each step (a resumed run repeats the steps after its checkpoint)."""
    return {r["step"]: (r["epoch"], r["loss"], r["lr"]) for r in log}


def final_tensors(run_dir: Path) -> dict[str, Any]:
    return runstate.load(run_dir / "final")


def assert_bit_identical(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert_bit_identical(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bit_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.e2e
def test_sigkilled_fit_resumes_bit_identically(runs: dict[str, Path]) -> None:
    reference, resumed = log_of(runs["reference"]), log_of(runs["runstate"])
    # The three processes: steps 0-12, then 10-17 (resumed at step 10), then 15-24 (at step 15).
    starts = [r["step"] for i, r in enumerate(resumed) if i == 0 or r["step"] <= resumed[i - 1]["step"]]
    assert starts == [0, 10, 15]
    assert [r["step"] for r in reference] == list(range(25))
    # Every step's loss, learning rate and epoch, in every process, equal the uninterrupted run's.
    ref = by_step(reference)
    for r in resumed:
        assert (r["epoch"], r["loss"], r["lr"]) == ref[r["step"]], r
    assert by_step(resumed) == ref
    assert_bit_identical(final_tensors(runs["reference"]), final_tensors(runs["runstate"]))
    assert json.loads((runs["runstate"] / "final.json").read_text()) == {"global_step": 25, "current_epoch": 3}


@pytest.mark.e2e
def test_a_loader_with_its_own_generator_resumes_bit_identically(runs: dict[str, Path]) -> None:
    reference = by_step(log_of(runs["generator/reference"]))
    assert reference != by_step(log_of(runs["reference"]))  # another data order than the global RNG's
    assert by_step(log_of(runs["generator/runstate"])) == reference
    assert_bit_identical(final_tensors(runs["generator/reference"]), final_tensors(runs["generator/runstate"]))


@pytest.mark.e2e
def test_exact_resume_works_with_lightnings_own_checkpoint_io_too(runs: dict[str, Path]) -> None:
    assert by_step(log_of(runs["default+exact"])) == by_step(log_of(runs["reference"]))
    assert_bit_identical(final_tensors(runs["reference"]), final_tensors(runs["default+exact"]))
    assert (runs["default+exact"] / "ckpt" / "last.ckpt").is_file()  # a torch.save zip: Lightning's own


@pytest.mark.e2e
def test_resume_from_an_epochs_last_batch_keeps_the_epoch(runs: dict[str, Path]) -> None:
    # The first resume is from step 10, saved after the last batch of epoch 0: the next step
    # is the first of epoch 1, as in the uninterrupted run (Lightning alone says epoch 2).
    resumed = log_of(runs["runstate"])
    first_after_resume = next(r for i, r in enumerate(resumed) if i > 0 and r["step"] <= resumed[i - 1]["step"])
    assert (first_after_resume["step"], first_after_resume["epoch"]) == (10, 1)
    default = log_of(runs["default"])
    first_default = next(r for i, r in enumerate(default) if i > 0 and r["step"] <= default[i - 1]["step"])
    assert (first_default["step"], first_default["epoch"]) == (10, 2)


@pytest.mark.e2e
def test_lightning_default_checkpointing_resumes_differently(runs: dict[str, Path]) -> None:
    # Negative control: Lightning's own checkpoints, resumed the same way, restore the data
    # order and the schedulers but not the RNGs (and count epoch 0 twice).
    reference, default = by_step(log_of(runs["reference"])), log_of(runs["default"])
    before_kill = [r for r in default if r["step"] < 13][:13]
    assert [(r["epoch"], r["loss"], r["lr"]) for r in before_kill] == [reference[s] for s in range(13)]
    resumed = by_step(default)
    differing = [s for s in range(10, 25) if resumed[s][1] != reference[s][1]]
    assert differing == list(range(10, 25))  # every loss after the resume
    assert [resumed[s][2] for s in range(10, 25)] == [reference[s][2] for s in range(10, 25)]  # the LR is right
    a, b = final_tensors(runs["reference"])["params"], final_tensors(runs["default"])["params"]
    assert max((a[k] - b[k]).abs().max().item() for k in a) > 1e-4
    assert json.loads((runs["default"] / "final.json").read_text())["current_epoch"] == 4  # one too many


@pytest.mark.e2e
def test_model_checkpoint_policies_keep_working(runs: dict[str, Path]) -> None:
    ckpt = runs["reference"] / "ckpt"
    # save_top_k=1 without a monitor keeps the newest step and last.ckpt; the older ones were removed.
    assert sorted(os.listdir(ckpt)) == ["epoch=2-step=25.ckpt", "last.ckpt"]
    for name in os.listdir(ckpt):
        assert (ckpt / name).is_dir() and runstate.verify(ckpt / name).ok
    loaded = runstate.lightning.CheckpointIO().load_checkpoint(ckpt / "last.ckpt")
    assert loaded["global_step"] == 25 and isinstance(loaded["state_dict"], OrderedDict)
    assert sorted(p for p in os.listdir(runs["runstate"] / "ckpt") if not p.startswith(".")) == [
        "epoch=2-step=25.ckpt",
        "last.ckpt",
    ]


# -- the plugin in this process ---------------------------------------------------------------------


def lightning_checkpoint(step: int) -> dict[str, Any]:
    """A checkpoint dict with the kinds of values Lightning puts in one."""
    torch.manual_seed(step)
    return {
        "epoch": 0,
        "global_step": step,
        "pytorch-lightning_version": "2.6.6",
        "state_dict": OrderedDict([("net.weight", torch.randn(3, 2)), ("net.bias", torch.randn(3))]),
        "loops": {"fit_loop": {"epoch_progress": {"total": {"ready": 1}}, "combined_loader": [{"_num_yielded": step}]}},
        "callbacks": {
            "ModelCheckpoint{'monitor': None}": {"kth_value": torch.tensor(float("inf")), "best_k_models": {}}
        },
        "optimizer_states": [
            {
                "state": {0: {"step": torch.tensor(float(step))}},
                "param_groups": [{"betas": (0.9, 0.999), "params": [0]}],
            }
        ],
        "lr_schedulers": [{"last_epoch": step, "_last_lr": [0.01]}],
        "hyper_parameters": {"lr": 0.01, "layers": [2, 3]},
    }


def test_save_and_load_round_trip_every_type(tmp_path: Path) -> None:
    io = runstate.lightning.CheckpointIO()
    ckpt = lightning_checkpoint(7)
    io.save_checkpoint(ckpt, tmp_path / "epoch=0-step=7.ckpt")
    assert (tmp_path / "epoch=0-step=7.ckpt" / "manifest.json").is_file()
    assert_bit_identical(io.load_checkpoint(tmp_path / "epoch=0-step=7.ckpt"), ckpt)
    back = io.load_checkpoint(tmp_path / "epoch=0-step=7.ckpt", map_location="cpu")
    assert isinstance(back["state_dict"], OrderedDict)
    assert back["optimizer_states"][0]["param_groups"][0]["betas"] == (0.9, 0.999)
    io.remove_checkpoint(tmp_path / "epoch=0-step=7.ckpt")
    assert os.listdir(tmp_path) == []


def test_unstorable_value_is_refused_naming_its_key(tmp_path: Path) -> None:
    ckpt = lightning_checkpoint(1)
    ckpt["hyper_parameters"]["activation"] = torch.nn.functional.relu
    with pytest.raises(runstate.UnsupportedTypeError, match=r"\['hyper_parameters'\]\['activation'\]"):
        runstate.lightning.CheckpointIO().save_checkpoint(ckpt, tmp_path / "last.ckpt")
    assert os.listdir(tmp_path) == []  # nothing written, nothing pickled


def test_unstorable_value_stops_fit_at_the_first_checkpoint(tmp_path: Path) -> None:
    from tests.lightning_job import Data, Model

    class WithFunction(Model):
        def __init__(self) -> None:
            super().__init__(tmp_path / "log.jsonl", None)
            self.save_hyperparameters({"activation": torch.nn.functional.relu})

    trainer = pl.Trainer(
        max_steps=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
        plugins=[runstate.lightning.CheckpointIO()],
        callbacks=[pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2)],
    )  # fmt: skip
    with pytest.raises(runstate.UnsupportedTypeError, match=r"\['hyper_parameters'\]\['activation'\]: a function"):
        trainer.fit(WithFunction(), Data())
    assert not (tmp_path / "ckpt").exists() or os.listdir(tmp_path / "ckpt") == []


# A pickle that creates a file when it is unpickled: builtins.open(MARKER, "w").
def pickle_bomb(marker: Path) -> bytes:
    return b"cbuiltins\nopen\n(V" + str(marker).encode() + b"\nVw\ntR."


def test_pickle_bomb_named_last_ckpt_is_refused_unread(tmp_path: Path) -> None:
    import pickle

    live = tmp_path / "bomb-is-live"
    pickle.loads(pickle_bomb(live)).close()  # the bomb works (when something unpickles it)
    assert live.exists()

    marker = tmp_path / "exploded"
    ckpt_dir = tmp_path / "ckpt"
    ckpt_dir.mkdir()
    (ckpt_dir / "last.ckpt").write_bytes(pickle_bomb(marker))
    io = runstate.lightning.CheckpointIO()
    with pytest.raises(runstate.CheckpointNotFoundError, match="is a file, not a runstate checkpoint directory"):
        io.load_checkpoint(ckpt_dir / "last.ckpt")

    from tests.lightning_job import Data, Model

    trainer = pl.Trainer(
        max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
        plugins=[io], callbacks=[pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, save_last=True)],
    )  # fmt: skip
    with pytest.raises(runstate.CheckpointNotFoundError, match="never reads it"):
        trainer.fit(Model(tmp_path / "log.jsonl", None), Data(), ckpt_path="last")
    assert not marker.exists()
    assert not (tmp_path / "log.jsonl").exists()  # refused before any training step


def test_url_paths_and_storage_options_are_refused(tmp_path: Path) -> None:
    io = runstate.lightning.CheckpointIO()
    with pytest.raises(runstate.CheckpointConfigError, match="local paths only"):
        io.save_checkpoint(lightning_checkpoint(1), "s3://bucket/last.ckpt")
    with pytest.raises(TypeError, match="storage_options"):
        io.save_checkpoint(lightning_checkpoint(1), tmp_path / "last.ckpt", storage_options={"x": 1})


# -- a SIGKILL at every point of an overwrite of last.ckpt ------------------------------------------

HOOKED = ("fsync", "rename", "replace", "unlink", "rmdir", "remove", "mkdir")


def overwrite_in_child(target: Path, kill_at: int | None) -> int:
    """Fork; the child overwrites ``target`` and SIGKILLs itself at file-system call ``kill_at``.

    Returns the child's wait status, or (kill_at None) the number of hooked calls the
    overwrite made, written by the child to a file.
    """
    count_file = target.parent / "calls"
    pid = os.fork()
    if pid == 0:  # the child: never returns to pytest
        try:
            calls = [0]

            def hook(fn: Any) -> Any:
                def wrapper(*args: Any, **kwargs: Any) -> Any:
                    if calls[0] == kill_at:
                        os.kill(os.getpid(), signal.SIGKILL)
                    calls[0] += 1
                    return fn(*args, **kwargs)

                return wrapper

            for name in HOOKED:
                setattr(os, name, hook(getattr(os, name)))
            runstate.lightning.CheckpointIO().save_checkpoint(lightning_checkpoint(2), target)
            with open(count_file, "w") as f:
                f.write(str(calls[0]))
            os._exit(0)
        except BaseException:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    if kill_at is None:
        assert os.waitstatus_to_exitcode(status) == 0
        return int(count_file.read_text())
    return status


@pytest.mark.e2e
def test_sigkill_at_any_point_of_an_overwrite_leaves_a_loadable_last_ckpt(tmp_path: Path) -> None:
    io = runstate.lightning.CheckpointIO()
    old, new = lightning_checkpoint(1), lightning_checkpoint(2)
    probe = tmp_path / "probe"
    probe.mkdir()
    io.save_checkpoint(old, probe / "last.ckpt")
    total = overwrite_in_child(probe / "last.ckpt", None)
    assert total >= 4  # the staged save's fsyncs and commit, the exchange's fsync, the removal of the old one
    outcomes = set()
    for kill_at in range(total):
        d = tmp_path / f"kill-{kill_at}"
        d.mkdir()
        io.save_checkpoint(old, d / "last.ckpt")
        status = overwrite_in_child(d / "last.ckpt", kill_at)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (kill_at, status)
        # What ckpt_path="last" finds (ModelCheckpoint: names last*.ckpt) is exactly one checkpoint,
        # complete: the previous one or the new one.
        assert [p for p in os.listdir(d) if re.match(r"^last(-\d+)?\.ckpt$", p)] == ["last.ckpt"]
        assert runstate.verify(d / "last.ckpt").ok, kill_at
        loaded = io.load_checkpoint(d / "last.ckpt")
        outcomes.add(loaded["global_step"])
        assert_bit_identical(loaded, old if loaded["global_step"] == 1 else new)
        # The next save over it works and clears what the killed one left.
        io.save_checkpoint(lightning_checkpoint(3), d / "last.ckpt")
        assert io.load_checkpoint(d / "last.ckpt")["global_step"] == 3
        assert not [p for p in os.listdir(d) if p.startswith(".last.ckpt.runstate-")]
    assert outcomes == {1, 2}  # killed before the swap: the previous one; after it: the new one


# -- docs/lightning.md runs as printed ------------------------------------------------------------------


def test_docs_example_runs_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.lightning_job import Data, Model

    text = (ROOT / "docs" / "lightning.md").read_text()
    blocks = re.findall(r"<!-- example: (\w+) -->\n```python\n(.*?)```", text, re.S)
    assert [name for name, _ in blocks] == ["setup"]
    monkeypatch.chdir(tmp_path)
    trainers = []
    for _ in range(2):  # the second run resumes from the first's last.ckpt: nothing left to train
        ns: dict[str, Any] = {"model": Model(tmp_path / "log.jsonl", None), "datamodule": Data()}
        exec(compile(blocks[0][1], "docs/lightning.md", "exec"), ns)
        trainers.append(ns["trainer"])
    assert [t.global_step for t in trainers] == [20, 20]
    assert len(log_of(tmp_path)) == 20
    assert (tmp_path / "checkpoints" / "last.ckpt" / "manifest.json").is_file()


def test_a_loader_without_state_dict_is_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from tests.lightning_job import Data, Model, NoisyData

    class PlainData(Data):
        def train_dataloader(self) -> Any:
            return torch.utils.data.DataLoader(NoisyData(), batch_size=4, shuffle=True)

    for data, warned in ((PlainData(), True), (Data(), False)):
        caplog.clear()
        trainer = pl.Trainer(
            max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
            enable_checkpointing=False, callbacks=[runstate.lightning.ExactResume()],
        )  # fmt: skip
        with caplog.at_level("WARNING", logger="runstate"):
            trainer.fit(Model(tmp_path / "log.jsonl", None), data)
        messages = [r.getMessage() for r in caplog.records if r.name == "runstate"]
        assert bool(messages) == warned, messages
        if warned:
            assert "training data loader 0 (DataLoader) has no state_dict/load_state_dict" in messages[0]
            assert "StatefulDataLoader" in messages[0]


def test_save_top_k_with_a_monitor_and_an_explicit_ckpt_path(tmp_path: Path) -> None:
    from tests.lightning_job import Data, Model

    class Logged(Model):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            loss = super().training_step(batch, batch_idx)
            self.log("train_loss", loss)
            return loss

    def trainer(max_steps: int) -> Any:
        checkpoint = pl.callbacks.ModelCheckpoint(
            dirpath=tmp_path / "ckpt", monitor="train_loss", save_top_k=2, every_n_train_steps=2, save_last=True
        )
        return pl.Trainer(
            max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
            plugins=[runstate.lightning.CheckpointIO()], callbacks=[checkpoint, runstate.lightning.ExactResume()],
        )  # fmt: skip

    first = trainer(8)
    first.fit(Logged(tmp_path / "log.jsonl", None), Data())
    callback = first.checkpoint_callback
    assert callback is not None and len(callback.best_k_models) == 2
    visible = sorted(p for p in os.listdir(tmp_path / "ckpt") if not p.startswith("."))
    assert visible == sorted([*(os.path.basename(p) for p in callback.best_k_models), "last.ckpt"])
    best = callback.best_model_path
    best_step = runstate.lightning.CheckpointIO().load_checkpoint(best)["global_step"]
    second = trainer(10)
    second.fit(Logged(tmp_path / "log2.jsonl", None), Data(), ckpt_path=best)
    assert [r["step"] for r in log_of_file(tmp_path / "log2.jsonl")] == list(range(best_step, 10))


def log_of_file(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]
