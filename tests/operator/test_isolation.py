"""Objects cannot touch each other (issue 8, item 6), operator side.

Without a cluster: child names that never collide, the ownership decision
before every create or apply, the NameConflict status, pods that get no
credentials but their own Secret's, and scratch volumes bounded by the download
limit. On a real control plane: a Service or Job that merely has the name the
operator would use is left alone (the object goes Failed / NameConflict), and
two long names that differ only at the end get a Job each.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from kubernetes import client

from edgeslim.api.spec import CompressedModel
from edgeslim.api.status import ArtifactStatus, Phase
from edgeslim.errors import BadInput
from edgeslim.operator import jobs, ownership, podspec, runtime, serving, status
from edgeslim.operator.kube import Conflict, Kube
from edgeslim.operator.names import NAME_LIMIT, job_name, serving_name
from edgeslim.operator.ownership import Verdict
from edgeslim.operator.settings import Settings
from tests.cluster.fixtures import K8s
from tests.cluster.processes import wait_until
from tests.operator.support import (
    create_model,
    get_model,
    instant_result_hook,
    model_body,
    model_jobs,
    wait_phase,
)

UID = "0f0e0d0c-0000-4000-8000-000000000001"
OTHER_UID = "0f0e0d0c-0000-4000-8000-000000000002"
HASH = "3f9c0d1e2a4b5c6d"
DNS_1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
Obj = dict[str, Any]
GiB = 1024**3


def model(
    name: str = "digits",
    *,
    secret: str | None = "s3-creds",
    namespace: str = "vision",
    **spec: object,
) -> CompressedModel:
    source: Obj = {"uri": "s3://models/digits/cnn.onnx"}
    if secret:
        source["credentialsSecret"] = secret
    return CompressedModel.model_validate(
        {
            "apiVersion": "edgeslim.io/v1alpha1",
            "kind": "CompressedModel",
            "metadata": {"name": name, "namespace": namespace, "uid": UID, "generation": 2},
            "spec": {
                "source": source,
                "evaluation": {"dataset": "s3://models/digits/val.npz"},
                "pipeline": [{"quantize": {"mode": "dynamic"}}],
                "output": {"uri": "s3://models/edge/"},
                "deployment": {"replicas": 1},
                **spec,
            },
        }
    )


# ------------------------------------------------------------------ names


def test_long_names_that_differ_only_at_the_end_get_different_jobs() -> None:
    base = "fraud-detector-transformer-quantized-eu-west"  # 44 characters
    a, b = job_name(f"{base}-prod-a", HASH), job_name(f"{base}-prod-b", HASH)
    assert a != b
    assert a.startswith(base[:40]) and b.startswith(base[:40])  # still readable
    assert a == job_name(f"{base}-prod-a", HASH)  # deterministic: a restart finds it
    # Names at every length up to the model name limit, differing in the last character.
    for n in range(1, 64):
        x, y = job_name("a" * (n - 1) + "x", HASH), job_name("a" * (n - 1) + "y", HASH)
        assert x != y, n
        for name in (x, y):
            assert len(name) <= NAME_LIMIT and DNS_1123_LABEL.match(name), name


def test_job_names_keep_short_names_whole_and_never_meet_truncated_ones() -> None:
    assert job_name("digits", HASH) == "digits-3f9c0d1e2a"
    # A kept name is at most 51 characters, a truncated one always 62.
    assert len(job_name("a" * 40, HASH)) == 51
    assert len(job_name("a" * 41, HASH)) == 62
    # A name that ends in '-' where it is cut still gives a valid label.
    cut = job_name("a" * 39 + "-" + "b" * 10, HASH)
    assert DNS_1123_LABEL.match(cut) and cut[:41] == "a" * 39 + "--"
    # The same name under another spec is another Job.
    assert job_name("a" * 50, HASH) != job_name("a" * 50, "0" * 16)


def test_serving_names_are_dns_1035_and_collision_free_when_cut() -> None:
    assert serving_name("digits") == "digits"
    assert serving_name("3d-model") == "m-3d-model"
    long_a, long_b = "1" + "a" * 61 + "x", "1" + "a" * 61 + "y"  # 63 characters each
    assert serving_name(long_a) != serving_name(long_b)
    for name in (serving_name(long_a), serving_name(long_b), serving_name("9" * 61)):
        assert len(name) <= NAME_LIMIT and DNS_1035_LABEL.match(name), name


# -------------------------------------------------------------- ownership


def obj(owner: Obj | None = None, **meta: object) -> Obj:
    return {
        "metadata": {"name": "digits", **({"ownerReferences": [owner]} if owner else {}), **meta}
    }


def ref(
    uid: str = UID, kind: str = "CompressedModel", name: str = "digits", **extra: object
) -> Obj:
    return {
        "apiVersion": "edgeslim.io/v1alpha1",
        "kind": kind,
        "name": name,
        "uid": uid,
        "controller": True,
        **extra,
    }


@pytest.mark.parametrize(
    ("existing", "verdict"),
    [
        (None, Verdict.absent),
        (obj(ref()), Verdict.owned),
        # A deleted object of the same name, not yet garbage-collected.
        (obj(ref(OTHER_UID)), Verdict.stale),
        (obj(deletionTimestamp="2026-12-01T00:00:00Z"), Verdict.stale),
        # Hand-made, or anyone else's.
        (obj(), Verdict.foreign),
        (obj(ref(OTHER_UID, kind="Deployment")), Verdict.foreign),
        (obj(ref(OTHER_UID, name="other")), Verdict.foreign),
        # A reference to us that is not the controller does not make it ours.
        (obj(ref(controller=False)), Verdict.foreign),
    ],
    ids=[
        "absent",
        "owned",
        "predecessor",
        "being-deleted",
        "unowned",
        "other-kind",
        "other-model",
        "not-controller",
    ],
)
def test_claim(existing: Obj | None, verdict: Verdict) -> None:
    assert ownership.claim(existing, "Service", "digits", "digits", UID).verdict is verdict


def test_require_refuses_a_foreign_object_and_waits_for_a_predecessors() -> None:
    ownership.require(ownership.claim(None, "Job", "j", "digits", UID), "vision")
    ownership.require(ownership.claim(obj(ref()), "Job", "j", "digits", UID), "vision")
    foreign = ownership.claim(
        obj(ref(OTHER_UID, kind="Foo", name="bar")), "Service", "digits", "digits", UID
    )
    with pytest.raises(ownership.NameConflict) as conflict:
        ownership.require(foreign, "vision")
    message = str(conflict.value)
    assert message.startswith("Service vision/digits already exists and is not owned")
    assert f"Foo bar (uid {OTHER_UID})" in message
    stale = ownership.claim(obj(ref(OTHER_UID)), "Deployment", "digits", "digits", UID)
    with pytest.raises(ownership.StillOwnedByPredecessor):
        ownership.require(stale, "vision")
    # A predecessor's object is a transient wait (the kopf handler retries it).
    from edgeslim.operator.kube import is_transient

    assert is_transient(ownership.StillOwnedByPredecessor("x"))


def test_a_serving_name_conflict_fails_the_object_but_keeps_its_result() -> None:
    artifact = ArtifactStatus(
        uri="s3://models/edge/digits/h/model.onnx", sha256="b" * 64, size_bytes=10
    )
    deploying = status.parse(
        status.apply(
            status.parse({}),
            2,
            status.Transition(
                Phase.deploying, "GatePassed", "ok", spec_hash=HASH, artifact=artifact
            ),
            "2026-12-01T00:00:00Z",
        )
    )
    plan = serving.name_conflict(deploying, "Service vision/digits already exists")
    after = status.parse(serving.apply_plan(deploying, 2, plan, "2026-12-01T00:00:01Z"))
    assert after.phase is Phase.failed
    conds = {c.type: c for c in after.conditions}
    assert (conds["Ready"].status, conds["Ready"].reason) == ("False", "NameConflict")
    assert conds["Available"].reason == "NameConflict"
    assert conds["GatePassed"].status == "True" and after.artifact == artifact
    assert serving.events_for(deploying, plan) == [
        ("Warning", "NameConflict", "Deploying -> Failed: Service vision/digits already exists")
    ]
    # Once the name is free, the next reconcile (spec change, restart) still rolls it out.
    assert serving.candidate(after, HASH) is not None
    # Written again, nothing changes and no Event is posted: no storm.
    assert serving.events_for(after, serving.name_conflict(after, "again")) == []


# ------------------------------------------------------------ credentials


def env_of(pod_spec: Obj) -> dict[str, Obj]:
    return {e["name"]: e for e in pod_spec["containers"][0]["env"]}


def pods(m: CompressedModel, settings: Settings) -> list[Obj]:
    job = jobs.build_job(m, settings, m.spec.spec_hash())
    served = serving.ServedArtifact(uri="s3://models/edge/digits/h/model.onnx", sha256="b" * 64)
    deployment = serving.build_deployment(m, served, settings)
    return [job["spec"]["template"]["spec"], deployment["spec"]["template"]["spec"]]


def test_without_a_secret_pods_get_no_credentials_at_all() -> None:
    for pod in pods(model(secret=None), Settings()):
        env = env_of(pod)
        assert not {k for k, _ in podspec.SECRET_KEYS} & env.keys()
        # boto3 would otherwise take the node's cloud role from instance metadata.
        assert env["AWS_EC2_METADATA_DISABLED"]["value"] == "true"
        assert pod["automountServiceAccountToken"] is False
        assert "serviceAccountName" not in pod


def test_inherited_credentials_only_behind_the_setting() -> None:
    for pod in pods(model(secret=None), Settings(inherit_storage_credentials=True)):
        assert "AWS_EC2_METADATA_DISABLED" not in env_of(pod)
        assert pod["automountServiceAccountToken"] is False  # the setting lends no API token
    for pod in pods(model(), Settings()):
        env = env_of(pod)
        assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "s3-creds"


def test_the_operator_lends_its_own_storage_credentials_only_behind_the_setting() -> None:
    def rt(inherit: bool) -> runtime.Runtime:
        # No API calls happen without a Secret name, so no client is needed.
        return runtime.Runtime(
            settings=Settings(inherit_storage_credentials=inherit),
            kube=None,
            slots=None,  # type: ignore[arg-type]
        )

    refused = runtime.storage_credentials(rt(False), model(secret=None))
    with pytest.raises(BadInput, match="credentialsSecret"), refused:
        pass
    with runtime.storage_credentials(rt(True), model(secret=None)):
        pass


def test_settings_read_the_switch_and_the_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings.from_env().inherit_storage_credentials is False
    monkeypatch.setenv("EDGESLIM_INHERIT_STORAGE_CREDENTIALS", "true")
    monkeypatch.setenv("EDGESLIM_MAX_DOWNLOAD_BYTES", str(GiB))
    got = Settings.from_env()
    assert got.inherit_storage_credentials is True and got.max_download_bytes == GiB
    monkeypatch.setenv("EDGESLIM_INHERIT_STORAGE_CREDENTIALS", "maybe")
    with pytest.raises(ValueError, match="not true or false"):
        Settings.from_env()
    monkeypatch.setenv("EDGESLIM_INHERIT_STORAGE_CREDENTIALS", "false")
    monkeypatch.setenv("EDGESLIM_MAX_DOWNLOAD_BYTES", "0")
    with pytest.raises(ValueError, match="positive"):
        Settings.from_env()


# ---------------------------------------------------------------- scratch


def scratch(pod_spec: Obj) -> str:
    (volume,) = pod_spec["volumes"]
    return volume["emptyDir"]["sizeLimit"]


def test_scratch_size_limits_follow_the_download_limit() -> None:
    # Source + evaluation dataset + two working copies, at the default 4 GiB.
    job_pod, serving_pod = pods(model(), Settings())
    assert (scratch(job_pod), scratch(serving_pod)) == ("16Gi", "8Gi")
    assert env_of(job_pod)["EDGESLIM_MAX_DOWNLOAD_BYTES"]["value"] == str(4 * GiB)
    assert env_of(serving_pod)["EDGESLIM_MAX_DOWNLOAD_BYTES"]["value"] == str(4 * GiB)
    # Each distinct dataset adds one download; a repeated one does not.
    with_data = model(
        pipeline=[
            {"distill": {"dataset": "s3://models/digits/train.npz"}},
            {"quantize": {"mode": "static", "calibrationDataset": "s3://models/digits/train.npz"}},
        ]
    )
    job_pod, _ = pods(with_data, Settings(max_download_bytes=GiB))
    assert scratch(job_pod) == "5Gi"
    # An explicit size wins; odd sizes stay exact.
    settings = Settings(compressor_scratch_bytes=3 * GiB + 1, serving_scratch_bytes=512 * 1024**2)
    job_pod, serving_pod = pods(model(), settings)
    assert (scratch(job_pod), scratch(serving_pod)) == (str(3 * GiB + 1), "512Mi")


# ------------------------------------------------------ real control plane


@pytest.mark.cluster
def test_apply_guards_on_a_real_api_server(k8s: K8s, namespace: str) -> None:
    """The guards `ownership` relies on, as the API server enforces them: a
    create-only apply never lands on an object that appeared after the check, an
    apply to our object never lands on a replacement, and a field the operator
    stops setting goes (why it applies rather than creates)."""
    kube = Kube.connect(kubeconfig=k8s.kubeconfig)
    service = _foreign_service(k8s, namespace)
    m = model(namespace=namespace)
    with pytest.raises(Conflict):
        kube.apply_service(serving.build_service(m), None)  # "absent" was wrong: refused
    untouched = k8s.core.read_namespaced_service("digits", namespace)
    assert untouched.metadata.resource_version == service.metadata.resource_version

    served = serving.ServedArtifact(uri="s3://models/edge/digits/h/model.onnx", sha256="b" * 64)
    tolerations = [{"key": "edge", "operator": "Exists"}]
    tolerating = model(namespace=namespace, deployment={"replicas": 1, "tolerations": tolerations})
    created = kube.apply_deployment(
        _unowned(serving.build_deployment(tolerating, served, Settings())), None
    )
    uid = created["metadata"]["uid"]
    assert created["spec"]["template"]["spec"]["tolerations"]
    with pytest.raises(Conflict):
        kube.apply_deployment(_unowned(serving.build_deployment(m, served, Settings())), OTHER_UID)
    again = kube.apply_deployment(_unowned(serving.build_deployment(m, served, Settings())), uid)
    assert "tolerations" not in again["spec"]["template"]["spec"]


def _unowned(deployment: dict) -> dict:
    """The Deployment without its owner reference: the test's model object does not
    exist in the API server, so the garbage collector would delete an owned
    Deployment between the applies (a flaky Conflict that tests nothing)."""
    deployment["metadata"].pop("ownerReferences", None)
    return deployment


def _foreign_service(k8s: K8s, namespace: str) -> client.V1Service:
    svc = client.V1Service(
        metadata=client.V1ObjectMeta(name="digits", labels={"team": "web"}),
        spec=client.V1ServiceSpec(
            selector={"app": "web"}, ports=[client.V1ServicePort(name="web", port=80)]
        ),
    )
    return k8s.core.create_namespaced_service(namespace, svc)


def _foreign_job(k8s: K8s, namespace: str, name: str) -> client.V1Job:
    """A suspended Job (it never runs) that has the name the operator would give."""
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "suspend": True,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "c", "image": "busybox", "command": ["true"]}],
                }
            },
        },
    }
    return k8s.batch.create_namespaced_job(namespace, job)


def _reasons(k8s: K8s, namespace: str, name: str) -> set[tuple[str, str]]:
    found = k8s.core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}")
    return {(e.type, e.reason) for e in found.items}


@pytest.mark.cluster
def test_objects_of_other_owners_are_never_taken_over(
    k8s: K8s, namespace: str, node_agent, run_operator
) -> None:
    service = _foreign_service(k8s, namespace)
    clash = model_body("clash", "bench")
    clash["metadata"]["namespace"] = namespace
    job = _foreign_job(
        k8s, namespace, job_name("clash", CompressedModel.model_validate(clash).spec.spec_hash())
    )
    op = run_operator()
    with node_agent.hooked(instant_result_hook({namespace})):
        body = model_body("digits", "bench")
        body["spec"]["deployment"] = {"replicas": 1}
        create_model(k8s, namespace, body)
        create_model(k8s, namespace, model_body("clash", "bench"))
        digits = wait_phase(k8s, namespace, "digits", {"Failed"}, 60, op)
        clashed = wait_phase(k8s, namespace, "clash", {"Failed"}, 60, op)

    # The Service: the object fails with the conflict named, the Service is as it was.
    ready = next(c for c in digits["status"]["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "NameConflict"
    assert f"Service {namespace}/digits already exists" in ready["message"]
    assert digits["status"]["artifact"]["uri"].endswith("/model.onnx")  # compressed all right
    assert ("Warning", "NameConflict") in _reasons(k8s, namespace, "digits")
    now = k8s.core.read_namespaced_service("digits", namespace)
    assert now.metadata.resource_version == service.metadata.resource_version
    assert now.metadata.owner_references is None and now.spec.selector == {"app": "web"}
    # Nothing was created under the name either.
    assert k8s.apps.list_namespaced_deployment(namespace).items == []

    # The Job: same answer, and the foreign Job is untouched.
    ready = next(c for c in clashed["status"]["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "NameConflict"
    assert f"Job {namespace}/{job.metadata.name} already exists" in ready["message"]
    assert ("Warning", "NameConflict") in _reasons(k8s, namespace, "clash")
    still = k8s.batch.read_namespaced_job(job.metadata.name, namespace)
    # (The Job controller writes its status; the operator wrote nothing.)
    assert "edgeslim-operator" not in {f.manager for f in still.metadata.managed_fields}
    assert still.metadata.owner_references is None and still.spec.suspend is True

    # Deleting the objects garbage-collects what they own (digits' Job) and
    # nothing of anyone else's.
    for name in ("digits", "clash"):
        k8s.custom.delete_namespaced_custom_object(
            "edgeslim.io", "v1alpha1", namespace, "compressedmodels", name
        )
    wait_until(lambda: not model_jobs(k8s, namespace, "digits"), 60, 0.5, "digits' Job to go")

    def gone(name: str) -> bool:
        try:
            get_model(k8s, namespace, name)
        except client.exceptions.ApiException as exc:
            return exc.status == 404
        return False

    wait_until(lambda: gone("digits") and gone("clash"), 30, 0.5, "the objects to go")
    now = k8s.core.read_namespaced_service("digits", namespace)
    assert now.metadata.uid == service.metadata.uid
    assert k8s.batch.read_namespaced_job(job.metadata.name, namespace).metadata.uid == (
        job.metadata.uid
    )


@pytest.mark.cluster
def test_long_names_differing_at_the_end_get_a_job_each(
    k8s: K8s, namespace: str, node_agent, run_operator
) -> None:
    base = "fraud-detector-transformer-quantized-eu-west"
    names = [f"{base}-prod-a", f"{base}-prod-b"]
    op = run_operator()
    with node_agent.hooked(instant_result_hook({namespace})):
        for name in names:
            create_model(k8s, namespace, model_body(name, "bench"))
        done = [wait_phase(k8s, namespace, name, {"Ready"}, 60, op) for name in names]
    owners = {}
    for name, obj_ in zip(names, done, strict=True):
        (job,) = model_jobs(k8s, namespace, name)
        assert job.metadata.name == obj_["status"]["jobName"]
        owners[job.metadata.name] = job.metadata.owner_references[0].uid
    assert sorted(owners.values()) == sorted(o["metadata"]["uid"] for o in done)
