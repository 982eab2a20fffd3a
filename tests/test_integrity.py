"""Pins, reuse and credentials under attack (issue 8, items 4, 5, 6-prefix and 8).

Real CLI runs (in-process `main`, or a subprocess where the environment is
the attack), real local files and the real S3 test server: a pin holds on
every use and for the bytes that run, a stored result is reused only when it
is this object's and was computed from the same input bytes, objects in two
namespaces never share a prefix, and no message carries a credential.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest

from edgeslim import storage
from edgeslim.api.result import CompressionResult
from edgeslim.api.spec import CompressedModel
from edgeslim.cli import EXIT_BAD_INPUT, EXIT_ERROR, EXIT_OK
from edgeslim.compressor import model_io
from edgeslim.compressor.pipeline import MANIFEST_FILE, MODEL_FILE, Workspace, reuse_mismatch
from edgeslim.errors import BadInput, StorageUnavailable
from edgeslim.operator import events
from edgeslim.operator.cleanup import cleanup_artifacts
from edgeslim.redact import redact, redact_messages, remember
from tests.cluster.processes import free_port
from tests.results import current_result
from tests.test_cli import run, spec_for, written

QUICK = [{"quantize": {"mode": "dynamic"}}]


def sha(path: Path) -> str:
    return storage.sha256_file(path)


def quick_spec(digits, tmp_path: Path, **spec_updates) -> dict:
    return spec_for(digits, tmp_path, pipeline=QUICK, **spec_updates)


def manifest_of(doc: dict, output: str, namespace: str = "default") -> tuple[str, dict]:
    """(prefix, manifest) of the result for the inputs' bytes as they are now."""
    return current_result(doc, output, namespace)


def variant(src: Path, dest: Path, text: str) -> Path:
    """The same model with other bytes (a doc string), as a re-exported model would be."""
    model = onnx.load(str(src))
    model.doc_string = text
    onnx.save(model, str(dest))
    return dest


# ------------------------------------------------------------------ item 4: pins


def test_a_pin_is_checked_even_when_the_uri_was_fetched_unpinned_first(
    digits, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # Same file as evaluation dataset (no pin) and distill dataset (wrong pin).
    doc = spec_for(
        digits,
        tmp_path,
        pipeline=[
            {"distill": {"dataset": str(digits.val), "datasetSha256": "0" * 64, "epochs": 1}}
        ],
    )
    assert run(doc, tmp_path) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "pipeline[0].distill.dataset" in err and "sha256 mismatch" in err, err
    assert f"got {sha(digits.val)}" in err
    assert written(tmp_path) == []


def test_only_the_verified_scratch_copy_is_ever_read(digits, tmp_path: Path) -> None:
    src = tmp_path / "cnn.onnx"
    src.write_bytes(digits.model_path.read_bytes())
    pinned = sha(src)
    ws = Workspace(tmp_path / "scratch")

    path = ws.model_file(str(src), pinned, "source model")
    # Swap the original right after the check, as an attacker racing the Job would.
    variant(digits.model_path, src, "swapped in after the check")

    assert path.is_relative_to(ws.root) and sha(path) == pinned
    assert model_io.load_model(path, "source").doc_string == digits.model().doc_string
    # A later use with the pin checks it against that same copy (and passes)...
    assert ws.fetch(str(src), pinned, "source model") == path
    # ...while another pin on a later use is checked too, not skipped as cached.
    with pytest.raises(BadInput, match="sha256 mismatch"):
        ws.fetch(str(src), "f" * 64, "distill student")


def _external(digits, folder: Path) -> Path:
    folder.mkdir()
    model = digits.model()
    path = folder / "cnn.onnx"
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="cnn.weights",
        size_threshold=0,
    )
    assert (folder / "cnn.weights").stat().st_size > 1000
    return path


