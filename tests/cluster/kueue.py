"""A real Kueue (sigs.k8s.io/kueue's manager, `make controlplane` builds it) against the
test control plane, as a local process, for the tests that need Kueue to admit Jobs.

A Kueue install gets its CRDs, a namespace, a webhook Secret mounted by the
kubelet and a config from its manifests; here:

* the CRDs come from the cache (`<cache>/kueue-<version>/crds/`, copied from the
  same module version the binary was built from). Kueue's internal certificate
  management injects its CA into the conversion webhook of five of them and
  reports ready only once it could, so those five get the conversion stanza
  Kueue's kustomize patches add. The API server calls a conversion webhook only
  to serve a version other than the stored one (v1beta2), which nothing here does;
* no Validating/MutatingWebhookConfiguration is created, so the API server never
  calls Kueue's admission webhooks (it cannot reach a Service here). Kueue's Job
  webhook would only suspend labelled Jobs, which the operator creates suspended;
* `Kueue.start` plays the kubelet: once the cert rotator filled the Secret, its
  tls.crt and tls.key go into the webhook's certDir, where the rotator looks;
* the config: leader election off, health and webhook ports free on loopback,
  metrics off, only the batch/job integration, and no visibility API server
  (VisibilityOnDemand would need an aggregated API the test bed does not serve).
"""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client
from kubernetes.client import ApiClient

from tests.cluster.processes import free_port, spawn, stop_group, tail, urlopen_direct, wait_until

GROUP, VERSION = "kueue.x-k8s.io", "v1beta2"
NAMESPACE = "kueue-system"
WEBHOOK_SERVICE = "kueue-webhook-service"
WEBHOOK_SECRET = "kueue-webhook-server-cert"
# The CRDs whose conversion webhook the cert rotator injects its CA into
# (pkg/util/cert/cert.go in Kueue); it is not ready until every one has one.
CONVERTED = ("localqueues", "clusterqueues", "workloads", "cohorts", "multikueueclusters")
START_TIMEOUT = 90.0


class KueueError(RuntimeError):
    """Kueue did not come up; the message carries its log tail."""


