"""`operator.credentials`: the service account in a pod, else the kubeconfig's
current context, read without the kubernetes client. (A real API server reads
the test bed's kubeconfig through it in `test_rest`.)"""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import kopf
import pytest
import yaml

from edgeslim.operator import credentials
from edgeslim.operator.credentials import Credentials, NoCredentials, TokenSource

PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _kubeconfig(
    path: Path, user: dict, current: str = "ctx", server: str = "https://a:6443"
) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "current-context": current,
                "contexts": [{"name": "ctx", "context": {"cluster": "c", "user": "u"}}],
                "clusters": [
                    {
                        "name": "c",
                        "cluster": {"server": server + "/", "certificate-authority": "ca.crt"},
                    }
                ],
                "users": [{"name": "u", "user": user}],
            }
        )
    )
    return path


def test_inline_client_certificate_and_key_become_private_files(tmp_path: Path) -> None:
    user = {"client-certificate-data": _b64("CERT"), "client-key-data": _b64("KEY")}
    creds = credentials.from_kubeconfig(_kubeconfig(tmp_path / "config", user))
    assert creds.server == "https://a:6443"
    assert creds.ca_file == str(tmp_path / "ca.crt")  # relative to the kubeconfig
    assert creds.cert_file and Path(creds.cert_file).read_text() == "CERT"
    assert creds.key_file and Path(creds.key_file).read_text() == "KEY"
    assert stat.S_IMODE(os.stat(creds.key_file).st_mode) == 0o600
    assert TokenSource(creds).authorization() is None  # the certificate is the identity


def test_kubeconfig_env_lists_files_and_the_first_to_name_a_thing_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _kubeconfig(tmp_path / "a", {"token": "first"}, server="https://first")
    second = _kubeconfig(tmp_path / "b", {"token": "second"}, current="other", server="https://2nd")
    monkeypatch.setenv("KUBECONFIG", os.pathsep.join([str(first), str(second)]))
    creds = credentials.load()
    assert (creds.server, creds.token) == ("https://first", "first")
    assert TokenSource(creds).authorization() == "Bearer first"


def test_a_token_file_is_read_again_once_a_minute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = tmp_path / "token"
    token.write_text("one\n")
    source = TokenSource(Credentials(server="https://a", token_file=str(token)))
    assert source.token() == "one"
    token.write_text("two")
    assert source.token() == "one"
    monkeypatch.setattr(credentials, "TOKEN_REREAD_S", 0.0)
    assert source.token() == "two"


def test_in_a_pod_the_service_account_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "token").write_text("sa-token")
    (tmp_path / "ca.crt").write_text(PEM)
    (tmp_path / "namespace").write_text("edgeslim-system")
    monkeypatch.setattr(credentials, "SERVICE_ACCOUNT", tmp_path)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    creds = credentials.in_cluster(tmp_path)
    assert creds == Credentials(
        server="https://10.96.0.1:443",
        ca_file=str(tmp_path / "ca.crt"),
        token_file=str(tmp_path / "token"),
        namespace="edgeslim-system",
    )
    info = credentials.connection_info(creds)
    assert isinstance(info, kopf.ConnectionInfo)
    assert (info.server, info.token, info.scheme, info.default_namespace) == (
        "https://10.96.0.1:443",
        "sa-token",
        "Bearer",
        "edgeslim-system",
    )
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST")
    assert credentials.in_cluster(tmp_path) is None


def test_no_credentials_and_plugins_say_so_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(NoCredentials, match="neither KUBECONFIG nor"):
        credentials.from_kubeconfig()
    # exec plugins run (test_exec_credential); the legacy auth-providers do not.
    legacy = _kubeconfig(tmp_path / "legacy", {"auth-provider": {"name": "oidc"}})
    with pytest.raises(NoCredentials, match=r"'oidc' auth-provider was removed .* exec plugin"):
        credentials.from_kubeconfig(legacy)
    with pytest.raises(NoCredentials, match="no current context"):
        credentials.from_kubeconfig(_kubeconfig(tmp_path / "x", {}, current="gone"))
