"""Size limits and sha256 checks that S3 and local reads share.

The download limit (:data:`DEFAULT_MAX_BYTES`, overridable through
:data:`MAX_BYTES_ENV`), the limits readers check declared sizes against before
reading (datasets, ONNX tensors, spec files; each a default plus an
``EDGESLIM_MAX_*`` environment variable), the expected-sha256 normalisation and comparison, and
:func:`_copy_limited`, the counting and hashing copy loop both backends stream
through.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from edgeslim.errors import BadInput

T = TypeVar("T")

GiB = 1024**3
MiB = 1024**2

#: Largest object :func:`fetch` / :func:`read_bytes` accept unless told otherwise.
#: A guard against a wrong URI (a whole dataset dump instead of a model) filling
#: the Job's ephemeral disk or memory; big enough for any model an edge device runs.
DEFAULT_MAX_BYTES: int = 4 * GiB
#: Environment variable that overrides :data:`DEFAULT_MAX_BYTES` (a byte count).
MAX_BYTES_ENV = "EDGESLIM_MAX_DOWNLOAD_BYTES"

#: Largest total size, once inflated, of the arrays in one ``.npz`` dataset.
#: Checked against what the zip directory and each ``.npy`` header declare,
#: before any array is read, so a small file cannot make the Job allocate it.
#: Sized like the download limit: the evaluation and training data of an edge model.
DEFAULT_MAX_DATASET_BYTES: int = 4 * GiB
MAX_DATASET_BYTES_ENV = "EDGESLIM_MAX_DATASET_BYTES"

#: Largest inflated/compressed size ratio of an ``.npz`` (zip bomb guard). Real
#: data (images, audio, token ids) deflates 1.5-20x, masks of mostly zeros
#: ~100x; all-zero padding reaches ~1000x, which is what bombs are made of.
#: Only applied past :data:`DATASET_RATIO_FLOOR` inflated bytes: small files may be anything.
DEFAULT_MAX_DATASET_COMPRESSION_RATIO: int = 200
MAX_DATASET_COMPRESSION_RATIO_ENV = "EDGESLIM_MAX_DATASET_COMPRESSION_RATIO"
DATASET_RATIO_FLOOR: int = 64 * MiB

#: Largest single tensor an ONNX model may declare statically (initializers,
#: Constant nodes, and outputs whose shapes inference can work out, such as a
#: ConstantOfShape of a constant shape). onnxruntime allocates these while it
#: builds the session or on the first run; protobuf caps inline data at 2 GiB.
DEFAULT_MAX_TENSOR_BYTES: int = 2 * GiB
MAX_TENSOR_BYTES_ENV = "EDGESLIM_MAX_TENSOR_BYTES"

#: Largest spec file the CLI parses (a CompressedModel is a few KiB).
DEFAULT_MAX_SPEC_BYTES: int = 1 * MiB
MAX_SPEC_BYTES_ENV = "EDGESLIM_MAX_SPEC_BYTES"

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


def _positive_setting(env: str, default: int, unit: str = "bytes") -> int:
    """A positive integer from ``env``, or ``default`` when it is unset or empty.

    Read on every call (not at import) so an operator or test can change it.
    """
    raw = os.environ.get(env, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value <= 0:
        raise BadInput(f"{env}={raw!r}: expected a positive number of {unit}")
    return value


def max_download_bytes() -> int:
    """The download limit in force: ``EDGESLIM_MAX_DOWNLOAD_BYTES`` or the default."""
    return _positive_setting(MAX_BYTES_ENV, DEFAULT_MAX_BYTES)


def max_dataset_bytes() -> int:
    """``EDGESLIM_MAX_DATASET_BYTES`` or :data:`DEFAULT_MAX_DATASET_BYTES`."""
    return _positive_setting(MAX_DATASET_BYTES_ENV, DEFAULT_MAX_DATASET_BYTES)


def max_dataset_compression_ratio() -> int:
    """``EDGESLIM_MAX_DATASET_COMPRESSION_RATIO`` or its default."""
    return _positive_setting(
        MAX_DATASET_COMPRESSION_RATIO_ENV, DEFAULT_MAX_DATASET_COMPRESSION_RATIO, "times"
    )


def max_tensor_bytes() -> int:
    """``EDGESLIM_MAX_TENSOR_BYTES`` or :data:`DEFAULT_MAX_TENSOR_BYTES`."""
    return _positive_setting(MAX_TENSOR_BYTES_ENV, DEFAULT_MAX_TENSOR_BYTES)


def max_spec_bytes() -> int:
    """``EDGESLIM_MAX_SPEC_BYTES`` or :data:`DEFAULT_MAX_SPEC_BYTES`."""
    return _positive_setting(MAX_SPEC_BYTES_ENV, DEFAULT_MAX_SPEC_BYTES)


def human_bytes(n: int) -> str:
    """``5476083302`` -> ``"5.1 GiB"``, for messages outside this module."""
    return _human(n)


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


def _stage_checked(
    dest_dir: Path,
    name: str,
    stream: Callable[[Callable[[bytes], Any]], tuple[int, str, T]],
    *,
    expected: str | None,
    what: str,
    uri: str,
) -> tuple[Path, int, str, T]:
    """Runs ``stream(sink)`` into ``dest_dir/name`` so that only a checked file appears.

    The data lands under a hidden ``.<name>.part-<uuid>`` name and is renamed
    into place only after the stream's own size checks and the sha256 check
    (``expected``: normalised hex, or None) pass; on any failure it is removed.
    ``stream`` returns ``(bytes, sha256 hex, extra)``; extra is passed back.
    """
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    final = dest_dir / name
    part = dest_dir / f".{name}.part-{uuid.uuid4().hex}"
    try:
        with open(part, "wb") as f:
            n, digest, extra = stream(f.write)
        _check_sha(expected, digest, what, uri)
        os.replace(part, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
        raise
    return final, n, digest, extra
