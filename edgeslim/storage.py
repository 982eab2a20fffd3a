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

Local files (``file:///abs/path`` or a plain path) get the same checks, so the
CLI without a cluster behaves exactly like the Job inside one.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import logging
import mimetypes
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote

import boto3
import boto3.exceptions
import botocore.exceptions
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from edgeslim.errors import BadInput, StorageUnavailable

__all__ = [
    "DEFAULT_MAX_BYTES",
    "MAX_BYTES_ENV",
    "credentials",
    "delete_prefix",
    "exists",
    "fetch",
    "join",
    "max_download_bytes",
    "parse",
    "put_bytes",
    "put_file",
    "read_bytes",
    "s3_client",
    "sha256_file",
]

log = logging.getLogger(__name__)

GiB = 1024**3
MiB = 1024**2

#: Largest object :func:`fetch` / :func:`read_bytes` accept unless told otherwise.
#: A guard against a wrong URI (a whole dataset dump instead of a model) filling
#: the Job's ephemeral disk or memory; big enough for any model an edge device runs.
DEFAULT_MAX_BYTES: int = 4 * GiB
#: Environment variable that overrides :data:`DEFAULT_MAX_BYTES` (a byte count).
MAX_BYTES_ENV = "EDGESLIM_MAX_DOWNLOAD_BYTES"

_CHUNK = 1 * MiB
# CopyObject handles sources up to 5 GiB in one request; above that S3 requires a
# multipart copy (UploadPartCopy). s3transfer's managed copy switches at this
# threshold. Module-level so a test can lower it and exercise the multipart path.
_COPY_MULTIPART_THRESHOLD = 5 * GiB
_COPY_PART_SIZE = 256 * MiB
_MAX_KEY_BYTES = 1024  # S3's limit on key length
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
# Characters only; length (AWS wants 3-63) is left to the store, so short
# names in examples and tests (s3://b/k) parse and the server has the last word.
_BUCKET_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")

# Error codes S3 and S3-compatible stores use, grouped by whose problem they are.
_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
_NO_BUCKET = {"NoSuchBucket"}
_DENIED = {
    "403",
    "AccessDenied",
    "Forbidden",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AllAccessDisabled",
    "AccountProblem",
    "InvalidToken",
    "ExpiredToken",
}
_RETRYABLE = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
    "XMinioServerNotInitialized",
    "PreconditionFailed",  # the object was replaced between our HEAD and GET
}


# --------------------------------------------------------------------------- URIs


def parse(uri: str) -> tuple[str, str, str]:
    """Splits ``uri`` into ``(scheme, bucket, key_or_path)``.

    ``s3://b/k`` gives ``("s3", "b", "k")``; ``file:///p`` and a plain path give
    ``("file", "", "/p")``. The key may be empty (``s3://b`` or ``s3://b/``
    names the whole bucket, which :func:`join` and :func:`exists` accept);
    operations on one object reject that themselves. S3 keys are taken
    literally (no percent-decoding, ``?`` and ``#`` are part of the key, as the
    AWS CLI does); ``file://`` URIs are percent-decoded as RFC 8089 says.

    Raises BadInput for anything that cannot name a location, at the earliest
    point, so a typo in a spec fails before any download starts.
    """
    if not isinstance(uri, str) or not uri.strip():
        raise BadInput("storage URI is empty")
    if uri != uri.strip():
        raise BadInput(f"storage URI {uri!r} has leading or trailing whitespace")
    lowered = uri.lower()
    if lowered.startswith("s3://"):
        bucket, _, key = uri[5:].partition("/")
        if not bucket:
            raise BadInput(f"{uri}: s3 URI has no bucket (expected s3://bucket/key)")
        if not _BUCKET_RE.match(bucket) or ".." in bucket:
            raise BadInput(
                f"{uri}: {bucket!r} is not a valid bucket name "
                "(letters, digits, '.', '-'; starting and ending with a letter or digit)"
            )
        if len(key.encode()) > _MAX_KEY_BYTES:
            raise BadInput(f"{uri}: key is longer than S3's {_MAX_KEY_BYTES}-byte limit")
        return "s3", bucket, key
    if lowered.startswith("file:"):
        rest = uri[5:]
        if rest.startswith("//"):
            host, slash, path = rest[2:].partition("/")
            if host not in ("", "localhost"):
                raise BadInput(
                    f"{uri}: file URI names host {host!r}; use file:///absolute/path "
                    "(three slashes) or a plain path"
                )
            path = slash + path
        else:
            path = rest  # file:/abs/path, the short RFC 8089 form
        path = unquote(path)
        if not path.startswith("/"):
            raise BadInput(f"{uri}: file URI needs an absolute path (file:///absolute/path)")
        return "file", "", path
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", uri):
        scheme = uri.split("://", 1)[0]
        raise BadInput(
            f"{uri}: unsupported storage scheme {scheme!r} (use s3://, file:// or a path)"
        )
    if "\0" in uri:
        raise BadInput(f"{uri!r}: path contains a NUL byte")
    return "file", "", uri