def test_a_pinned_model_with_external_data_is_refused(
    digits, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = _external(digits, tmp_path / "ext")
    doc = quick_spec(digits, tmp_path)
    doc["spec"]["source"] = {"uri": str(path), "sha256": sha(path)}
    assert run(doc, tmp_path) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "external data files (cnn.weights)" in err and "pin cannot cover" in err, err
    assert written(tmp_path) == []


def test_an_unpinned_model_with_external_data_runs_from_scratch_and_is_recorded(
    digits, tmp_path: Path
) -> None:
    path = _external(digits, tmp_path / "ext")
    doc = quick_spec(digits, tmp_path)
    doc["spec"]["source"] = {"uri": str(path)}
    assert run(doc, tmp_path) == EXIT_OK
    _, manifest = manifest_of(doc, str(tmp_path / "out"))
    inputs = {i["uri"]: i for i in manifest["inputs"]}
    weights = str(tmp_path / "ext" / "cnn.weights")
    assert inputs[weights]["sha256"] == sha(tmp_path / "ext" / "cnn.weights")
    assert inputs[weights]["field"] == "source external data cnn.weights"

    # New weights beside the same .onnx are new content: not the old result.
    data = bytearray((tmp_path / "ext" / "cnn.weights").read_bytes())
    data[-4:] = b"\0\0\0\0"
    (tmp_path / "ext" / "cnn.weights").write_bytes(bytes(data))
    assert run(doc, tmp_path) == EXIT_OK
    _, again = manifest_of(doc, str(tmp_path / "out"))
    assert {i["uri"]: i["sha256"] for i in again["inputs"]}[weights] == sha(
        tmp_path / "ext" / "cnn.weights"
    )


# ----------------------------------------------------- item 4: what may be reused


@pytest.fixture(scope="module")
def stored(digits, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, dict]:
    """One real result: (spec, prefix, manifest)."""
    tmp = tmp_path_factory.mktemp("stored")
    doc = quick_spec(digits, tmp)
    assert run(doc, tmp) == EXIT_OK
    prefix, manifest = manifest_of(doc, str(tmp / "out"))
    return doc, prefix, manifest


def _tampered(manifest: dict, **changes: object) -> CompressionResult:
    out = json.loads(json.dumps(manifest))
    for dotted, value in changes.items():
        *path, last = dotted.split("__")
        node = out
        for key in path:
            node = node[key]
        node[last] = value
    return CompressionResult.model_validate(out)


def test_the_stored_result_as_written_is_reusable(stored) -> None:
    doc, prefix, manifest = stored
    obj = CompressedModel.model_validate(doc)
    current = CompressionResult.model_validate(manifest)
    args = (obj.metadata.name, "default", obj.spec.spec_hash(), prefix, current.inputs)
    assert reuse_mismatch(current, *args) is None


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"name": "someone-else"}, "belongs to default/someone-else"),
        ({"namespace": "team-b"}, "belongs to team-b/"),
        ({"namespace": None}, "belongs to None/"),
        ({"specHash": "ffffffffffffffff"}, "spec hash ffffffffffffffff"),
        ({"artifact__uri": "{prefix}../other/model.onnx"}, "not its own"),
        ({"artifact__uri": "{prefix}%2e%2e/model.onnx"}, "not its own"),
        ({"artifact__uri": "{prefix}model.rejected.onnx"}, "not its own"),
        ({"artifact__uri": "s3://other-bucket/model.onnx"}, "not its own"),
        ({"artifact__uri": "{parent}/model.onnx"}, "not its own"),
        ({"inputs": []}, "does not record the content of its inputs"),
    ],
)
def test_a_manifest_that_is_not_this_runs_is_not_reused(stored, changes: dict, why: str) -> None:
    doc, prefix, manifest = stored
    obj = CompressedModel.model_validate(doc)
    parent = prefix.rstrip("/").rsplit("/", 1)[0]
    changes = {
        k: v.format(prefix=prefix, parent=parent) if isinstance(v, str) else v
        for k, v in changes.items()
    }
    current = CompressionResult.model_validate(manifest).inputs
    bad = _tampered(manifest, **changes)
    got = reuse_mismatch(bad, obj.metadata.name, "default", obj.spec.spec_hash(), prefix, current)
    assert got is not None and why in got, got


def test_an_artifact_outside_the_prefix_is_recomputed_not_served(digits, tmp_path: Path) -> None:
    doc = quick_spec(digits, tmp_path)
    assert run(doc, tmp_path) == EXIT_OK
    prefix, manifest = manifest_of(doc, str(tmp_path / "out"))
    model = Path(prefix) / MODEL_FILE
    # Another object's artifact with the same bytes: a sha check alone would pass.
    foreign = Path(prefix).parent.parent / "other" / "h" / MODEL_FILE
    foreign.parent.mkdir(parents=True)
    foreign.write_bytes(model.read_bytes())
    first = model.stat().st_ino
    manifest["artifact"]["uri"] = f"{prefix}../../other/h/{MODEL_FILE}"
    manifest["namespace"] = "team-b"
    (Path(prefix) / MANIFEST_FILE).write_text(json.dumps(manifest))

    assert run(doc, tmp_path) == EXIT_OK
    _, again = manifest_of(doc, str(tmp_path / "out"))
    assert again["artifact"]["uri"] == storage.join(prefix, MODEL_FILE)
    assert again["namespace"] == "default"
    assert model.stat().st_ino != first  # computed again, into its own prefix
    assert foreign.read_bytes() == model.read_bytes()  # the other one left alone


# ------------------------------------------------------------ item 5: stale results


