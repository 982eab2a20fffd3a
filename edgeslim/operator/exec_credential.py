"""kubeconfig `exec` credential plugins (client.authentication.k8s.io ExecCredential),
as kubectl runs them: EKS `aws eks get-token`, GKE `gke-gcloud-auth-plugin`,
`kubelogin`, ...

The plugin is the operator's own configured credential, so it runs as the
operator's user, with no shell (argv list), the kubeconfig's `env` added to the
operator's environment, stdin not a terminal (the operator is never
interactive: `interactiveMode: Always` is refused), and KUBERNETES_EXEC_INFO
saying so (with the cluster's server and CA when `provideClusterInfo`). Its
stdout is read up to MAX_OUTPUT bytes within TIMEOUT_S seconds and parsed into
an `ExecCredential` whose apiVersion must be the one the kubeconfig asked for.
Anything else is one `ExecPluginError` line: the command, its exit code and
the first line of its stderr, never what it printed on stdout (the token).

The answer is cached per plugin for the whole process (our REST client and
kopf's login share it) until REFRESH_MARGIN_S before its expirationTimestamp,
then the plugin runs again: EKS tokens last 15 minutes, the operator runs for
weeks. A 401 drops the credential it was sent with (`invalidate`), as client-go
does, so a revoked credential is replaced before its stated expiry.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import os
import re
import selectors
import signal
import ssl
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgeslim.api.errors import format_validation_error
from edgeslim.redact import redact, remember

log = logging.getLogger(__name__)

TIMEOUT_S = 60.0  # a plugin that waits for a browser login or a dead network
MAX_OUTPUT = 1 << 20  # an ExecCredential is a few KB; a certificate chain a few more
_STDERR_KEPT = 64 << 10  # only its first line is ever shown
# Run the plugin again this long before its credential expires, so no request
# goes out with a credential about to expire in flight (EKS: asked again at 13 min).
REFRESH_MARGIN_S = 60.0
# kopf logs in again when a credential it holds expires: never sooner than this
# from now, so a plugin answering already-expired credentials cannot make kopf
# log in (and run the plugin) in a tight loop. A 401 still logs kopf in at once.
KOPF_MIN_LIFETIME_S = 10.0


class ExecPluginError(Exception):
    """The plugin could not be run, failed, or answered something unusable (one line)."""


class EnvVar(BaseModel):
    model_config = ConfigDict(frozen=True)
    name: str
    value: str = Field(repr=False)  # may be a secret: never in a repr


class ExecConfig(BaseModel):
    """A kubeconfig user's `exec:` section (clientcmd's ExecConfig)."""

    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="ignore")
    command: str = Field(min_length=1)
    args: tuple[str, ...] = ()
    env: tuple[EnvVar, ...] = ()
    api_version: Literal[
        "client.authentication.k8s.io/v1", "client.authentication.k8s.io/v1beta1"
    ] = Field(alias="apiVersion")
    install_hint: str | None = Field(None, alias="installHint")
    provide_cluster_info: bool = Field(False, alias="provideClusterInfo")
    interactive_mode: Literal["Never", "IfAvailable", "Always"] | None = Field(
        None, alias="interactiveMode"
    )


class ExecPlugin(BaseModel):
    """One plugin to run: its config (command resolved against the kubeconfig's
    folder), the user it stands for (for messages) and the KUBERNETES_EXEC_INFO
    it is given. Hashable: the process-wide cache's key."""

    model_config = ConfigDict(frozen=True)
    user: str
    config: ExecConfig
    exec_info: str  # JSON


