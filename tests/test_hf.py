"""runstate.hf: a transformers.Trainer and an Accelerate loop, killed and resumed, end bit-identical.

The end-to-end tests run tests/hf_job.py (a tiny GPT-2 with dropout, AdamW, linear warmup +
cosine, gradient accumulation 2, 6 optimizer steps per epoch, 2 epochs; checkpoints every 3
steps) in real processes that SIGKILL or SIGTERM themselves, and compare the final parameters,
the AdamW moments and every logged loss, bit for bit, with a run that was never stopped. The
negative control resumes the weights only and must differ. One job server imports
transformers once and forks a process per job (importing it takes seconds).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import zipfile
from pathlib import Path
from typing import Any

import pytest

from tests.forkserver import Jobs, job_env

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
torch = pytest.importorskip("torch")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "tests" / "hf_job.py"
ENV = job_env()
EXIT_PREEMPTED = 75


def test_import_runstate_hf_imports_neither_transformers_nor_accelerate() -> None:
    code = (
        "import sys, runstate, runstate.hf\n"
        "heavy = {'transformers', 'accelerate', 'torch', 'datasets'} & set(sys.modules)\n"
        "assert not heavy, sorted(heavy)\n"
        "assert runstate.hf is runstate.__getattr__('hf')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def flip_a_byte(checkpoint: Path) -> None:
    path = checkpoint / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # in the tensor data, past the header
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every job, in streams run side by side."""
    base = tmp_path_factory.mktemp("hf")
    dirs = {
        name: base / name
        for name in (
            "reference",
            "runstate",
            "weights",
            "aug_reference",
            "aug",
            "acc_reference",
            "acc",
            "own_reference",
            "own",
            "doc_trainer",
            "doc_accelerate",
            "own_partial",
            "partial",
            "own_plain_reference",
            "own_corrupt",
            "own_plain",
            "own_mid",
            "refusals",
            "acc_own_reference",
            "acc_own",
            "acc_plain",
            "iter_reference",
            "iter",
            "own_iter_reference",
            "own_iter",
            "no_cadence",
            "term_in_save",
            "acc_torn",
            "acc_own_torn",
            "acc_own_torn_rng",
        )
    }
    errors: list[BaseException] = []
    jobs = Jobs(JOB, ENV)

    def runstate_stream() -> None:
        run = dirs["runstate"]
        # Killed at step 5: resumes from step 3 (mid-epoch, with loss accumulated since the log at step 2).
        jobs.run(run, "trainer", "--kill-at", "5", expect=-signal.SIGKILL)
        shutil.copytree(run / "ckpt", dirs["weights"] / "ckpt")
        jobs.run(run, "trainer", "--kill-at", "10", expect=-signal.SIGKILL)
        # Steps 3, 6, 9 are on disk; damage 9: the next run resumes from 6 (the end of epoch 1).
        flip_a_byte(run / "ckpt" / "step-000000000009")
        jobs.run(run, "trainer", "--term-at", "8", expect=EXIT_PREEMPTED)  # saves step 8 and stops
        jobs.run(run, "trainer")

    def own_corrupt_stream() -> None:
        run = dirs["own_corrupt"]
        jobs.run(run, "own", "--kill-at", "8", expect=-signal.SIGKILL)
        flip_a_byte(run / "hf" / "checkpoint-6")
        jobs.run(run, "own")

    def stream(name: str, *chain: tuple[tuple[str, ...], int]) -> Any:
        def go() -> None:
            for args, expect in chain:
                jobs.run(dirs[name], *args, expect=expect)

        return go

    kill = -signal.SIGKILL
    aug = ("trainer", "--augment", "--workers", "2")
    acc = ("accelerate", "--augment", "--workers", "2")
    streams = [
        runstate_stream,
        stream("reference", (("trainer", "--export"), 0)),
        stream("aug_reference", (aug, 0)),
        # The second run saves asynchronously (CheckpointManager(async_save=True)).
        stream("aug", ((*aug, "--kill-at", "5"), kill), ((*aug, "--async-save", "--kill-at", "8"), kill), (aug, 0)),
        stream("acc_reference", (acc, 0)),
        stream("acc", ((*acc, "--kill-at", "5"), kill), ((*acc, "--kill-at", "8"), kill), (acc, 0)),
        # The Trainer's own checkpoints and resume_from_checkpoint=True, in the same configuration.
        stream("own_reference", (("own", "--augment", "--workers", "2"), 0)),
        stream(
            "own",
            (("own", "--augment", "--workers", "2", "--kill-at", "5"), kill),
            (("own", "--augment", "--workers", "2"), 0),
        ),
        # SIGKILL in the middle of the checkpoint of step 6, then run again.
        stream("refusals", (("refusals",), 0)),
        # A plain Accelerate loop (no augmentation, no workers): runstate, and accelerate's own
        # save_state / load_state + skip_first_batches, each killed at step 5.
        stream("acc_own_reference", (("accelerate-own",), 0)),
        stream("acc_own", (("accelerate-own", "--kill-at", "5"), kill), (("accelerate-own",), 0)),
        stream("acc_plain", (("accelerate", "--kill-at", "5"), kill), (("accelerate",), 0)),
        stream("iter_reference", (("trainer", "--iterable"), 0)),
        stream(
            "iter",
            (("trainer", "--iterable", "--kill-at", "5"), kill),
            (("trainer", "--iterable", "--kill-at", "10"), kill),
            (("trainer", "--iterable"), 0),
        ),
        stream("own_iter_reference", (("own", "--iterable"), 0)),
        stream("own_iter", (("own", "--iterable", "--kill-at", "10"), kill), (("own", "--iterable"), 0)),
        stream("own_plain_reference", (("own",), 0)),
        stream("own_plain", (("own", "--kill-at", "8"), kill), (("own",), 0)),
        stream("own_mid", (("own", "--kill-at", "5"), kill), (("own",), 0)),
        own_corrupt_stream,
        stream("own_partial", (("own", "--kill-in-save", "6"), kill), (("own",), 1)),
        stream("partial", (("trainer", "--kill-in-save", "6"), kill), (("trainer",), 0)),
        # A manager without a cadence of its own: saves at the Trainer's save_steps (4, not the 3 above).
        stream(
            "no_cadence",
            (("trainer", "--no-cadence", "--every", "4", "--kill-at", "7"), kill),
            (("trainer", "--no-cadence", "--every", "4"), 0),
        ),
        # A real SIGTERM during the save of step 6, the last step of epoch 1.
        stream("term_in_save", (("trainer", "--term-in-save", "6"), EXIT_PREEMPTED), (("trainer",), 0)),
        # SIGKILL while the optimizer's file of step 6 is half written: runstate, then accelerate's
        # own save_state (torn optimizer.bin; torn random_states_0.pkl, its last file).
        stream("acc_torn", (("accelerate", "--kill-in-save", "6"), kill), (("accelerate",), 0)),
        stream("acc_own_torn", (("accelerate-own", "--kill-in-save", "6"), kill), (("accelerate-own",), 1)),
        stream(
            "acc_own_torn_rng",
            (("accelerate-own", "--kill-in-save", "6", "--in-file", "random_states_0.pkl"), kill),
            (("accelerate-own",), 0),
        ),
        stream("doc_trainer", (("doc", "--example", "trainer"), 0), (("doc", "--example", "trainer"), 0)),
        stream("doc_accelerate", (("doc", "--example", "accelerate"), 0), (("doc", "--example", "accelerate"), 0)),
    ]

    def guarded(fn: Any) -> Any:
        def go() -> None:
            try:
                fn()
            except BaseException as exc:  # reported in the test thread
                errors.append(exc)

        return go

    threads = [threading.Thread(target=guarded(fn)) for fn in streams]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # The negative control resumes from the copy of the checkpoint the first kill left.
    try:
        jobs.run(dirs["weights"], "weights")
    except BaseException as exc:
        errors.append(exc)
    jobs.close()
    if errors:
        raise errors[0]
    return dirs


