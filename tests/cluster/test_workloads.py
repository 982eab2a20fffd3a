"""Jobs and Deployments run end to end: real controllers, pods as local processes."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from kubernetes import client

from tests.cluster.fixtures import K8s
from tests.cluster.node_agent import NodeAgent, PodOutcome
from tests.cluster.processes import pid_alive, urlopen_direct, wait_until

pytestmark = pytest.mark.cluster


def python_job(name: str, code: str, *, backoff_limit: int = 0, **container: Any) -> client.V1Job:
    return client.V1Job(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1JobSpec(
            backoff_limit=backoff_limit,
            template=client.V1PodTemplateSpec(
                spec=client.V1PodSpec(
                    restart_policy="Never",
                    node_selector={"node-role.kubernetes.io/edge": ""},
                    containers=[
                        client.V1Container(
                            name="main",
                            image="edgeslim:test",
                            command=["python", "-c", code],
                            **container,
                        )
                    ],
                )
            ),
        ),
    )


def job_condition(k8s: K8s, namespace: str, name: str) -> str | None:
    """The type of the Job's first true Complete/Failed condition, if any."""
    job = k8s.batch.read_namespaced_job(name, namespace)
    for cond in job.status.conditions or []:
        if cond.type in ("Complete", "Failed") and cond.status == "True":
            return str(cond.type)
    return None


def job_pods(k8s: K8s, namespace: str, name: str) -> list[client.V1Pod]:
    return k8s.core.list_namespaced_pod(namespace, label_selector=f"job-name={name}").items


WRITE_MESSAGE = """
import json, os
path = os.environ["EDGESLIM_TERMINATION_LOG"]
with open(path, "w") as f:
    json.dump({"accuracy": 0.97, "pod": os.environ["POD_NAME"]}, f)
"""


def test_job_completes_and_its_termination_message_is_in_the_pod_status(
    k8s: K8s, namespace: str
) -> None:
    env = [
        client.V1EnvVar(
            name="POD_NAME",
            value_from=client.V1EnvVarSource(
                field_ref=client.V1ObjectFieldSelector(field_path="metadata.name")
            ),
        )
    ]
    k8s.batch.create_namespaced_job(namespace, python_job("ok", WRITE_MESSAGE, env=env))
    assert wait_until(lambda: job_condition(k8s, namespace, "ok"), 60) == "Complete"
    assert k8s.batch.read_namespaced_job("ok", namespace).status.succeeded == 1
    [pod] = job_pods(k8s, namespace, "ok")
    assert pod.status.phase == "Succeeded"
    terminated = pod.status.container_statuses[0].state.terminated
    assert terminated.exit_code == 0
    assert json.loads(terminated.message) == {"accuracy": 0.97, "pod": pod.metadata.name}


def test_failing_job_fails_after_its_backoff_limit(k8s: K8s, namespace: str) -> None:
    code = "import sys; print('loading model'); print('boom: bad input'); sys.exit(3)"
    job = python_job(
        "bad", code, backoff_limit=1, termination_message_policy="FallbackToLogsOnError"
    )
    k8s.batch.create_namespaced_job(namespace, job)
    assert wait_until(lambda: job_condition(k8s, namespace, "bad"), 120) == "Failed"
    job_status = k8s.batch.read_namespaced_job("bad", namespace).status
    assert job_status.failed == 2
    failed = next(c for c in job_status.conditions if c.type == "Failed")
    assert failed.reason == "BackoffLimitExceeded"
    pods = job_pods(k8s, namespace, "bad")
    assert len(pods) == 2
    for pod in pods:
        assert pod.status.phase == "Failed"
        terminated = pod.status.container_statuses[0].state.terminated
        assert terminated.exit_code == 3
        # No termination-log content, so the log tail stands in for it.
        assert terminated.message.splitlines()[-1] == "boom: bad input"


