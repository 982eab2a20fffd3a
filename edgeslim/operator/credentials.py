"""Where the operator's API credentials come from, without the kubernetes client.

Importing the `kubernetes` package costs the operator ~31 MB (its config
loading pulls in requests, oauthlib and google-auth), for reading two files.
This reads them itself, in the client's order: in a pod, the service account's
token and CA (the token file is re-read, since bound tokens rotate); else the
current context of KUBECONFIG (paths joined with `os.pathsep`, the first file
to name a thing wins) or ~/.kube/config, with a bearer token (or token file),
a client certificate and key (paths or inline data), a user name and
password, or an `exec` credential plugin (`exec_credential`: run as kubectl
runs it, its answer cached until shortly before it expires and shared by the
whole process). The legacy `auth-provider` plugins (gcp, azure, oidc; removed
from kubectl) fail with a line that says to use an exec plugin. The same
`Credentials` serve our own calls (`rest`) and kopf's watches
(`connection_info`), so both connections are one identity.
"""

from __future__ import annotations

import atexit
import base64
import os
import shutil
import ssl
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from edgeslim.operator import exec_credential
from edgeslim.operator.exec_credential import ExecPlugin, ExecPluginError, Issued

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
TOKEN_REREAD_S = 60.0  # as the kubernetes client: bound tokens rotate well before they expire


class NoCredentials(Exception):
    """Neither a pod's service account nor a usable kubeconfig."""


@dataclass(frozen=True)
class Credentials:
    """One API server and how to prove who we are to it."""

    server: str
    ca_file: str | None = None
    ca_data: str | None = None  # PEM
    insecure: bool = False
    cert_file: str | None = None
    key_file: str | None = None
    token: str | None = None
    token_file: str | None = None  # re-read every TOKEN_REREAD_S; wins over `token`
    username: str | None = None
    password: str | None = None
    namespace: str | None = None  # the pod's own, for kopf's cluster-scoped Events
    exec: ExecPlugin | None = None  # a credential plugin gives the token or certificate

    def ssl_context(self, issued: Issued | None = None) -> ssl.SSLContext:
        """With `issued`'s client certificate, when the exec plugin gave one."""
        ctx = ssl.create_default_context(cafile=self.ca_file, cadata=self.ca_data)
        if self.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        pem = exec_credential.client_pem(issued)
        if pem is not None:
            exec_credential.load_client_pem(ctx, *pem)
        elif self.cert_file:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx


class TokenSource:
    """The bearer token to send now: a token file re-read once a minute, or the
    exec plugin's current credential (`issued`, shared by the whole process)."""

    def __init__(self, creds: Credentials) -> None:
        self.creds = creds
        self._token = creds.token
        self._read_at = float("-inf")

    def issued(self) -> Issued | None:
        """The exec plugin's credential now (running it when the cached one is
        stale); None without a plugin. NoCredentials when the plugin fails."""
        if self.creds.exec is None:
            return None
        try:
            return exec_credential.issued(self.creds.exec)
        except ExecPluginError as exc:
            raise NoCredentials(str(exc)) from None

    def invalidate(self, seen: Issued | None) -> None:
        """The API server refused `seen` (401): the next `issued` runs the plugin again."""
        if self.creds.exec is not None and seen is not None:
            exec_credential.invalidate(self.creds.exec, seen)

    def token(self, issued: Issued | None = None) -> str | None:
        if self.creds.exec is not None:
            return (issued or self.issued() or _NONE).token
        path = self.creds.token_file
        if path and time.monotonic() - self._read_at > TOKEN_REREAD_S:
            self._token = Path(path).read_text().strip() or None
            self._read_at = time.monotonic()
        return self._token

    def authorization(self, issued: Issued | None = None) -> str | None:
        """The Authorization header value, or None (a client certificate, or anonymous)."""
        token = self.token(issued)
        if token:
            return f"Bearer {token}"
        if self.creds.username is not None:
            pair = f"{self.creds.username}:{self.creds.password or ''}".encode()
            return "Basic " + base64.b64encode(pair).decode()
        return None