def join(base: str, *parts: str) -> str:
    """Appends path segments to ``base`` with exactly one ``/`` between them.

    ``join("s3://b/models/", "a", "b/c") == "s3://b/models/a/b/c"``; the same
    for ``file://`` URIs and plain paths, keeping ``base``'s form. A trailing
    ``/`` on the last part is kept (it marks a prefix). Empty segments vanish;
    ``.`` and ``..`` are refused, because the parts come from names in a spec
    and must never climb out of the output location the user chose.
    """
    parse(base)  # validates
    segments: list[str] = []
    for part in parts:
        for seg in part.split("/"):
            if seg in (".", ".."):
                raise BadInput(f"join({base!r}, ...): path segment {seg!r} is not allowed")
            if seg:
                segments.append(seg)
    if not segments:
        return base
    trailing = "/" if parts and parts[-1].endswith("/") else ""
    sep = "" if base.endswith("/") else "/"
    out = base + sep + "/".join(segments) + trailing
    parse(out)  # e.g. the joined key may now be too long
    return out


def _s3_object(uri: str, what: str) -> tuple[str, str]:
    """``(bucket, key)`` of a URI that must name one S3 object (not a prefix)."""
    _, bucket, key = parse(uri)
    if not key:
        raise BadInput(f"{what} {uri}: s3 URI has no key (expected s3://bucket/key)")
    if key.endswith("/"):
        raise BadInput(f"{what} {uri}: names a prefix (ends with '/'), not an object")
    return bucket, key


def _local_path(uri: str) -> Path:
    return Path(parse(uri)[2])


# ---------------------------------------------------------------------- helpers


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


# -------------------------------------------------------------------- S3 client

# Env vars that decide which client we build; part of the cache key below.
_CLIENT_ENV = (
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
)


def _client_config() -> Config:
    options: dict[str, Any] = {
        # A few quick retries inside botocore smooth over a blip; anything longer
        # is the caller's decision (StorageUnavailable -> operator requeues).
        "retries": {"max_attempts": 3, "mode": "standard"},
        "connect_timeout": 5,
        "read_timeout": 60,
        # MinIO and moto serve buckets as paths (http://host:9000/bucket/key),
        # not as virtual hosts (bucket.host), which would need wildcard DNS.
        "s3": {"addressing_style": "path"},
    }
    # botocore >= 1.36 adds CRC checksums to every upload by default, which many
    # S3-compatible stores (older MinIO, Ceph RGW, GCS interop) reject. Only send
    # checksums where the API demands them (e.g. DeleteObjects); our own sha256
    # covers end-to-end integrity. Older botocores lack the option and don't need it.
    if "request_checksum_calculation" in getattr(Config, "OPTION_DEFAULTS", {}):
        options["request_checksum_calculation"] = "when_required"
        options["response_checksum_validation"] = "when_required"
    return Config(**options)


# Credentials given explicitly (the operator reads them from a model's Secret).
# A context variable, not os.environ: concurrent operator handlers, each with
# another model's Secret, must never see each other's keys.
_EXPLICIT_ENV: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "edgeslim_storage_env", default=None
)


