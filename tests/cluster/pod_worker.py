"""Runs one pod's containers as local processes and reports them like a kubelet.

A :class:`PodWorker` is a thread per pod. It resolves each container's
environment (see :mod:`tests.cluster.pod_env`), starts ``command`` + ``args`` in
its own process group with stdout and stderr in ``<pod dir>/logs/<container>.log``,
restarts containers per ``restartPolicy``, runs readiness probes and writes
``status`` -- phase, conditions, pod IP, container states with exit codes and
termination messages -- which is all the Job, ReplicaSet and Deployment
controllers look at. Deletion is graceful: SIGTERM, the grace period, SIGKILL,
then the pod object is deleted with a zero grace period, as the kubelet does.
"""

from __future__ import annotations

import datetime
import logging
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import urllib3
from kubernetes.client.exceptions import ApiException

from tests.cluster import pod_env
from tests.cluster.processes import signal_group, spawn, tail, urlopen_direct

if TYPE_CHECKING:
    from tests.cluster.node_agent import NodeAgent

Obj = dict[str, Any]
log = logging.getLogger(__name__)

# The kubelet's limits for termination messages.
MESSAGE_LIMIT = 4096
FALLBACK_LOG_LINES = 80
FALLBACK_LOG_BYTES = 2048
# Faster than a kubelet on purpose: tests wait on these.
POLL_INTERVAL = 0.1
PROBE_INTERVAL = 0.5
MAX_RESTART_BACKOFF = 10.0
STATUS_ATTEMPTS = 240  # 0.5 s apart: two minutes of API-server outage


@dataclass(frozen=True)
class PodOutcome:
    """How a pod hook ends every container of a pod instead of running it."""

    exit_code: int = 0
    message: str = ""