def test_pod_environment_comes_from_the_api(
    k8s: K8s, namespace: str, node_agent: NodeAgent
) -> None:
    k8s.core.create_namespaced_secret(
        namespace,
        client.V1Secret(metadata=client.V1ObjectMeta(name="creds"), string_data={"key": "s3cr3t"}),
    )
    k8s.core.create_namespaced_config_map(
        namespace,
        client.V1ConfigMap(
            metadata=client.V1ObjectMeta(name="settings"),
            data={"MODE": "edge", "LEVEL": "3"},
        ),
    )

    def var(name: str, **source: Any) -> client.V1EnvVar:
        return client.V1EnvVar(name=name, value_from=client.V1EnvVarSource(**source))

    env = [
        var("POD_IP", field_ref=client.V1ObjectFieldSelector(field_path="status.podIP")),
        var("NS", field_ref=client.V1ObjectFieldSelector(field_path="metadata.namespace")),
        var("SECRET", secret_key_ref=client.V1SecretKeySelector(name="creds", key="key")),
        var("MODE", config_map_key_ref=client.V1ConfigMapKeySelector(name="settings", key="MODE")),
        client.V1EnvVar(name="GREETING", value="mode=$(MODE)"),
    ]
    code = """
import json, os, pathlib, sys
scratch = pathlib.Path(os.environ["EDGESLIM_MOUNT_SCRATCH"])
(scratch / "out.txt").write_text("written")
keys = ["POD_IP", "NS", "SECRET", "MODE", "GREETING", "CFG_LEVEL", "EDGESLIM_MOUNT_SCRATCH"]
report = {k: os.environ.get(k) for k in keys}
report["argv"] = sys.argv[1:]
report["PATH0"] = os.environ["PATH"].split(":")[0]
open(os.environ["EDGESLIM_TERMINATION_LOG"], "w").write(json.dumps(report))
"""
    job = python_job(
        "env",
        code,
        env=env,
        args=["$(NS)", "$$(NS)"],
        env_from=[
            client.V1EnvFromSource(
                prefix="CFG_", config_map_ref=client.V1ConfigMapEnvSource(name="settings")
            )
        ],
        volume_mounts=[client.V1VolumeMount(name="scratch", mount_path="/scratch")],
    )
    job.spec.template.spec.volumes = [
        client.V1Volume(name="scratch", empty_dir=client.V1EmptyDirVolumeSource())
    ]
    k8s.batch.create_namespaced_job(namespace, job)
    assert wait_until(lambda: job_condition(k8s, namespace, "env"), 60) == "Complete"
    [pod] = job_pods(k8s, namespace, "env")
    report = json.loads(pod.status.container_statuses[0].state.terminated.message)
    assert report["POD_IP"] == pod.status.pod_ip
    assert pod.status.pod_ip.startswith("127.0.") and pod.status.pod_ip != "127.0.0.1"
    assert report["NS"] == namespace
    assert report["SECRET"] == "s3cr3t"
    assert report["MODE"] == "edge"
    assert report["GREETING"] == "mode=edge"
    assert report["CFG_LEVEL"] == "3"
    assert report["argv"] == [namespace, "$(NS)"]
    assert report["PATH0"].endswith("/bin")
    with open(f"{report['EDGESLIM_MOUNT_SCRATCH']}/out.txt") as f:
        assert f.read() == "written"
    assert node_agent.log_path(namespace, pod.metadata.name).exists()


def test_pod_hook_completes_pods_without_running_them(
    k8s: K8s, namespace: str, node_agent: NodeAgent
) -> None:
    seen: list[str] = []

    def complete_at_once(pod: dict[str, Any]) -> PodOutcome | None:
        if pod["metadata"]["namespace"] != namespace:
            return None
        seen.append(pod["metadata"]["name"])
        return PodOutcome(exit_code=0, message='{"result": "hooked"}')

    with node_agent.hooked(complete_at_once):
        job = python_job("hooked", "import sys; sys.exit(1)")
        k8s.batch.create_namespaced_job(namespace, job)
        assert wait_until(lambda: job_condition(k8s, namespace, "hooked"), 60) == "Complete"
    [pod] = job_pods(k8s, namespace, "hooked")
    assert seen == [pod.metadata.name]
    terminated = pod.status.container_statuses[0].state.terminated
    assert (terminated.exit_code, terminated.message) == (0, '{"result": "hooked"}')
    worker = node_agent.worker(namespace, pod.metadata.name)
    assert worker is not None and worker.pids == []