@contextlib.contextmanager
def credentials(env: dict[str, str]) -> Iterator[None]:
    """Within the block, S3 calls use only ``env`` (AWS_* names), not the process environment.

    Scoped to the current thread / asyncio task, so handlers running side by
    side with different Secrets stay apart.
    """
    token = _EXPLICIT_ENV.set(dict(env))
    try:
        yield
    finally:
        _EXPLICIT_ENV.reset(token)


def s3_client() -> Any:
    """An S3 client for the endpoint and credentials in the environment *now*.

    The environment is read on every call (tests swap endpoints), or taken
    from :func:`credentials` when the caller gave some; clients are cached per
    distinct environment: building one parses the S3 service model, ~50 ms.
    Clients are thread-safe, so sharing them is fine.
    """
    explicit = _EXPLICIT_ENV.get()
    source = explicit if explicit is not None else os.environ
    return _cached_client(tuple(source.get(name) or "" for name in _CLIENT_ENV))


@functools.lru_cache(maxsize=8)
def _cached_client(env: tuple[str, ...]) -> Any:
    values = dict(zip(_CLIENT_ENV, env, strict=True))
    # AWS_ENDPOINT_URL_S3 beats AWS_ENDPOINT_URL, as in the AWS SDKs' own rules.
    endpoint = values["AWS_ENDPOINT_URL_S3"] or values["AWS_ENDPOINT_URL"] or None
    if endpoint and not re.match(r"^https?://[^/]", endpoint):
        raise BadInput(
            f"S3 endpoint {endpoint!r} (AWS_ENDPOINT_URL) is not an http(s) URL, "
            "e.g. http://minio:9000"
        )
    region = values["AWS_REGION"] or values["AWS_DEFAULT_REGION"] or "us-east-1"
    # Keys passed explicitly (None = boto3's own lookup, as before) so that
    # credentials() works without touching the process environment.
    session = boto3.session.Session(
        region_name=region,
        aws_access_key_id=values["AWS_ACCESS_KEY_ID"] or None,
        aws_secret_access_key=values["AWS_SECRET_ACCESS_KEY"] or None,
        aws_session_token=values["AWS_SESSION_TOKEN"] or None,
    )
    try:
        # boto3 >= 1.34 reads AWS_ENDPOINT_URL itself; passing it keeps older
        # botocores (and AWS_ENDPOINT_URL_S3 handling) identical everywhere.
        return session.client("s3", endpoint_url=endpoint, config=_client_config())
    except ValueError as exc:
        raise BadInput(f"S3 endpoint {endpoint!r}: {exc}") from exc


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _status(exc: botocore.exceptions.ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def _translate(exc: Exception, what: str, uri: str) -> Exception:
    """Maps a boto3/botocore failure onto BadInput or StorageUnavailable.

    Unknown botocore errors are returned unchanged: better a traceback than a
    misfiled error that retries forever or blames the user for our bug.
    """
    where = f"{what} {uri}"
    if isinstance(exc, botocore.exceptions.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = _status(exc)
        message = _one_line(err.get("Message") or code or status)
        if code in _NO_BUCKET:
            bucket = parse(uri)[1]
            return BadInput(f"{where}: bucket {bucket!r} does not exist")
        if code in _NOT_FOUND or status == 404:
            return BadInput(f"{where}: not found")
        if code in _DENIED or status == 403:
            return BadInput(f"{where}: access denied ({code or status}: {message})")
        if code == "PreconditionFailed" or status == 412:
            return StorageUnavailable(f"{where}: object changed while it was being read")
        if code in _RETRYABLE or status >= 500 or status == 429:
            return StorageUnavailable(f"{where}: storage error {code or status}: {message}")
        return BadInput(f"{where}: {code or status}: {message}")
    if isinstance(
        exc,
        botocore.exceptions.NoCredentialsError | botocore.exceptions.PartialCredentialsError,
    ):
        return BadInput(
            f"{where}: no usable S3 credentials "
            f"(set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY): {_one_line(exc)}"
        )
    if isinstance(exc, botocore.exceptions.ParamValidationError):
        return BadInput(f"{where}: {_one_line(exc)}")
    if isinstance(
        exc,
        botocore.exceptions.ConnectionError
        | botocore.exceptions.HTTPClientError
        | botocore.exceptions.IncompleteReadError
        | botocore.exceptions.ChecksumError,
    ):
        return StorageUnavailable(f"{where}: storage unreachable: {_one_line(exc)}")
    return exc


_BOTO_ERRORS = (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError)


@contextlib.contextmanager
def _s3_errors(what: str, uri: str) -> Iterator[None]:
    try:
        yield
    except _BOTO_ERRORS as exc:
        raise _translate(exc, what, uri) from exc
    except boto3.exceptions.S3UploadFailedError as exc:
        # upload_file wraps the ClientError that says what actually went wrong.
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, _BOTO_ERRORS):
            raise _translate(cause, what, uri) from exc
        raise


def _head(client: Any, bucket: str, key: str, what: str, uri: str) -> dict[str, Any]:
    """HeadObject, telling "no such key" from "no such bucket".

    A HEAD response has no body, so a 404 doesn't say which is missing; one
    HeadBucket call does, and "bucket does not exist" points at the typo.
    """
    try:
        return client.head_object(Bucket=bucket, Key=key)
    except botocore.exceptions.ClientError as exc:
        if _status(exc) == 404:
            try:
                client.head_bucket(Bucket=bucket)
            except botocore.exceptions.ClientError as bexc:
                if _status(bexc) == 404:
                    raise BadInput(f"{what} {uri}: bucket {bucket!r} does not exist") from exc
            raise BadInput(f"{what} {uri}: not found") from exc
        raise


def _s3_read(
    uri: str,
    sink: Callable[[bytes], Any],
    *,
    max_bytes: int | None,
    what: str,
) -> tuple[int, str]:
    """Streams one object into ``sink``; returns ``(bytes, sha256)``."""
    bucket, key = _s3_object(uri, what)
    limit, hint = _limit(max_bytes)
    with _s3_errors(what, uri):
        client = s3_client()
        head = _head(client, bucket, key, what, uri)
        size = head.get("ContentLength")
        if size is not None and size > limit:
            raise _too_big(what, uri, int(size), limit, hint)
        extra: dict[str, Any] = {}
        if head.get("ETag"):
            # Read exactly the object we size-checked: if a writer replaces it
            # in between, the GET fails with 412 (retryable) instead of
            # returning a different object than the one we judged.
            extra["IfMatch"] = head["ETag"]
        body = client.get_object(Bucket=bucket, Key=key, **extra)["Body"]
        try:
            n, digest = _copy_limited(
                body.iter_chunks(_CHUNK), sink, limit=limit, hint=hint, what=what, uri=uri
            )
        finally:
            body.close()
        if size is not None and n != size:
            raise StorageUnavailable(f"{what} {uri}: download truncated at {n} of {size} bytes")
        return n, digest


# ----------------------------------------------------------------------- reading


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


def _local_read(
    path: Path, uri: str, sink: Callable[[bytes], Any], *, limit: int, hint: str, what: str
) -> tuple[int, str]:
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
    uri: str,
    dest_dir: Path,
    *,
    sha256: str | None = None,
    max_bytes: int | None = None,
    what: str = "file",
) -> Path:
    """Makes the object at ``uri`` available as a local file and returns its path.

    * ``s3://``: streamed into ``dest_dir/<basename of key>``. Size is checked
      against ``max_bytes`` (default :func:`max_download_bytes`) from HeadObject
      before any byte moves, and again while streaming. The data goes to a
      hidden ``.<name>.part-<uuid>`` file that is renamed into place only after
      size and sha256 check out; on any failure it is removed, so ``dest_dir``
      never holds a partial or unverified file (an older file of the same name
      is left as it was). Two URIs with the same basename overwrite each other:
      give each its own ``dest_dir`` if that matters.
    * ``file://`` / plain path: checked (exists, regular file, size, sha256) and
      returned **in place, not copied** — models run to gigabytes and the
      Job's scratch disk is precious. ``dest_dir`` is unused; treat the returned
      path as read-only.

    ``what`` names the thing in error messages ("source model", "evaluation
    dataset"), so the user knows which field of the spec to fix.
    """
    expected = _normalize_sha(sha256, what, uri)
    scheme, _, key = parse(uri)
    if scheme == "file":
        path = _local_source(uri, what)
        limit, hint = _limit(max_bytes)
        _, digest = _local_read(path, uri, lambda _c: None, limit=limit, hint=hint, what=what)
        _check_sha(expected, digest, what, uri)
        return path

    _s3_object(uri, what)
    name = key.rsplit("/", 1)[-1]
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    final = dest_dir / name
    part = dest_dir / f".{name}.part-{uuid.uuid4().hex}"
    try:
        with open(part, "wb") as f:
            _, digest = _s3_read(uri, f.write, max_bytes=max_bytes, what=what)
        _check_sha(expected, digest, what, uri)
        os.replace(part, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
        raise
    return final


def read_bytes(uri: str, *, max_bytes: int | None = None, what: str = "file") -> bytes:
    """The whole object at ``uri`` in memory (manifests, small configs).

    Same checks and errors as :func:`fetch`; pass a small ``max_bytes`` for
    things that should be small, so a wrong URI fails fast instead of eating RAM.
    """
    buf = bytearray()
    scheme = parse(uri)[0]
    if scheme == "file":
        path = _local_source(uri, what)
        limit, hint = _limit(max_bytes)
        _local_read(path, uri, buf.extend, limit=limit, hint=hint, what=what)
    else:
        _s3_read(uri, buf.extend, max_bytes=max_bytes, what=what)
    return bytes(buf)


def exists(uri: str) -> bool:
    """Whether an object (s3) or regular file (local) exists at ``uri``.

    A URI ending in ``/`` (or naming a local directory) is a prefix: true when
    anything is stored under it. A missing bucket counts as "doesn't exist";
    denied access and connection failures raise, since "no" would be a guess.
    """
    scheme, bucket, key = parse(uri)
    if scheme == "file":
        path = Path(key)
        if path.is_dir():
            return any(p.is_file() for p in path.rglob("*"))
        return path.is_file() and not key.endswith("/")
    client = s3_client()
    if key == "" or key.endswith("/"):
        with _s3_errors("prefix", uri):
            try:
                resp = client.list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)
            except botocore.exceptions.ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in _NO_BUCKET:
                    return False
                raise
        return int(resp.get("KeyCount", 0)) > 0
    with _s3_errors("object", uri):
        try:
            client.head_object(Bucket=bucket, Key=key)
        except botocore.exceptions.ClientError as exc:
            if _status(exc) == 404:
                return False
            raise
    return True


