"""runstate.torch: the resumable sampler, per-sample seeding and the loader built from them."""

from __future__ import annotations

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
