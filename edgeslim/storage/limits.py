"""Size limits and sha256 checks that S3 and local reads share.

The download limit (:data:`DEFAULT_MAX_BYTES`, overridable through
:data:`MAX_BYTES_ENV`), the expected-sha256 normalisation and comparison, and
:func:`_copy_limited`, the counting and hashing copy loop both backends stream
through.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from edgeslim.errors import BadInput

GiB = 1024**3
MiB = 1024**2

#: Largest object :func:`fetch` / :func:`read_bytes` accept unless told otherwise.
#: A guard against a wrong URI (a whole dataset dump instead of a model) filling
#: the Job's ephemeral disk or memory; big enough for any model an edge device runs.
DEFAULT_MAX_BYTES: int = 4 * GiB
#: Environment variable that overrides :data:`DEFAULT_MAX_BYTES` (a byte count).
MAX_BYTES_ENV = "EDGESLIM_MAX_DOWNLOAD_BYTES"

_CHUNK = 1 * MiB
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks so a multi-GiB model never sits in memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _human(n: int) -> str:
    """``5476083302`` -> ``"5.1 GiB"``; whole numbers lose the ``.0`` (``"4 GiB"``)."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    text = f"{value:.1f}".removesuffix(".0")
    return f"{text} {unit}"


def max_download_bytes() -> int:
    """The download limit in force: ``EDGESLIM_MAX_DOWNLOAD_BYTES`` or the default.

    Read on every call (not at import) so an operator or test can change it.
    """
    raw = os.environ.get(MAX_BYTES_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_BYTES
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value <= 0:
        raise BadInput(f"{MAX_BYTES_ENV}={raw!r}: expected a positive number of bytes")
    return value


def _limit(max_bytes: int | None) -> tuple[int, str]:
    """The limit to apply and how to raise it, for the error message."""
    if max_bytes is None:
        return max_download_bytes(), f" (set {MAX_BYTES_ENV} to raise it)"
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    return max_bytes, ""


def _normalize_sha(sha256: str | None, what: str, uri: str) -> str | None:
    """Lower-case hex; accepts a ``sha256:`` prefix as written by OCI-style tooling."""
    if sha256 is None:
        return None
    value = sha256.strip().lower().removeprefix("sha256:")
    if not _SHA256_RE.match(value):
        raise BadInput(f"{what} {uri}: expected sha256 {sha256!r} is not 64 hexadecimal characters")
    return value


def _too_big(what: str, uri: str, size: int, limit: int, hint: str) -> BadInput:
    return BadInput(
        f"{what} {uri}: {_human(size)} ({size} bytes) exceeds the "
        f"{_human(limit)} download limit{hint}"
    )


def _copy_limited(
    chunks: Iterable[bytes],
    sink: Callable[[bytes], Any],
    *,
    limit: int,
    hint: str,
    what: str,
    uri: str,
) -> tuple[int, str]:
    """Feeds ``chunks`` to ``sink`` while counting and hashing; stops past ``limit``.

    The size a store reports up front is checked before this runs; the count
    here is the backstop for stores that report none, or a file that grows
    while it is being read. Returns ``(bytes, sha256 hex)``.
    """
    h = hashlib.sha256()
    n = 0
    for chunk in chunks:
        n += len(chunk)
        if n > limit:
            raise BadInput(
                f"{what} {uri}: exceeds the {_human(limit)} download limit "
                f"(stopped reading after {n} bytes){hint}"
            )
        h.update(chunk)
        sink(chunk)
    return n, h.hexdigest()


def _check_sha(expected: str | None, got: str, what: str, uri: str) -> None:
    if expected is not None and got != expected:
        raise BadInput(f"{what} {uri}: sha256 mismatch: expected {expected}, got {got}")
