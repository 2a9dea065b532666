"""How long listing a run's committed steps takes on an S3 API as steps hold more objects.

Starts a moto S3 server on 127.0.0.1 (no other network), writes 3 steps of N tiny objects
each, and times ``list_committed`` (one delimited LIST, then one existence check of
``manifest.json`` per step) against a single delimited LIST request. See docs/scaling.md.

    python benchmarks/s3_listing.py
"""

from __future__ import annotations

import logging
import time

import boto3
from moto.server import ThreadedMotoServer

from runstate.storage import open_store

REPEATS = 5


def main() -> None:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id="t", aws_secret_access_key="t", region_name="us-east-1"
    )
    options = {
        "key": "t",
        "secret": "t",
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
        "skip_instance_cache": True,
    }
    try:
        for files in (10, 100, 1000, 3000):
            bucket = f"b{files}"
            client.create_bucket(Bucket=bucket)
            for step in range(3):
                for i in range(files):
                    client.put_object(Bucket=bucket, Key=f"run/step-{step:012d}/f{i}.safetensors", Body=b"x")
                client.put_object(Bucket=bucket, Key=f"run/step-{step:012d}/manifest.json", Body=b"{}")
            store = open_store(f"s3://{bucket}/run", storage_options=options)
            store.list_committed()
            started = time.perf_counter()
            for _ in range(REPEATS):
                steps = store.list_committed()
            listed = (time.perf_counter() - started) / REPEATS
            started = time.perf_counter()
            for _ in range(REPEATS):
                client.list_objects_v2(Bucket=bucket, Prefix="run/", Delimiter="/")
            one = (time.perf_counter() - started) / REPEATS
            print(
                f"{files:>5} objects/step x 3 steps: list_committed {listed * 1000:.0f} ms "
                f"({len(steps)} steps); one delimited LIST {one * 1000:.0f} ms"
            )
    finally:
        server.stop()


if __name__ == "__main__":
    main()