# ----------------------------------------------------------------------- writing
#
# Why uploads are staged. A reader (the edge server pulling model.onnx, the
# operator reading manifest.json) must never see half an artifact. On AWS S3 a
# single PUT and a completed multipart upload are each atomic already, but:
# not every S3-compatible store guarantees it (filesystem-backed gateways write
# in place); a writer killed mid-upload should leave an identifiable leftover
# (`<key>.tmp-<uuid>`), not a damaged or missing object at the real name; and
# staging lets us check the stored size before anything becomes visible. The
# price is one server-side copy: no data passes through us twice.
#
# The staging key sits next to the final key (same prefix) rather than under a
# bucket-wide `.tmp/` prefix, so credentials scoped to the output prefix can
# write it and `delete_prefix` of the artifact directory sweeps leftovers.
#
# Locally the same guarantee comes from a temp file in the destination's own
# directory (same filesystem, so `os.replace` is an atomic rename), fsynced
# first so a crash can't publish a name that points at unwritten blocks.


def _content_type(key: str) -> str:
    guessed, _ = mimetypes.guess_type(key)
    return guessed or "application/octet-stream"


def _s3_copy(client: Any, bucket: str, src_key: str, dest_key: str, content_type: str) -> None:
    """Server-side copy; CopyObject up to 5 GiB, multipart UploadPartCopy above."""
    client.copy(
        {"Bucket": bucket, "Key": src_key},
        bucket,
        dest_key,
        ExtraArgs={"ContentType": content_type, "MetadataDirective": "REPLACE"},
        Config=TransferConfig(
            multipart_threshold=_COPY_MULTIPART_THRESHOLD,
            multipart_chunksize=_COPY_PART_SIZE,
        ),
    )