# Called with the pod (a dict, as the API serves it) when it starts on the
# node; returning a PodOutcome completes the pod at once, None runs it.
PodHook = Callable[[Obj], PodOutcome | None]


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Container:
    """One container's process and the status the kubelet would report for it."""

    def __init__(self, spec: Obj, pod_dir: Path, pod_uid: str) -> None:
        self.spec = spec
        self.name: str = spec["name"]
        self.pod_uid = pod_uid
        self.log_path = pod_dir / "logs" / f"{self.name}.log"
        self.termination_log = pod_dir / "containers" / self.name / "termination-log"
        self.termination_log.parent.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self.pids: list[int] = []
        self.restart_count = 0
        self.state: Obj = {"waiting": {"reason": "ContainerCreating"}}
        self.last_state: Obj = {}
        self.exit_code: int | None = None
        self.ready = False
        self.restart_at: float | None = 0.0  # monotonic; None = never again
        self._probe_at = 0.0
        self._probe_failures = 0

    @property
    def running(self) -> bool:
        return self.proc is not None and "running" in self.state

    @property
    def container_id(self) -> str:
        return f"edgeslim://{self.pod_uid}/{self.name}/{self.restart_count}"

    def start(self, argv: list[str], env: dict[str, str], cwd: Path) -> None:
        self.termination_log.write_bytes(b"")
        started = now()
        try:
            self.proc = spawn(argv, self.log_path, env=env, cwd=cwd)
        except OSError as e:
            # What the kubelet reports when the runtime cannot exec the entrypoint.
            self.fail_to_start("StartError", str(e))
            return
        self.pids.append(self.proc.pid)
        self.state = {"running": {"startedAt": started}}
        self.ready = False
        delay = (self.spec.get("readinessProbe") or {}).get("initialDelaySeconds", 0)
        self._probe_at = time.monotonic() + delay
        self._probe_failures = 0

    def fail_to_start(self, reason: str, message: str) -> None:
        self._terminated(128, reason, message, started=now())

    def waiting(self, reason: str, message: str = "") -> None:
        self.state = {"waiting": {"reason": reason, **({"message": message} if message else {})}}

    def reap(self) -> bool:
        """Records the exit of a finished process; True if it just exited."""
        if self.proc is None or self.proc.poll() is None or "running" not in self.state:
            return False
        code = self.proc.returncode
        # A signal death reads as 128+N, as in a container runtime.
        code = 128 - code if code < 0 else code
        # Whatever the entrypoint forked dies with it, as in a container.
        signal_group(self.proc, signal.SIGKILL)
        self._terminated(
            code,
            "Completed" if code == 0 else "Error",
            self._termination_message(code),
            started=self.state["running"]["startedAt"],
        )
        return True

    def _terminated(self, code: int, reason: str, message: str, started: str) -> None:
        self.exit_code = code
        self.ready = False
        terminated: Obj = {
            "exitCode": code,
            "reason": reason,
            "startedAt": started,
            "finishedAt": now(),
            "containerID": self.container_id,
        }
        if message:
            terminated["message"] = message
        self.state = {"terminated": terminated}

    def complete_with(self, outcome: PodOutcome) -> None:
        """Ends the container as the pod hook says, without running anything."""
        self.termination_log.write_text(outcome.message)
        started = now()
        reason = "Completed" if outcome.exit_code == 0 else "Error"
        self._terminated(outcome.exit_code, reason, outcome.message[:MESSAGE_LIMIT], started)
        self.restart_at = None

    def _termination_message(self, code: int) -> str:
        try:
            message = self.termination_log.read_bytes()[:MESSAGE_LIMIT].decode("utf-8", "replace")
        except OSError:
            message = ""
        policy = self.spec.get("terminationMessagePolicy", "File")
        if not message and code != 0 and policy == "FallbackToLogsOnError":
            lines = tail(self.log_path, 64 * 1024).splitlines()[-FALLBACK_LOG_LINES:]
            message = "\n".join(lines)[-FALLBACK_LOG_BYTES:]
        return message

    def restart_later(self) -> None:
        """Schedules a restart with the kubelet's doubling back-off (but shorter)."""
        self.last_state = self.state
        delay = min(0.5 * 2**self.restart_count, MAX_RESTART_BACKOFF)
        self.restart_count += 1
        self.restart_at = time.monotonic() + delay
        self.waiting("CrashLoopBackOff", f"back-off {delay:.1f}s restarting failed container")

    def probe(self, pod_ip: str, env: dict[str, str]) -> bool:
        """Runs the readiness probe when due; True if ``ready`` changed."""
        if not self.running:
            return False
        probe = self.spec.get("readinessProbe")
        if not probe:
            changed = not self.ready
            self.ready = True
            return changed
        if time.monotonic() < self._probe_at:
            return False
        self._probe_at = time.monotonic() + PROBE_INTERVAL
        ok = run_probe(probe, self.spec, pod_ip, env)
        self._probe_failures = 0 if ok else self._probe_failures + 1
        before = self.ready
        if ok:
            self.ready = True
        elif self._probe_failures >= probe.get("failureThreshold", 3):
            self.ready = False
        return before != self.ready

    def status(self) -> Obj:
        status: Obj = {
            "name": self.name,
            "image": self.spec.get("image", ""),
            "imageID": "",
            "ready": self.ready,
            "started": self.running,
            "restartCount": self.restart_count,
            "state": self.state,
            "lastState": self.last_state,
        }
        if self.proc is not None:
            status["containerID"] = self.container_id
        return status


def _port(value: int | str, container: Obj) -> int:
    if isinstance(value, int) or str(value).isdigit():
        return int(value)
    for port in container.get("ports") or []:
        if port.get("name") == value:
            return int(port["containerPort"])
    raise ValueError(f"no container port named {value!r}")


def run_probe(probe: Obj, container: Obj, pod_ip: str, env: dict[str, str]) -> bool:
    """httpGet, tcpSocket and exec probes; other kinds count as passing."""
    timeout = float(probe.get("timeoutSeconds", 1))
    try:
        if "httpGet" in probe:
            http = probe["httpGet"]
            scheme = http.get("scheme", "HTTP").lower()
            host = http.get("host") or pod_ip
            url = f"{scheme}://{host}:{_port(http['port'], container)}{http.get('path', '/')}"
            headers = {h["name"]: h["value"] for h in http.get("httpHeaders") or []}
            ctx = ssl._create_unverified_context() if scheme == "https" else None
            request = urllib.request.Request(url, headers=headers)
            try:
                with urlopen_direct(request, timeout=timeout, context=ctx) as resp:
                    return 200 <= resp.status < 400
            except urllib.error.HTTPError as e:
                return 200 <= e.code < 400
        if "tcpSocket" in probe:
            tcp = probe["tcpSocket"]
            address = (tcp.get("host") or pod_ip, _port(tcp["port"], container))
            with socket.create_connection(address, timeout=timeout):
                return True
        if "exec" in probe:
            result = subprocess.run(
                probe["exec"]["command"], env=env, capture_output=True, timeout=timeout, check=False
            )
            return result.returncode == 0
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return False
    return True


