"""The generated CompressedModel CRD: in sync with the models, structural, and
enforced by a real API server (schema, CEL rules, defaults, kubectl explain)."""

from __future__ import annotations

import copy
import json
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from edgeslim.api.base import API_GROUP, API_VERSION, PLURAL
from edgeslim.api.crd import MAX_NAME_LENGTH, build_crd, render_crd, render_policy_crd
from edgeslim.api.spec import CompressedModel
from tests.cluster.fixtures import K8s
from tests.cluster.tools import binaries
from tests.operator.support import apply_crd

ROOT = Path(__file__).resolve().parent.parent
CRD_FILE = ROOT / "crds" / "compressedmodel.yaml"
POLICY_CRD_FILE = ROOT / "crds" / "compressionpolicy.yaml"
EXAMPLE = ROOT / "examples" / "digits" / "digits-s3.yaml"


def _schema() -> dict[str, Any]:
    return build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def _nodes(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from _nodes(child, f"{path}.{name}")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _nodes(node["additionalProperties"], f"{path}.*")
    if "items" in node:
        yield from _nodes(node["items"], f"{path}[]")


# --- the file and the schema, no cluster -----------------------------------------


def test_committed_crd_matches_the_models() -> None:
    assert CRD_FILE.read_text() == render_crd(), (
        "crds/compressedmodel.yaml is out of date with edgeslim/api; run `make crd` and commit it"
    )
    assert POLICY_CRD_FILE.read_text() == render_policy_crd(), (
        "crds/compressionpolicy.yaml is out of date with edgeslim/api; run `make crd`"
    )


def test_schema_is_structural() -> None:
    for path, node in _nodes(_schema()):
        assert not {"$ref", "$defs", "anyOf", "oneOf", "allOf", "title", "const"} & set(node), path
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path} has no type"
        assert node.get("default", "") is not None, f"{path} has default: null"
        assert node.get("additionalProperties") is not False, path
        for bound in ("exclusiveMinimum", "exclusiveMaximum"):
            assert node.get(bound, True) is True, f"{path}.{bound} must be a boolean flag"


def test_field_descriptions_reach_the_schema() -> None:
    props = _schema()["properties"]["spec"]["properties"]
    assert props["pipeline"]["description"] == "Ordered steps, applied one after the other."
    prune = props["pipeline"]["items"]["properties"]["prune"]
    assert prune["properties"]["sparsity"]["description"].startswith("Target share of weights")
    # docstring line breaks are unwrapped: kubectl explain re-wraps the text itself
    assert "\n" not in props["evaluation"]["properties"]["dataset"]["description"]


def test_every_field_has_a_description() -> None:
    """`kubectl explain` shows nothing for a field without one: keep it at 100%.

    Walks the committed CRD (the drift test ties it to the models), so a field
    added to edgeslim/api without a docstring or `description=` fails here."""
    for path, least in ((CRD_FILE, 100), (POLICY_CRD_FILE, 50)):
        committed = yaml.safe_load(path.read_text())
        schema = committed["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        fields = [
            f"{path}.{name}"
            for path, node in _nodes(schema)
            for name, child in node.get("properties", {}).items()
        ]
        missing = [
            f"{path}.{name}"
            for path, node in _nodes(schema)
            for name, child in node.get("properties", {}).items()
            if not str(child.get("description", "")).strip()
        ]
        # The API server refuses anything on metadata but name / generateName (a
        # description included); kubectl explain shows ObjectMeta's own text there.
        missing.remove(".metadata")
        assert len(fields) > least  # the walk reaches the nested fields
        assert missing == [], f"{path.name}: {len(missing)} of {len(fields)} lack a description"


def test_crd_names_avoid_kubectl_clashes() -> None:
    names = build_crd()["spec"]["names"]
    assert "cm" not in names["shortNames"]  # configmaps
    assert names["categories"] == ["edgeslim"]


# --- a real API server ---------------------------------------------------------------


@pytest.fixture(scope="module")
def crd(k8s: K8s) -> None:
    """The committed CRD, installed (or replaced) and Established.

    Left installed afterwards: other tests in the session may use the same CRD.
    """
    apply_crd(k8s)


