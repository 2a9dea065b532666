"""Saves to an S3 endpoint and reports each finished tensor file, so a test can SIGKILL it mid-upload.

Usage: python s3_kill_saver.py ENDPOINT URL

Saves step 1 (small), prints ``committed 1``, then saves step 2 (six 6 MiB tensor files,
uploaded in parallel in 5 MiB parts) and prints ``uploaded`` each time a file's upload is
complete, then pauses: the parent kills it while the other files are still being uploaded
(or wait, uncommitted, for the manifest).
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

import numpy as np

import runstate
import runstate._impl.parts as parts_module
from tests.conftest import s3_options


def state(step: int, big: bool) -> dict[str, Any]:
    n = 6 * 1024 * 1024 // 4 if big else 1000
    return {f"layer{i}": {"w": np.full(n, step * 10 + i, np.float32)} for i in range(6)} | {"step": step}


def main() -> None:
    endpoint, url = sys.argv[1], sys.argv[2]
    real = parts_module._write_file
    printing = threading.Lock()  # files finish in parallel threads: one whole line each

    def reporting(*args: Any, **kwargs: Any) -> Any:
        out = real(*args, **kwargs)
        with printing:
            sys.stdout.write("uploaded\n")
            sys.stdout.flush()
        time.sleep(0.5)
        return out

    with runstate.CheckpointManager(url, storage_options=s3_options(endpoint), keep_last=None) as mgr:
        mgr.save(1, state(1, big=False), force=True)
        print("committed 1", flush=True)
        parts_module._write_file = reporting  # type: ignore[assignment]
        mgr.save(2, state(2, big=True), force=True)
        print("committed 2", flush=True)


if __name__ == "__main__":
    main()
