"""One interface over ``s3://bucket/key``, ``file://`` URIs and plain paths.

Every edgeslim component (CLI, compressor Job, operator, edge server) moves
models, datasets and manifests through this module, so the rules live here once:

* **Where S3 is.** Any S3-compatible endpoint (AWS, MinIO, moto). Endpoint,
  credentials and region come from the standard AWS environment variables,
  read on every call: the operator mounts a Secret's keys as env vars, and the
  tests point the same code at a throwaway server just by changing the env.
* **Errors say whose they are.** :class:`~edgeslim.errors.BadInput` (one line,
  naming what was being read and the URI) for anything the user must fix: a
  missing object or bucket, denied access, a checksum mismatch, a file too big.
  :class:`~edgeslim.errors.StorageUnavailable` for what may pass on its own
  (connection refused, timeouts, 5xx, throttling), so callers retry those only.
* **Nothing half-done is visible.** Downloads land under a temporary name and
  are renamed only once the size and sha256 check out; uploads are staged and
  published in one step (see :func:`put_file`).
* **The bytes checked are the bytes used.** Every fetch copies into the
  caller's scratch folder while hashing, local files included.
* **One layout.** :func:`model_prefix` / :func:`result_prefix` say where an
  object's artifacts live (``<output>/<namespace>/<name>/<spec-hash>/<inputs-id>/``;
  :mod:`~edgeslim.storage.identity` says what a stored object is now, by HEAD) and
  :func:`within` whether a URI lies under such a prefix.

Local files (``file:///abs/path`` or a plain path) get the same checks, so the
CLI without a cluster behaves exactly like the Job inside one.

The package's modules, each named for what it holds: :mod:`~edgeslim.storage.uris`
(parsing and joining URIs), :mod:`~edgeslim.storage.limits` (the download size
limit and sha256 checks), :mod:`~edgeslim.storage.s3` (the client, error
translation, reads and staged uploads) and :mod:`~edgeslim.storage.local`
(local reads, atomic writes, deletes). This module holds the public API: the
functions below pick the backend from the URI's scheme.
"""

from __future__ import annotations

from pathlib import Path

from edgeslim.errors import BadInput
from edgeslim.storage import local, s3
from edgeslim.storage.fetched import Fetched
from edgeslim.storage.limits import (
    DEFAULT_MAX_BYTES,
    MAX_BYTES_ENV,
    _check_sha,
    _normalize_sha,
    max_download_bytes,
    sha256_file,
)
from edgeslim.storage.s3 import credentials, s3_client
from edgeslim.storage.uris import (
    DEFAULT_NAMESPACE,
    join,
    model_prefix,
    parse,
    result_prefix,
    within,
)

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_NAMESPACE",
    "MAX_BYTES_ENV",
    "Fetched",
    "credentials",
    "delete_prefix",
    "exists",
    "fetch",
    "fetch_verified",
    "join",
    "max_download_bytes",
    "model_prefix",
    "parse",
    "put_bytes",
    "put_file",
    "read_bytes",
    "result_prefix",
    "s3_client",
    "sha256_file",
    "verify_sha256",
    "within",
]


def _is_local(uri: str) -> bool:
    """Whether ``uri`` names a local file (``file://`` or a plain path) rather than S3."""
    return parse(uri)[0] == "file"


# ----------------------------------------------------------------------- reading


def fetch(
    uri: str,
    dest_dir: Path,
    *,
    sha256: str | None = None,
    max_bytes: int | None = None,
    what: str = "file",
) -> Path:
    """Copies the object at ``uri`` into ``dest_dir`` and returns the copy's path.

    The path of :func:`fetch_verified`'s result; see there.
    """
    return fetch_verified(uri, dest_dir, sha256=sha256, max_bytes=max_bytes, what=what).path