class PodWorker(threading.Thread):
    """Owns one pod bound to the agent's node from start to deletion."""

    def __init__(self, agent: NodeAgent, pod: Obj, ip: str) -> None:
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.agent = agent
        self.pod = pod
        self.uid: str = meta["uid"]
        self.namespace: str = meta["namespace"]
        self.pod_name: str = meta["name"]
        self.ip = ip
        self.dir = agent.pod_dir(self.namespace, self.pod_name, self.uid)
        self.dir.mkdir(parents=True, exist_ok=True)
        spec = pod["spec"]
        self.restart_policy: str = spec.get("restartPolicy", "Always")
        self.init_containers = [
            Container(c, self.dir, self.uid) for c in spec.get("initContainers") or []
        ]
        self.containers = [Container(c, self.dir, self.uid) for c in spec["containers"]]
        self.sidecars = [c for c in self.init_containers if c.spec.get("restartPolicy") == "Always"]
        self.start_time = now()
        self.phase = "Pending"
        self.initialized = not self.init_containers
        self._conditions: dict[str, tuple[str, str, str]] = {}
        self._envs: dict[str, dict[str, str]] = {}
        self._delete_grace: float | None = None
        self._wake = threading.Event()
        self._vanished = False
        self.finished = threading.Event()
        # The downward API's status.* fields need these before anything runs.
        self.pod.setdefault("status", {}).update(
            {"podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "127.0.0.1"}
        )

    # -- called from the agent's watch thread ---------------------------------

    def request_delete(self, grace: float) -> None:
        if self._delete_grace is None or grace < self._delete_grace:
            self._delete_grace = grace
        self._wake.set()

    def vanished(self) -> None:
        """The pod is gone from the API (force-deleted): kill, report nothing."""
        self._vanished = True
        self.request_delete(0)

    @property
    def pids(self) -> list[int]:
        """Every process id this pod's containers ever had."""
        return [pid for c in self.init_containers + self.containers for pid in c.pids]

    # -- the thread ---------------------------------------------------------

    def run(self) -> None:
        try:
            self._run()
        except Exception:
            log.exception("pod %s/%s: worker failed", self.namespace, self.pod_name)
        finally:
            self._kill_all(grace=0)
            self.agent.release_ip(self.ip)
            self.finished.set()

    def _run(self) -> None:
        self._write_status()
        outcome = self.agent.pod_hook(self.pod) if self.agent.pod_hook else None
        if outcome is not None:
            for c in self.init_containers + self.containers:
                c.complete_with(outcome)
            self.initialized = True
            self.phase = "Succeeded" if outcome.exit_code == 0 else "Failed"
            self._write_status()
            self.agent.release_ip(self.ip)
            self._await_deletion()
            return
        volumes = self._materialise_volumes()
        if volumes is None:
            return
        if not self._run_init_containers(volumes):
            if self._delete_grace is not None:
                self._terminate()
            else:
                self._await_deletion()
            return
        self.phase = "Running"
        while True:
            if self._delete_grace is not None:
                self._terminate()
                return
            changed = self._step(self.sidecars + self.containers, volumes)
            if self._all_done(self.containers):
                # Sidecars stop once the main containers are done.
                self._kill_all(grace=0)
                for c in self.sidecars:
                    c.reap()
                    c.restart_at = None
                self.phase = "Succeeded" if self._all_succeeded() else "Failed"
                self._write_status()
                self.agent.release_ip(self.ip)
                self._await_deletion()
                return
            if changed:
                self._write_status()
            self._wake.wait(POLL_INTERVAL)

    def _materialise_volumes(self) -> dict[str, Path] | None:
        """Volumes from Secrets/ConfigMaps may not exist yet: wait like a kubelet."""
        while self._delete_grace is None:
            try:
                return self.agent.materialiser.volumes(self.pod, self.dir)
            except pod_env.MissingReference as e:
                for c in self.init_containers + self.containers:
                    c.waiting("CreateContainerConfigError", str(e))
                self._write_status()
                self._wake.wait(1.0)
        self._terminate()
        return None

    def _run_init_containers(self, volumes: dict[str, Path]) -> bool:
        """Runs init containers in order; False if one failed for good or the pod
        is being deleted. Sidecars (``restartPolicy: Always``) are started and
        left running beside the ones that follow."""
        for container in self.init_containers:
            if container in self.sidecars:
                self._step([container], volumes)
                continue
            while True:
                if self._delete_grace is not None:
                    return False
                changed = self._step([*self.sidecars, container], volumes)
                if container.restart_at is None:
                    break
                if changed:
                    self._write_status()
                self._wake.wait(POLL_INTERVAL)
            if container.exit_code != 0:
                self.phase = "Failed"
                self._write_status()
                return False
        self.initialized = True
        self._write_status()
        return True

    def _step(self, containers: list[Container], volumes: dict[str, Path]) -> bool:
        """Reaps exits, (re)starts what is due and probes; True if status changed."""
        changed = False
        for c in containers:
            if c.reap():
                changed = True
                policy = self._restart_policy(c)
                if policy == "Always" or (policy == "OnFailure" and c.exit_code != 0):
                    c.restart_later()
                else:
                    c.restart_at = None
            if c.restart_at is not None and not c.running and time.monotonic() >= c.restart_at:
                changed |= self._start(c, volumes)
            if c.running:
                changed |= c.probe(self.ip, self._envs.get(c.name, {}))
        return changed

    def _restart_policy(self, c: Container) -> str:
        if c in self.sidecars:
            return "Always"
        if c in self.init_containers:
            # An init container must succeed once; it is retried on failure
            # unless the pod never restarts anything.
            return "Never" if self.restart_policy == "Never" else "OnFailure"
        return self.restart_policy

    def _start(self, c: Container, volumes: dict[str, Path]) -> bool:
        command = c.spec.get("command") or []
        if not command:
            c.fail_to_start("StartError", "node agent: no command; images are not run")
            c.restart_at = None
            return True
        extra = pod_env.base_environment(self.dir)
        extra.update(pod_env.service_environment(self.agent.core.api_client.configuration.host))
        extra[pod_env.TERMINATION_LOG_ENV] = str(c.termination_log)
        extra.update(pod_env.mount_environment(c.spec, volumes))
        try:
            env = self.agent.materialiser.environment(self.pod, c.spec, extra)
        except pod_env.MissingReference as e:
            c.waiting("CreateContainerConfigError", str(e))
            c.restart_at = time.monotonic() + 1.0
            return True
        self._envs[c.name] = env
        argv = [pod_env.expand(a, env) for a in command + (c.spec.get("args") or [])]
        c.start(argv, env, self._working_dir(c.spec, volumes))
        if "terminated" in c.state:
            c.restart_at = None
        return True

    def _working_dir(self, spec: Obj, volumes: dict[str, Path]) -> Path:
        wanted = spec.get("workingDir")
        if not wanted:
            return self.dir
        for mount in spec.get("volumeMounts") or []:
            if mount["mountPath"] == wanted and mount["name"] in volumes:
                return volumes[mount["name"]]
        return Path(wanted) if Path(wanted).is_dir() else self.dir

    def _all_done(self, containers: list[Container]) -> bool:
        return all(c.restart_at is None and not c.running for c in containers)

    def _all_succeeded(self) -> bool:
        return all(c.exit_code == 0 for c in self.containers)

    def _kill_all(self, grace: float) -> None:
        procs = [c.proc for c in self.init_containers + self.containers if c.proc is not None]
        for proc in procs:
            if proc.poll() is None:
                signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.05)
        for proc in procs:
            signal_group(proc, signal.SIGKILL)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                log.warning("pid %s survived SIGKILL", proc.pid)

    def _terminate(self) -> None:
        """Graceful deletion: SIGTERM, grace period, SIGKILL, final status, delete."""
        self._kill_all(self._delete_grace or 0.0)
        for c in self.init_containers + self.containers:
            c.reap()
            c.restart_at = None
            if "waiting" in c.state:
                c.ready = False
        if self._vanished:
            return
        # Like the kubelet, leave a terminal phase behind so controllers that
        # count finished pods (Job) see how it ended.
        all_ok = all(c.exit_code == 0 for c in self.containers)
        self.phase = "Succeeded" if all_ok else "Failed"
        self._write_status()
        self._delete_object()

    def _await_deletion(self) -> None:
        # request_delete() sets _delete_grace before waking us.
        while self._delete_grace is None:
            self._wake.wait(60)
        if not self._vanished:
            self._delete_object()

    def _delete_object(self) -> None:
        body = {"gracePeriodSeconds": 0, "preconditions": {"uid": self.uid}}
        try:
            self.agent.core.delete_namespaced_pod(
                self.pod_name, self.namespace, body=body, _preload_content=False
            )
        except ApiException as e:
            if e.status not in (404, 409):
                log.warning("deleting pod %s/%s: %s", self.namespace, self.pod_name, e)

    # -- status -------------------------------------------------------------

    def _condition(self, kind: str, ok: bool, reason: str = "") -> Obj:
        status = "True" if ok else "False"
        previous = self._conditions.get(kind)
        if previous is None or previous[0] != status:
            self._conditions[kind] = (status, now(), reason)
        status, since, reason = self._conditions[kind]
        condition: Obj = {"type": kind, "status": status, "lastTransitionTime": since}
        if reason:
            condition["reason"] = reason
        return condition

    def _status(self) -> Obj:
        terminal = self.phase in ("Succeeded", "Failed")
        containers_ready = not terminal and all(c.ready for c in self.containers)
        not_ready = "PodCompleted" if terminal else "ContainersNotReady"
        status: Obj = {
            "phase": self.phase,
            "conditions": [
                self._condition("PodReadyToStartContainers", not terminal),
                self._condition("Initialized", self.initialized),
                self._condition("Ready", containers_ready, "" if containers_ready else not_ready),
                self._condition(
                    "ContainersReady", containers_ready, "" if containers_ready else not_ready
                ),
                self._condition("PodScheduled", True),
            ],
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": self.ip,
            "podIPs": [{"ip": self.ip}],
            "startTime": self.start_time,
            "containerStatuses": [c.status() for c in self.containers],
        }
        if self.init_containers:
            status["initContainerStatuses"] = [c.status() for c in self.init_containers]
        return status

    def _write_status(self) -> None:
        """One strategic-merge patch of the pod's status, as the kubelet sends.

        Conditions merge by type (others' conditions survive); the container
        status lists have no merge key, so ours replace them whole. The uid in
        the patch makes it fail (422), not land on a new pod that reuses the name.
        """
        body = {"metadata": {"uid": self.uid}, "status": self._status()}
        try:
            # Like a kubelet, keep trying while the API server is unreachable (it
            # restarts, say): a status that never lands would leave the Job
            # running forever, which no real node does.
            for attempt in range(STATUS_ATTEMPTS):
                try:
                    self.agent.core.patch_namespaced_pod_status(
                        self.pod_name,
                        self.namespace,
                        body,
                        _content_type="application/strategic-merge-patch+json",
                        _preload_content=False,
                    )
                    break
                except (urllib3.exceptions.HTTPError, OSError):
                    if attempt + 1 == STATUS_ATTEMPTS:
                        raise
                    time.sleep(0.5)
        except ApiException as e:
            # 404: gone; 422 naming metadata.uid: the name now belongs to a new pod.
            replaced = e.status == 422 and "metadata.uid" in str(e.body)
            if e.status != 404 and not replaced:
                log.warning("pod %s/%s status: %s", self.namespace, self.pod_name, e.body)
