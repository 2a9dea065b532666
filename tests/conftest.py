from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn


def make_training_state(seed: int = 0, hidden: int = 8) -> dict:
    """A small model, AdamW and a scheduler after two real steps."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(2):
        model(torch.randn(3, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return {"model": model, "optimizer": opt, "scheduler": sched}


def fresh_training_state(seed: int = 100, hidden: int = 8) -> dict:
    """Same architecture, different weights, optimizer never stepped."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    return {"model": model, "optimizer": opt, "scheduler": sched}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--stress",
        action="store_true",
        default=False,
        help="run the fault-injection and fuzz tests ten times longer (make stress)",
    )


@pytest.fixture
def stress(request: pytest.FixtureRequest) -> bool:
    """True under ``--stress``: fault-injection and fuzz tests scale their trial counts up."""
    return bool(request.config.getoption("--stress"))


# -- tests that fork worker processes run in a fresh interpreter ----------------------------------

_CHILD_ENV = "RUNSTATE_TEST_FRESH_PROCESS"


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run a test marked ``fresh_process`` as its own pytest in a new interpreter.

    A pytest worker has imported whatever earlier tests needed (TensorFlow, JAX and their thread
    pools); a DataLoader worker forked from it has died of SIGSEGV in CI. The same test in a
    fresh interpreter forks from a process that holds only torch, as a user's training script does.
    """
    if pyfuncitem.get_closest_marker("fresh_process") is None or os.environ.get(_CHILD_ENV):
        return None
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, _CHILD_ENV: "1", "PYTHONWARNINGS": "ignore"}
    env.pop("PYTEST_XDIST_WORKER", None)
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", pyfuncitem.nodeid]
    proc = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and " passed" in proc.stdout, proc.stdout[-6000:] + proc.stderr[-3000:]
    return True


# -- a real S3 API on loopback (moto's server mode), for the object-store tests -------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _serving(endpoint: str, timeout: float) -> bool:
    try:
        with urllib.request.urlopen(endpoint + "/", timeout=timeout) as response:
            return int(response.status) < 500
    except urllib.error.HTTPError as exc:
        return exc.code < 500
    except OSError:
        return False


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """``http://127.0.0.1:<free port>``: a moto S3 server, one per xdist worker, loopback only.

    The server runs in its own process, not in a thread of the test worker: a CI run once saw
    the in-process server stop answering for minutes (botocore's ReadTimeoutError on a plain
    ``create_bucket``) while the worker's tests forked, held the GIL in C code or kept threads
    busy. A separate process shares none of that.
    """
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    last_error = ""
    for _attempt in range(5):
        port = _free_port()
        endpoint = f"http://127.0.0.1:{port}"
        # werkzeug logs a line per request; a pipe nobody reads would fill and stall the server
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while process.poll() is None and time.monotonic() < deadline:
            if _serving(endpoint, timeout=2):
                break
            time.sleep(0.1)
        else:
            process.kill()
            last_error = f"port {port}: exit status {process.wait()}"
            continue  # most likely the port was taken between _free_port and the bind
        try:
            yield endpoint
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return
    pytest.fail(f"the moto S3 server did not start on loopback in 5 attempts: {last_error}")


def s3_options(endpoint: str, block_size: int = 5 * 1024 * 1024) -> dict[str, Any]:
    """storage_options for s3fs against the moto server: dummy credentials, small upload parts."""
    return {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
        "default_block_size": block_size,
        "skip_instance_cache": True,
    }


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """A new, empty bucket on the moto server."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:16]}"
    client = boto3.client(
        "s3", endpoint_url=s3_endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=name)
    return name