class ExecCredentialStatus(BaseModel):
    """What the plugin hands back: a bearer token and/or a client certificate."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore")
    token: str | None = None
    client_certificate_data: str | None = Field(None, alias="clientCertificateData")
    client_key_data: str | None = Field(None, alias="clientKeyData")
    expiration_timestamp: dt.datetime | None = Field(None, alias="expirationTimestamp")


class ExecCredential(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore")
    api_version: str = Field(alias="apiVersion")
    kind: Literal["ExecCredential"]
    status: ExecCredentialStatus | None = None


@dataclass(frozen=True, eq=False)  # compared by identity: "the one a request was sent with"
class Issued:
    """One answer of the plugin, as the clients use it."""

    token: str | None = field(repr=False)
    cert_pem: str | None = field(repr=False)
    key_pem: str | None = field(repr=False)
    expires: dt.datetime | None  # tz-aware; None: until a 401

    @property
    def refresh_at(self) -> dt.datetime | None:
        if self.expires is None:
            return None
        return self.expires - dt.timedelta(seconds=REFRESH_MARGIN_S)

    def stale(self, now: dt.datetime | None = None) -> bool:
        refresh_at = self.refresh_at
        return refresh_at is not None and (now or _now()) >= refresh_at

    def expired(self, now: dt.datetime | None = None) -> bool:
        return self.expires is not None and (now or _now()) >= self.expires

    def kopf_expiration(self) -> dt.datetime | None:
        """When kopf should log in again for a fresh one."""
        refresh_at = self.refresh_at
        if refresh_at is None:
            return None
        return max(refresh_at, _now() + dt.timedelta(seconds=KOPF_MIN_LIFETIME_S))


def client_pem(issued: Issued | None) -> tuple[str, str] | None:
    """(certificate, key) PEM when the plugin gave a client certificate (its answer
    is refused unless it gives both or neither)."""
    if issued is None or not issued.cert_pem or not issued.key_pem:
        return None
    return issued.cert_pem, issued.key_pem


def plugin_for(
    user: str,
    section: object,
    cluster: dict[str, object],
    ca_pem: str | None,
    base_dir: str,
) -> ExecPlugin:
    """The kubeconfig's `exec:` section as a runnable plugin; ExecPluginError
    (naming fields, never values: `env` may hold secrets) if it is not one."""
    try:
        config = ExecConfig.model_validate(section)
    except ValidationError as exc:
        problem = format_validation_error(exc)
        raise ExecPluginError(f"kubeconfig user {user!r}: exec: {problem}") from None
    if config.interactive_mode is None and config.api_version.endswith("/v1"):
        # As kubectl: v1 requires it (v1beta1 defaults to IfAvailable).
        raise ExecPluginError(
            f"kubeconfig user {user!r}: exec: interactiveMode must be set for "
            f"{config.api_version} (Never or IfAvailable; the operator is never interactive)"
        )
    if config.interactive_mode == "Always":
        raise ExecPluginError(
            f"kubeconfig user {user!r}: exec: interactiveMode Always needs a terminal, and the "
            "operator never runs interactively; use a plugin (or mode) that works without one"
        )
    command = config.command
    if os.sep in command and not os.path.isabs(command):
        # As kubectl: a relative path is relative to the kubeconfig that names it.
        command = os.path.normpath(os.path.join(base_dir, command))
    spec: dict[str, object] = {"interactive": False}
    if config.provide_cluster_info:
        spec["cluster"] = _cluster_info(cluster, ca_pem)
    info = {"apiVersion": config.api_version, "kind": "ExecCredential", "spec": spec}
    return ExecPlugin(
        user=user,
        config=config.model_copy(update={"command": command}),
        exec_info=json.dumps(info, separators=(",", ":")),
    )


def _cluster_info(cluster: dict[str, object], ca_pem: str | None) -> dict[str, object]:
    """The ExecCredential's spec.cluster: the kubeconfig's cluster fields, the CA
    always as data (base64, as Go encodes []byte), and the cluster's
    `client.authentication.k8s.io/exec` extension as `config`."""
    info: dict[str, object] = {"server": cluster.get("server")}
    for key in ("tls-server-name", "insecure-skip-tls-verify", "proxy-url", "disable-compression"):
        if cluster.get(key):
            info[key] = cluster[key]
    if ca_pem:
        info["certificate-authority-data"] = base64.b64encode(ca_pem.encode()).decode()
    for ext in cluster.get("extensions") or []:  # type: ignore[attr-defined]
        if isinstance(ext, dict) and ext.get("name") == "client.authentication.k8s.io/exec":
            info["config"] = ext.get("extension")
    return info


# -- the process-wide cache ------------------------------------------------

_cache: dict[ExecPlugin, Issued] = {}
_locks: dict[ExecPlugin, threading.Lock] = {}
_locks_guard = threading.Lock()


def _lock(plugin: ExecPlugin) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(plugin, threading.Lock())


def issued(plugin: ExecPlugin) -> Issued:
    """The plugin's current credential: the cached one, else a fresh run (one
    run at a time per plugin: the threads that need it meanwhile wait for it)."""
    with _lock(plugin):
        current = _cache.get(plugin)
        if current is not None and not current.stale():
            return current
        try:
            fresh = run(plugin)
        except ExecPluginError as exc:
            if current is not None and not current.expired():
                # Within the margin the old one still works: keep going, try again next call.
                log.warning("%s; keeping the current credential until it expires", exc)
                return current
            raise
        _cache[plugin] = fresh
        return fresh


def invalidate(plugin: ExecPlugin, seen: Issued) -> None:
    """The API server refused `seen` (401): the next `issued` runs the plugin
    again, unless another caller has already replaced it."""
    with _lock(plugin):
        if _cache.get(plugin) is seen:
            del _cache[plugin]


# -- one run ---------------------------------------------------------------


def run(plugin: ExecPlugin) -> Issued:
    """Runs the plugin once and parses its answer."""
    config = plugin.config
    name = f"kubeconfig user {plugin.user!r}: exec plugin {config.command!r}"
    env = dict(os.environ)
    env.update({var.name: var.value for var in config.env})
    env["KUBERNETES_EXEC_INFO"] = plugin.exec_info
    try:
        proc = subprocess.Popen(
            [config.command, *config.args],
            stdin=subprocess.DEVNULL,  # never interactive
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,  # its own process group: a timeout kills all of it
        )
    except FileNotFoundError:
        hint = " ".join((config.install_hint or "").split())
        raise ExecPluginError(f"{name} not found" + (f": {hint}" if hint else "")) from None
    except OSError as exc:
        raise ExecPluginError(f"{name} could not start: {exc.strerror or exc}") from None
    deadline = time.monotonic() + TIMEOUT_S
    try:
        stdout, stderr = _read(proc, name, deadline)
        try:  # it may close its pipes and linger
            code = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise ExecPluginError(_too_slow(name, stderr)) from None
    finally:
        if proc.poll() is None:
            _kill(proc)
        for pipe in (proc.stdout, proc.stderr):
            if pipe:
                pipe.close()
    if code != 0:
        raise ExecPluginError(f"{name} exited {code}: {_first_line(stderr)}")
    return parse(stdout, config.api_version, name)


def _read(proc: subprocess.Popen[bytes], name: str, deadline: float) -> tuple[bytes, bytes]:
    """Both pipes until EOF: stdout up to MAX_OUTPUT, stderr's first _STDERR_KEPT
    bytes (the rest drained, so a chatty plugin cannot block on a full pipe)."""
    assert proc.stdout and proc.stderr
    out, err = bytearray(), bytearray()
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ, out)
        sel.register(proc.stderr, selectors.EVENT_READ, err)
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                raise ExecPluginError(_too_slow(name, bytes(err)))
            for key, _ in sel.select(left):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                buf: bytearray = key.data
                if buf is out:
                    if len(out) + len(chunk) > MAX_OUTPUT:
                        _kill(proc)
                        raise ExecPluginError(
                            f"{name} printed more than {MAX_OUTPUT} bytes (killed)"
                        )
                    out += chunk
                elif len(err) < _STDERR_KEPT:
                    err += chunk[: _STDERR_KEPT - len(err)]
    return bytes(out), bytes(err)


def _too_slow(name: str, stderr: bytes) -> str:
    return (
        f"{name} gave no credential within {TIMEOUT_S:g} s (killed); stderr: {_first_line(stderr)}"
    )


def _kill(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    proc.wait()


def parse(stdout: bytes, api_version: str, name: str = "exec plugin") -> Issued:
    """The ExecCredential on the plugin's stdout; ExecPluginError saying what is
    wrong with it, never quoting it."""
    try:
        doc = json.loads(stdout)
    except ValueError as exc:  # UnicodeDecodeError is one too
        detail = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
        raise ExecPluginError(
            f"{name} printed no ExecCredential JSON ({len(stdout)} bytes: {detail})"
        ) from None
    try:
        cred = ExecCredential.model_validate(doc)
    except ValidationError as exc:
        raise ExecPluginError(
            f"{name} answered an invalid ExecCredential: {format_validation_error(exc)}"
        ) from None
    if cred.api_version != api_version:
        shown = cred.api_version if re.fullmatch(r"[\w./-]{1,80}", cred.api_version) else "another"
        raise ExecPluginError(
            f"{name} answered apiVersion {shown!r}; the kubeconfig asks for {api_version!r}"
        )
    status = cred.status
    if status is None:
        raise ExecPluginError(f"{name} answered an ExecCredential without a status")
    cert, key = status.client_certificate_data, status.client_key_data
    if bool(cert) != bool(key):
        raise ExecPluginError(
            f"{name} answered {'clientCertificateData' if cert else 'clientKeyData'} "
            "without the other"
        )
    if not status.token and not cert:
        raise ExecPluginError(f"{name} answered neither a token nor a client certificate and key")
    if cert and key:
        try:
            load_client_pem(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), cert, key)
        except (ssl.SSLError, OSError):
            raise ExecPluginError(
                f"{name} answered clientCertificateData/clientKeyData that are not a PEM "
                "certificate and its key"
            ) from None
    expires = status.expiration_timestamp
    if expires is not None and expires.tzinfo is None:
        expires = expires.replace(tzinfo=dt.UTC)  # RFC 3339 has an offset; be lenient
    remember(status.token, key)  # masked wherever they might be quoted
    return Issued(token=status.token or None, cert_pem=cert, key_pem=key, expires=expires)


def load_client_pem(ctx: ssl.SSLContext, cert_pem: str, key_pem: str) -> None:
    """Loads a PEM certificate and key held in memory into `ctx` (ssl reads them
    from files only: each is written to a file only we can read and removed at once)."""
    paths: list[str] = []
    try:
        for pem in (cert_pem, key_pem):
            fd, path = tempfile.mkstemp(prefix="edgeslim-exec-", suffix=".pem")  # mode 0600
            paths.append(path)
            with os.fdopen(fd, "w") as file:
                file.write(pem)
        ctx.load_cert_chain(paths[0], paths[1])
    finally:
        for path in paths:
            os.unlink(path)


def _first_line(stderr: bytes) -> str:
    for line in stderr.decode("utf-8", "replace").splitlines():
        if line.strip():
            return redact(line.strip())[:300]
    return "(nothing on stderr)"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
