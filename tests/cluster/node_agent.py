"""A stand-in kubelet (and scheduler) for a cluster with no real nodes.

:class:`NodeAgent` registers one Ready Node, binds pending pods whose
scheduling constraints the node satisfies, and hands every pod bound to it to
a :class:`~tests.cluster.pod_worker.PodWorker`, which runs the containers as
local processes. Each pod gets its own loopback address (127.0.x.y) as its pod
IP, so servers that bind their pod IP never collide.

Pluggable for benchmarks: ``pod_hook`` (constructor argument, attribute, or the
:meth:`NodeAgent.hooked` context manager) sees each pod as it starts and may
return a :class:`~tests.cluster.pod_worker.PodOutcome` to complete it at once
with a given exit code and termination message instead of running it.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import platform
import random
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kubernetes.client import ApiClient, CoreV1Api
from kubernetes.client.exceptions import ApiException
from urllib3 import HTTPResponse

from tests.cluster.pod_env import Materialiser
from tests.cluster.pod_worker import PodHook, PodOutcome, PodWorker
from tests.cluster.processes import keep_dirs, pid_alive, tail

Obj = dict[str, Any]
log = logging.getLogger(__name__)

__all__ = ["EDGE_LABELS", "NodeAgent", "PodHook", "PodOutcome"]

EDGE_LABELS = {"node-role.kubernetes.io/edge": ""}
DEFAULT_CAPACITY = {"cpu": "8", "memory": "16Gi", "pods": "110", "ephemeral-storage": "100Gi"}
NOT_READY_TAINTS = ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable")
WATCH_SECONDS = 300  # the server ends each watch after this; it is resumed


class IPPool:
    """Loopback addresses in 127.0.0.0/16, handed out round-robin so a freed
    address is not reused while its old sockets may linger. Each pool starts at
    a random place: two test sessions on one machine (two node agents) would
    otherwise hand out the same addresses and their pods' servers collide."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._used: set[str] = set()
        self._next = random.randrange(2, 254 * 250)

    def acquire(self) -> str:
        with self._lock:
            for _ in range(254 * 250):
                n = self._next
                self._next = 2 if n >= 254 * 250 else n + 1
                if n % 256 in (0, 1, 255):
                    continue
                ip = f"127.0.{n // 256}.{n % 256}"
                if ip not in self._used:
                    self._used.add(ip)
                    return ip
        raise RuntimeError("no free loopback address")

    def release(self, ip: str) -> None:
        with self._lock:
            self._used.discard(ip)


def _selector_term_matches(term: Obj, labels: dict[str, str], node_name: str) -> bool:
    def matches(expr: Obj, values: dict[str, str]) -> bool:
        key, op, wanted = expr["key"], expr["operator"], expr.get("values") or []
        present = key in values
        if op == "In":
            return present and values[key] in wanted
        if op == "NotIn":
            return not present or values[key] not in wanted
        if op == "Exists":
            return present
        if op == "DoesNotExist":
            return not present
        if op in ("Gt", "Lt") and present and values[key].lstrip("-").isdigit():
            diff = int(values[key]) - int(wanted[0])
            return diff > 0 if op == "Gt" else diff < 0
        return False

    fields = {"metadata.name": node_name}
    return all(matches(e, labels) for e in term.get("matchExpressions") or []) and all(
        matches(e, fields) for e in term.get("matchFields") or []
    )


def schedulable_on(pod: Obj, node_name: str, labels: dict[str, str]) -> bool:
    """nodeSelector and required node affinity, the parts a one-node scheduler needs."""
    spec = pod["spec"]
    if any(labels.get(k) != v for k, v in (spec.get("nodeSelector") or {}).items()):
        return False
    required = (
        ((spec.get("affinity") or {}).get("nodeAffinity") or {}).get(
            "requiredDuringSchedulingIgnoredDuringExecution"
        )
        or {}
    ).get("nodeSelectorTerms")
    if required:
        return any(_selector_term_matches(t, labels, node_name) for t in required)
    return True


