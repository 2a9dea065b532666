"""runstate.torch: the resumable sampler, per-sample seeding and the loader built from them."""

from __future__ import annotations

import logging
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from runstate.torch import ResumableSampler, SampleIndex, SeededDataset, resumable_loader


def test_sampler_order_depends_on_seed_and_epoch_only() -> None:
    a, b = ResumableSampler(20, seed=1), ResumableSampler(20, seed=1)
    torch.manual_seed(123)  # the global RNG plays no part
    e0, e1 = list(a), list(a)
    assert sorted(e0) == list(range(20)) and e0 != e1 and a.epoch == 2
    assert [i.epoch for i in e0] == [0] * 20 and [i.epoch for i in e1] == [1] * 20
    assert list(b) == e0
    assert list(ResumableSampler(20, seed=2)) != e0
    assert list(ResumableSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]


def test_sampler_resumes_mid_epoch() -> None:
    ref = ResumableSampler(10, seed=4)
    full = list(ref) + list(ref)
    s = ResumableSampler(10, seed=4)
    it = iter(s)
    head = [next(it) for _ in range(7)]
    saved = s.state_dict()
    assert saved["epoch"] == 0 and saved["position"] == 7
    resumed = ResumableSampler(10, seed=4)
    resumed.load_state_dict(saved)
    assert head + list(resumed) + list(resumed) == full


def test_sampler_refuses_a_different_order_definition() -> None:
    saved = ResumableSampler(10, seed=4).state_dict()
    with pytest.raises(ValueError, match="saved seed=4 but this sampler has seed=5"):
        ResumableSampler(10, seed=5).load_state_dict(saved)
    with pytest.raises(ValueError, match="num_samples"):
        ResumableSampler(11, seed=4).load_state_dict(saved)


def test_sample_index_is_an_int_that_survives_pickling_to_workers() -> None:
    i = SampleIndex(3, epoch=2)
    assert i == 3 and [10, 11, 12, 13][i] == 13
    j = pickle.loads(pickle.dumps(i))  # what multiprocessing does to send it to a worker
    assert j == 3 and j.epoch == 2