class Kueue:
    """`kueue --config ...` watching the control plane of `kubeconfig`."""

    def __init__(self, binary: Path, kubeconfig: Path, work_dir: Path) -> None:
        self.binary = binary
        self.crds = binary.parent / "crds"
        self.kubeconfig = kubeconfig
        self.work_dir = work_dir
        self.cert_dir = work_dir / "certs"
        self.log_path = work_dir / "kueue.log"
        self.health_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, api: ApiClient) -> Kueue:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._install_crds(api)
        core = client.CoreV1Api(api)
        _create(lambda: core.create_namespace({"metadata": {"name": NAMESPACE}}))
        # The cert rotator fills this Secret but does not create it.
        _create(
            lambda: core.create_namespaced_secret(NAMESPACE, {"metadata": {"name": WEBHOOK_SECRET}})
        )
        config = self.work_dir / "config.yaml"
        config.write_text(yaml.safe_dump(self._config()))
        self.proc = spawn(
            [str(self.binary), f"--config={config}", "--zap-log-level=info"],
            self.log_path,
            env={"KUBECONFIG": str(self.kubeconfig), "PATH": "/usr/bin:/bin"},
            cwd=self.work_dir,
        )
        try:
            wait_until(lambda: self._mounted(core) and self._ready(), START_TIMEOUT, 0.2, "Kueue")
        except TimeoutError as exc:
            self.stop()
            raise KueueError(f"{exc}; log {self.log_path}:\n{tail(self.log_path)}") from exc
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc, grace=10)
            self.proc = None

    def log_tail(self) -> str:
        return tail(self.log_path)

    def _config(self) -> dict[str, Any]:
        return {
            "apiVersion": f"config.{GROUP}/{VERSION}",
            "kind": "Configuration",
            "namespace": NAMESPACE,
            "leaderElection": {"leaderElect": False},
            "health": {"healthProbeBindAddress": f"127.0.0.1:{self.health_port}"},
            "metrics": {"bindAddress": "0"},
            "webhook": {"host": "127.0.0.1", "port": free_port(), "certDir": str(self.cert_dir)},
            "internalCertManagement": {
                "enable": True,
                "webhookServiceName": WEBHOOK_SERVICE,
                "webhookSecretName": WEBHOOK_SECRET,
            },
            "integrations": {"frameworks": ["batch/job"]},
            "featureGates": {"VisibilityOnDemand": False},
        }

    def _install_crds(self, api: ApiClient) -> None:
        ext = client.ApiextensionsV1Api(api)
        names = []
        for path in sorted(self.crds.glob("*.yaml")):
            crd = yaml.safe_load(path.read_text())
            if crd["spec"]["names"]["plural"] in CONVERTED:
                crd["spec"]["conversion"] = {
                    "strategy": "Webhook",
                    "webhook": {
                        "clientConfig": {
                            "service": {
                                "namespace": NAMESPACE,
                                "name": WEBHOOK_SERVICE,
                                "path": "/convert",
                            }
                        },
                        "conversionReviewVersions": ["v1"],
                    },
                }
            names.append(crd["metadata"]["name"])
            _create(lambda crd=crd: ext.create_custom_resource_definition(crd))
        if not names:
            raise KueueError(f"no Kueue CRDs in {self.crds}; run `make controlplane`")

        def established() -> bool:
            for name in names:
                conds = ext.read_custom_resource_definition(name).status.conditions or []
                if not any(c.type == "Established" and c.status == "True" for c in conds):
                    return False
            return True

        wait_until(established, 30, 0.1, "Kueue's CRDs to be established")

    def _mounted(self, core: client.CoreV1Api) -> bool:
        """What the kubelet does with the webhook Secret's volume: its files, once filled."""
        if (self.cert_dir / "tls.crt").exists():
            return True
        self._check_running()
        data = core.read_namespaced_secret(WEBHOOK_SECRET, NAMESPACE).data or {}
        if "tls.crt" not in data or "tls.key" not in data:
            return False
        self.cert_dir.mkdir(parents=True, exist_ok=True)
        for name in ("tls.key", "ca.crt", "tls.crt"):  # tls.crt last: the rotator polls it
            if name in data:
                (self.cert_dir / name).write_bytes(base64.b64decode(data[name]))
        return True

    def _ready(self) -> bool:
        self._check_running()
        try:
            url = f"http://127.0.0.1:{self.health_port}/readyz"
            with urlopen_direct(url, timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def _check_running(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise KueueError(f"kueue exited {self.proc.returncode}:\n{self.log_tail()}")


def _create(call: Any) -> None:
    """Creates an object; one that exists already (an earlier start) is fine."""
    try:
        call()
    except client.ApiException as exc:
        if exc.status != 409:
            raise


def queues(api: ApiClient, namespace: str, cluster_queue: str, local_queue: str, cpu: str) -> None:
    """A ResourceFlavor, a ClusterQueue with `cpu` of quota for `namespace` only, and
    the LocalQueue `local_queue` in it pointing there."""
    custom = client.CustomObjectsApi(api)
    api_version = f"{GROUP}/{VERSION}"
    flavor = "edgeslim-default"
    _create(
        lambda: custom.create_cluster_custom_object(
            GROUP,
            VERSION,
            "resourceflavors",
            {"apiVersion": api_version, "kind": "ResourceFlavor", "metadata": {"name": flavor}},
        )
    )
    custom.create_cluster_custom_object(
        GROUP,
        VERSION,
        "clusterqueues",
        {
            "apiVersion": api_version,
            "kind": "ClusterQueue",
            "metadata": {"name": cluster_queue},
            "spec": {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                "resourceGroups": [
                    {
                        "coveredResources": ["cpu"],
                        "flavors": [
                            {"name": flavor, "resources": [{"name": "cpu", "nominalQuota": cpu}]}
                        ],
                    }
                ],
            },
        },
    )
    custom.create_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        "localqueues",
        {
            "apiVersion": api_version,
            "kind": "LocalQueue",
            "metadata": {"name": local_queue},
            "spec": {"clusterQueue": cluster_queue},
        },
    )

    def active() -> bool:
        cq = custom.get_cluster_custom_object(GROUP, VERSION, "clusterqueues", cluster_queue)
        conds = (cq.get("status") or {}).get("conditions") or []
        return any(c["type"] == "Active" and c["status"] == "True" for c in conds)

    wait_until(active, 30, 0.1, f"ClusterQueue {cluster_queue} to be active")
