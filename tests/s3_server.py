"""An S3-compatible server on loopback for the tests: moto's, in a thread of the test process.

``s3_server()`` starts it on a free 127.0.0.1 port with one bucket and yields the environment that
points pyarrow (Ray's storage), boto3 and MLflow at it: fake credentials, a region and
``AWS_ENDPOINT_URL``. Whoever starts Ray sets that environment first, so Ray's processes inherit it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from moto.server import ThreadedMotoServer

from mammo_ray.ray_session import free_port


@contextmanager
def s3_server(bucket: str) -> Iterator[dict[str, str]]:
    """A moto S3 server with ``bucket`` created; yields the environment variables that reach it."""
    import boto3

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": "mammo-ray-test",
        "AWS_SECRET_ACCESS_KEY": "mammo-ray-test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    try:
        session = boto3.session.Session(
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=env["AWS_DEFAULT_REGION"],
        )
        session.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=bucket)
        yield env
    finally:
        server.stop()


def bucket_keys(env: dict[str, str], bucket: str, prefix: str = "") -> set[str]:
    """Every object key in ``bucket`` under ``prefix``, listed with boto3."""
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )
    keys: set[str] = set()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys |= {item["Key"] for item in page.get("Contents", [])}
    return keys