@pytest.mark.e2e
def test_runstate_run_restarts_a_killed_then_preempted_trainer(runs: dict[str, Path], tmp_path: Path) -> None:
    # Under the supervisor: SIGKILLed at step 5 on the first start, SIGTERMed at step 8 on the
    # second (it saves and exits 75); each start resumes by itself.
    command = [sys.executable, str(JOB), str(tmp_path), "trainer", "--kill-at", "5", "--term-at", "8"]
    proc = subprocess.run(
        [sys.executable, "-m", "runstate", "run", "--max-restarts", "2", "--backoff", "0", "--", *command],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert starts(tmp_path) == [0, 3, 8]
    assert_bit_identical(final(tmp_path), final(runs["reference"]))
    assert losses(tmp_path) == losses(runs["reference"])


def final(run_dir: Path) -> dict[str, Any]:
    return load_file(str(run_dir / "final.safetensors"))


def losses(run_dir: Path) -> list[float]:
    result: list[float] = json.loads((run_dir / "log.json").read_text())
    return result


def starts(run_dir: Path) -> list[int]:
    return [int(line) for line in (run_dir / "starts.txt").read_text().split()]


def assert_bit_identical(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not (a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]))]
    assert not different, different[:5]


@pytest.mark.e2e
def test_trainer_killed_preempted_and_resumed_ends_bit_identical(runs: dict[str, Path]) -> None:
    # Each process started where the previous one left a checkpoint: 3 after the kill at 5,
    # 6 after the kill at 10 (9 was damaged), 8 after the SIGTERM at 8.
    assert starts(runs["runstate"]) == [0, 3, 6, 8]
    assert starts(runs["reference"]) == [0]
    tensors = final(runs["reference"])
    assert any(k.startswith("opt.") for k in tensors) and any(k.startswith("param.") for k in tensors)
    assert_bit_identical(final(runs["runstate"]), tensors)
    assert losses(runs["runstate"]) == losses(runs["reference"])
    assert len(losses(runs["reference"])) == 6  # logging_steps=2, 12 steps