@pytest.fixture(scope="module")
def cm_namespace(k8s: K8s, crd: None) -> Iterator[str]:
    """One namespace for the whole module: most objects here are rejected, so
    they never need cleaning up, and a namespace per case would be slow."""
    name = f"t-crd-{uuid.uuid4().hex[:6]}"
    k8s.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    k8s.core.delete_namespace(name, propagation_policy="Background")


def _example(name: str | None = None) -> dict[str, Any]:
    obj = yaml.safe_load(EXAMPLE.read_text())
    obj["metadata"] = {"name": name or f"m-{uuid.uuid4().hex[:8]}"}
    return obj


def _create(k8s: K8s, namespace: str, obj: dict[str, Any]) -> dict[str, Any]:
    # Strict is what kubectl sends by default since 1.27: unknown fields are errors.
    return k8s.custom.create_namespaced_custom_object(
        API_GROUP, API_VERSION, namespace, PLURAL, obj, field_validation="Strict"
    )


@pytest.mark.cluster
def test_valid_example_is_accepted_and_defaulted(k8s: K8s, cm_namespace: str) -> None:
    obj = _example()
    obj["spec"]["pipeline"][0] = {"simplify": None}  # `- simplify:` with nothing after it
    created = _create(k8s, cm_namespace, obj)
    spec = created["spec"]
    assert spec["pipeline"][0] == {"simplify": None}
    assert spec["activeDeadlineSeconds"] == 3600
    # Fields a CompressionPolicy can supply get no server-side default: it would
    # read as the object's own choice and override the policy's. pydantic fills
    # them in after the merge.
    assert "latencyRuns" not in spec["evaluation"]
    prune = spec["pipeline"][1]["prune"]
    assert (prune["scope"], prune["sparsity"]) == ("layer", 0.5)
    assert spec["pipeline"][2]["distill"]["batchSize"] == 64
    assert spec["pipeline"][3]["quantize"]["perChannel"] is True
    assert "threads" not in spec["deployment"]


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A mutation setting spec.<path> (dotted, integers index lists); DELETE removes it."""

    def mutate(obj: dict[str, Any]) -> None:
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        node: Any = obj
        for part in parents:
            node = node[part]
        if value is DELETE:
            del node[last]
        else:
            node[last] = copy.deepcopy(value)

    return mutate


def _optimize_instead(optimize: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    """A mutation replacing spec.pipeline by spec.optimize."""

    def mutate(obj: dict[str, Any]) -> None:
        del obj["spec"]["pipeline"]
        obj["spec"]["optimize"] = copy.deepcopy(optimize)

    return mutate


def _canary_beside_targets(names: list[str]) -> Callable[[dict[str, Any]], None]:
    """A mutation giving the spec a canary and targets of these names."""

    def mutate(obj: dict[str, Any]) -> None:
        obj["spec"]["deployment"]["canary"] = {}
        obj["spec"]["targets"] = [{"name": n} for n in names]

    return mutate


DELETE = object()
QUANTIZE = {"quantize": {"mode": "dynamic"}}
PRUNE = {"prune": {"sparsity": 0.3}}

# (id, mutation, substrings the API server's message must contain)
REJECTED: list[tuple[str, Callable[[dict[str, Any]], None], list[str]]] = [
    (
        "sparsity-one",
        _set("spec.pipeline.1.prune.sparsity", 1.0),
        ["spec.pipeline[1].prune.sparsity", "less than 1"],
    ),
    (
        "sparsity-negative",
        _set("spec.pipeline.1.prune.sparsity", -0.1),
        ["spec.pipeline[1].prune.sparsity", "greater than or equal to 0"],
    ),
    (
        "unknown-method",
        _set("spec.pipeline.1.prune.method", "random"),
        ["spec.pipeline[1].prune.method", 'Unsupported value: "random"', '"structured"'],
    ),
    ("bad-sha256", _set("spec.source.sha256", "ABC123"), ["spec.source.sha256", "should match"]),
    ("missing-source", _set("spec.source", DELETE), ["spec.source", "Required value"]),
    (
        "unknown-step",
        _set("spec.pipeline.0", {"sparsify": {}}),
        ['unknown field "spec.pipeline[0].sparsify"'],
    ),
    (
        "unknown-option",
        _set("spec.pipeline.1.prune.ratio", 0.5),
        ['unknown field "spec.pipeline[1].prune.ratio"'],
    ),
    (
        "two-keys-in-a-step",
        _set("spec.pipeline.0", {"simplify": {}, **PRUNE}),
        ["spec.pipeline[0]", "Too many: 2: must have at most 1 item"],
    ),
    (
        "negative-replicas",
        _set("spec.deployment.replicas", -1),
        ["spec.deployment.replicas", "greater than or equal to 0"],
    ),
    (
        "zero-epochs",
        _set("spec.pipeline.2.distill.epochs", 0),
        ["spec.pipeline[2].distill.epochs", "greater than or equal to 1"],
    ),
    (
        "negative-max-drop",
        _set("spec.evaluation.maxMetricDrop", -0.01),
        ["spec.evaluation.maxMetricDrop", "greater than or equal to 0"],
    ),
    (
        "bad-op-type",
        _set("spec.pipeline.3.quantize.opTypes", ["Conv", "1x1"]),
        ["spec.pipeline[3].quantize.opTypes[1]", "should match"],
    ),
    # CEL rules
    (
        "quantize-twice",
        _set("spec.pipeline", [PRUNE, QUANTIZE, QUANTIZE]),
        ["spec.pipeline", "quantize may appear at most once"],
    ),
    (
        "prune-after-quantize",
        _set("spec.pipeline", [QUANTIZE, {"simplify": {}}, PRUNE]),
        ["spec.pipeline", "prune and distill cannot follow quantize"],
    ),
    (
        "distill-after-quantize",
        _set("spec.pipeline", [QUANTIZE, {"distill": {"dataset": "s3://data/train.npz"}}]),
        ["spec.pipeline", "prune and distill cannot follow quantize"],
    ),
    (
        "deployment-without-output",
        _set("spec.output", DELETE),
        ["spec.output", "a deployment needs an output location"],
    ),
    (
        "target-named-as-a-canary",
        _canary_beside_targets(["gpu", "arm", "gpu-canary"]),
        ["spec.targets", "no target may be named <another target>-canary"],
    ),
    (
        "empty-pipeline",
        _set("spec.pipeline", []),
        ["spec.pipeline", "pipeline needs at least one step"],
    ),
    (
        "pipeline-and-optimize",
        _set("spec.optimize", {"objective": "download"}),
        ["spec", "give exactly one of pipeline and optimize"],
    ),
    (
        "optimize-without-budget",
        _optimize_instead({"maxCandidates": 0}),
        ["spec.optimize.maxCandidates", "greater than or equal to 1"],
    ),
    (
        "local-path-in-cluster",
        _set("spec.source.uri", "out/demo/data/cnn.onnx"),
        ["spec.source.uri", "only s3:// URIs work"],
    ),
    (
        "file-uri-in-cluster",
        _set("spec.output.uri", "file:///srv/models"),
        ["spec.output.uri", "only s3:// URIs work"],
    ),
    (
        "name-too-long",
        _set("metadata.name", "m" * (MAX_NAME_LENGTH + 1)),
        ["metadata.name", f"may not be more than {MAX_NAME_LENGTH} bytes"],
    ),
]


# Only the API server enforces these: the CLI reads local paths and does not
# name child objects after the model.
CLUSTER_ONLY = {"local-path-in-cluster", "file-uri-in-cluster", "name-too-long"}
# Only pydantic refuses these: in a cluster a CompressionPolicy may supply what
# is missing, so the operator checks the merged spec (tests/test_policy.py).
PYDANTIC_ONLY = [
    ("neither-pipeline-nor-optimize", _set("spec.pipeline", DELETE)),
    ("no-evaluation", _set("spec.evaluation", DELETE)),
    ("no-evaluation-dataset", _set("spec.evaluation.dataset", DELETE)),
]


@pytest.mark.parametrize(
    "mutate",
    [c[1] for c in REJECTED if c[0] not in CLUSTER_ONLY] + [c[1] for c in PYDANTIC_ONLY],
    ids=[c[0] for c in REJECTED if c[0] not in CLUSTER_ONLY] + [c[0] for c in PYDANTIC_ONLY],
)
def test_pydantic_rejects_what_the_crd_rejects(mutate: Callable[[dict[str, Any]], None]) -> None:
    """The CRD and the models agree: nothing the API server refuses gets through the CLI."""
    obj = _example()
    mutate(obj)
    with pytest.raises(ValidationError):
        CompressedModel.model_validate(obj)


def test_pydantic_accepts_the_cluster_example() -> None:
    CompressedModel.model_validate(_example())


def test_pydantic_accepts_optimize_instead_of_pipeline() -> None:
    obj = _example()
    _optimize_instead({"objective": "latency", "trainDataset": "s3://data/train.npz"})(obj)
    spec = CompressedModel.model_validate(obj).spec
    assert spec.pipeline is None and spec.optimize.objective.value == "latency"
    assert spec.optimize.max_candidates == 32 and spec.optimize.max_seconds == 900


@pytest.mark.cluster
@pytest.mark.parametrize(
    ("mutate", "expected"), [c[1:] for c in REJECTED], ids=[c[0] for c in REJECTED]
)
def test_malformed_object_is_rejected_naming_the_field(
    k8s: K8s, cm_namespace: str, mutate: Callable[[dict[str, Any]], None], expected: list[str]
) -> None:
    obj = _example()
    mutate(obj)
    with pytest.raises(ApiException) as err:
        _create(k8s, cm_namespace, obj)
    message = json.loads(err.value.body)["message"]
    assert err.value.status in (400, 422), message
    missing = [s for s in expected if s not in message]
    assert not missing, f"{missing} not in the API server's message: {message}"


def _kubectl(kubeconfig: Path, cache: Path, *args: str) -> str:
    done = subprocess.run(
        [str(binaries().kubectl), f"--kubeconfig={kubeconfig}", f"--cache-dir={cache}", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _eventually(fn: Callable[[], str], seconds: float = 20) -> str:
    """The API server publishes a new CRD's OpenAPI a moment after it is Established."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return fn()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.mark.cluster
