"""A real S3 API server on loopback (moto's ThreadedMotoServer) for the object-store tests."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from distributed import Client

if TYPE_CHECKING:
    import pandas as pd

# Fake credentials: moto accepts any; the region must be set for botocore.
FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing-key-id",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
    "AWS_SESSION_TOKEN": "testing-token",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def clear_filesystem_caches() -> None:
    """Drop every cached fsspec filesystem (each class keeps its own): the next reads the environment."""
    import fsspec

    fsspec.AbstractFileSystem.clear_instance_cache()
    for implementation in fsspec.registry.values():
        implementation.clear_instance_cache()


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """Start a moto S3 server on 127.0.0.1 (a free port); yields its endpoint URL.

    Filesystems cached in this process are dropped on the way in and out: one
    made for an earlier server would keep talking to its (closed) port.
    """
    from moto.server import ThreadedMotoServer

    # One line per request otherwise.
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    clear_filesystem_caches()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        clear_filesystem_caches()


def _set_environment(values: dict[str, str | None]) -> dict[str, str | None]:
    previous = {name: os.environ.get(name) for name in values}
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    return previous


@contextlib.contextmanager
def worker_environment(client: Client, values: dict[str, str]) -> Iterator[None]:
    """Set environment variables on every worker of ``client`` (as a deployment would), then restore them.

    Filesystems cached on the workers are dropped, so that they are made again from this environment.
    """

    def apply(values: dict[str, str | None]) -> dict[str, str | None]:
        # On a worker: the body of clear_filesystem_caches, without importing the tests there.
        import fsspec

        fsspec.AbstractFileSystem.clear_instance_cache()
        for implementation in fsspec.registry.values():
            implementation.clear_instance_cache()
        return _set_environment(values)

    previous = client.run(apply, values)
    try:
        yield
    finally:
        for worker, saved in previous.items():
            client.run(apply, saved, workers=[worker])


@contextlib.contextmanager
def s3_bucket(client: Client, bucket: str) -> Iterator[dict[str, str]]:
    """A moto S3 server with an empty ``bucket``; yields its environment (endpoint and fake keys).

    The environment is set in this process and on the workers of ``client``
    for the block, as a deployment would set it, and restored after.
    """
    import fsspec

    with moto_server() as endpoint:
        environment = {**FAKE_CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}
        previous = _set_environment(dict(environment))
        try:
            fsspec.AbstractFileSystem.clear_instance_cache()
            fsspec.filesystem("s3").mkdir(bucket)
            with worker_environment(client, environment):
                yield environment
        finally:
            _set_environment(previous)


@contextlib.contextmanager
def bucket_with_ratings(
    client: Client, ratings: pd.DataFrame, scratch: Path, bucket: str
) -> Iterator[dict[str, str]]:
    """An :func:`s3_bucket` holding ``ratings`` under ``ratings/`` (Parquet parts, ``_SUCCESS``)."""
    import fsspec

    from tests.support.data import write_input

    with s3_bucket(client, bucket) as environment:
        filesystem = fsspec.filesystem("s3")
        source = write_input(ratings, scratch / "input")
        for file in sorted(source.iterdir()):
            filesystem.put_file(str(file), f"{bucket}/ratings/{file.name}")
        filesystem.pipe_file(f"{bucket}/ratings/_SUCCESS", b"")
        yield environment