def fetch_verified(
    uri: str,
    dest_dir: Path,
    *,
    sha256: str | None = None,
    max_bytes: int | None = None,
    what: str = "file",
) -> Fetched:
    """Copies the object at ``uri`` into ``dest_dir/<basename>``; returns the copy and its identity.

    S3 objects and local files alike are copied, never used in place: the
    sha256 is computed over exactly the bytes written to the copy, so the
    bytes that are checked against ``sha256`` are the bytes the caller reads
    (a local file verified in place could be swapped before it is opened
    again). Size is checked against ``max_bytes`` (default
    :func:`max_download_bytes`) before any byte moves (S3 HeadObject, local
    stat), and again while copying. The data goes to a hidden
    ``.<name>.part-<uuid>`` file renamed into place only after size and
    sha256 check out; on any failure it is removed, so ``dest_dir`` never
    holds a partial or unverified file (an older file of the same name is
    left as it was). Two URIs with the same basename overwrite each other:
    give each its own ``dest_dir`` if that matters.

    ``what`` names the thing in error messages ("source model", "evaluation
    dataset"), so the user knows which field of the spec to fix.
    """
    expected = _normalize_sha(sha256, what, uri)
    backend = local if _is_local(uri) else s3
    return backend.fetch(uri, dest_dir, expected=expected, max_bytes=max_bytes, what=what)


def verify_sha256(fetched: Fetched, sha256: str | None, what: str = "file") -> None:
    """Checks a pin against an earlier fetch's copy (same error as a fetch with that pin).

    For callers that fetch once and use many times: each use may carry its
    own pin, and each must hold for the bytes that use reads.
    """
    expected = _normalize_sha(sha256, what, fetched.uri)
    _check_sha(expected, fetched.sha256, what, fetched.uri)


def read_bytes(uri: str, *, max_bytes: int | None = None, what: str = "file") -> bytes:
    """The whole object at ``uri`` in memory (manifests, small configs).

    Same checks and errors as :func:`fetch`; pass a small ``max_bytes`` for
    things that should be small, so a wrong URI fails fast instead of eating RAM.
    """
    buf = bytearray()
    reader = local.read if _is_local(uri) else s3.read
    reader(uri, buf.extend, max_bytes=max_bytes, what=what)
    return bytes(buf)


def exists(uri: str) -> bool:
    """Whether an object (s3) or regular file (local) exists at ``uri``.

    A URI ending in ``/`` (or naming a local directory) is a prefix: true when
    anything is stored under it. A missing bucket counts as "doesn't exist";
    denied access and connection failures raise, since "no" would be a guess.
    """
    return local.exists(uri) if _is_local(uri) else s3.exists(uri)


# ----------------------------------------------------------------------- writing


def put_file(path: Path, uri: str) -> str:
    """Uploads a local file to ``uri`` atomically; returns ``uri``.

    Readers see either the previous object or the complete new one, never a
    partial one (see the comment on staged uploads in :mod:`edgeslim.storage.s3`).
    The content type is guessed from the destination name (``.json`` ->
    application/json, else octet-stream). Works for any size: multipart upload
    and, above 5 GiB, multipart server-side copy.
    """
    src = Path(path)
    if not src.is_file():
        raise BadInput(f"upload source {src}: not found or not a regular file")
    if _is_local(uri):
        return local.put_file(src, uri)
    return s3.put_file(src, uri)


def put_bytes(data: bytes, uri: str, content_type: str = "application/octet-stream") -> str:
    """Writes ``data`` to ``uri`` atomically, like :func:`put_file`; returns ``uri``."""
    if _is_local(uri):
        return local.put_bytes(data, uri)
    return s3.put_bytes(data, uri, content_type)


# ---------------------------------------------------------------------- deleting


def delete_prefix(uri: str) -> int:
    """Deletes everything under ``uri`` taken as a directory; returns how many objects.

    ``s3://b/models/x`` deletes ``models/x/...`` but not ``models/x-v2/...``:
    the URI is always treated as ending in ``/``, because a bare string prefix
    would let one model's cleanup finalizer delete its neighbours. A whole
    bucket (empty key) or the filesystem root is refused outright. A missing
    bucket or directory deletes nothing and returns 0, so a finalizer can
    finish. On versioned buckets this adds delete markers (old versions stay,
    per the bucket's lifecycle rules).
    """
    return local.delete_prefix(uri) if _is_local(uri) else s3.delete_prefix(uri)


# ---------------------------------------------------------------------- listing


def list_uris(uri: str, limit: int = 10_000) -> list[str]:
    """URIs of the objects under ``uri`` (a directory), at most ``limit``; s3:// only
    (what a CompressionPolicy discovers models from)."""
    if _is_local(uri):
        raise BadInput(f"{uri}: listing needs an s3:// prefix")
    return s3.list_uris(uri, limit)
