"""edgeslim.storage against a real S3 endpoint over HTTP (moto) and the local disk.

Run with the fixtures plugin: ``pytest tests/test_storage.py -p tests.fixtures_s3``
(conftest.py registers it for a plain ``pytest``).
"""

from __future__ import annotations

import hashlib
import os
import socket
import stat
import threading
from pathlib import Path

import botocore.exceptions
import pytest

from edgeslim import storage
from edgeslim.errors import BadInput, StorageUnavailable
from tests.s3server import S3Server


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def keys(server: S3Server, bucket: str) -> list[str]:
    resp = server.client().list_objects_v2(Bucket=bucket)
    return sorted(obj["Key"] for obj in resp.get("Contents", []))


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# ------------------------------------------------------------------ parse / join


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://models/digits/cnn.onnx", ("s3", "models", "digits/cnn.onnx")),
        ("s3://models", ("s3", "models", "")),
        ("s3://models/", ("s3", "models", "")),
        ("S3://models/a", ("s3", "models", "a")),
        ("s3://b.example-1/k?x#y", ("s3", "b.example-1", "k?x#y")),  # keys are literal
        ("file:///data/m.onnx", ("file", "", "/data/m.onnx")),
        ("file://localhost/data/m.onnx", ("file", "", "/data/m.onnx")),
        ("file:/data/m.onnx", ("file", "", "/data/m.onnx")),
        ("file:///data/a%20b.onnx", ("file", "", "/data/a b.onnx")),
        ("/data/m.onnx", ("file", "", "/data/m.onnx")),
        ("rel/m.onnx", ("file", "", "rel/m.onnx")),
        ("model:v1.onnx", ("file", "", "model:v1.onnx")),
    ],
)
def test_parse(uri: str, expected: tuple[str, str, str]) -> None:
    assert storage.parse(uri) == expected


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("", "storage URI is empty"),
        ("s3://", "s3 URI has no bucket"),
        ("s3:///key", "s3 URI has no bucket"),
        ("s3://-bucket/k", "not a valid bucket name"),
        ("s3://my bucket/k", "not a valid bucket name"),
        ("s3://" + "b" * 64 + "/k", "not a valid bucket name"),
        ("s3://bad_bucket!/k", "not a valid bucket name"),
        ("gs://b/k", "unsupported storage scheme 'gs'"),
        ("https://example.com/m.onnx", "unsupported storage scheme 'https'"),
        ("file://data/m.onnx", "file URI names host 'data'"),
        ("file:data/m.onnx", "needs an absolute path"),
        (" s3://b/k", "whitespace"),
        ("s3://bkt/" + "k" * 1025, "1024-byte limit"),
    ],
)
def test_parse_rejects(uri: str, message: str) -> None:
    with pytest.raises(BadInput, match=message.replace("?", r"\?")):
        storage.parse(uri)


@pytest.mark.parametrize(
    ("base", "parts", "expected"),
    [
        ("s3://b/models/", ("a", "b/c"), "s3://b/models/a/b/c"),
        ("s3://b/models", ("a", "b/c"), "s3://b/models/a/b/c"),
        ("s3://b", ("a",), "s3://b/a"),
        ("s3://b/", ("/a/", "//b"), "s3://b/a/b"),
        ("s3://b/m", ("x", "y/"), "s3://b/m/x/y/"),
        ("s3://b/m", (), "s3://b/m"),
        ("file:///out", ("n", "h/model.onnx"), "file:///out/n/h/model.onnx"),
        ("file:///", ("out",), "file:///out"),
        ("/out/", ("n", "manifest.json"), "/out/n/manifest.json"),
        ("out", ("n",), "out/n"),
        ("/", ("x",), "/x"),
    ],
)
def test_join(base: str, parts: tuple[str, ...], expected: str) -> None:
    assert storage.join(base, *parts) == expected


@pytest.mark.parametrize("bad", ["..", "a/../b", "./a"])
def test_join_refuses_dot_segments(bad: str) -> None:
    with pytest.raises(BadInput, match="not allowed"):
        storage.join("s3://b/models/", bad)


# ----------------------------------------------------------------------- S3 reads


