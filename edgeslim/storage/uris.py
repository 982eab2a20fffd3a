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


# ------------------------------------------------------------ artifact layout

#: The namespace of an object that has none (the CLI run on a bare spec file).
DEFAULT_NAMESPACE = "default"
_DNS_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def model_prefix(output: str, namespace: str | None, name: str) -> str:
    """``<output>/<namespace>/<name>/``: everything one object ever stores.

    The one place the layout is decided: the compressor writes under it, the
    operator checks result URIs against it and the cleanup finalizer deletes
    it. The namespace is part of it so two objects of the same name in two
    namespaces never share (or delete) each other's artifacts; without one
    (the CLI on a bare spec) it is :data:`DEFAULT_NAMESPACE`.
    """
    ns = namespace or DEFAULT_NAMESPACE
    for label, value in (("namespace", ns), ("name", name)):
        # Kubernetes guarantees DNS labels; a spec file for the CLI does not,
        # and a '/' or '..' here would move the prefix somewhere else.
        if not _DNS_LABEL_RE.match(value):
            raise BadInput(
                f"metadata.{label} {value!r}: must be a DNS label "
                "(lower-case letters, digits and '-', at most 63)"
            )
    return join(output, ns, name) + "/"


def result_prefix(
    output: str, namespace: str | None, name: str, spec_hash: str, inputs_id: str | None = None
) -> str:
    """``<output>/<namespace>/<name>/<spec-hash>/<inputs-id>/``: where one spec's result
    for one content of its inputs lives.

    Keyed by the inputs too (:func:`edgeslim.api.result.inputs_id`, a digest of the
    bytes of source and datasets), so a re-compression after a source was replaced
    at the same URI writes beside the artifact that pods may be serving, never over
    it. Without ``inputs_id``, the spec hash's folder: everything the spec ever
    produced lies under it (the operator checks result URIs against it), and results
    stored before the inputs were part of the layout lie directly in it.
    """
    if not re.match(r"^[0-9a-f]{8,64}$", spec_hash):
        raise BadInput(f"spec hash {spec_hash!r} is not hexadecimal")
    spec_dir = join(model_prefix(output, namespace, name), spec_hash) + "/"
    if inputs_id is None:
        return spec_dir
    if not re.match(r"^[0-9a-f]{8,64}$", inputs_id):
        raise BadInput(f"inputs id {inputs_id!r} is not hexadecimal")
    return join(spec_dir, inputs_id) + "/"


def within(uri: str, prefix: str) -> bool:
    """Whether ``uri`` names something strictly under the directory ``prefix``.

    Compared after parsing, so ``file:///out/x`` and ``/out/x`` are the same
    place, but nothing that could resolve elsewhere is accepted: another
    scheme or bucket, ``.`` / ``..`` / empty segments, backslashes, or any
    ``%`` (S3 takes keys literally, but tools and proxies that decode would
    not). A URI that does not parse is not within anything.
    """
    try:
        scheme, bucket, key = parse(uri)
        p_scheme, p_bucket, p_key = parse(prefix)
    except BadInput:
        return False
    if (scheme, bucket) != (p_scheme, p_bucket):
        return False
    base = p_key.rstrip("/") + "/" if p_key.strip("/") else p_key
    if not key.startswith(base):
        return False
    rest = key[len(base) :]
    if not rest or "%" in rest or "\\" in rest or "\0" in rest:
        return False
    return all(seg not in ("", ".", "..") for seg in rest.split("/"))