def test_a_source_replaced_at_the_same_s3_uri_is_recomputed(
    digits, tmp_path: Path, s3: str
) -> None:
    src, val = f"s3://{s3}/inputs/cnn.onnx", f"s3://{s3}/inputs/val.npz"
    storage.put_file(digits.model_path, src)
    storage.put_file(digits.val, val)
    doc = quick_spec(digits, tmp_path)
    doc["spec"]["source"] = {"uri": src}
    doc["spec"]["evaluation"]["dataset"] = val
    doc["spec"]["output"]["uri"] = f"s3://{s3}/edge/"
    output = doc["spec"]["output"]["uri"]
    assert run(doc, tmp_path) == EXIT_OK
    old_prefix, old = manifest_of(doc, output)
    assert old["source"]["sha256"] == sha(digits.model_path)
    etag = s3_etag(src)
    assert {i["field"]: i.get("etag") for i in old["inputs"]}["source"] == etag

    # Same URI, new bytes: the old result must not come back.
    new = variant(digits.model_path, tmp_path / "v2.onnx", "retrained")
    storage.put_file(new, src)
    obj = CompressedModel.model_validate(doc)
    logs: list[str] = []
    from edgeslim.compressor.pipeline import compress

    outcome = compress(obj, output=None, workdir=tmp_path / "w", log=logs.append)
    assert outcome.result.source.sha256 == sha(new) != old["source"]["sha256"]
    assert not any("reusing" in line for line in logs), logs
    fresh_prefix, fresh = manifest_of(doc, output)
    assert fresh["source"]["sha256"] == sha(new)
    assert {i["field"]: i.get("etag") for i in fresh["inputs"]}["source"] == s3_etag(src) != etag
    # Written beside the old result, which stays whole: pods may still be serving it.
    assert fresh_prefix != old_prefix
    assert fresh_prefix.rsplit("/", 2)[0] == old_prefix.rsplit("/", 2)[0]  # same spec hash
    old_model = storage.read_bytes(old["artifact"]["uri"])
    assert hashlib.sha256(old_model).hexdigest() == old["artifact"]["sha256"]
    assert json.loads(storage.read_bytes(storage.join(old_prefix, MANIFEST_FILE))) == old

    # Unchanged inputs: reused as before.
    logs.clear()
    again = compress(obj, output=None, workdir=tmp_path / "w2", log=logs.append)
    assert again.result.source.sha256 == sha(new)
    assert any("reusing the stored result" in line for line in logs), logs


def test_a_result_in_the_layout_before_inputs_ids_is_still_reused(digits, tmp_path: Path) -> None:
    """Results stored as <spec-hash>/model.onnx (before the inputs named a folder)
    are found and reused for the same bytes: no migration, no second compression."""
    doc = quick_spec(digits, tmp_path)
    assert run(doc, tmp_path) == EXIT_OK
    prefix, manifest = manifest_of(doc, str(tmp_path / "out"))
    legacy = Path(prefix).parent
    for name in (MODEL_FILE, MANIFEST_FILE):
        (Path(prefix) / name).rename(legacy / name)
    Path(prefix).rmdir()
    manifest["artifact"]["uri"] = str(legacy / MODEL_FILE)
    (legacy / MANIFEST_FILE).write_text(json.dumps(manifest))

    from edgeslim.compressor.pipeline import compress

    logs: list[str] = []
    obj = CompressedModel.model_validate(doc)
    outcome = compress(obj, output=None, workdir=tmp_path / "w", log=logs.append)
    assert any("reusing the stored result" in line for line in logs), logs
    assert outcome.model_uri == str(legacy / MODEL_FILE)
    assert not Path(prefix).exists()  # nothing computed again


def s3_etag(uri: str) -> str:
    bucket, key = storage.parse(uri)[1:]
    return storage.s3_client().head_object(Bucket=bucket, Key=key)["ETag"]


def test_a_replaced_evaluation_dataset_gets_a_new_verdict(digits, tmp_path: Path) -> None:
    val = tmp_path / "val.npz"
    val.write_bytes(digits.val.read_bytes())
    doc = quick_spec(digits, tmp_path)
    doc["spec"]["evaluation"]["dataset"] = str(val)
    assert run(doc, tmp_path) == EXIT_OK
    _, old = manifest_of(doc, str(tmp_path / "out"))

    with np.load(digits.val) as npz:
        np.savez(val, **{k: npz[k][:50] for k in npz.files})
    assert run(doc, tmp_path) == EXIT_OK
    _, new = manifest_of(doc, str(tmp_path / "out"))
    assert (old["evaluation"]["samples"], new["evaluation"]["samples"]) == (540, 50)
    recorded = {i["field"]: i["sha256"] for i in new["inputs"]}
    assert recorded["evaluation.dataset"] == sha(val)


# ------------------------------------------------------- item 6: the storage prefix


