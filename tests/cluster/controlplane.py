"""etcd + kube-apiserver + kube-controller-manager on loopback, like envtest.

``ControlPlane().start()`` generates certificates, starts the three processes in
their own process groups under a temporary directory, writes an admin
kubeconfig and returns once the API server is ready and the controller manager
has done real work (the ``default`` ServiceAccount exists). ``stop()`` kills
every process group and removes the directory; an atexit hook does the same if
the owner forgets or crashes.
"""

from __future__ import annotations

import atexit
import base64
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
import urllib.error
from collections.abc import Callable
from pathlib import Path

import yaml
from kubernetes import config
from kubernetes.client import ApiClient, Configuration

from tests.cluster.certs import CertificateAuthority, KeyPair, service_account_keys
from tests.cluster.processes import (
    free_port,
    keep_dirs,
    signal_group,
    spawn,
    stop_group,
    tail,
    urlopen_direct,
    wait_until,
)
from tests.cluster.tools import Binaries, require_binaries

SERVICE_CIDR = "10.0.0.0/24"
# No kubelet, so these would see a node that never heartbeats and evict or
# taint everything on it; node-ipam has no pod CIDRs to hand out.
DISABLED_CONTROLLERS = (
    "node-lifecycle-controller",
    "taint-eviction-controller",
    "device-taint-eviction-controller",
    "node-ipam-controller",
)
START_TIMEOUT = 90.0
STOP_GRACE = 3.0


class ControlPlaneError(RuntimeError):
    """A component failed to start; the message carries its log tail."""