@pytest.mark.e2e
def test_damaged_newest_checkpoint_is_skipped_and_set_aside(runs: dict[str, Path]) -> None:
    ckpt = runs["runstate"] / "ckpt"
    names = sorted(p.name for p in ckpt.iterdir() if p.name.startswith("step-"))
    assert any(name.startswith("step-000000000009.abandoned-") for name in names), names
    assert "step-000000000009" in names and "step-000000000012" in names  # saved again after the resume from 6


@pytest.mark.e2e
def test_weights_only_resume_differs(runs: dict[str, Path]) -> None:
    # The negative control: the check above can fail.
    assert starts(runs["weights"]) == [0]
    a, b = final(runs["weights"]), final(runs["reference"])
    params = [k for k in a if k.startswith("param.")]
    assert any(not torch.equal(a[k], b[k]) for k in params)
    assert losses(runs["weights"]) != losses(runs["reference"])[-len(losses(runs["weights"])) :]


@pytest.mark.e2e
def test_no_pickle_in_a_trainer_checkpoint(runs: dict[str, Path]) -> None:
    ckpt = runs["reference"] / "ckpt"
    checkpoints = [p for p in ckpt.iterdir() if p.name.startswith("step-")]
    assert checkpoints
    for checkpoint in checkpoints:
        for path in checkpoint.rglob("*"):
            if path.is_dir():
                continue
            head = path.read_bytes()[:2]
            assert head[:1] != b"\x80", f"{path} starts like a pickle"
            if path.name == "manifest.json":
                json.loads(path.read_text())
            else:
                assert path.suffix == ".safetensors", path
                with safe_open(str(path), framework="pt") as f:
                    list(f.keys())
    # The Trainer's own checkpoint-N folders (torch.save, pickle) are never written.
    hf_dir = runs["reference"] / "hf"
    assert not hf_dir.exists() or not any(p.name.startswith("checkpoint-") for p in hf_dir.iterdir())


@pytest.mark.e2e
def test_export_for_from_pretrained_has_equal_parameters(runs: dict[str, Path]) -> None:
    export = runs["reference"] / "export"
    assert sorted(p.name for p in export.iterdir()) == ["config.json", "model.safetensors"]
    result = json.loads((runs["reference"] / "export.json").read_text())
    assert result["equal"] is True and result["parameters"] > 0