def test_two_namespaces_never_share_or_delete_each_others_artifacts(digits, tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    prefixes = []
    for ns in ("team-a", "team-b"):
        doc = quick_spec(digits, tmp_path)
        doc["metadata"]["namespace"] = ns
        assert run(doc, tmp_path) == EXIT_OK
        prefix, manifest = manifest_of(doc, out, ns)
        assert manifest["namespace"] == ns and prefix.startswith(f"{out}/{ns}/digits-cnn/")
        prefixes.append(prefix)

    body = {**doc, "metadata": {"name": "digits-cnn", "namespace": "team-a", "uid": "u"}}
    # No Secret and ambient credentials allowed: the runtime is read for that setting only.
    rt = SimpleNamespace(settings=SimpleNamespace(inherit_storage_credentials=True))
    assert cleanup_artifacts(rt, body) == 2  # type: ignore[arg-type]
    assert not storage.exists(prefixes[0]) and storage.exists(prefixes[1])


@pytest.mark.parametrize("namespace", ["../x", "a/b", "Team", ""])
def test_a_namespace_that_is_no_dns_label_never_moves_the_prefix(namespace: str) -> None:
    if namespace == "":
        assert storage.model_prefix("s3://b/out/", namespace, "m") == "s3://b/out/default/m/"
        return
    with pytest.raises(BadInput, match="must be a DNS label"):
        storage.model_prefix("s3://b/out/", namespace, "m")


# ------------------------------------------------------------ item 8: credentials


@pytest.mark.parametrize(
    ("text", "secret", "kept"),
    [
        (
            'Could not connect to the endpoint URL: "http://user:s3cr3t@127.0.0.1:9/b/k"',
            "s3cr3t",
            "http://***@127.0.0.1:9/b/k",
        ),
        ("endpoint https://AKIAXYZ:pw%40x@minio.local", "pw%40x", "https://***@minio.local"),
        (
            "GET https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4-HMAC-SHA256"
            "&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20260101&X-Amz-Signature=9f86d081884c7d65",
            "9f86d081884c7d65",
            "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=***&X-Amz-Signature=***",
        ),
        ("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG", "wJalrXUtnFEMI", "aws_secret_access_key"),
        ('{"password": "hunter2hunter2"}', "hunter2", '{"password": "***"}'),
    ],
)
def test_redact_masks_credentials_and_keeps_the_rest(text: str, secret: str, kept: str) -> None:
    out = redact(text)
    assert secret not in out and kept in out, out


def test_redact_masks_secret_values_from_the_environment_and_from_secrets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret-0123456789")
    remember("from-a-model-secret-42")
    text = "signature for env-secret-0123456789 and from-a-model-secret-42 did not match"
    assert redact(text) == "signature for *** and *** did not match"
    # Unrelated text, short values and field names survive untouched.
    plain = "spec.source.credentialsSecret: s3-creds not found; sparsity=0.5"
    assert redact(plain) == plain
    # Errors redact themselves as they are made, whoever prints them.
    assert "env-secret" not in str(StorageUnavailable("x env-secret-0123456789 y"))


def test_operator_status_and_events_carry_no_credentials() -> None:
    message = "Job failed: Could not connect to http://admin:hunter22@minio:9000/b/k"
    status = redact_messages(
        {"message": message, "conditions": [{"type": "Ready", "message": message}]}
    )
    assert "hunter22" not in json.dumps(status)
    assert status["conditions"][0]["message"].endswith("http://***@minio:9000/b/k")
    model = {
        "apiVersion": "edgeslim.io/v1alpha1",
        "kind": "CompressedModel",
        "metadata": {"name": "m", "namespace": "ns", "uid": "u"},
    }
    assert "hunter22" not in events.build(model, "Warning", "CompressionFailed", message)["message"]


@pytest.mark.parametrize(
    ("endpoint", "code"),
    [
        ("http://user:s3cr3t@127.0.0.1:{port}", EXIT_ERROR),  # unreachable: storage unavailable
        ("ftp://user:s3cr3t@127.0.0.1:{port}", EXIT_BAD_INPUT),  # not http(s): bad input
    ],
)
def test_the_cli_never_prints_endpoint_credentials(
    digits, tmp_path: Path, endpoint: str, code: int
) -> None:
    doc = quick_spec(digits, tmp_path)
    doc["spec"]["source"] = {"uri": "s3://models/cnn.onnx"}
    spec = tmp_path / "spec.yaml"
    spec.write_text(json.dumps(doc))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
        "AWS_ENDPOINT_URL": endpoint.format(port=free_port()),
        "AWS_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "edgeslim.cli", "compress", str(spec), "--quiet"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == code, proc.stderr
    both = proc.stdout + proc.stderr
    assert "s3cr3t" not in both and "wJalrXUtnFEMI" not in both, both
    assert "***@127.0.0.1" in proc.stderr and "Traceback" not in both, proc.stderr
    assert proc.stderr.count("\n") == 1