def test_s3_round_trip(s3: str, tmp_path: Path) -> None:
    data = os.urandom(300_000)
    src = write(tmp_path / "src.onnx", data)
    uri = f"s3://{s3}/models/digits/cnn.onnx"

    assert storage.put_file(src, uri) == uri
    got = storage.fetch(uri, tmp_path / "dl", sha256=sha(data), what="source model")

    assert got == tmp_path / "dl" / "cnn.onnx"
    assert got.read_bytes() == data
    assert storage.sha256_file(got) == sha(data) == storage.sha256_file(src)
    assert os.listdir(tmp_path / "dl") == ["cnn.onnx"]  # no .part leftovers
    assert storage.read_bytes(uri) == data
    assert storage.exists(uri)
    assert storage.exists(f"s3://{s3}/models/")
    assert not storage.exists(f"s3://{s3}/models/digits/other.onnx")


def test_s3_put_bytes_content_type(s3: str, s3_server: S3Server) -> None:
    uri = f"s3://{s3}/m/manifest.json"
    storage.put_bytes(b'{"a": 1}', uri, content_type="application/json")
    head = s3_server.client().head_object(Bucket=s3, Key="m/manifest.json")
    assert head["ContentType"] == "application/json"
    assert head["ContentLength"] == 8
    assert storage.read_bytes(uri) == b'{"a": 1}'


def test_s3_put_file_guesses_content_type(s3: str, s3_server: S3Server, tmp_path: Path) -> None:
    storage.put_file(write(tmp_path / "x", b"{}"), f"s3://{s3}/m/result.json")
    storage.put_file(write(tmp_path / "y", b"\0"), f"s3://{s3}/m/model.onnx")
    client = s3_server.client()
    assert client.head_object(Bucket=s3, Key="m/result.json")["ContentType"] == "application/json"
    assert client.head_object(Bucket=s3, Key="m/model.onnx")["ContentType"] == (
        "application/octet-stream"
    )


def test_s3_sha_mismatch_leaves_nothing(s3: str, tmp_path: Path) -> None:
    data = b"real model bytes"
    uri = f"s3://{s3}/m/model.onnx"
    storage.put_bytes(data, uri)
    wrong = "0" * 64
    dest = tmp_path / "dl"

    with pytest.raises(BadInput) as err:
        storage.fetch(uri, dest, sha256=wrong, what="source model")

    assert str(err.value) == (
        f"source model {uri}: sha256 mismatch: expected {wrong}, got {sha(data)}"
    )
    assert os.listdir(dest) == []


def test_s3_failed_fetch_keeps_previous_file(s3: str, tmp_path: Path) -> None:
    uri = f"s3://{s3}/m/model.onnx"
    storage.put_bytes(b"new", uri)
    dest = tmp_path / "dl"
    dest.mkdir()
    write(dest / "model.onnx", b"old")

    with pytest.raises(BadInput, match="sha256 mismatch"):
        storage.fetch(uri, dest, sha256="1" * 64)

    assert os.listdir(dest) == ["model.onnx"]
    assert (dest / "model.onnx").read_bytes() == b"old"


def test_s3_sha_accepts_prefix_and_upper_case(s3: str, tmp_path: Path) -> None:
    uri = f"s3://{s3}/m/a.bin"
    storage.put_bytes(b"abc", uri)
    got = storage.fetch(uri, tmp_path, sha256="sha256:" + sha(b"abc").upper())
    assert got.read_bytes() == b"abc"


def test_bad_sha_format_fails_before_download(s3: str, tmp_path: Path) -> None:
    uri = f"s3://{s3}/m/absent.bin"  # would be "not found" if it got that far
    with pytest.raises(BadInput, match=r"expected sha256 'abc' is not 64 hexadecimal"):
        storage.fetch(uri, tmp_path, sha256="abc", what="source model")


def test_s3_missing_key(s3: str, tmp_path: Path) -> None:
    uri = f"s3://{s3}/models/nope.onnx"
    with pytest.raises(BadInput) as err:
        storage.fetch(uri, tmp_path / "dl", what="source model")
    assert str(err.value) == f"source model {uri}: not found"
    assert not (tmp_path / "dl").exists() or os.listdir(tmp_path / "dl") == []
    with pytest.raises(BadInput, match=r"evaluation dataset .*: not found"):
        storage.read_bytes(uri, what="evaluation dataset")
    assert not storage.exists(uri)