@pytest.mark.e2e
def test_cli_export_hf_writes_what_from_pretrained_loaded(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "export"
    command = ["export", "--hf", str(runs["reference"] / "ckpt"), "--step", "latest", "-o", str(out)]
    proc = subprocess.run([sys.executable, "-m", "runstate", *command], env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    exported = runs["reference"] / "export"  # written by export_pretrained, loaded by from_pretrained
    assert json.loads((out / "config.json").read_text())["n_layer"] == 2
    assert_bit_identical(load_file(str(out / "model.safetensors")), load_file(str(exported / "model.safetensors")))
    again = subprocess.run([sys.executable, "-m", "runstate", *command], env=ENV, capture_output=True, text=True)
    assert again.returncode == 2 and "--force" in again.stderr


@pytest.mark.e2e
def test_trainer_with_two_workers_and_random_augmentation_resumes_exactly(runs: dict[str, Path]) -> None:
    # Worker processes shift every sample by an amount drawn from Python's, NumPy's and torch's
    # RNGs; killed mid-epoch (5 -> 3) and after an epoch end (8 -> 6; the second run saved
    # asynchronously: should the kill have come before step 6 was committed, it resumes from 3).
    assert starts(runs["aug"]) in ([0, 3, 6], [0, 3, 3])
    assert_bit_identical(final(runs["aug"]), final(runs["aug_reference"]))
    assert losses(runs["aug"]) == losses(runs["aug_reference"])


@pytest.mark.e2e
def test_accelerate_loop_resumes_exactly(runs: dict[str, Path]) -> None:
    # accelerator.prepare(model, optimizer, loader, scheduler), accelerator.accumulate, a
    # stateful prepared loader with two workers and random augmentation.
    assert starts(runs["acc"]) == [0, 3, 6]
    assert_bit_identical(final(runs["acc"]), final(runs["acc_reference"]))
    assert losses(runs["acc"]) == losses(runs["acc_reference"])
    assert losses(runs["acc"]) != losses(runs["reference"])  # a different loop, not a copied file


@pytest.mark.e2e
def test_docs_examples_run_as_printed_and_resume(runs: dict[str, Path]) -> None:
    # docs/huggingface.md's two examples, each run twice in a fresh process: the second resumes
    # from the first's last checkpoint and trains nothing more.
    text = (ROOT / "docs" / "huggingface.md").read_text()
    assert text.count("```python") == text.count("<!-- example: ") == 2  # every python block is run
    trainer = [json.loads(line) for line in (runs["doc_trainer"] / "doc.jsonl").read_text().splitlines()]
    last = trainer[0]["steps"][-1]
    assert [r["first_step"] for r in trainer] == [0, last] and last == 12 and [r["exit"] for r in trainer] == [0, 0]
    acc = [json.loads(line) for line in (runs["doc_accelerate"] / "doc.jsonl").read_text().splitlines()]
    assert [r["first_step"] for r in acc] == [0, 12] and acc[0]["steps"] == [4, 8, 12]


@pytest.mark.e2e
def test_trainer_own_resume_side_by_side(runs: dict[str, Path]) -> None:
    # Measured on transformers 5.24, not a runstate guarantee: the same run (2 workers, random
    # augmentation), killed at step 5, resumed by the Trainer itself from checkpoint-3.
    own = runs["own"] / "hf" / "checkpoint-3"
    assert starts(runs["own"]) == [0, 3]
    a, b = final(runs["own"]), final(runs["own_reference"])
    differs = [k for k in a if k.startswith("param.") and not torch.equal(a[k], b[k])]
    assert differs, "the Trainer's own resume became exact here: update docs/huggingface.md"
    # Its optimizer, scheduler and RNG files are torch.save archives: pickle inside.
    pickled = [
        p.name
        for p in own.iterdir()
        if zipfile.is_zipfile(p) and any(n.endswith(".pkl") for n in zipfile.ZipFile(p).namelist())
    ]
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth"} <= set(pickled), pickled


@pytest.mark.e2e
def test_kill_during_a_save_side_by_side(runs: dict[str, Path]) -> None:
    # runstate: the interrupted step 6 never became visible; the next run resumed from step 3
    # and ended bit-identical.
    assert starts(runs["partial"]) == [0, 3]
    assert_bit_identical(final(runs["partial"]), final(runs["reference"]))
    # The Trainer's own (measured on transformers 5.24): the partial checkpoint-6 folder stays,
    # resume_from_checkpoint=True picks it as the newest, and every restart fails on it.
    partial = runs["own_partial"] / "hf" / "checkpoint-6"
    assert partial.is_dir() and not (partial / "trainer_state.json").exists()
    assert "Can't find a valid checkpoint at" in (runs["own_partial"] / "output.txt").read_text()


@pytest.mark.e2e
def test_damaged_byte_side_by_side(runs: dict[str, Path]) -> None:
    # runstate: see test_damaged_newest_checkpoint_is_skipped_and_set_aside. The Trainer's own
    # (measured on transformers 5.24): one flipped byte in checkpoint-6's model.safetensors is
    # loaded without a word, and the run ends with other parameters than the undamaged one.
    # Without the damage, the same resume is bit-identical (as the Trainer's own resume is, for
    # this plain run): the difference below is the flipped byte.
    assert starts(runs["own_plain"]) == [0, 6]
    assert_bit_identical(final(runs["own_plain"]), final(runs["own_plain_reference"]))
    output = (runs["own_corrupt"] / "output.txt").read_text()
    assert "Traceback" not in output
    assert starts(runs["own_corrupt"]) == [0, 6]
    a, b = final(runs["own_corrupt"]), final(runs["own_plain_reference"])
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("param."))


@pytest.mark.e2e
def test_trainer_own_resume_between_two_logs_side_by_side(runs: dict[str, Path]) -> None:
    # Measured on transformers 5.24: killed at 5, the Trainer resumes from checkpoint-3 with
    # bit-identical parameters, but the loss it logs at step 4 averages step 4 alone (runstate
    # logs the uninterrupted average of steps 3 and 4: see the first test).
    assert starts(runs["own_mid"]) == [0, 3]
    assert_bit_identical(final(runs["own_mid"]), final(runs["own_plain_reference"]))
    own, reference = losses(runs["own_mid"]), losses(runs["own_plain_reference"])
    assert own[0] == reference[0] and own[1] != reference[1] and own[2:] == reference[2:]


@pytest.mark.e2e
def test_attach_refuses_what_it_cannot_resume_exactly(runs: dict[str, Path]) -> None:
    found = json.loads((runs["refusals"] / "errors.json").read_text())
    config_error = "runstate.errors.CheckpointConfigError"
    assert found["not_a_trainer"] == [
        config_error,
        "runstate.hf.attach: expected a transformers.Trainer (or a subclass), got object",
    ]
    assert found["ignore_data_skip"][0] == config_error and "ignore_data_skip=True" in found["ignore_data_skip"][1]
    assert found["group_by_length"][0] == config_error and "'group_by_length'" in found["group_by_length"][1]
    assert found["twice"] == [config_error, "runstate.hf.attach: this Trainer is attached already"]
    assert found["resume_argument"][0] == config_error
    assert "call trainer.train() without resume_from_checkpoint" in found["resume_argument"][1]


@pytest.mark.e2e
def test_trainer_over_an_iterable_dataset_resumes_exactly(runs: dict[str, Path]) -> None:
    # A Hugging Face IterableDataset in 4 shards whose order changes every epoch (set_epoch),
    # max_steps=12 (two passes): killed in the first pass (5 -> 3) and in the second (10 -> 9),
    # where the Trainer counts epoch 0 again.
    assert starts(runs["iter"]) == [0, 3, 9]
    assert_bit_identical(final(runs["iter"]), final(runs["iter_reference"]))
    assert losses(runs["iter"]) == losses(runs["iter_reference"])
    # The Trainer's own resume in the second pass (measured on transformers 5.24) differs.
    assert starts(runs["own_iter"]) == [0, 9]
    own, reference = final(runs["own_iter"]), final(runs["own_iter_reference"])
    assert any(not torch.equal(own[k], reference[k]) for k in own if k.startswith("param."))


@pytest.mark.e2e
def test_attach_changes_nothing_about_an_uninterrupted_run(runs: dict[str, Path]) -> None:
    # The same runs with and without attach, never stopped: same data order, same dropout,
    # bit-identical results (plain, two workers with augmentation, an IterableDataset).
    for attached, own in (
        ("reference", "own_plain_reference"),
        ("aug_reference", "own_reference"),
        ("iter_reference", "own_iter_reference"),
    ):
        assert_bit_identical(final(runs[attached]), final(runs[own]))
        assert losses(runs[attached]) == losses(runs[own])


@pytest.mark.e2e
def test_accelerate_own_save_state_side_by_side(runs: dict[str, Path]) -> None:
    # The same plain loop, killed at step 5 and resumed from step 3. runstate: bit-identical.
    assert starts(runs["acc_plain"]) == [0, 3]
    assert_bit_identical(final(runs["acc_plain"]), final(runs["acc_own_reference"]))
    assert losses(runs["acc_plain"]) == losses(runs["acc_own_reference"])
    # accelerate's own (measured on accelerate 1.15): load_state puts the RNGs back before the
    # skipped loader's iterator draws its seed from them, so the dropout after the resume differs;
    # its RNG file is a pickle.
    assert starts(runs["acc_own"]) == [0, 3]
    own, reference = losses(runs["acc_own"]), losses(runs["acc_own_reference"])
    assert own[:3] == reference[:3] and own[3] != reference[3]
    assert (runs["acc_own"] / "acc_state" / "step-3" / "random_states_0.pkl").is_file()


@pytest.mark.e2e
def test_kill_during_accelerate_save_state_side_by_side(runs: dict[str, Path]) -> None:
    # The same plain Accelerate loop, SIGKILLed at step 6 while the optimizer's file is half
    # written, then run again. runstate: the half-written checkpoint was never committed; the
    # next run resumed from step 3 and ended bit-identical to the loop never stopped.
    torn = json.loads((runs["acc_torn"] / "at_kill.json").read_text())
    assert torn["folder"].startswith(".tmp-step-000000000006-") and "manifest.json" not in torn["files"], torn
    assert starts(runs["acc_torn"]) == [0, 3]
    assert_bit_identical(final(runs["acc_torn"]), final(runs["acc_own_reference"]))
    assert losses(runs["acc_torn"]) == losses(runs["acc_own_reference"])
    # accelerate's own (measured on accelerate 1.15): save_state writes step-6/ in place. With
    # optimizer.bin torn, load_state on that folder loads the model's weights from it, then
    # raises on optimizer.bin; every restart fails the same way until someone deletes the folder.
    torn = json.loads((runs["acc_own_torn"] / "at_kill.json").read_text())
    assert torn["folder"] == "step-6" and "optimizer.bin" in torn["files"] and "scheduler.bin" not in torn["files"]
    output = (runs["acc_own_torn"] / "output.txt").read_text()
    assert "All model weights loaded successfully" in output
    assert "failed finding central directory" in output and "All optimizer states loaded" not in output
    assert starts(runs["acc_own_torn"]) == [0]  # the second run died in load_state, before training
    # With its last file (random_states_0.pkl) torn, load_state loads the rest and skips the RNGs
    # with an INFO log line only: the run goes on silently from a partial state.
    torn = json.loads((runs["acc_own_torn_rng"] / "at_kill.json").read_text())
    assert {"optimizer.bin", "scheduler.bin", "random_states_0.pkl"} <= set(torn["files"]), torn
    output = (runs["acc_own_torn_rng"] / "output.txt").read_text()
    assert "Could not load random states" in output and "Traceback" not in output
    assert starts(runs["acc_own_torn_rng"]) == [0, 6]


@pytest.mark.e2e
def test_manager_without_cadence_saves_at_the_trainer_save_steps(runs: dict[str, Path]) -> None:
    # CheckpointManager() with no save_every_steps/save_every_seconds, TrainingArguments
    # save_steps=4: checkpoints at 4, 8, 12 (keep_last=3); killed at 7, resumed from 4.
    ckpt = runs["no_cadence"] / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith("step-")) == [
        "step-000000000004",
        "step-000000000008",
        "step-000000000012",
    ]
    assert starts(runs["no_cadence"]) == [0, 4]
    assert_bit_identical(final(runs["no_cadence"]), final(runs["reference"]))
    assert losses(runs["no_cadence"]) == losses(runs["reference"])


