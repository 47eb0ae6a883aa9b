"""A real S3-compatible server for the remote tests: moto's server on 127.0.0.1, a free port.

Tests talk to it over HTTP through s3fs (``endpoint_url``), exactly as they would to S3: nothing in the
client is mocked. The server runs in a thread of the test process (``ThreadedMotoServer``), so its
data survives ``stop()``/``start()`` — which the interruption tests use to take the server away in the
middle of an upload. Each test gets a fresh bucket.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

ACCESS_KEY = "AKIDSAVEGAMETEST"
SECRET_KEY = "sg-secret-5f1c9e0d7a2b4c68"  # a recognisable value: tests check it never leaks


class MotoServer:
    """moto's S3 server on a fixed local port; ``stop``/``start`` keep its data (it lives in-process)."""

    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server: Any = None

    def start(self) -> None:
        self._server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


@pytest.fixture(scope="session")
def moto() -> Iterator[MotoServer]:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_DEFAULT_REGION="us-east-1")
    server = MotoServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def options_for(endpoint: str) -> dict[str, Any]:
    """storage_options for the moto server: explicit credentials, fast failure (our layer retries)."""
    return {
        "endpoint_url": endpoint,
        "key": ACCESS_KEY,
        "secret": SECRET_KEY,
        "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2, "read_timeout": 30},
    }


@pytest.fixture
def s3_options(moto: MotoServer) -> dict[str, Any]:
    return options_for(moto.endpoint)


@pytest.fixture
def bucket(s3_options: dict[str, Any]) -> str:
    """A fresh bucket: its ``s3://`` URL."""
    import fsspec

    name = f"sg-{uuid.uuid4().hex[:12]}"
    fs = fsspec.filesystem("s3", **s3_options)
    fs.mkdir(name)
    return f"s3://{name}"