def http_deployment(name: str, replicas: int) -> client.V1Deployment:
    labels = {"app": name}
    container = client.V1Container(
        name="web",
        image="edgeslim:test",
        command=["python", "-m", "http.server", "--bind", "$(POD_IP)", "8000"],
        env=[
            client.V1EnvVar(
                name="POD_IP",
                value_from=client.V1EnvVarSource(
                    field_ref=client.V1ObjectFieldSelector(field_path="status.podIP")
                ),
            )
        ],
        ports=[client.V1ContainerPort(name="http", container_port=8000)],
        readiness_probe=client.V1Probe(
            http_get=client.V1HTTPGetAction(path="/", port="http"), period_seconds=1
        ),
    )
    return client.V1Deployment(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1DeploymentSpec(
            replicas=replicas,
            selector=client.V1LabelSelector(match_labels=labels),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=labels),
                spec=client.V1PodSpec(
                    containers=[container],
                    termination_grace_period_seconds=5,
                ),
            ),
        ),
    )


def test_deployment_becomes_available_serves_and_stops(
    k8s: K8s, namespace: str, node_agent: NodeAgent
) -> None:
    k8s.apps.create_namespaced_deployment(namespace, http_deployment("web", 2))

    def available() -> bool:
        status = k8s.apps.read_namespaced_deployment("web", namespace).status
        conditions = {c.type: c.status for c in status.conditions or []}
        return conditions.get("Available") == "True" and status.ready_replicas == 2

    wait_until(available, 60, what="Deployment web Available")
    pods = k8s.core.list_namespaced_pod(namespace, label_selector="app=web").items
    assert len(pods) == 2
    ips = {p.status.pod_ip for p in pods}
    assert len(ips) == 2
    pids: list[int] = []
    for pod in pods:
        with urlopen_direct(f"http://{pod.status.pod_ip}:8000/", timeout=5) as resp:
            assert resp.status == 200
        worker = node_agent.worker(namespace, pod.metadata.name)
        assert worker is not None
        pids += worker.pids
    assert len(pids) == 2 and all(pid_alive(pid) for pid in pids)
    [replica_set] = k8s.apps.list_namespaced_replica_set(namespace).items

    # Background propagation: the garbage collector deletes the ReplicaSet,
    # then its pods, which the node agent stops.
    k8s.apps.delete_namespaced_deployment("web", namespace, propagation_policy="Background")
    wait_until(
        lambda: not k8s.core.list_namespaced_pod(namespace, label_selector="app=web").items,
        60,
        what="the Deployment's pods to be deleted",
    )
    assert not [pid for pid in pids if pid_alive(pid)]
    names = [rs.metadata.name for rs in k8s.apps.list_namespaced_replica_set(namespace).items]
    assert replica_set.metadata.name not in names


WHO_AM_I = """
import json, os, ssl, urllib.request
secrets = os.environ["EDGESLIM_MOUNT_VAR_RUN_SECRETS_KUBERNETES_IO_SERVICEACCOUNT"]
host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"]
token = open(os.path.join(secrets, "token")).read()
ctx = ssl.create_default_context(cafile=os.path.join(secrets, "ca.crt"))
review = {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
request = urllib.request.Request(
    f"https://{host}:{port}/apis/authentication.k8s.io/v1/selfsubjectreviews",
    data=json.dumps(review).encode(),
    headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"},
)
with urllib.request.urlopen(request, context=ctx) as resp:
    user = json.load(resp)["status"]["userInfo"]["username"]
namespace = open(os.path.join(secrets, "namespace")).read()
open(os.environ["EDGESLIM_TERMINATION_LOG"], "w").write(f"{user} {namespace}")
"""