@pytest.mark.e2e
def test_a_stateful_callback_survives_every_resume(runs: dict[str, Path]) -> None:
    # Seen (an ExportableState callback) records every global step it sees; the TrainerState's
    # stateful_callbacks bring its list back at each resume (3, 6, 8 in the killed run), so the
    # last process ends with all 12 steps, as the uninterrupted run does. Lost: [9, 10, 11, 12].
    every_step = list(range(1, 13))
    assert json.loads((runs["reference"] / "seen.json").read_text()) == every_step
    assert starts(runs["runstate"]) == [0, 3, 6, 8]
    assert json.loads((runs["runstate"] / "seen.json").read_text()) == every_step


@pytest.mark.e2e
def test_sigterm_during_the_save_of_a_step_saves_the_next_step_and_exits_75(runs: dict[str, Path]) -> None:
    # The SIGTERM arrived while step 6 (an epoch's last) was being saved, so that save does not
    # count as the preemption save: the Trainer trained step 7, saved it and exited 75 (not at
    # the epoch end with exit 0 and nothing saved after the signal); the next run went on from 7.
    assert starts(runs["term_in_save"]) == [0, 7]
    ckpt = runs["term_in_save"] / "ckpt"
    assert "step-000000000007" in {p.name for p in ckpt.iterdir()}
    assert_bit_identical(final(runs["term_in_save"]), final(runs["reference"]))
    assert losses(runs["term_in_save"]) == losses(runs["reference"])
