"""Storage URIs: parsing and validating ``s3://``, ``file://`` and plain paths, and joining them."""

from __future__ import annotations

import re
from urllib.parse import unquote

from edgeslim.errors import BadInput

_MAX_KEY_BYTES = 1024  # S3's limit on key length
# Characters only; length (AWS wants 3-63) is left to the store, so short
# names in examples and tests (s3://b/k) parse and the server has the last word.
_BUCKET_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")


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
