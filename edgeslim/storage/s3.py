"""S3 and S3-compatible stores: the client, error translation, read, staged upload, copy, delete.

* **Where S3 is.** Endpoint, credentials and region come from the standard AWS
  environment variables, read on every call (:func:`s3_client`), or from
  :func:`credentials` when the caller scopes some explicitly.
* **Errors say whose they are.** :func:`_translate` files every boto3/botocore
  failure as :class:`~edgeslim.errors.BadInput` or
  :class:`~edgeslim.errors.StorageUnavailable`.

The dispatchers in :mod:`edgeslim.storage` call the unprefixed functions here
(:func:`read`, :func:`fetch`, :func:`exists`, :func:`put_file`,
:func:`put_bytes`, :func:`delete_prefix`) for ``s3://`` URIs.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import mimetypes
import os
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import boto3.exceptions
import botocore.exceptions
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from edgeslim.errors import BadInput, StorageUnavailable
from edgeslim.redact import redact, remember
from edgeslim.storage.fetched import Fetched
from edgeslim.storage.limits import (
    _CHUNK,
    GiB,
    MiB,
    _copy_limited,
    _limit,
    _stage_checked,
    _too_big,
)
from edgeslim.storage.uris import parse

log = logging.getLogger(__name__)

# CopyObject handles sources up to 5 GiB in one request; above that S3 requires a
# multipart copy (UploadPartCopy). s3transfer's managed copy switches at this
# threshold. Module-level so a test can lower it and exercise the multipart path.
_COPY_MULTIPART_THRESHOLD = 5 * GiB
_COPY_PART_SIZE = 256 * MiB

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
    # Error texts may quote these (a signature mismatch, a URL): mask them everywhere.
    remember(*(v for k, v in env.items() if "SECRET" in k or "TOKEN" in k))
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
    # One build per environment: lru_cache does not hold back threads that miss
    # at once, and each would build (and briefly keep) its own client, ~13 MB
    # of service model apiece (16 threads at once: 217 MB instead of 50).
    with _CLIENT_LOCK:
        return _cached_client(tuple(source.get(name) or "" for name in _CLIENT_ENV))


_CLIENT_LOCK = threading.Lock()


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
    # botocore texts quote endpoint URLs, which may carry user:password@.
    return redact(" ".join(str(text).split()))


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


def _s3_object(uri: str, what: str) -> tuple[str, str]:
    """``(bucket, key)`` of a URI that must name one S3 object (not a prefix)."""
    _, bucket, key = parse(uri)
    if not key:
        raise BadInput(f"{what} {uri}: s3 URI has no key (expected s3://bucket/key)")
    if key.endswith("/"):
        raise BadInput(f"{what} {uri}: names a prefix (ends with '/'), not an object")
    return bucket, key


# ----------------------------------------------------------------------- reading


def _stream(
    uri: str,
    sink: Callable[[bytes], Any],
    *,
    max_bytes: int | None,
    what: str,
) -> tuple[int, str, dict[str, Any]]:
    """Streams one object into ``sink``; returns ``(bytes, sha256, HeadObject response)``."""
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
        return n, digest, head


def read(
    uri: str,
    sink: Callable[[bytes], Any],
    *,
    max_bytes: int | None,
    what: str,
) -> tuple[int, str]:
    """Streams one object into ``sink``; returns ``(bytes, sha256)``."""
    n, digest, _ = _stream(uri, sink, max_bytes=max_bytes, what=what)
    return n, digest


def fetch(
    uri: str, dest_dir: Path, *, expected: str | None, max_bytes: int | None, what: str
) -> Fetched:
    """Streams one object into ``dest_dir/<basename of key>``; returns it with its identity.

    The data is staged and renamed into place only after size and sha256
    (``expected``, already normalised hex, or None) check out
    (:func:`~edgeslim.storage.limits._stage_checked`).
    """
    _, key = _s3_object(uri, what)
    final, n, digest, head = _stage_checked(
        dest_dir,
        key.rsplit("/", 1)[-1],
        lambda sink: _stream(uri, sink, max_bytes=max_bytes, what=what),
        expected=expected,
        what=what,
        uri=uri,
    )
    return Fetched(
        uri=uri,
        path=final,
        sha256=digest,
        size_bytes=n,
        etag=head.get("ETag"),
        version_id=head.get("VersionId"),
    )


def exists(uri: str) -> bool:
    """Whether an object exists at ``uri``, or for a prefix, anything under it."""
    _, bucket, key = parse(uri)
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
# edgeslim.storage.local gives local files the same guarantee its own way.


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
                        "could not delete staging object s3://%s/%s: %s",
                        bucket,
                        tmp_key,
                        _one_line(cleanup),
                    )
            except Exception as cleanup:  # the original error matters more
                log.warning(
                    "could not delete staging object s3://%s/%s: %s",
                    bucket,
                    tmp_key,
                    _one_line(cleanup),
                )
            raise
        try:
            client.delete_object(Bucket=bucket, Key=tmp_key)
        except _BOTO_ERRORS as exc:
            # The artifact is published; failing now would make the caller
            # redo a successful upload. The leftover lives under the artifact's
            # prefix, where delete_prefix finds it.
            log.warning(
                "could not delete staging object s3://%s/%s: %s", bucket, tmp_key, _one_line(exc)
            )
    return uri


def put_file(src: Path, uri: str) -> str:
    """Uploads the regular file ``src`` to ``uri`` through a staged upload; returns ``uri``."""
    dest = parse(uri)[2]
    content_type = _content_type(dest)

    def upload(client: Any, bucket: str, tmp_key: str) -> None:
        client.upload_file(str(src), bucket, tmp_key, ExtraArgs={"ContentType": content_type})

    return _s3_put_staged(uri, src.stat().st_size, content_type, upload)


def put_bytes(data: bytes, uri: str, content_type: str) -> str:
    """Writes ``data`` to ``uri`` through a staged upload; returns ``uri``."""

    def upload(client: Any, bucket: str, tmp_key: str) -> None:
        client.put_object(Bucket=bucket, Key=tmp_key, Body=data, ContentType=content_type)

    return _s3_put_staged(uri, len(data), content_type, upload)


# ---------------------------------------------------------------------- deleting


def delete_prefix(uri: str) -> int:
    """Deletes every object under ``uri`` taken as a directory; returns how many."""
    _, bucket, key = parse(uri)
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


def list_uris(uri: str, limit: int) -> list[str]:
    """s3:// URIs of the objects under ``uri`` taken as a directory, at most ``limit``
    (BadInput beyond it: a prefix that large is not a team's model folder)."""
    _, bucket, key = parse(uri)
    prefix = key if key.endswith("/") or not key else key + "/"
    found: list[str] = []
    with _s3_errors("list", uri):
        pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for page in pages:
            for obj in page.get("Contents", []):
                found.append(f"s3://{bucket}/{obj['Key']}")
                if len(found) > limit:
                    raise BadInput(f"{uri}: more than {limit} objects under the prefix")
    return found
