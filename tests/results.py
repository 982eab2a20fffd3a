"""Where a test's compression result lies: `<output>/<ns>/<name>/<spec-hash>/<inputs-id>/`.

The inputs id is a digest of the bytes of every input, so a test finds the
folder either by computing it from the files it gave the spec (before a run)
or by picking the stored result whose inputs match the files' bytes now.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from edgeslim import storage
from edgeslim.api.result import InputIdentity, inputs_id
from edgeslim.api.spec import CompressedModel
from edgeslim.compressor.pipeline import MANIFEST_FILE


def _sha(uri: str) -> str:
    return hashlib.sha256(storage.read_bytes(uri)).hexdigest()


def spec_inputs(doc: dict) -> list[str]:
    """The URIs a plain spec reads: source, every dataset and student a step or the
    search names (the output is written, not read)."""
    spec = CompressedModel.model_validate(doc).spec.model_dump(by_alias=True, exclude={"output"})
    keys = {"uri", "dataset", "calibrationDataset", "trainDataset"}
    uris: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in keys and isinstance(value, str) and value not in uris:
                    uris.append(value)
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(spec)
    return uris


def expected_prefix(doc: dict, output: str, namespace: str = "default") -> str:
    """The folder a run of `doc` writes to, for the bytes its inputs hold now."""
    obj = CompressedModel.model_validate(doc)
    ids = [
        InputIdentity(field="", uri=uri, sha256=_sha(uri), size_bytes=0) for uri in spec_inputs(doc)
    ]
    return storage.result_prefix(
        output, namespace, obj.metadata.name, obj.spec.spec_hash(), inputs_id(ids)
    )


def _manifests(spec_dir: str) -> list[str]:
    """manifest.json URIs one level below `spec_dir` (one per inputs id)."""
    scheme, bucket, key = storage.parse(spec_dir)
    if scheme == "file":
        return [str(p) for p in sorted(Path(key).glob(f"*/{MANIFEST_FILE}"))]
    listed = storage.s3_client().list_objects_v2(Bucket=bucket, Prefix=key)
    return [
        f"s3://{bucket}/{o['Key']}"
        for o in listed.get("Contents", [])
        if o["Key"].count("/") == key.count("/") + 1 and o["Key"].endswith(f"/{MANIFEST_FILE}")
    ]


def current_result(doc: dict, output: str, namespace: str = "default") -> tuple[str, dict]:
    """(prefix, manifest) of the stored result computed from the inputs' bytes as they are now."""
    obj = CompressedModel.model_validate(doc)
    spec_dir = storage.result_prefix(output, namespace, obj.metadata.name, obj.spec.spec_hash())
    for uri in _manifests(spec_dir):
        manifest = json.loads(storage.read_bytes(uri))
        if all(_sha(i["uri"]) == i["sha256"] for i in manifest["inputs"]):
            return uri.removesuffix(MANIFEST_FILE), manifest
    raise AssertionError(f"no result under {spec_dir} for the inputs' current bytes")