def test_kubectl_explain_shows_the_field_docs(k8s: K8s, crd: None, tmp_path: Path) -> None:
    pipeline = _eventually(
        lambda: _kubectl(k8s.kubeconfig, tmp_path, "explain", "compressedmodel.spec.pipeline")
    )
    assert "Ordered steps, applied one after the other." in pipeline
    assert "quantize" in pipeline and "prune" in pipeline
    sparsity = _kubectl(k8s.kubeconfig, tmp_path, "explain", "cmodel.spec.pipeline.prune.sparsity")
    assert "Target share of weights" in sparsity


@pytest.mark.cluster
def test_kubectl_get_prints_the_columns(k8s: K8s, cm_namespace: str, tmp_path: Path) -> None:
    name = f"cols-{uuid.uuid4().hex[:6]}"
    _create(k8s, cm_namespace, _example(name))
    k8s.custom.patch_namespaced_custom_object_status(
        API_GROUP,
        API_VERSION,
        cm_namespace,
        PLURAL,
        name,
        {
            "status": {
                "phase": "Ready",
                "candidates": "6/6",
                "targetsReady": "1/2",
                "canary": {
                    "artifact": "b" * 64,
                    "stable": "a" * 64,
                    "shown": "50%",
                    "stepStarted": "2026-01-01T00:00:00Z",
                },
                "artifact": {"uri": "s3://m/a/model.onnx", "sha256": "a" * 64, "sizeBytes": 10},
                "results": {
                    "compressionRatio": 3.9,
                    "downloadRatio": 4.25,
                    "evaluation": {
                        "metric": "accuracy",
                        "samples": 10,
                        "baseline": 0.98,
                        "compressed": 0.975,
                        "drop": 0.005,
                    },
                    "gate": {"passed": True, "maxMetricDrop": 0.01, "reason": "within"},
                },
            }
        },
    )
    out = _kubectl(k8s.kubeconfig, tmp_path, "get", "cmodels", "-n", cm_namespace, "-o", "wide")
    header, row = next(
        (lines[0], line) for lines in [out.splitlines()] for line in lines if name in line
    )
    assert header.split() == [
        "NAME",
        "PHASE",
        "RATIO",
        "DROP",
        "CANDIDATES",
        "TARGETS",
        "CANARY",
        "AGE",
        "SIZE-RATIO",
        "SPEEDUP",
        "ARTIFACT",
        "JOB",
        "SERVING",
        "REPLICAS",
    ]
    assert row.split()[1:7] == ["Ready", "4.25", "0.005", "6/6", "1/2", "50%"]
