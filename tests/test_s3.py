"""runstate against a real S3 API (moto's server on loopback): exact resume, multipart, SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import runstate
from tests.conftest import fresh_training_state, make_training_state, s3_options
from tests.e2e.s3_kill_saver import state as kill_state

ROOT = Path(__file__).resolve().parents[1]


def _client(endpoint: str) -> Any:
    import boto3

    return boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
        region_name="us-east-1",
    )


def test_torch_model_and_optimizer_resume_bit_exactly(s3_endpoint: str, s3_bucket: str) -> None:
    url, options = f"s3://{s3_bucket}/exp", s3_options(s3_endpoint)
    saved = make_training_state(hidden=64)
    with runstate.CheckpointManager(url, storage_options=options, keep_last=2) as mgr:
        for step in (10, 20, 30):
            mgr.save(step, saved, metrics={"loss": 1.0 / step}, force=True)
        assert mgr.steps() == [20, 30]  # retention on S3
    keys = {o["Key"] for o in _client(s3_endpoint).list_objects_v2(Bucket=s3_bucket)["Contents"]}
    assert not any(k.startswith("exp/step-000000000010/") for k in keys)
    restored = fresh_training_state(hidden=64)
    with runstate.CheckpointManager(url, storage_options=options) as mgr:
        assert mgr.restore(restored) == 30
        assert mgr.info(30).metrics == {"loss": pytest.approx(1 / 30)}
    for (k, a), (_, b) in zip(saved["model"].state_dict().items(), restored["model"].state_dict().items()):
        assert torch.equal(a, b), k
    sa, sb = saved["optimizer"].state_dict(), restored["optimizer"].state_dict()
    for p in sa["state"]:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(sa["state"][p][name], sb["state"][p][name])
    assert restored["scheduler"].state_dict() == saved["scheduler"].state_dict()
    with torch.no_grad():  # negative control: a different model does not compare equal
        assert not torch.equal(fresh_training_state(hidden=64)["model"][0].weight, saved["model"][0].weight)


def test_a_large_file_is_uploaded_in_several_parts(s3_endpoint: str, s3_bucket: str) -> None:
    url, options = f"s3://{s3_bucket}/exp", s3_options(s3_endpoint, block_size=5 * 1024 * 1024)
    big = {f"t{i}": np.full(6 * 1024 * 1024 // 4, i, np.float32) for i in range(3)}  # 18 MiB in one file
    small = {"x": np.arange(10.0)}
    with runstate.CheckpointManager(url, storage_options=options) as mgr:
        mgr.save(1, {"big": big, "small": small}, force=True)
    client = _client(s3_endpoint)
    etag_big = client.head_object(Bucket=s3_bucket, Key="exp/step-000000000001/big.safetensors")["ETag"]
    etag_small = client.head_object(Bucket=s3_bucket, Key="exp/step-000000000001/small.safetensors")["ETag"]
    parts = int(etag_big.strip('"').rpartition("-")[2])  # a multipart ETag ends in -<number of parts>
    assert parts >= 3, etag_big
    assert "-" not in etag_small  # negative control: a small file is one plain PUT
    got = runstate.load(f"{url}/step-000000000001", storage_options=options)
    assert all(np.array_equal(got["big"][k], v) for k, v in big.items())


def test_writer_killed_mid_upload_leaves_only_the_previous_step(s3_endpoint: str, s3_bucket: str) -> None:
    url, options = f"s3://{s3_bucket}/exp", s3_options(s3_endpoint)
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.e2e.s3_kill_saver", s3_endpoint, url],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "committed 1"
        assert proc.stdout.readline().strip() == "uploaded"  # one file of step 2 done, others in flight
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    reader = runstate.CheckpointManager(url, storage_options=options, read_only=True)
    assert reader.steps() == [1]
    assert reader.leftovers() == [f"{url}/step-000000000002"]  # at least one complete file, no manifest
    client = _client(s3_endpoint)
    left = [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="exp/step-000000000002/")["Contents"]]
    assert left and "exp/step-000000000002/manifest.json" not in left
    state: dict[str, Any] = kill_state(0, big=False)
    assert reader.restore(state) == 1
    assert state["step"] == 1 and np.all(state["layer3"]["w"] == 13)
    with runstate.CheckpointManager(url, storage_options=options) as mgr:  # the dead writer's lock is taken over
        mgr.save(2, kill_state(2, big=True), force=True)
        assert mgr.leftovers() == []
        assert mgr.steps() == [1, 2]
        assert runstate.verify(mgr.path(2), storage_options=options).ok


def test_fsspec_is_not_imported_for_plain_paths(tmp_path: Path) -> None:
    code = (
        "import sys, runstate; m = runstate.CheckpointManager(sys.argv[1]); m.save(1, {'a': 1}, force=True);"
        "runstate.load(m.path(1)); print('fsspec' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "run")], capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    assert out.stdout.strip() == "False"


def test_storage_options_are_refused_for_plain_paths(tmp_path: Path) -> None:
    with pytest.raises(runstate.CheckpointError, match="only apply to URLs"):
        runstate.CheckpointManager(tmp_path, storage_options={"key": "x"})


def test_readme_object_storage_example_runs(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    text = (ROOT / "README.md").read_text().split("## Object storage", 1)[1]
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    assert "http://127.0.0.1:9000" in code
    code = code.replace("http://127.0.0.1:9000", s3_endpoint)
    _client(s3_endpoint).create_bucket(Bucket="my-bucket")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    weights = {"w": np.zeros(4)}

    def train_step() -> None:
        weights["w"] += 1

    scope: dict[str, Any] = {"state": {"model": weights}, "train_step": train_step}
    exec(compile(code, "README.md", "exec"), scope)
    mgr = runstate.CheckpointManager("s3://my-bucket/runs/exp", storage_options=scope["options"])
    assert mgr.steps() == [800, 900, 1000]
    assert np.array_equal(runstate.load(mgr.path(1000), storage_options=scope["options"])["model"]["w"], np.full(4, 1000.0))


def test_cli_reads_runs_on_s3(s3_endpoint: str, s3_bucket: str) -> None:
    """ls, show, verify and diff take URLs; credentials and endpoint come from the environment."""
    url, options = f"s3://{s3_bucket}/cli", s3_options(s3_endpoint)
    with runstate.CheckpointManager(url, storage_options=options) as mgr:
        mgr.save(1, {"w": np.arange(4.0)})
        mgr.save(2, {"w": np.arange(4.0) + 1}, metrics={"loss": 0.5})
    env = {
        **os.environ,
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "runstate", *args], env=env, capture_output=True, text=True)

    listed = cli("ls", url)
    assert listed.returncode == 0, listed.stderr
    assert "2 checkpoints (latest step 2)" in listed.stdout and "loss=0.5" in listed.stdout
    shown = cli("show", f"{url}/step-000000000002")
    assert shown.returncode == 0 and "F64" in shown.stdout
    verified = cli("verify", url)
    assert verified.returncode == 0 and "2 of 2 checkpoints passed" in verified.stdout
    differ = cli("diff", f"{url}/step-000000000001", f"{url}/step-000000000002")
    assert differ.returncode == 1, differ.stderr  # the tensors differ
    missing = cli("ls", f"s3://{s3_bucket}/nothing-here")
    assert missing.returncode == 0 and "no checkpoints" in missing.stdout