def _s3_put_staged(
    uri: str, size: int, content_type: str, upload: Callable[[Any, str, str], None]
) -> str:
    """Uploads via ``upload(client, bucket, tmp_key)``, verifies, publishes, cleans up."""
    what = "destination"
    bucket, key = _s3_object(uri, what)
    tmp_key = f"{key}.tmp-{uuid.uuid4().hex}"
    with _s3_errors(what, uri):
        client = s3_client()
        try:
            upload(client, bucket, tmp_key)
            stored = client.head_object(Bucket=bucket, Key=tmp_key).get("ContentLength")
            if stored is not None and stored != size:
                raise StorageUnavailable(
                    f"{what} {uri}: staged upload holds {stored} bytes, expected {size}"
                )
            _s3_copy(client, bucket, tmp_key, key, content_type)
        except BaseException:
            try:
                client.delete_object(Bucket=bucket, Key=tmp_key)
            except botocore.exceptions.ClientError as cleanup:
                if _status(cleanup) != 404:  # no bucket, no leftover
                    log.warning(
                        "could not delete staging object s3://%s/%s: %s", bucket, tmp_key, cleanup
                    )
            except Exception as cleanup:  # the original error matters more
                log.warning(
                    "could not delete staging object s3://%s/%s: %s", bucket, tmp_key, cleanup
                )
            raise
        try:
            client.delete_object(Bucket=bucket, Key=tmp_key)
        except _BOTO_ERRORS as exc:
            # The artifact is published; failing now would make the caller
            # redo a successful upload. The leftover lives under the artifact's
            # prefix, where delete_prefix finds it.
            log.warning("could not delete staging object s3://%s/%s: %s", bucket, tmp_key, exc)
    return uri


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