def test_pod_reaches_the_api_as_its_service_account(k8s: K8s, namespace: str) -> None:
    k8s.batch.create_namespaced_job(namespace, python_job("whoami", WHO_AM_I))
    assert wait_until(lambda: job_condition(k8s, namespace, "whoami"), 60) == "Complete"
    [pod] = job_pods(k8s, namespace, "whoami")
    message = pod.status.container_statuses[0].state.terminated.message
    assert message == f"system:serviceaccount:{namespace}:default {namespace}"


def test_finished_job_is_deleted_after_its_ttl(k8s: K8s, namespace: str) -> None:
    job = python_job("short-lived", "print('done')")
    job.spec.ttl_seconds_after_finished = 0
    k8s.batch.create_namespaced_job(namespace, job)

    def deleted() -> bool:
        return not k8s.batch.list_namespaced_job(namespace).items

    wait_until(deleted, 60, what="the TTL-after-finished controller to delete the Job")


def test_deleting_a_namespace_stops_its_pods(k8s: K8s, node_agent: NodeAgent) -> None:
    name = f"doomed-{uuid.uuid4().hex[:6]}"
    k8s.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    wait_until(lambda: k8s.core.list_namespaced_service_account(name).items, 30, what="default SA")
    pod = client.V1Pod(
        metadata=client.V1ObjectMeta(name="sleeper"),
        spec=client.V1PodSpec(
            containers=[client.V1Container(name="main", image="x", command=["sleep", "300"])],
            termination_grace_period_seconds=2,
        ),
    )
    k8s.core.create_namespaced_pod(name, pod)
    wait_until(
        lambda: k8s.core.read_namespaced_pod("sleeper", name).status.phase == "Running",
        30,
        what="the pod to run",
    )
    pids = node_agent.live_pids(name)
    assert len(pids) == 1

    k8s.core.delete_namespace(name)

    def namespace_gone() -> bool:
        return name not in [ns.metadata.name for ns in k8s.core.list_namespace().items]

    wait_until(namespace_gone, 90, interval=0.5, what=f"namespace {name} to be deleted")
    assert not [pid for pid in pids if pid_alive(pid)]


CRASH_ONCE = """
import os, pathlib, time
marker = pathlib.Path(os.environ["EDGESLIM_MOUNT_DATA"]) / "crashed"
assert (pathlib.Path(os.environ["EDGESLIM_MOUNT_DATA"]) / "init-ran").exists()
if not marker.exists():
    marker.write_text("x")
    raise SystemExit(1)
time.sleep(300)
"""


def test_init_containers_run_once_and_crashed_containers_restart(k8s: K8s, namespace: str) -> None:
    data = [client.V1VolumeMount(name="data", mount_path="/data")]
    pod = client.V1Pod(
        metadata=client.V1ObjectMeta(name="flaky"),
        spec=client.V1PodSpec(
            restart_policy="Always",
            volumes=[client.V1Volume(name="data", empty_dir=client.V1EmptyDirVolumeSource())],
            init_containers=[
                client.V1Container(
                    name="prepare",
                    image="x",
                    command=["sh", "-c", 'touch "$EDGESLIM_MOUNT_DATA/init-ran"'],
                    volume_mounts=data,
                )
            ],
            containers=[
                client.V1Container(
                    name="main",
                    image="x",
                    command=["python", "-c", CRASH_ONCE],
                    volume_mounts=data,
                )
            ],
            termination_grace_period_seconds=1,
        ),
    )
    k8s.core.create_namespaced_pod(namespace, pod)

    def restarted_and_ready() -> client.V1Pod | None:
        pod = k8s.core.read_namespaced_pod("flaky", namespace)
        [main] = pod.status.container_statuses or [None]
        return pod if main and main.restart_count == 1 and main.ready else None

    pod = wait_until(restarted_and_ready, 60, what="the crashed container to restart")
    assert pod.status.phase == "Running"
    [main] = pod.status.container_statuses
    assert main.last_state.terminated.exit_code == 1
    assert main.state.running is not None
    [init] = pod.status.init_container_statuses
    assert (init.state.terminated.exit_code, init.restart_count) == (0, 0)
    conditions = {c.type: c.status for c in pod.status.conditions}
    assert conditions["Initialized"] == conditions["Ready"] == "True"