def test_s3_missing_bucket(s3: str, tmp_path: Path) -> None:
    uri = "s3://no-such-bucket-edgeslim/m.onnx"
    with pytest.raises(BadInput) as err:
        storage.fetch(uri, tmp_path, what="source model")
    assert str(err.value) == f"source model {uri}: bucket 'no-such-bucket-edgeslim' does not exist"
    assert not storage.exists(uri)
    assert not storage.exists("s3://no-such-bucket-edgeslim/prefix/")
    with pytest.raises(BadInput, match=f"destination {uri}: bucket .* does not exist"):
        storage.put_bytes(b"x", uri)
    with pytest.raises(BadInput, match=f"destination {uri}: bucket .* does not exist"):
        storage.put_file(write(tmp_path / "m.onnx", b"x"), uri)


def test_s3_uri_must_name_an_object(s3: str, tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="s3 URI has no key"):
        storage.fetch(f"s3://{s3}", tmp_path)
    with pytest.raises(BadInput, match="names a prefix"):
        storage.put_bytes(b"x", f"s3://{s3}/models/")


def test_s3_size_limit_from_head(s3: str, tmp_path: Path) -> None:
    uri = f"s3://{s3}/m/big.bin"
    storage.put_bytes(b"x" * 3000, uri)

    with pytest.raises(BadInput) as err:
        storage.fetch(uri, tmp_path / "dl", max_bytes=1024, what="source model")
    assert str(err.value) == (
        f"source model {uri}: 2.9 KiB (3000 bytes) exceeds the 1 KiB download limit"
    )
    assert os.listdir(tmp_path / "dl") == []
    # exactly at the limit is fine
    assert storage.fetch(uri, tmp_path / "ok", max_bytes=3000).stat().st_size == 3000


