"""Local files (``file:///abs/path`` or a plain path): read, atomic write, delete.

The same checks and errors as :mod:`edgeslim.storage.s3`, so the CLI without a
cluster behaves exactly like the Job inside one. The dispatchers in
:mod:`edgeslim.storage` call these for URIs that :func:`~edgeslim.storage.uris.parse`
gives the ``file`` scheme.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from edgeslim.errors import BadInput
from edgeslim.storage.fetched import Fetched
from edgeslim.storage.limits import _CHUNK, _copy_limited, _limit, _stage_checked, _too_big
from edgeslim.storage.uris import parse

# ----------------------------------------------------------------------- reading


def _local_path(uri: str) -> Path:
    return Path(parse(uri)[2])


def _local_source(uri: str, what: str) -> Path:
    """The path a local URI names, checked to be a readable regular file."""
    path = _local_path(uri)
    try:
        path.stat()
    except FileNotFoundError:
        raise BadInput(f"{what} {uri}: not found") from None
    except PermissionError:
        raise BadInput(f"{what} {uri}: access denied") from None
    except NotADirectoryError:
        raise BadInput(f"{what} {uri}: not found (a parent is not a directory)") from None
    if path.is_dir():
        raise BadInput(f"{what} {uri}: is a directory, expected a file")
    if not os.path.isfile(path):
        raise BadInput(f"{what} {uri}: not a regular file")
    return path


def read(
    uri: str,
    sink: Callable[[bytes], Any],
    *,
    max_bytes: int | None,
    what: str,
) -> tuple[int, str]:
    """Streams the local file ``uri`` names into ``sink``; returns ``(bytes, sha256)``."""
    path = _local_source(uri, what)
    limit, hint = _limit(max_bytes)
    size = path.stat().st_size
    if size > limit:
        raise _too_big(what, uri, size, limit, hint)
    try:
        with open(path, "rb") as f:
            chunks = iter(lambda: f.read(_CHUNK), b"")
            return _copy_limited(chunks, sink, limit=limit, hint=hint, what=what, uri=uri)
    except PermissionError:
        raise BadInput(f"{what} {uri}: access denied") from None


def fetch(
    uri: str, dest_dir: Path, *, expected: str | None, max_bytes: int | None, what: str
) -> Fetched:
    """Copies the file ``uri`` names into ``dest_dir`` while hashing it; returns the copy.

    The copy is what callers read, never the original: a file checked in
    place and opened again later could be swapped in between, and a
    different model would then run under the pinned sha256. One pass reads
    the original once, writes the copy and hashes exactly the bytes written.
    Like S3 downloads, the copy is staged and renamed into place only after
    size and sha256 check out (:func:`~edgeslim.storage.limits._stage_checked`).
    """
    final, n, digest, _ = _stage_checked(
        dest_dir,
        _local_path(uri).name,
        lambda sink: (*read(uri, sink, max_bytes=max_bytes, what=what), None),
        expected=expected,
        what=what,
        uri=uri,
    )
    return Fetched(uri=uri, path=final, sha256=digest, size_bytes=n)


def exists(uri: str) -> bool:
    """Whether a regular file exists at ``uri``; for a directory, whether it holds any."""
    key = parse(uri)[2]
    path = Path(key)
    if path.is_dir():
        return any(p.is_file() for p in path.rglob("*"))
    return path.is_file() and not key.endswith("/")


# ----------------------------------------------------------------------- writing
#
# Locally the guarantee that a reader never sees half an artifact (see the
# comment on staged uploads in edgeslim.storage.s3) comes from a temp file in
# the destination's own directory (same filesystem, so `os.replace` is an
# atomic rename), fsynced first so a crash can't publish a name that points at
# unwritten blocks.


def _atomic_write_local(dest: Path, uri: str, write: Callable[[IO[bytes]], Any]) -> None:
    if str(dest).endswith("/") or dest.is_dir():
        raise BadInput(f"destination {uri}: is a directory, expected a file name")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.tmp-")
    except PermissionError:
        raise BadInput(f"destination {uri}: permission denied") from None
    except (FileExistsError, NotADirectoryError):
        raise BadInput(f"destination {uri}: a parent is not a directory") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes 0600; artifacts are read by other users (the serving
        # container's UID), so publish them world-readable like a normal file.
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    # Persist the rename itself (the directory entry), not just the data.
    with contextlib.suppress(OSError):
        dir_fd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def put_file(src: Path, uri: str) -> str:
    """Copies the regular file ``src`` to ``uri`` atomically; returns ``uri``."""
    dest = parse(uri)[2]

    def write(f: IO[bytes]) -> None:
        with open(src, "rb") as s:
            shutil.copyfileobj(s, f, _CHUNK)

    _atomic_write_local(Path(dest), uri, write)
    return uri


def put_bytes(data: bytes, uri: str) -> str:
    """Writes ``data`` to ``uri`` atomically; returns ``uri``."""
    dest = parse(uri)[2]
    _atomic_write_local(Path(dest), uri, lambda f: f.write(data))
    return uri


# ---------------------------------------------------------------------- deleting


def delete_prefix(uri: str) -> int:
    """Deletes the directory ``uri`` names and everything in it; returns how many files.

    The filesystem root and the working directory (or a parent of it) are
    refused; a missing directory deletes nothing and returns 0.
    """
    key = parse(uri)[2]
    root = Path(key)
    if root.resolve() == Path("/") or not key.strip("/"):
        raise BadInput(f"delete {uri}: refusing to delete the filesystem root")
    if Path.cwd().resolve().is_relative_to(root.resolve()):
        raise BadInput(f"delete {uri}: refusing to delete the working directory or a parent")
    if not root.is_dir():
        return 0
    count = 0
    for _dirpath, dirnames, filenames in os.walk(root):
        count += len(filenames)
        # os.walk lists symlinks to directories as dirs; rmtree unlinks them
        count += sum(1 for d in dirnames if os.path.islink(os.path.join(_dirpath, d)))
    shutil.rmtree(root)
    return count