def load(kubeconfig: str | os.PathLike[str] | None = None) -> Credentials:
    """In-cluster when in a pod (and no `kubeconfig` is named), else a kubeconfig."""
    if kubeconfig is None:
        in_pod = in_cluster()
        if in_pod is not None:
            return in_pod
    return from_kubeconfig(kubeconfig)


def in_cluster(root: Path = SERVICE_ACCOUNT) -> Credentials | None:
    """The pod's service account, as the kubernetes client's `load_incluster_config`
    finds it (the Service env vars, then the token and CA files); None outside a pod."""
    host = os.environ.get("KUBERNETES_SERVICE_HOST")
    port = os.environ.get("KUBERNETES_SERVICE_PORT")
    token = root / "token"
    if not host or not port or not token.is_file():
        return None
    if ":" in host:  # IPv6
        host = f"[{host}]"
    ca = root / "ca.crt"
    ns = root / "namespace"
    return Credentials(
        server=f"https://{host}:{port}",
        ca_file=str(ca) if ca.is_file() else None,
        token_file=str(token),
        namespace=(ns.read_text().strip() or None) if ns.is_file() else None,
    )


def from_kubeconfig(path: str | os.PathLike[str] | None = None) -> Credentials:
    """The current context of `path`, else of KUBECONFIG, else of ~/.kube/config."""
    paths = _kubeconfig_paths(path)
    current: str | None = None
    sections: dict[str, dict[str, tuple[Path, dict[str, Any]]]] = {
        "contexts": {},
        "clusters": {},
        "users": {},
    }
    for file in paths:
        try:
            doc = yaml.safe_load(file.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise NoCredentials(f"kubeconfig {file}: {exc}") from exc
        if not isinstance(doc, dict):
            raise NoCredentials(f"kubeconfig {file}: not a mapping")
        current = current or doc.get("current-context")
        for section, entries in sections.items():
            key = section[:-1]  # "contexts" -> "context"
            for item in doc.get(section) or []:
                if isinstance(item, dict) and "name" in item:
                    entries.setdefault(item["name"], (file.parent, item.get(key) or {}))
    if not current or current not in sections["contexts"]:
        raise NoCredentials(f"kubeconfig {os.pathsep.join(map(str, paths))}: no current context")
    _, context = sections["contexts"][current]
    cluster_dir, cluster = sections["clusters"].get(context.get("cluster"), (Path(), {}))
    user_dir, user = sections["users"].get(context.get("user"), (Path(), {}))
    if not cluster.get("server"):
        raise NoCredentials(f"kubeconfig context {current!r}: its cluster names no server")
    user_name = str(context.get("user"))
    if "auth-provider" in user and not user.get("token"):
        provider = (user.get("auth-provider") or {}).get("name") or "?"
        raise NoCredentials(
            f"kubeconfig user {user_name!r}: the {provider!r} auth-provider was removed from "
            "kubectl and is not supported; use its exec plugin (e.g. gke-gcloud-auth-plugin, "
            "kubelogin) or a token or client certificate"
        )
    ca_file = _path(cluster_dir, cluster.get("certificate-authority"))
    ca_data = _decoded(cluster.get("certificate-authority-data"))
    plugin = None
    if user.get("exec") and not user.get("token"):  # a static token wins, as before
        plugin = _exec_plugin(user_name, user["exec"], cluster, ca_file, ca_data, user_dir)
    return Credentials(
        server=cluster["server"].rstrip("/"),
        ca_file=ca_file,
        ca_data=ca_data,
        insecure=bool(cluster.get("insecure-skip-tls-verify")),
        cert_file=_path(user_dir, user.get("client-certificate"))
        or _private_file(user.get("client-certificate-data"), "client.crt"),
        key_file=_path(user_dir, user.get("client-key"))
        or _private_file(user.get("client-key-data"), "client.key"),
        token=user.get("token"),
        token_file=_path(user_dir, user.get("tokenFile")),
        username=user.get("username"),
        password=user.get("password"),
        namespace=context.get("namespace"),
        exec=plugin,
    )


def _exec_plugin(
    user: str,
    section: Any,
    cluster: dict[str, Any],
    ca_file: str | None,
    ca_data: str | None,
    user_dir: Path,
) -> ExecPlugin:
    ca_pem = ca_data
    wants_ca = isinstance(section, dict) and section.get("provideClusterInfo")
    if ca_pem is None and ca_file and wants_ca:
        try:  # the plugin gets the CA as data, as kubectl passes it
            ca_pem = Path(ca_file).read_text()
        except OSError as exc:
            raise NoCredentials(f"kubeconfig cluster CA {ca_file}: {exc.strerror}") from None
    try:
        return exec_credential.plugin_for(user, section, cluster, ca_pem, str(user_dir))
    except ExecPluginError as exc:
        raise NoCredentials(str(exc)) from None


def connection_info(creds: Credentials, issued: Issued | None = None) -> Any:
    """The same credentials as kopf's ConnectionInfo, for its login handler; with
    an exec plugin, its credential `issued` (else the current one), expiring
    for kopf when the plugin should run again."""
    import kopf

    source = TokenSource(creds)
    if creds.exec is not None and issued is None:
        issued = source.issued()
    pem = exec_credential.client_pem(issued)
    return kopf.ConnectionInfo(
        server=creds.server,
        ca_path=creds.ca_file,
        ca_data=creds.ca_data,
        insecure=creds.insecure or None,
        certificate_path=creds.cert_file if pem is None else None,
        private_key_path=creds.key_file if pem is None else None,
        certificate_data=pem[0] if pem is not None else None,
        private_key_data=pem[1] if pem is not None else None,
        scheme="Bearer" if creds.token or creds.token_file or (issued and issued.token) else None,
        token=source.token(issued),
        username=creds.username,
        password=creds.password,
        default_namespace=creds.namespace,
        expiration=issued.kopf_expiration() if issued is not None else None,
    )


_NONE = Issued(token=None, cert_pem=None, key_pem=None, expires=None)


def without_kubernetes_client() -> None:
    """Keeps the `kubernetes` package out of this process (call before kopf is imported).

    kopf imports it whenever it is installed (in the image it is not; in a
    development venv the tests need it): to recognise its model objects, which
    the operator never hands to kopf, and for a login handler we replace. A
    None in `sys.modules` makes those imports fail as if it were absent, and
    kopf then does without. Only the operator's entry point calls this: any
    later `import kubernetes` in this process fails.
    """
    if "kopf" in sys.modules:
        raise RuntimeError("without_kubernetes_client() must run before kopf is imported")
    for name in ("kubernetes", "kubernetes_asyncio", "pykube"):
        if name not in sys.modules:
            sys.modules[name] = None  # type: ignore[assignment]


def _kubeconfig_paths(path: str | os.PathLike[str] | None) -> list[Path]:
    if path is not None:
        return [Path(path)]
    env = os.environ.get("KUBECONFIG", "")
    paths = [Path(p).expanduser() for p in env.split(os.pathsep) if p.strip()]
    if not paths:
        default = Path("~/.kube/config").expanduser()
        if not default.is_file():
            raise NoCredentials("not in a pod, and neither KUBECONFIG nor ~/.kube/config is set")
        paths = [default]
    return paths


def _path(base: Path, value: str | None) -> str | None:
    """A kubeconfig path; relative ones are relative to the file that names them."""
    return str(base / Path(value).expanduser()) if value else None


def _decoded(data: str | None) -> str | None:
    return base64.b64decode(data).decode() if data else None


_private_dir: str | None = None


def _private_file(data: str | None, name: str) -> str | None:
    """Inline certificate or key data as a file only we can read (ssl loads client
    certificates from files only), removed when the process ends."""
    global _private_dir
    if not data:
        return None
    if _private_dir is None:
        _private_dir = tempfile.mkdtemp(prefix="edgeslim-kube-")  # mode 0700
        atexit.register(shutil.rmtree, _private_dir, True)
    file = Path(_private_dir) / name
    file.touch(mode=0o600)
    file.write_bytes(base64.b64decode(data))
    return str(file)
