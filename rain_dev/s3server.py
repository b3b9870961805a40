"""A local S3-compatible server (moto) for the demo and the tests: 127.0.0.1, a free port, dummy credentials.

Real S3 or MinIO is a configuration change: point the DVC remote's endpointurl (or AWS
settings) elsewhere and skip this server.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

DUMMY_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "rain-local",
    "AWS_SECRET_ACCESS_KEY": "rain-local-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    # never probe the cloud metadata endpoint for credentials
    "AWS_EC2_METADATA_DISABLED": "true",
}


def free_port() -> int:
    """An unused TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def local_s3(bucket: str) -> Iterator[str]:
    """Run moto's S3 server on 127.0.0.1 with `bucket` created; yield its endpoint URL; stop it afterwards."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per S3 request otherwise

    for k, v in DUMMY_CREDENTIALS.items():
        os.environ.setdefault(k, v)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        server.stop()
