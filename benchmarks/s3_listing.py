"""How long listing a run's committed steps takes on an S3 API as steps hold more objects.

Starts a moto S3 server on 127.0.0.1 (no other network), writes 3 steps of N tiny objects
each, and times ``list_committed`` (one delimited LIST, then one existence check of
``manifest.json`` per step) against a single delimited LIST request. docs/scaling.md.

    python benchmarks/s3_listing.py
"""

from __future__ import annotations

import logging
import time

import boto3
from moto.server import ThreadedMotoServer

from runstate.storage import open_store

logging.getLogger("werkzeug").setLevel(logging.ERROR)
srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False); srv.start()
host, port = srv.get_host_and_port(); ep = f"http://{host}:{port}"
c = boto3.client("s3", endpoint_url=ep, aws_access_key_id="t", aws_secret_access_key="t", region_name="us-east-1")
opts = {"key": "t", "secret": "t", "client_kwargs": {"endpoint_url": ep, "region_name": "us-east-1"}, "skip_instance_cache": True}
for files in (10, 100, 1000, 3000):
    b = f"b{files}"; c.create_bucket(Bucket=b)
    for step in range(3):
        for i in range(files):
            c.put_object(Bucket=b, Key=f"run/step-{step:012d}/f{i}.safetensors", Body=b"x")
        c.put_object(Bucket=b, Key=f"run/step-{step:012d}/manifest.json", Body=b"{}")
    store = open_store(f"s3://{b}/run", storage_options=opts)
    store.list_committed()
    t = time.perf_counter(); n = 5
    for _ in range(n): steps = store.list_committed()
    dt = (time.perf_counter() - t) / n
    t = time.perf_counter()
    for _ in range(n): c.list_objects_v2(Bucket=b, Prefix="run/", Delimiter="/")
    dl = (time.perf_counter() - t) / n
    print(f"{files} files/step x 3 steps: list_committed {dt*1000:.0f} ms ({len(steps)} steps); one delimiter LIST {dl*1000:.0f} ms")
srv.stop()