class NodeAgent:
    """One fake edge node. ``start()`` registers it and begins running pods."""

    def __init__(
        self,
        api_client: ApiClient,
        *,
        name: str = "edge-node-0",
        labels: dict[str, str] | None = None,
        capacity: dict[str, str] | None = None,
        work_dir: Path | None = None,
        pod_hook: PodHook | None = None,
        kubelet_version: str = "v0.0.0",
    ) -> None:
        self.core = CoreV1Api(api_client)
        self.name = name
        self.labels = {
            "kubernetes.io/hostname": name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            **EDGE_LABELS,
            **(labels or {}),
        }
        self.capacity = dict(capacity or DEFAULT_CAPACITY)
        self.kubelet_version = kubelet_version
        self._own_dir = work_dir is None
        self.dir = work_dir or Path(tempfile.mkdtemp(prefix="edgeslim-node-"))
        self.pod_hook = pod_hook
        self.workers: dict[str, PodWorker] = {}
        self._ips = IPPool()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stream: HTTPResponse | None = None
        self.materialiser: Materialiser

    # -- lifecycle -------------------------------------------------------

    def start(self) -> NodeAgent:
        # Backstop: pod processes live in their own sessions and would outlive us.
        atexit.register(self.stop)
        node = self._register_node()
        self.materialiser = Materialiser(self.core, node)
        self._thread = threading.Thread(target=self._watch_loop, name="node-agent", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Kills every pod's processes (no API calls) and stops watching."""
        atexit.unregister(self.stop)
        self._stop.set()
        for worker in list(self.workers.values()):
            worker.vanished()
        for worker in list(self.workers.values()):
            worker.join(timeout=15)
        stream = self._stream
        if stream is not None:
            # Unblocks the watch thread's read instead of waiting out the watch.
            with contextlib.suppress(Exception):
                stream.shutdown()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._own_dir and not keep_dirs():
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> NodeAgent:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @contextlib.contextmanager
    def hooked(self, hook: PodHook) -> Iterator[NodeAgent]:
        """Runs the block with ``hook`` deciding each new pod's fate."""
        previous, self.pod_hook = self.pod_hook, hook
        try:
            yield self
        finally:
            self.pod_hook = previous

    # -- what tests look at -------------------------------------------------

    def pod_dir(self, namespace: str, name: str, uid: str) -> Path:
        return self.dir / "pods" / f"{namespace}_{name}_{uid}"

    def worker(self, namespace: str, name: str) -> PodWorker | None:
        """The most recent worker that ran pod ``namespace/name``."""
        found = [w for w in self.workers.values() if (w.namespace, w.pod_name) == (namespace, name)]
        return found[-1] if found else None

    def log_path(self, namespace: str, name: str, container: str | None = None) -> Path:
        """The file holding a container's stdout and stderr (first container by default)."""
        worker = self.worker(namespace, name)
        if worker is None:
            raise KeyError(f"pod {namespace}/{name} never ran on {self.name}")
        c = container or worker.containers[0].name
        return worker.dir / "logs" / f"{c}.log"

    def log_tail(
        self, namespace: str, name: str, container: str | None = None, max_bytes: int = 4000
    ) -> str:
        return tail(self.log_path(namespace, name, container), max_bytes)

    def live_pids(self, namespace: str | None = None) -> list[int]:
        """Container processes still alive (optionally only one namespace's)."""
        return [
            pid
            for w in list(self.workers.values())
            if namespace is None or w.namespace == namespace
            for pid in w.pids
            if pid_alive(pid)
        ]

    def release_ip(self, ip: str) -> None:
        self._ips.release(ip)

    # -- node ------------------------------------------------------------

    def _register_node(self) -> Obj:
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.name, "labels": self.labels},
        }
        try:
            self.core.create_node(body, _preload_content=False)
        except ApiException as e:
            if e.status != 409:
                raise
        status = {
            "capacity": self.capacity,
            "allocatable": self.capacity,
            "conditions": [
                {
                    "type": kind,
                    "status": "True" if kind == "Ready" else "False",
                    "reason": reason,
                    "message": message,
                }
                for kind, reason, message in (
                    ("Ready", "KubeletReady", "edgeslim test node agent is posting ready status"),
                    ("MemoryPressure", "KubeletHasSufficientMemory", "no memory pressure"),
                    ("DiskPressure", "KubeletHasNoDiskPressure", "no disk pressure"),
                    ("PIDPressure", "KubeletHasSufficientPID", "no PID pressure"),
                )
            ],
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": self.name},
            ],
            "nodeInfo": {
                "architecture": "amd64",
                "operatingSystem": "linux",
                "osImage": "edgeslim test node agent",
                "kernelVersion": platform.release(),
                "kubeletVersion": self.kubelet_version,
                "kubeProxyVersion": "",
                "containerRuntimeVersion": "edgeslim://local-processes",
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
            },
        }
        resp = self.core.patch_node_status(self.name, {"status": status}, _preload_content=False)
        node = json.loads(resp.data)
        # The TaintNodesByCondition admission plugin taints every new node
        # not-ready; the node-lifecycle controller (off here) would lift it.
        taints = (node.get("spec") or {}).get("taints") or []
        kept = [t for t in taints if t["key"] not in NOT_READY_TAINTS]
        if kept != taints:
            resp = self.core.patch_node(
                self.name,
                [{"op": "add", "path": "/spec/taints", "value": kept}],
                _preload_content=False,
            )
            node = json.loads(resp.data)
        return node

    # -- pods ------------------------------------------------------------

    def _watch_loop(self) -> None:
        """List once, then watch from the last resourceVersion seen, relisting
        only when the watch breaks -- an informer's pattern, so the agent adds
        little to the API server's request counts (benchmarks read them)."""
        resource_version: str | None = None
        while not self._stop.is_set():
            try:
                if resource_version is None:
                    resource_version = self._relist()
                resource_version = self._watch(resource_version)
            except Exception as e:
                resource_version = None
                if not self._stop.is_set():
                    log.warning("node agent watch: %s", e)
                    self._stop.wait(0.5)

    def _relist(self) -> str:
        resp = self.core.list_pod_for_all_namespaces(_preload_content=False)
        listing = json.loads(resp.data)
        seen = set()
        for pod in listing["items"]:
            seen.add(pod["metadata"]["uid"])
            self._sync("SYNC", pod)
        for uid, worker in list(self.workers.items()):
            if uid not in seen and not worker.finished.is_set():
                worker.vanished()
        return str(listing["metadata"]["resourceVersion"])

    def _watch(self, resource_version: str) -> str | None:
        """Streams pod events; returns where to resume, or None to relist."""
        stream = self.core.list_pod_for_all_namespaces(
            watch=True,
            resource_version=resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=WATCH_SECONDS,
            _preload_content=False,
            _request_timeout=WATCH_SECONDS + 30,
        )
        self._stream = stream
        try:
            # stop() sets the flag, then shuts down whatever stream it sees:
            # checking after publishing the stream closes the gap between.
            if self._stop.is_set():
                return None
            for line in stream:
                if self._stop.is_set():
                    return None
                if not line.strip():
                    continue
                event = json.loads(line)
                if event["type"] == "ERROR":
                    return None  # typically 410 Gone: the version is too old
                resource_version = event["object"]["metadata"]["resourceVersion"]
                if event["type"] != "BOOKMARK":
                    self._sync(event["type"], event["object"])
        finally:
            self._stream = None
            stream.release_conn()
        return resource_version

    def _sync(self, kind: str, pod: Obj) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        uid = meta["uid"]
        worker = self.workers.get(uid)
        if kind == "DELETED":
            if worker is not None:
                worker.vanished()
            return
        node_name = spec.get("nodeName")
        if not node_name:
            if (
                not meta.get("deletionTimestamp")
                and spec.get("schedulerName", "default-scheduler") == "default-scheduler"
                and schedulable_on(pod, self.name, self.labels)
            ):
                self._bind(pod)
            return
        if node_name != self.name:
            return
        phase = (pod.get("status") or {}).get("phase")
        if worker is None:
            if phase in ("Succeeded", "Failed"):
                # Finished before this agent started: only deletion is left.
                if meta.get("deletionTimestamp"):
                    self._delete_finished(meta)
                return
            worker = PodWorker(self, pod, self._ips.acquire())
            self.workers[uid] = worker
            worker.start()
        if meta.get("deletionTimestamp"):
            grace = meta.get("deletionGracePeriodSeconds")
            if grace is None:
                grace = spec.get("terminationGracePeriodSeconds", 30)
            worker.request_delete(float(grace))

    def _delete_finished(self, meta: Obj) -> None:
        body = {"gracePeriodSeconds": 0, "preconditions": {"uid": meta["uid"]}}
        with contextlib.suppress(ApiException):
            self.core.delete_namespaced_pod(
                meta["name"], meta["namespace"], body=body, _preload_content=False
            )

    def _bind(self, pod: Obj) -> None:
        meta = pod["metadata"]
        body = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"]},
            "target": {"apiVersion": "v1", "kind": "Node", "name": self.name},
        }
        try:
            # Raw response: the generated client cannot deserialize a Binding reply.
            self.core.create_namespaced_pod_binding(
                meta["name"], meta["namespace"], body, _preload_content=False
            )
        except ApiException as e:
            if e.status not in (404, 409):
                log.warning("binding %s/%s: %s", meta["namespace"], meta["name"], e)
