"""What a fetch hands back: the local copy and the identity of the bytes in it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Fetched:
    """A verified local copy of one stored object.

    ``sha256`` and ``size_bytes`` were computed from the very bytes written to
    ``path`` while they were copied, so whoever reads ``path`` reads what was
    hashed (and checked against a pin). ``etag`` and ``version_id`` are the
    store's own names for that content (S3 only; None where the store gives none).
    """

    uri: str
    path: Path
    sha256: str
    size_bytes: int
    etag: str | None = None
    version_id: str | None = None
