"""What a stored object is *now*, found cheaply: S3 HEAD (ETag, VersionId, size) or a
local file's stat (size, mtime), without moving its bytes.

The operator compares this with the identity the compressor recorded for the
bytes it used (edgeslim/operator/source_watch.py) to notice a source model that
was replaced at the same URI.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from edgeslim.errors import BadInput
from edgeslim.storage import local, s3
from edgeslim.storage.uris import parse


@dataclass(frozen=True)
class StoredIdentity:
    """The store's own names for an object's content (no byte of it read)."""

    uri: str
    size_bytes: int | None
    etag: str | None = None
    version_id: str | None = None
    modified_ns: int | None = None
    """Local files only: st_mtime_ns."""


def head(uri: str, what: str = "source model") -> StoredIdentity:
    """The identity of the object at ``uri`` as the store reports it, in one request.

    Errors as for a fetch: BadInput (not found, access denied) or
    StorageUnavailable (the store is not answering).
    """
    if parse(uri)[0] == "file":
        path = local._local_source(uri, what)
        st = os.stat(path)
        return StoredIdentity(uri=uri, size_bytes=st.st_size, modified_ns=st.st_mtime_ns)
    bucket, key = s3._s3_object(uri, what)
    with s3._s3_errors(what, uri):
        found = s3._head(s3.s3_client(), bucket, key, what, uri)
    size = found.get("ContentLength")
    return StoredIdentity(
        uri=uri,
        size_bytes=int(size) if size is not None else None,
        etag=found.get("ETag"),
        version_id=found.get("VersionId"),
    )


def local_sha256(uri: str, what: str = "source model", max_bytes: int | None = None) -> str:
    """sha256 of a local file, streamed (nothing kept); for when its stat changed."""
    if parse(uri)[0] != "file":
        raise BadInput(f"{what} {uri}: not a local file")
    _, digest = local.read(uri, lambda _chunk: None, max_bytes=max_bytes, what=what)
    return digest