def test_size_limit_from_env(s3: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"s3://{s3}/m/big.bin"
    storage.put_bytes(b"x" * 2048, uri)
    monkeypatch.setenv(storage.MAX_BYTES_ENV, "1024")
    assert storage.max_download_bytes() == 1024
    with pytest.raises(
        BadInput, match=f"2 KiB .* exceeds the 1 KiB download limit .*{storage.MAX_BYTES_ENV}"
    ):
        storage.read_bytes(uri)
    monkeypatch.setenv(storage.MAX_BYTES_ENV, "lots")
    with pytest.raises(BadInput, match="expected a positive number of bytes"):
        storage.read_bytes(uri)
    monkeypatch.delenv(storage.MAX_BYTES_ENV)
    assert storage.max_download_bytes() == storage.DEFAULT_MAX_BYTES == 4 * 1024**3
    assert storage.limits._human(storage.DEFAULT_MAX_BYTES) == "4 GiB"
    assert storage.limits._human(5_476_083_302) == "5.1 GiB"


def test_s3_size_limit_while_streaming(s3: str, s3_server: S3Server) -> None:
    """The streamed backstop, fed a real HTTP body (HEAD would have caught this one first)."""
    storage.put_bytes(b"y" * 5000, f"s3://{s3}/m/stream.bin")
    body = s3_server.client().get_object(Bucket=s3, Key="m/stream.bin")["Body"]
    received: list[bytes] = []
    with pytest.raises(BadInput, match=r"exceeds the 2 KiB download limit \(stopped reading"):
        storage.limits._copy_limited(
            body.iter_chunks(1000),
            received.append,
            limit=2048,
            hint="",
            what="source model",
            uri="s3://x/y",
        )
    body.close()
    assert sum(map(len, received)) <= 2048


# ---------------------------------------------------------------------- S3 writes


def test_s3_atomic_upload_readers_see_old_or_new(
    s3: str, s3_server: S3Server, tmp_path: Path
) -> None:
    """While a multipart upload replaces an object, readers only ever see a whole version."""
    old, new = b"o" * 1000, os.urandom(12 * 1024 * 1024)  # > 8 MiB: multipart upload
    fresh_uri = f"s3://{s3}/m/fresh.bin"
    uri = f"s3://{s3}/m/model.onnx"
    storage.put_bytes(old, uri)
    src = write(tmp_path / "new.onnx", new)
    client = s3_server.client()
    seen: set[str] = set()
    fresh_seen: set[str] = set()
    listed: set[str] = set()
    done = threading.Event()

    def writer() -> None:
        try:
            storage.put_file(src, uri)
            storage.put_file(src, fresh_uri)
        finally:
            done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    while not done.is_set():
        seen.add(sha(client.get_object(Bucket=s3, Key="m/model.onnx")["Body"].read()))
        try:
            fresh_seen.add(sha(client.get_object(Bucket=s3, Key="m/fresh.bin")["Body"].read()))
        except client.exceptions.NoSuchKey:
            fresh_seen.add("absent")
        listed.update(keys(s3_server, s3))
    thread.join()

    assert seen <= {sha(old), sha(new)}
    assert fresh_seen <= {"absent", sha(new)}
    assert storage.sha256_file(storage.fetch(uri, tmp_path / "dl")) == sha(new)
    assert keys(s3_server, s3) == ["m/fresh.bin", "m/model.onnx"]  # staging keys gone
    staged = [k for k in listed if ".tmp-" in k]
    assert all(k.startswith(("m/model.onnx.tmp-", "m/fresh.bin.tmp-")) for k in staged)


def test_s3_failed_publish_cleans_up(
    s3: str, s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = f"s3://{s3}/m/model.onnx"
    storage.put_bytes(b"old", uri)
    staged: list[str] = []

    def failing_copy(client: object, bucket: str, src_key: str, dest_key: str, ct: str) -> None:
        staged.append(src_key)
        assert src_key in keys(s3_server, s3)  # the staged upload really happened
        raise StorageUnavailable("injected: server went away during copy")

    monkeypatch.setattr("edgeslim.storage.s3._s3_copy", failing_copy)
    with pytest.raises(StorageUnavailable, match="injected"):
        storage.put_file(write(tmp_path / "new", b"new"), uri)
    with pytest.raises(StorageUnavailable, match="injected"):
        storage.put_bytes(b"other", f"s3://{s3}/m/fresh.json")

    assert [k.startswith("m/model.onnx.tmp-") for k in staged] == [True, False]
    assert keys(s3_server, s3) == ["m/model.onnx"]
    assert storage.read_bytes(uri) == b"old"


def test_s3_multipart_copy_path(
    s3: str, s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Artifacts over 5 GiB are published with UploadPartCopy; shrink the threshold to test it."""
    monkeypatch.setattr("edgeslim.storage.s3._COPY_MULTIPART_THRESHOLD", 5 * 1024 * 1024)
    monkeypatch.setattr("edgeslim.storage.s3._COPY_PART_SIZE", 5 * 1024 * 1024)
    data = os.urandom(11 * 1024 * 1024)
    uri = f"s3://{s3}/m/huge.onnx"
    storage.put_file(write(tmp_path / "huge.onnx", data), uri)

    head = s3_server.client().head_object(Bucket=s3, Key="m/huge.onnx")
    assert head["ETag"].strip('"').endswith("-3")  # really a 3-part multipart copy
    assert head["ContentType"] == "application/octet-stream"
    assert storage.fetch(uri, tmp_path / "dl", sha256=sha(data)).read_bytes() == data
    assert keys(s3_server, s3) == ["m/huge.onnx"]


def test_s3_delete_prefix(s3: str, s3_server: S3Server) -> None:
    for key in ["out/cnn/h1/model.onnx", "out/cnn/h1/manifest.json", "out/cnn/h2/model.onnx"]:
        storage.put_bytes(b"x", f"s3://{s3}/{key}")
    for key in ["out/cnn-v2/h1/model.onnx", "out/cnn", "other/cnn/x"]:
        storage.put_bytes(b"x", f"s3://{s3}/{key}")

    assert storage.delete_prefix(f"s3://{s3}/out/cnn") == 3
    assert keys(s3_server, s3) == ["other/cnn/x", "out/cnn", "out/cnn-v2/h1/model.onnx"]
    assert storage.delete_prefix(f"s3://{s3}/out/cnn/") == 0  # idempotent
    assert storage.delete_prefix("s3://no-such-bucket-edgeslim/out/") == 0
    with pytest.raises(BadInput, match="refusing to delete a whole bucket"):
        storage.delete_prefix(f"s3://{s3}/")


# ------------------------------------------------------------- endpoint problems


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # nothing listens once the socket closes


def test_unreachable_endpoint_is_retryable(
    s3: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    uri = f"s3://{s3}/m/model.onnx"
    with pytest.raises(StorageUnavailable, match=f"source model {uri}: storage unreachable"):
        storage.fetch(uri, tmp_path / "dl", what="source model")
    assert os.listdir(tmp_path / "dl") == []
    with pytest.raises(StorageUnavailable, match="storage unreachable"):
        storage.put_bytes(b"x", uri)
    with pytest.raises(StorageUnavailable, match="storage unreachable"):
        storage.put_file(write(tmp_path / "m.onnx", b"x"), uri)
    with pytest.raises(StorageUnavailable, match="storage unreachable"):
        storage.exists(uri)
    with pytest.raises(StorageUnavailable, match="storage unreachable"):
        storage.delete_prefix(f"s3://{s3}/m/")


def test_endpoint_must_be_a_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "minio:9000")
    with pytest.raises(BadInput, match=r"'minio:9000' .* is not an http"):
        storage.exists("s3://bucket/key")


def test_client_follows_env(s3: str, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    first = storage.s3_client()
    assert first is storage.s3_client()  # cached for an unchanged env
    assert first.meta.endpoint_url == s3_server.endpoint
    assert first.meta.region_name == "us-east-1"
    monkeypatch.delenv("AWS_REGION")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    assert storage.s3_client().meta.region_name == "eu-west-1"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:1")
    assert storage.s3_client().meta.endpoint_url == "http://127.0.0.1:1"


def test_threads_that_need_a_client_at_once_share_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """The operator's handler threads read their first manifests together: one
    client is built, not one each (~13 MB apiece)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")  # an env of this test's own
    monkeypatch.setenv("AWS_REGION", "ap-south-2")
    start = threading.Barrier(16)
    clients: list[object] = []

    def get() -> None:
        start.wait()
        clients.append(storage.s3_client())

    threads = [threading.Thread(target=get) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(clients) == 16 and all(c is clients[0] for c in clients)


def client_error(code: str, status: int) -> botocore.exceptions.ClientError:
    return botocore.exceptions.ClientError(
        {
            "Error": {"Code": code, "Message": f"{code} says\nno"},
            "ResponseMetadata": {"HTTPStatusCode": status},
        },
        "GetObject",
    )


@pytest.mark.parametrize(
    ("code", "status", "kind", "message"),
    [
        (
            "AccessDenied",
            403,
            BadInput,
            "m s3://b/k: access denied (AccessDenied: AccessDenied says no)",
        ),
        ("InvalidAccessKeyId", 403, BadInput, "m s3://b/k: access denied (InvalidAccessKeyId"),
        ("NoSuchKey", 404, BadInput, "m s3://b/k: not found"),
        ("NoSuchBucket", 404, BadInput, "m s3://b/k: bucket 'b' does not exist"),
        ("InternalError", 500, StorageUnavailable, "m s3://b/k: storage error InternalError"),
        ("ServiceUnavailable", 503, StorageUnavailable, "storage error ServiceUnavailable"),
        ("SlowDown", 503, StorageUnavailable, "storage error SlowDown"),
        ("PreconditionFailed", 412, StorageUnavailable, "changed while it was being read"),
        ("InvalidRange", 416, BadInput, "m s3://b/k: InvalidRange: InvalidRange says no"),
    ],
)
def test_error_classification(code: str, status: int, kind: type, message: str) -> None:
    """How S3 error responses map to ours (moto can't be made to answer 403/5xx on cue)."""
    err = storage.s3._translate(client_error(code, status), "m", "s3://b/k")
    assert type(err) is kind
    assert message in str(err)
    assert str(err).startswith("m s3://b/k: ")
    assert "\n" not in str(err)


# ------------------------------------------------------------------ local files


@pytest.mark.parametrize("form", ["path", "file-uri"])
def test_local_fetch_copies_the_bytes_it_hashed(tmp_path: Path, form: str) -> None:
    data = b"local model"
    src = write(tmp_path / "m.onnx", data)
    uri = str(src) if form == "path" else f"file://{src}"
    dest = tmp_path / "dl"

    got = storage.fetch_verified(uri, dest, sha256=sha(data), what="source model")

    # A copy in the caller's scratch folder, never the original: swapping the
    # original afterwards cannot change what runs under the checked sha256.
    assert got.path == dest / "m.onnx" and got.path != src
    assert (got.sha256, got.size_bytes, got.etag) == (sha(data), len(data), None)
    src.write_bytes(b"a different model")
    assert got.path.read_bytes() == data
    assert sorted(p.name for p in dest.iterdir()) == ["m.onnx"]  # no .part leftovers
    src.write_bytes(data)
    assert storage.read_bytes(uri) == data
    assert storage.exists(uri)
    with pytest.raises(BadInput) as err:
        storage.fetch(uri, dest, sha256="a" * 64, what="source model")
    assert str(err.value) == (
        f"source model {uri}: sha256 mismatch: expected {'a' * 64}, got {sha(data)}"
    )
    with pytest.raises(BadInput, match=r"11 B \(11 bytes\) exceeds the 10 B download limit"):
        storage.fetch(uri, dest, max_bytes=10)


def test_local_fetch_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.onnx"
    with pytest.raises(BadInput) as err:
        storage.fetch(str(missing), tmp_path, what="source model")
    assert str(err.value) == f"source model {missing}: not found"
    with pytest.raises(BadInput, match="is a directory, expected a file"):
        storage.read_bytes(f"file://{tmp_path}", what="dataset")
    assert not storage.exists(str(missing))


def test_local_put_is_atomic_and_readable(tmp_path: Path) -> None:
    dest = tmp_path / "out" / "cnn" / "model.onnx"
    src = write(tmp_path / "src", b"v1")
    assert storage.put_file(src, str(dest)) == str(dest)
    assert dest.read_bytes() == b"v1"
    assert stat.S_IMODE(dest.stat().st_mode) == 0o644
    storage.put_bytes(b"v2", f"file://{dest}")
    assert dest.read_bytes() == b"v2"
    assert os.listdir(dest.parent) == ["model.onnx"]  # no temp files left


def test_local_readers_see_old_or_new(tmp_path: Path) -> None:
    dest = tmp_path / "model.onnx"
    versions = [b"a" * 2_000_000, b"b" * 3_000_000]
    storage.put_bytes(versions[0], str(dest))
    done = threading.Event()

    def writer() -> None:
        for i in range(10):
            storage.put_bytes(versions[i % 2], str(dest))
        done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    seen = set()
    while not done.is_set():
        seen.add(sha(dest.read_bytes()))
    thread.join()
    assert seen <= {sha(v) for v in versions}
    assert os.listdir(tmp_path) == ["model.onnx"]


def test_local_failed_write_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dest = tmp_path / "model.onnx"
    dest.write_bytes(b"old")

    def boom(src: object, dst: object) -> None:
        raise OSError("injected: disk went away")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="injected"):
        storage.put_file(write(tmp_path / "src", b"new"), str(dest))
    monkeypatch.undo()
    assert dest.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "src"]


def test_local_put_errors(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match=r"upload source .*: not found"):
        storage.put_file(tmp_path / "absent", str(tmp_path / "x"))
    (tmp_path / "dir").mkdir()
    with pytest.raises(BadInput, match="is a directory"):
        storage.put_bytes(b"x", str(tmp_path / "dir"))


def test_local_delete_prefix(tmp_path: Path) -> None:
    root = tmp_path / "out"
    for rel in ["cnn/h1/model.onnx", "cnn/h1/manifest.json", "cnn/h2/model.onnx"]:
        storage.put_bytes(b"x", str(root / rel))
    storage.put_bytes(b"x", str(root / "cnn-v2" / "model.onnx"))

    assert storage.exists(f"{root}/cnn/")
    assert storage.delete_prefix(f"file://{root}/cnn") == 3
    assert not (root / "cnn").exists()
    assert (root / "cnn-v2" / "model.onnx").exists()
    assert not storage.exists(f"{root}/cnn/")
    assert storage.delete_prefix(str(root / "cnn")) == 0
    with pytest.raises(BadInput, match="filesystem root"):
        storage.delete_prefix("file:///")
    with pytest.raises(BadInput, match="working directory"):
        storage.delete_prefix(".")
