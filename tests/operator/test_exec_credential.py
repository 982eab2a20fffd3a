"""`operator.exec_credential`: kubeconfig exec plugins, run for real.

Each test writes a small Python plugin into tmp_path and points a kubeconfig's
`users[].user.exec` at it; the loader, `Rest` (against real HTTP and HTTPS
servers that check the credential) and kopf's login run it as the operator
would. The plugin counts its runs and records what it was given.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import os
import re
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from edgeslim.operator import credentials, exec_credential, login
from edgeslim.operator.credentials import NoCredentials, TokenSource
from edgeslim.operator.kube import Kube
from edgeslim.operator.rest import ApiError, Rest
from tests.cluster.certs import CertificateAuthority
from tests.cluster.controlplane import ControlPlane
from tests.cluster.fixtures import K8s

V1 = "client.authentication.k8s.io/v1"
V1BETA1 = "client.authentication.k8s.io/v1beta1"

PLUGIN = r"""
import datetime, json, os, pathlib, sys, time

state, mode, extra = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
runs = state / "runs"
n = (len(runs.read_text()) if runs.exists() else 0) + 1
with runs.open("a") as f:
    f.write("x")
(state / f"seen-{n}.json").write_text(json.dumps({
    "exec_info": json.loads(os.environ["KUBERNETES_EXEC_INFO"]),
    "stdin_tty": os.isatty(0),
    "stdin": sys.stdin.read(),
    "greeting": os.environ.get("PLUGIN_GREETING"),
    "pid": os.getpid(),
}))
# As real plugins do, answer in the version asked for (unless told otherwise).
asked = json.loads(os.environ["KUBERNETES_EXEC_INFO"])["apiVersion"]
version = os.environ.get("PLUGIN_VERSION") or asked


def expiring(status, seconds):
    if seconds is not None:
        at = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=seconds)
        status["expirationTimestamp"] = at.strftime("%Y-%m-%dT%H:%M:%SZ")
    return status


if mode == "token":  # token-<run>, expiring in extra[0] seconds when given
    status = expiring({"token": f"token-{n}"}, float(extra[0]) if extra else None)
elif mode == "cert":  # the pair named for this run (the last one after that)
    stem = pathlib.Path(extra[min(n, len(extra)) - 1])
    status = {
        "clientCertificateData": stem.with_suffix(".crt").read_text(),
        "clientKeyData": stem.with_suffix(".key").read_text(),
    }
elif mode == "token-file":  # the token in the file named for this run (the last after that)
    status = {"token": pathlib.Path(extra[min(n, len(extra)) - 1]).read_text().strip()}
elif mode == "fail":
    sys.stderr.write("\nerror: no credentials for profile prod\nsecond line\n")
    sys.exit(3)
elif mode == "hang":
    time.sleep(600)
    sys.exit(0)
elif mode == "big":
    sys.stdout.write('{"token": "' + "x" * (2 << 20))
    sys.exit(0)
elif mode == "garbage":
    print("token: hunter2-garbage-secret")
    sys.exit(0)
elif mode == "half-cert":
    status = {"clientCertificateData": "-----BEGIN CERTIFICATE-----\nMIIB\n"}
elif mode == "bad-cert":
    status = {"clientCertificateData": "not a cert", "clientKeyData": "sekrit-key-material"}
elif mode == "empty":
    status = {}
