"""pytest fixtures for a real S3 endpoint; registered as a plugin by conftest.py.

``s3_server`` starts one moto server per test session (startup costs ~1-2 s);
``s3`` gives each test its own fresh bucket on it and points the AWS
environment variables at it, so tests are isolated without restarting the server.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.s3server import S3Server

# Variables that could point boto3 elsewhere or change auth; cleared per test.
_FOREIGN_AWS_ENV = (
    "AWS_ENDPOINT_URL_S3",
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """One S3 server (moto, over HTTP on 127.0.0.1) for the whole session."""
    with S3Server() as server:
        yield server


@pytest.fixture
def s3(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh, empty bucket; the AWS env vars point at the server. Yields the bucket name."""
    for name in _FOREIGN_AWS_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    bucket = f"test-{uuid.uuid4().hex[:20]}"
    s3_server.create_bucket(bucket)
    yield bucket