class Noisy(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        return (random.random(), float(np.random.rand()), torch.rand(()).item())


def test_seeded_dataset_is_a_function_of_seed_epoch_and_index() -> None:
    ds = SeededDataset(Noisy(), seed=0)
    assert ds[SampleIndex(1, 0)] == ds[SampleIndex(1, 0)]
    assert ds[SampleIndex(1, 0)] != ds[SampleIndex(1, 1)] != ds[SampleIndex(2, 1)]
    assert SeededDataset(Noisy(), seed=1)[SampleIndex(1, 0)] != ds[SampleIndex(1, 0)]


def test_seeded_dataset_leaves_the_main_process_generators_alone() -> None:
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    expected = (random.random(), float(np.random.rand()), torch.rand(()).item())
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    SeededDataset(Noisy(), seed=0)[SampleIndex(2, 3)]
    assert (random.random(), float(np.random.rand()), torch.rand(()).item()) == expected


def check_loader_resumes_exactly(workers: int) -> None:
    """Interrupted after 3 batches and resumed in a fresh loader: the same 7 batches, and the
    global torch RNG (dropout) sees the same draws."""

    def make():
        return resumable_loader(Noisy(), batch_size=3, seed=5, num_workers=workers)

    def draw(loader, n, stop=None):
        out = []
        while len(out) < n:
            for batch in loader:
                out.append([t.tolist() for t in batch] + [torch.rand(()).item()])
                if len(out) == stop:
                    return out, loader.state_dict(), torch.get_rng_state()
                if len(out) == n:
                    break
        return out, None, None

    torch.manual_seed(0)
    ref, _, _ = draw(make(), 7)
    torch.manual_seed(0)
    head, saved, rng = draw(make(), 7, stop=3)
    torch.manual_seed(99)
    loader = make()
    loader.load_state_dict(saved)
    torch.set_rng_state(rng)
    tail, _, _ = draw(loader, 4)
    assert head + tail == ref


def test_loader_resumes_exactly_and_never_touches_the_global_rng() -> None:
    check_loader_resumes_exactly(0)


def test_loader_with_worker_processes_resumes_exactly() -> None:
    # In a fresh process: forking DataLoader workers from a pytest worker that has imported
    # jax (keras imports it) risks a deadlock.
    root = Path(__file__).resolve().parents[1]
    code = "from tests.test_torch_data import check_loader_resumes_exactly as c; c(2); print('ok')"
    env = {**os.environ, "PYTHONPATH": f"{root / 'src'}{os.pathsep}{root}", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_loader_rejects_arguments_it_sets() -> None:
    with pytest.raises(TypeError, match="resumable_loader sets sampler itself"):
        resumable_loader(Noisy(), sampler=[0, 1])


# --- Loaders as users write them (runstate.adapters.torch_data / runstate.adapters.data) ---


class Augmented(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int):
        return torch.tensor([float(i), random.random(), float(np.random.rand()), torch.rand(()).item()])


def _sdl(generator: bool):
    from torchdata.stateful_dataloader import StatefulDataLoader

    gen = torch.Generator().manual_seed(3) if generator else None
    return StatefulDataLoader(Augmented(), batch_size=3, shuffle=True, generator=gen)


def _epochs(loader, n_batches: int, out: list, stop: int | None = None) -> bool:
    """Iterate epochs until ``n_batches`` batches in all (or ``stop``); each batch with a dropout-like draw."""
    while len(out) < n_batches:
        for batch in loader:
            out.append((batch.tolist(), torch.rand(()).item()))
            if len(out) in (stop, n_batches):
                return True
    return True


@pytest.mark.parametrize("generator", [False, True], ids=["generator=None", "generator=seeded"])
@pytest.mark.parametrize("stop", [2, 4], ids=["mid-epoch", "epoch-end"])
def test_stateful_dataloader_as_written_resumes_exactly_in_process(tmp_path: Path, generator: bool, stop: int) -> None:
    """The bug: re-creating the iterator after a restore drew from the global RNG (generator=None)
    or lost the loader generator's base_seed draw (generator=g: later epochs shuffled otherwise)."""
    import runstate

    def state_of(loader):
        return {"loader": loader, "rng": runstate.RNG()}

    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    ref: list = []
    loader = _sdl(generator)
    _epochs(loader, 11, ref)
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    head: list = []
    loader = _sdl(generator)
    _epochs(loader, 11, head, stop=stop)
    runstate.save(tmp_path / "ckpt", state_of(loader), step=stop)
    random.seed(5), np.random.seed(5), torch.manual_seed(5)  # a fresh process's generators differ
    resumed = _sdl(generator)
    runstate.load(tmp_path / "ckpt", state_of(resumed))
    tail: list = []
    _epochs(resumed, 11 - stop, tail)
    assert head + tail == ref


def test_plain_dataloader_is_saved_with_one_warning_naming_the_fix(tmp_path: Path, caplog) -> None:
    import logging

    import runstate

    loader = torch.utils.data.DataLoader(Augmented(), batch_size=2, shuffle=True)
    state = {"model": torch.nn.Linear(2, 2), "train_loader": loader}
    with caplog.at_level(logging.WARNING, logger="runstate"):
        runstate.save(tmp_path / "a", state, step=1)
        runstate.save(tmp_path / "b", state, step=2)
    warnings_ = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings_) == 1, warnings_
    assert "state['train_loader']: a torch.utils.data.DataLoader cannot resume where it stopped" in warnings_[0]
    assert "torchdata.stateful_dataloader.StatefulDataLoader(...)" in warnings_[0]
    caplog.clear()
    fresh = torch.utils.data.DataLoader(Augmented(), batch_size=2, shuffle=True)
    restored = {"model": torch.nn.Linear(2, 2), "train_loader": fresh}
    with caplog.at_level(logging.WARNING, logger="runstate"):
        runstate.load(tmp_path / "b", restored)
    assert restored["train_loader"] is fresh
    assert "state['train_loader']: a torch.utils.data.DataLoader has no saved position" in caplog.text


def test_require_exact_refuses_a_loader_that_cannot_resume(tmp_path: Path) -> None:
    import runstate

    loader = torch.utils.data.DataLoader(Augmented(), batch_size=2)
    with runstate.CheckpointManager(tmp_path / "run", require_exact=True) as mgr:
        with pytest.raises(runstate.UnsupportedTypeError, match=r"state\['loader'\].*require_exact=True"):
            mgr.save(1, {"loader": loader}, force=True)
        with pytest.raises(runstate.UnsupportedTypeError, match=r"state\['batches'\]: a generator"):
            mgr.save(1, {"batches": (b for b in loader)}, force=True)
        assert mgr.steps() == []


def test_iterators_and_generators_are_saved_with_a_warning_and_kept_on_restore(tmp_path: Path, caplog) -> None:
    import logging

    import runstate

    loader = torch.utils.data.DataLoader(Augmented(), batch_size=2)
    it, gen = iter(loader), (b for b in loader)
    with caplog.at_level(logging.WARNING, logger="runstate"):
        runstate.save(tmp_path / "c", {"it": it, "gen": gen}, step=1)
    assert "state['it']: a _SingleProcessDataLoaderIter iterator cannot resume" in caplog.text
    assert "state['gen']: a generator cannot resume" in caplog.text
    live = {"it": iter(loader), "gen": (b for b in loader)}
    kept = dict(live)
    runstate.load(tmp_path / "c", live)
    assert live["it"] is kept["it"] and live["gen"] is kept["gen"]


@pytest.mark.fresh_process  # forks DataLoader workers
def test_exact_is_idempotent_and_keeps_the_users_worker_init_fn() -> None:
    from torchdata.stateful_dataloader import StatefulDataLoader

    from runstate.adapters.torch_data import WorkerInit
    from runstate.torch import exact

    def init(worker_id: int) -> None:
        pass

    loader = StatefulDataLoader(Augmented(), batch_size=2, num_workers=2, worker_init_fn=init)
    assert exact(exact(loader)) is loader
    assert isinstance(loader.worker_init_fn, WorkerInit) and loader.worker_init_fn.user_fn is init
    assert "_runstate" in loader.state_dict()
    assert pickle.loads(pickle.dumps(WorkerInit(None))).user_fn is None  # spawn contexts pickle it
    with pytest.raises(TypeError, match="needs a torchdata StatefulDataLoader"):
        exact(torch.utils.data.DataLoader(Augmented()))


def test_docs_data_loaders_example_resumes_exactly(tmp_path: Path, monkeypatch) -> None:
    """docs/data-loaders.md's example, run as written twice: the second run resumes at step 2
    and sees the same last batch (augmented with the global RNGs) as the first."""
    import re

    import runstate

    text = (Path(__file__).resolve().parents[1] / "docs" / "data-loaders.md").read_text()
    (code,) = re.findall(r"<!-- example: loader -->\n```python\n(.*?)```", text, re.S)
    monkeypatch.chdir(tmp_path)
    spaces = []
    for _ in range(2):
        random.seed(0), np.random.seed(0), torch.manual_seed(0)
        from torchdata.stateful_dataloader import StatefulDataLoader

        ns = {
            "StatefulDataLoader": StatefulDataLoader,
            "dataset": Augmented(),
            "model": torch.nn.Linear(4, 1),
            "runstate": runstate,
            "run_dir": "run",
        }
        exec(compile(code, "docs/data-loaders.md", "exec"), ns)
        spaces.append(ns)
    first, second = spaces
    assert first["step"] == second["step"] == 3 and second["mgr"].steps() == [2]
    assert torch.equal(first["x"], second["x"])


class _Stream(torch.utils.data.IterableDataset):
    """An IterableDataset without state_dict: torchdata resumes it by fast-forwarding."""

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, n = (info.id, info.num_workers) if info is not None else (0, 1)
        yield from (torch.tensor([float(i)]) for i in range(wid, 16, n))


@pytest.mark.fresh_process  # forks DataLoader workers
def test_iterable_dataset_without_state_in_workers_resumes_at_its_position() -> None:
    """The bug: runstate's worker RNG carry gave the dataset a state_dict, so torchdata stopped
    fast-forwarding it, and a resumed loader replayed every worker's stream from its start."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    from runstate.torch import exact

    def loader():
        return exact(StatefulDataLoader(_Stream(), batch_size=2, num_workers=2))

    ref = [b.flatten().tolist() for b in loader()]
    first = loader()
    it = iter(first)
    head = [next(it).flatten().tolist() for _ in range(3)]
    saved = first.state_dict()
    del it, first
    resumed = loader()
    resumed.load_state_dict(saved)
    tail = [b.flatten().tolist() for b in resumed]
    assert head + tail == ref


@pytest.mark.fresh_process  # forks DataLoader workers
def test_require_exact_refuses_a_stateful_loader_whose_worker_rng_is_not_captured(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Workers that cannot carry their RNG state (here: an IterableDataset without state_dict)
    make the resume inexact: a WARNING by default, an error under require_exact=True."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    import runstate

    loader = StatefulDataLoader(_Stream(), batch_size=2, num_workers=2)
    with runstate.CheckpointManager(tmp_path / "strict", require_exact=True) as mgr:
        mgr.restore({"loader": loader})
        it = iter(loader)
        next(it)
        with pytest.raises(runstate.UnsupportedTypeError, match=r"loader.*worker processes.*require_exact=True"):
            mgr.save(1, {"loader": loader})
        assert mgr.steps() == []
    with runstate.CheckpointManager(tmp_path / "lenient") as mgr, caplog.at_level(logging.WARNING, "runstate"):
        mgr.save(1, {"loader": loader})
        mgr.save(2, {"loader": loader})
        assert mgr.steps() == [1, 2]
    assert sum("worker processes is not in the checkpoint" in r.getMessage() for r in caplog.records) == 1
    del it