class ControlPlane:
    """One throwaway cluster. Not reusable: ``start`` once, ``stop`` once."""

    def __init__(self, work_dir: Path | None = None, binaries: Binaries | None = None) -> None:
        self.binaries = binaries or require_binaries()
        self._own_dir = work_dir is None
        self.dir = work_dir or Path(tempfile.mkdtemp(prefix="edgeslim-cp-"))
        self.pki = self.dir / "pki"
        self.logs = self.dir / "logs"
        self.kubeconfig = self.dir / "admin.kubeconfig"
        self.etcd_port = free_port()
        self.api_port = free_port()
        self.server = f"https://127.0.0.1:{self.api_port}"
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._argv: dict[str, list[str]] = {}
        self._stopped = False

    # -- lifecycle -------------------------------------------------------

    def start(self) -> ControlPlane:
        atexit.register(self.stop)
        try:
            self._write_pki()
            self._start_etcd()
            self._start_apiserver()
            self._start_controller_manager()
            self._wait_for_default_service_account()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stops every component (reverse start order) and removes the temp dir."""
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        for name in reversed(list(self.processes)):
            # Short grace: the data is throwaway, and kube-apiserver stopped
            # right after starting can sit in graceful shutdown for a minute.
            stop_group(self.processes[name], grace=STOP_GRACE)
        if self._own_dir and not keep_dirs():
            shutil.rmtree(self.dir, ignore_errors=True)

    def restart_apiserver(self, down_seconds: float = 0.0, *, kill: bool = False) -> None:
        """Stops kube-apiserver (SIGTERM, or SIGKILL with `kill`), leaves it down
        for `down_seconds`, starts it again on the same port and waits for /readyz.

        etcd keeps every object, so clients see what they would on a real
        control-plane upgrade or crash: refused connections, broken watches,
        then the same resourceVersions as before.
        """
        name = "kube-apiserver"
        proc = self.processes[name]
        if kill:
            signal_group(proc, signal.SIGKILL)
            proc.wait(timeout=10)
        else:
            stop_group(proc, grace=STOP_GRACE)
        time.sleep(down_seconds)
        self._spawn(name, self._argv[name])
        self._wait(name, lambda: self.get("/readyz", 2)[0] == 200, "/readyz after a restart")

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pids(self) -> dict[str, int]:
        return {name: proc.pid for name, proc in self.processes.items()}

    def log_path(self, component: str) -> Path:
        return self.logs / f"{component}.log"

    # -- talking to it ---------------------------------------------------

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        """An authenticated GET as the admin user; returns (status, body)."""
        ctx = ssl.create_default_context(cafile=str(self.ca.cert_path))
        ctx.load_cert_chain(str(self.admin.cert), str(self.admin.key))
        try:
            with urlopen_direct(self.server + path, context=ctx, timeout=timeout) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def api_client(self, pool_size: int = 32) -> ApiClient:
        """A ``kubernetes.client.ApiClient`` for the admin user.

        The pool is larger than the default 4 because the node agent's pod
        workers and watch share one client with the test.
        """
        configuration = Configuration()
        config.load_kube_config(str(self.kubeconfig), client_configuration=configuration)
        configuration.connection_pool_maxsize = pool_size
        # The server is on loopback; never route it through an *_proxy.
        configuration.no_proxy = "*"
        return ApiClient(configuration)

    # -- pieces ----------------------------------------------------------

    def _write_pki(self) -> None:
        self.ca = CertificateAuthority(self.pki)
        self.serving = self.ca.issue("apiserver", "kube-apiserver", server=True)
        self.admin = self.ca.issue("admin", "admin", organizations=("system:masters",))
        # Its own identity, so RBAC's bootstrap policy (not system:masters)
        # governs the controller manager, as in a real cluster.
        kcm = self.ca.issue("controller-manager", "system:kube-controller-manager")
        self.sa = service_account_keys(self.pki)
        self._write_kubeconfig(self.kubeconfig, "admin", self.admin)
        self.kcm_kubeconfig = self.dir / "controller-manager.kubeconfig"
        self._write_kubeconfig(self.kcm_kubeconfig, "system:kube-controller-manager", kcm)

    def _write_kubeconfig(self, path: Path, user: str, pair: KeyPair) -> None:
        def b64(p: Path) -> str:
            return base64.b64encode(p.read_bytes()).decode()

        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "edgeslim-test",
                    "cluster": {
                        "server": self.server,
                        "certificate-authority-data": b64(self.ca.cert_path),
                    },
                }
            ],
            "users": [
                {
                    "name": user,
                    "user": {
                        "client-certificate-data": b64(pair.cert),
                        "client-key-data": b64(pair.key),
                    },
                }
            ],
            "contexts": [
                {"name": "edgeslim-test", "context": {"cluster": "edgeslim-test", "user": user}}
            ],
            "current-context": "edgeslim-test",
        }
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        path.chmod(0o600)

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        proc = spawn(argv, self.log_path(name), cwd=self.dir)
        self.processes[name] = proc
        self._argv[name] = argv
        return proc

    def _check_running(self, name: str) -> None:
        proc = self.processes[name]
        if proc.poll() is not None:
            raise ControlPlaneError(
                f"{name} exited with {proc.returncode}; log tail:\n{tail(self.log_path(name))}"
            )

    def _wait(self, name: str, predicate: Callable[[], object], what: str) -> None:
        """Waits for ``predicate`` while failing fast if ``name`` dies."""

        def check() -> bool:
            self._check_running(name)
            try:
                return bool(predicate())
            except OSError:
                return False

        try:
            wait_until(check, START_TIMEOUT, interval=0.1, what=what)
        except TimeoutError as e:
            raise ControlPlaneError(f"{e}; {name} log tail:\n{tail(self.log_path(name))}") from e

    def _start_etcd(self) -> None:
        client = f"http://127.0.0.1:{self.etcd_port}"
        # An explicit peer port: etcd's default (2380) would collide between
        # two control planes on one machine.
        peer = f"http://127.0.0.1:{free_port()}"
        self._spawn(
            "etcd",
            [
                str(self.binaries.etcd),
                "--name=default",
                f"--data-dir={self.dir / 'etcd'}",
                f"--listen-client-urls={client}",
                f"--advertise-client-urls={client}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=default={peer}",
                # Test data is disposable; fsync dominates etcd latency.
                "--unsafe-no-fsync=true",
                "--log-level=warn",
            ],
        )

        def healthy() -> bool:
            with urlopen_direct(client + "/health", timeout=2) as r:
                return r.status == 200

        self._wait("etcd", healthy, "etcd /health")

    def _start_apiserver(self) -> None:
        self._spawn(
            "kube-apiserver",
            [
                str(self.binaries.kube_apiserver),
                f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
                f"--secure-port={self.api_port}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--cert-dir={self.pki}",
                f"--tls-cert-file={self.serving.cert}",
                f"--tls-private-key-file={self.serving.key}",
                f"--client-ca-file={self.ca.cert_path}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                f"--service-account-issuer={self.server}",
                f"--service-account-key-file={self.sa.cert}",
                f"--service-account-signing-key-file={self.sa.key}",
                # RBAC, not AlwaysAllow: the operator's least-privilege Role is
                # tested against this server.
                "--authorization-mode=Node,RBAC",
                # Privileged pods must be *allowed* by the cluster so that the
                # PodSecurity admission (on by default) is what rejects them.
                "--allow-privileged=true",
                # The lease reconciler would try to publish 127.0.0.1 as the
                # kubernetes Service's endpoint, which validation forbids.
                "--endpoint-reconciler-type=none",
                "--v=1",
            ],
        )
        self._wait("kube-apiserver", lambda: self.get("/readyz", 2)[0] == 200, "/readyz")

    def _start_controller_manager(self) -> None:
        disabled = ",".join(f"-{c}" for c in DISABLED_CONTROLLERS)
        self._spawn(
            "kube-controller-manager",
            [
                str(self.binaries.kube_controller_manager),
                f"--kubeconfig={self.kcm_kubeconfig}",
                f"--controllers=*,{disabled}",
                f"--service-account-private-key-file={self.sa.key}",
                f"--root-ca-file={self.ca.cert_path}",
                # One token per controller, so RBAC sees each controller's own
                # ServiceAccount the way it does in a real cluster.
                "--use-service-account-credentials=true",
                f"--cluster-signing-cert-file={self.ca.cert_path}",
                f"--cluster-signing-key-file={self.ca.key_path}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                # Nothing scrapes it; no port means no collisions.
                "--secure-port=0",
                "--v=1",
            ],
        )

    def _wait_for_default_service_account(self) -> None:
        # Proves the controller manager is up and reconciling, and pods in
        # "default" cannot be created before their ServiceAccount exists.
        self._wait(
            "kube-controller-manager",
            lambda: self.get("/api/v1/namespaces/default/serviceaccounts/default")[0] == 200,
            "the default ServiceAccount",
        )