print(json.dumps({"apiVersion": version, "kind": "ExecCredential", "status": status}))
"""


class Plugin:
    """The plugin in tmp_path: its kubeconfig `exec:` section, runs, what it saw."""

    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path / "plugin"
        self.dir.mkdir()
        self.script = self.dir / "plugin.py"
        self.script.write_text(PLUGIN)

    def exec(self, mode: str, *extra: str, **fields: Any) -> dict[str, Any]:
        section: dict[str, Any] = {
            "apiVersion": V1,
            "interactiveMode": "Never",
            "command": sys.executable,
            "args": [str(self.script), str(self.dir), mode, *extra],
        }
        section.update(fields)
        return section

    @property
    def runs(self) -> int:
        runs = self.dir / "runs"
        return len(runs.read_text()) if runs.exists() else 0

    def seen(self, run: int) -> dict[str, Any]:
        return json.loads((self.dir / f"seen-{run}.json").read_text())


@pytest.fixture
def plugin(tmp_path: Path) -> Plugin:
    return Plugin(tmp_path)


def _kubeconfig(
    path: Path, exec_section: dict[str, Any], server: str = "https://a:6443", **cluster: Any
) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "current-context": "ctx",
                "contexts": [{"name": "ctx", "context": {"cluster": "c", "user": "u"}}],
                "clusters": [{"name": "c", "cluster": {"server": server, **cluster}}],
                "users": [{"name": "u", "user": {"exec": exec_section}}],
            }
        )
    )
    return path


def _load(tmp_path: Path, exec_section: dict[str, Any], **kw: Any) -> credentials.Credentials:
    return credentials.from_kubeconfig(_kubeconfig(tmp_path / "config", exec_section, **kw))


# -- what the plugin is given and what comes back --------------------------


def test_a_token_plugin_gets_its_env_and_the_cluster_and_is_never_interactive(
    tmp_path: Path, plugin: Plugin
) -> None:
    ca = CertificateAuthority(tmp_path / "pki")
    section = plugin.exec(
        "token", env=[{"name": "PLUGIN_GREETING", "value": "hello"}], provideClusterInfo=True
    )
    extension = {"name": "client.authentication.k8s.io/exec", "extension": {"audience": "edge"}}
    creds = _load(
        tmp_path,
        section,
        **{"certificate-authority": "pki/ca.crt", "extensions": [extension]},
    )
    assert TokenSource(creds).authorization() == "Bearer token-1"
    seen = plugin.seen(1)
    assert (seen["greeting"], seen["stdin_tty"], seen["stdin"]) == ("hello", False, "")
    assert seen["exec_info"] == {
        "apiVersion": V1,
        "kind": "ExecCredential",
        "spec": {
            "interactive": False,
            "cluster": {
                "server": "https://a:6443",
                "certificate-authority-data": base64.b64encode(ca.cert_pem).decode(),
                "config": {"audience": "edge"},
            },
        },
    }
    # Without provideClusterInfo the plugin learns only that nobody is at the keyboard.
    other = _load(tmp_path, plugin.exec("token", "3600", apiVersion=V1BETA1))
    TokenSource(other).token()
    assert plugin.seen(2)["exec_info"] == {
        "apiVersion": V1BETA1,
        "kind": "ExecCredential",
        "spec": {"interactive": False},
    }


def test_the_credential_is_cached_until_shortly_before_it_expires(
    tmp_path: Path, plugin: Plugin
) -> None:
    hour = _load(tmp_path, plugin.exec("token", "3600"))
    first = TokenSource(hour).issued()
    assert first is not None and first.token == "token-1"
    # Another client of the same kubeconfig (kopf's login, a second Rest) shares it.
    assert TokenSource(_load(tmp_path, plugin.exec("token", "3600"))).issued() is first
    assert plugin.runs == 1
    assert first.refresh_at == first.expires - dt.timedelta(seconds=60)  # type: ignore[operator]
    info = credentials.connection_info(hour, first)
    assert (info.token, info.scheme, info.expiration) == ("token-1", "Bearer", first.refresh_at)

    # Within the refresh margin of its expiry: every use runs the plugin again.
    short = _load(tmp_path, plugin.exec("token", "30"))
    source = TokenSource(short)
    assert [source.token(), source.token()] == ["token-2", "token-3"]
    # kopf is not told to log in again sooner than KOPF_MIN_LIFETIME_S from now.
    issued = source.issued()
    assert issued is not None and issued.token == "token-4"
    info = credentials.connection_info(short, issued)
    floor = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=exec_credential.KOPF_MIN_LIFETIME_S)
    assert info.expiration > issued.refresh_at and info.expiration <= floor  # type: ignore[operator]


def test_a_failed_refresh_keeps_the_credential_until_it_really_expires(
    tmp_path: Path, plugin: Plugin
) -> None:
    creds = _load(tmp_path, plugin.exec("token", "30"))
    issued = TokenSource(creds).issued()
    assert issued is not None and issued.token == "token-1" and issued.stale()
    plugin.script.write_text("import sys; sys.exit(1)\n")  # e.g. the network is down
    assert TokenSource(creds).issued() is issued  # 30 s left: still good to use
    # One that has really expired is not used: the plugin's failure is the answer.
    expired = exec_credential.Issued("gone", None, None, dt.datetime.now(dt.UTC))
    assert creds.exec is not None
    exec_credential._cache[creds.exec] = expired
    with pytest.raises(NoCredentials, match="exited 1"):
        TokenSource(creds).issued()


# -- failures: one line each, never the token --------------------------------


@pytest.mark.parametrize(
    ("mode", "fields", "message"),
    [
        ("fail", {}, r"exec plugin '.*python.*' exited 3: error: no credentials for profile prod$"),
        ("big", {}, r"printed more than 1048576 bytes \(killed\)$"),
        ("garbage", {}, r"printed no ExecCredential JSON \(30 bytes: Expecting value\)$"),
        (
            "token",
            {"env": [{"name": "PLUGIN_VERSION", "value": V1BETA1}]},
            r"answered apiVersion '.*/v1beta1'; the kubeconfig asks for '.*/v1'$",
        ),
        ("half-cert", {}, r"answered clientCertificateData without the other$"),
        ("bad-cert", {}, r"are not a PEM certificate and its key$"),
        ("empty", {}, r"answered neither a token nor a client certificate and key$"),
    ],
)
def test_a_plugin_that_fails_or_answers_garbage_is_one_line(
    tmp_path: Path, plugin: Plugin, mode: str, fields: dict[str, Any], message: str
) -> None:
    creds = _load(tmp_path, plugin.exec(mode, **fields))
    with pytest.raises(NoCredentials) as caught:
        TokenSource(creds).token()
    text = str(caught.value)
    assert text.startswith("kubeconfig user 'u': exec plugin ")
    assert "\n" not in text and caught.value.__cause__ is None
    assert "hunter2" not in text and "sekrit" not in text and "xxxx" not in text
    assert re.search(message, text), text


def test_a_hanging_plugin_is_killed_at_the_timeout(
    tmp_path: Path, plugin: Plugin, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(exec_credential, "TIMEOUT_S", 1.0)
    creds = _load(tmp_path, plugin.exec("hang"))
    with pytest.raises(NoCredentials, match=r"gave no credential within 1 s \(killed\)"):
        TokenSource(creds).token()
    with pytest.raises(ProcessLookupError):  # killed and reaped, not left behind
        os.kill(plugin.seen(1)["pid"], 0)


def test_kubeconfig_mistakes_are_refused_in_one_line(tmp_path: Path, plugin: Plugin) -> None:
    with pytest.raises(NoCredentials, match=r"exec: apiVersion: Field required$"):
        _load(tmp_path, {"command": "aws"})
    with pytest.raises(NoCredentials, match=r"interactiveMode must be set for .*/v1 "):
        _load(tmp_path, {"command": "aws", "apiVersion": V1})
    always = plugin.exec("token", interactiveMode="Always")
    with pytest.raises(NoCredentials, match="operator never runs interactively"):
        _load(tmp_path, always)
    # v1beta1 defaults to IfAvailable, which without a terminal is not interactive.
    beta = {"command": "aws", "apiVersion": V1BETA1}
    assert _load(tmp_path, beta).exec is not None
    secret_env = {**beta, "env": [{"name": "AWS_SECRET", "value": 12345678901}]}
    with pytest.raises(NoCredentials) as caught:
        _load(tmp_path, secret_env)
    assert "env[0].value" in str(caught.value) and "12345678901" not in str(caught.value)
    missing = {
        **beta,
        "command": "edgeslim-no-such-plugin",
        "installHint": "Install it:\n  brew install\n  edgeslim-no-such-plugin\n",
    }
    with pytest.raises(NoCredentials) as caught:
        TokenSource(_load(tmp_path, missing)).token()
    assert str(caught.value) == (
        "kubeconfig user 'u': exec plugin 'edgeslim-no-such-plugin' not found: "
        "Install it: brew install edgeslim-no-such-plugin"
    )
    # A relative command with a path is relative to the kubeconfig, as in kubectl.
    relative = _load(tmp_path, {**beta, "command": "./bin/get-token"})
    assert relative.exec is not None
    assert relative.exec.config.command == str(tmp_path / "bin/get-token")
    provider = {"auth-provider": {"name": "gcp", "config": {}}}
    (tmp_path / "legacy").write_text(
        yaml.safe_dump(
            {
                "current-context": "ctx",
                "contexts": [{"name": "ctx", "context": {"cluster": "c", "user": "u"}}],
                "clusters": [{"name": "c", "cluster": {"server": "https://a"}}],
                "users": [{"name": "u", "user": provider}],
            }
        )
    )
    with pytest.raises(NoCredentials, match=r"'gcp' auth-provider was removed .* exec plugin"):
        credentials.from_kubeconfig(tmp_path / "legacy")


def test_edgeslim_operator_with_a_failing_plugin_exits_2_with_one_line(
    tmp_path: Path, plugin: Plugin
) -> None:
    config = _kubeconfig(tmp_path / "config", plugin.exec("fail"))
    env = {**os.environ, "KUBECONFIG": str(config), "HOME": str(tmp_path)}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    run = subprocess.run(
        [sys.executable, "-m", "edgeslim.cli", "operator"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert run.returncode == 2, run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "exited 3: error: no credentials for profile prod" in lines[0]


# -- the clients pick up fresh credentials ----------------------------------


class _Server:
    """A real HTTP(S) server answering every GET with JSON: 200 when `accept`
    takes the request's credential (its Authorization header, or its client
    certificate's CN), else 401. `seen` lists each request's credential."""

    def __init__(self, accept: Any, tls: ssl.SSLContext | None = None) -> None:
        self.seen: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                peer = self.connection.getpeercert() if tls else None
                if peer:
                    credential = dict(x[0] for x in peer["subject"])["commonName"]
                else:
                    credential = self.headers.get("Authorization", "")
                outer.seen.append(credential)
                ok = accept(credential)
                body = json.dumps({"kind": "Status", "code": 200 if ok else 401}).encode()
                self.send_response(200 if ok else 401)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> _Server:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def token_server() -> Iterator[_Server]:
    # Only tokens from the plugin's second run on are good: the first is "revoked".
    with _Server(lambda auth: auth.startswith("Bearer token-") and auth != "Bearer token-1") as s:
        yield s


def test_rest_runs_the_plugin_again_on_a_401_and_sends_the_request_once_more(
    tmp_path: Path, plugin: Plugin, token_server: _Server
) -> None:
    rest = Rest(_load(tmp_path, plugin.exec("token", "3600"), server=token_server.url))
    assert plugin.runs == 1  # at connect: a broken plugin fails `Kube.connect`
    assert rest.read_namespaced_secret("s", "ns").status == 200
    assert rest.read_namespaced_secret("s", "ns").status == 200
    assert token_server.seen == ["Bearer token-1", "Bearer token-2", "Bearer token-2"]
    assert plugin.runs == 2


def test_rest_runs_the_plugin_again_as_its_credential_expires(
    tmp_path: Path, plugin: Plugin, token_server: _Server
) -> None:
    rest = Rest(_load(tmp_path, plugin.exec("token", "30"), server=token_server.url))
    rest.read_namespaced_secret("s", "ns")
    rest.read_namespaced_secret("s", "ns")
    assert token_server.seen == ["Bearer token-2", "Bearer token-3"]


def test_a_refused_fresh_credential_is_the_401_not_a_loop(tmp_path: Path, plugin: Plugin) -> None:
    with _Server(lambda auth: False) as server:
        rest = Rest(_load(tmp_path, plugin.exec("token", "3600"), server=server.url))
        with pytest.raises(ApiError) as caught:
            rest.read_namespaced_secret("s", "ns")
    assert caught.value.status == 401
    assert server.seen == ["Bearer token-1", "Bearer token-2"]  # sent once more, then given up


def test_rest_presents_the_plugins_client_certificate_and_a_new_one_after_a_401(
    tmp_path: Path, plugin: Plugin
) -> None:
    ca = CertificateAuthority(tmp_path / "pki")
    serving = ca.issue("serving", "localhost", server=True)
    ca.issue("one", "one")
    ca.issue("two", "two")
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(serving.cert, serving.key)
    tls.load_verify_locations(ca.cert_path)
    tls.verify_mode = ssl.CERT_REQUIRED
    pki = tmp_path / "pki"
    section = plugin.exec("cert", str(pki / "one"), str(pki / "two"))
    with _Server(lambda cn: cn == "two", tls) as server:
        creds = _load(
            tmp_path, section, server=server.url, **{"certificate-authority": "pki/ca.crt"}
        )
        rest = Rest(creds)
        assert rest.read_namespaced_secret("s", "ns").status == 200
        assert rest.read_namespaced_secret("s", "ns").status == 200
    # "one" was refused: the plugin ran again and a new pool presented "two".
    assert server.seen == ["one", "two", "two"]
    assert plugin.runs == 2
    issued = TokenSource(creds).issued()
    assert issued is not None and TokenSource(creds).authorization(issued) is None
    info = credentials.connection_info(creds, issued)
    assert (info.certificate_data, info.certificate_path) == (issued.cert_pem, None)


def test_kopf_logs_in_with_a_fresh_credential_after_a_401(
    tmp_path: Path, plugin: Plugin, token_server: _Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _kubeconfig(tmp_path / "config", plugin.exec("token", "3600"), server=token_server.url)
    monkeypatch.setenv("KUBECONFIG", str(config))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)

    async def log_in_and_get() -> tuple[int, Any]:
        ctx = await login.login()
        async with ctx.aiohttp_session as session, session.get(ctx.server + "/api") as response:
            return response.status, ctx.expiration

    first, expiration = asyncio.run(log_in_and_get())
    issued = TokenSource(credentials.load()).issued()
    assert issued is not None and expiration == issued.refresh_at
    # kopf logs in again only when its session is refused (or expires): not token-1 again.
    second, _ = asyncio.run(log_in_and_get())
    assert (first, second) == (401, 200)
    assert token_server.seen == ["Bearer token-1", "Bearer token-2"]
    assert plugin.runs == 2


# -- a real API server ---------------------------------------------------------


@pytest.mark.cluster
def test_exec_plugins_authenticate_the_operator_to_a_real_api_server(
    tmp_path: Path, plugin: Plugin, control_plane: ControlPlane, k8s: K8s, namespace: str
) -> None:
    """A service account's token (TokenRequest) and the admin's client certificate,
    each handed over by an exec plugin: the operator's REST client lists pods, and
    kopf's login session does too. The token plugin's first answer is a token the
    API server does not know: the 401 makes the client run it again."""
    from kubernetes import client

    k8s.core.create_namespaced_service_account(
        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="edge"))
    )
    k8s.rbac.create_namespaced_role(
        namespace,
        {
            "metadata": {"name": "list-pods"},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}],
        },
    )
    k8s.rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": "edge-lists-pods"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": "list-pods",
            },
            "subjects": [{"kind": "ServiceAccount", "name": "edge", "namespace": namespace}],
        },
    )
    request = client.AuthenticationV1TokenRequest(
        spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=600)
    )
    token = k8s.core.create_namespaced_service_account_token("edge", namespace, request)
    (tmp_path / "unknown").write_text("not-a-token-the-server-knows")
    (tmp_path / "sa").write_text(token.status.token)
    ca = {"certificate-authority-data": base64.b64encode(control_plane.ca.cert_pem).decode()}

    by_token = _kubeconfig(
        tmp_path / "by-token",
        plugin.exec("token-file", str(tmp_path / "unknown"), str(tmp_path / "sa")),
        server=control_plane.server,
        **ca,
    )
    kube = Kube.connect(kubeconfig=by_token)
    assert kube.list_pods(namespace, "app=none") == []
    assert plugin.runs == 2  # the unknown token was refused (401), the next one listed

    stem = str(control_plane.admin.cert.with_suffix(""))
    by_cert = _kubeconfig(
        tmp_path / "by-cert", plugin.exec("cert", stem), server=control_plane.server, **ca
    )
    assert Kube.connect(kubeconfig=by_cert).list_pods(namespace, "app=none") == []

    async def kopf_lists_pods() -> int:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("KUBECONFIG", str(by_cert))
            mp.delenv("KUBERNETES_SERVICE_HOST", raising=False)
            ctx = await login.login()
        url = f"{ctx.server}/api/v1/namespaces/{namespace}/pods"
        async with ctx.aiohttp_session as session, session.get(url) as response:
            return response.status

    assert asyncio.run(kopf_lists_pods()) == 200
