"""Every storage backend passes the same conformance suite (tests/storage_conformance.py)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import s3_options
from tests.storage_conformance import Backend, StorageConformance, local_flip_helpers


def _fsspec_helpers(options: dict | None) -> tuple[Callable[[str], bytes], Callable[[str], Callable[[bytes], None]]]:
    import fsspec

    def read(url: str) -> bytes:
        with fsspec.open(url, "rb", **(options or {})) as f:
            return f.read()

    def write(url: str) -> Callable[[bytes], None]:
        def put(data: bytes) -> None:
            with fsspec.open(url, "wb", **(options or {})) as f:
                f.write(data)

        return put

    return read, write


@pytest.fixture(params=["local", "memory", "file", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    kind = request.param
    if kind == "local":
        return Backend(kind, str(tmp_path / "run"), None, *local_flip_helpers())
    pytest.importorskip("fsspec")
    if kind == "memory":
        url = f"memory://runstate-test-{uuid.uuid4().hex}/run"
        return Backend(kind, url, None, *_fsspec_helpers(None))
    if kind == "file":
        return Backend(kind, f"file://{tmp_path}/run", None, *_fsspec_helpers(None))
    bucket = request.getfixturevalue("s3_bucket")
    options = s3_options(request.getfixturevalue("s3_endpoint"))
    return Backend(kind, f"s3://{bucket}/run", options, *_fsspec_helpers(options))


class TestStorageConformance(StorageConformance):
    """The suite, once per backend."""