def put_file(path: Path, uri: str) -> str:
    """Uploads a local file to ``uri`` atomically; returns ``uri``.

    Readers see either the previous object or the complete new one, never a
    partial one (see the comment above). The content type is guessed from the
    destination name (``.json`` -> application/json, else octet-stream). Works
    for any size: multipart upload and, above 5 GiB, multipart server-side copy.
    """
    src = Path(path)
    if not src.is_file():
        raise BadInput(f"upload source {src}: not found or not a regular file")
    scheme, _, dest = parse(uri)
    if scheme == "file":

        def write(f: IO[bytes]) -> None:
            with open(src, "rb") as s:
                shutil.copyfileobj(s, f, _CHUNK)

        _atomic_write_local(Path(dest), uri, write)
        return uri
    content_type = _content_type(dest)

    def upload(client: Any, bucket: str, tmp_key: str) -> None:
        client.upload_file(str(src), bucket, tmp_key, ExtraArgs={"ContentType": content_type})

    return _s3_put_staged(uri, src.stat().st_size, content_type, upload)


def put_bytes(data: bytes, uri: str, content_type: str = "application/octet-stream") -> str:
    """Writes ``data`` to ``uri`` atomically, like :func:`put_file`; returns ``uri``."""
    scheme, _, dest = parse(uri)
    if scheme == "file":
        _atomic_write_local(Path(dest), uri, lambda f: f.write(data))
        return uri

    def upload(client: Any, bucket: str, tmp_key: str) -> None:
        client.put_object(Bucket=bucket, Key=tmp_key, Body=data, ContentType=content_type)

    return _s3_put_staged(uri, len(data), content_type, upload)


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
    scheme, bucket, key = parse(uri)
    if scheme == "file":
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

    prefix = key if key.endswith("/") or not key else key + "/"
    if not prefix:
        raise BadInput(f"delete {uri}: refusing to delete a whole bucket; name a prefix")
    client = s3_client()
    count = 0
    with _s3_errors("delete", uri):
        try:
            pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for page in pages:
                keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
                if not keys:
                    continue
                # A listing page holds at most 1000 keys, DeleteObjects' limit.
                resp = client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
                errors = resp.get("Errors", [])
                count += len(keys) - len(errors)
                if errors:
                    first = errors[0]
                    raise botocore.exceptions.ClientError(
                        {
                            "Error": {
                                "Code": first.get("Code", ""),
                                "Message": first.get("Message", ""),
                            },
                            "ResponseMetadata": {"HTTPStatusCode": 0},
                        },
                        "DeleteObjects",
                    )
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in _NO_BUCKET:
                return count
            raise
    return count
