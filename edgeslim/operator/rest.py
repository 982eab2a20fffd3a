"""The few API calls the operator makes, over plain urllib3.

The kubernetes client costs the operator ~60 MB: ~31 MB to import the package
(its config loading pulls in requests, oauthlib and google-auth) and ~29 MB
more the first time a generated API class is used (some 300 model classes, a
pydantic validator per method), for calls whose bodies are plain dicts anyway
(`kube.py` reads and writes JSON). `Rest` serves the same method names and
positional order as CoreV1Api, BatchV1Api, AppsV1Api and CustomObjectsApi
(their `_preload_content=False` answer: the raw response, `.data` and
`.status`) over one urllib3 pool with the credentials of `credentials.py`;
a non-2xx answer raises `ApiError`, with the server's status, reason and body.
With an exec credential plugin, each request carries the plugin's current
credential (re-run when it nears expiry, see `exec_credential`); a client
certificate from it gets a new pool when it changes, and a 401 drops the
credential and sends the request once more with a fresh one.
"""

from __future__ import annotations

import json
import threading
from typing import Any
from urllib.parse import quote, urlencode

import urllib3

from edgeslim.operator import exec_credential
from edgeslim.operator.credentials import Credentials, TokenSource
from edgeslim.operator.exec_credential import Issued


class ApiError(Exception):
    """The API server answered with a non-2xx status (`body`: its Status JSON)."""

    def __init__(self, status: int, reason: str | None, body: str) -> None:
        super().__init__(f"({status}) {reason}: {body[:500]}")
        self.status = status
        self.reason = reason
        self.body = body


_CUSTOM = "/apis/{group}/{version}/namespaces/{namespace}/{plural}"
_JOBS = "/apis/batch/v1/namespaces/{namespace}/jobs"
_DEPLOYMENTS = "/apis/apps/v1/namespaces/{namespace}/deployments"
_CORE = "/api/v1/namespaces/{namespace}"
_NAMED = ("name", "namespace")

# method name: (HTTP verb, path, positional parameters in the generated method's order)
ROUTES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "get_namespaced_custom_object": (
        "GET",
        _CUSTOM + "/{name}",
        ("group", "version", "namespace", "plural", "name"),
    ),
    "create_namespaced_custom_object": (
        "POST",
        _CUSTOM,
        ("group", "version", "namespace", "plural", "body"),
    ),
    "patch_namespaced_custom_object_status": (
        "PATCH",
        _CUSTOM + "/{name}/status",
        ("group", "version", "namespace", "plural", "name", "body"),
    ),
    "create_namespaced_job": ("POST", _JOBS, ("namespace", "body")),
    "read_namespaced_job": ("GET", _JOBS + "/{name}", _NAMED),
    "delete_namespaced_job": ("DELETE", _JOBS + "/{name}", _NAMED),
    "list_namespaced_pod": ("GET", _CORE + "/pods", ("namespace",)),
    "read_namespaced_deployment": ("GET", _DEPLOYMENTS + "/{name}", _NAMED),
    "patch_namespaced_deployment": ("PATCH", _DEPLOYMENTS + "/{name}", (*_NAMED, "body")),
    "delete_namespaced_deployment": ("DELETE", _DEPLOYMENTS + "/{name}", _NAMED),
    "read_namespaced_service": ("GET", _CORE + "/services/{name}", _NAMED),
    "patch_namespaced_service": ("PATCH", _CORE + "/services/{name}", (*_NAMED, "body")),
    "delete_namespaced_service": ("DELETE", _CORE + "/services/{name}", _NAMED),
    "read_namespaced_secret": ("GET", _CORE + "/secrets/{name}", _NAMED),
    "create_namespaced_event": ("POST", _CORE + "/events", ("namespace", "body")),
}

# Query parameters the operator passes, as the generated methods name them.
_QUERY = {
    "label_selector": "labelSelector",
    "propagation_policy": "propagationPolicy",
    "field_manager": "fieldManager",
    "force": "force",
}


class Rest:
    """Stands in for CoreV1Api, BatchV1Api, AppsV1Api and CustomObjectsApi at once
    (their method names do not collide)."""

    def __init__(self, creds: Credentials, pool_size: int = 32, user_agent: str = "") -> None:
        self.creds = creds
        self.auth = TokenSource(creds)
        self.user_agent = user_agent
        self.pool_size = pool_size
        self._pool_lock = threading.Lock()
        # An exec plugin runs now, so a failing one fails `Kube.connect` (NoCredentials).
        issued = self.auth.issued()
        self._pool_cert = exec_credential.client_pem(issued)
        self.pool = self._new_pool(issued)

    def _new_pool(self, issued: Issued | None) -> urllib3.PoolManager:
        https = self.creds.server.startswith("https")
        # Handlers run on many threads at once: `pool_size` connections, not 1.
        return urllib3.PoolManager(
            num_pools=2,
            maxsize=self.pool_size,
            ssl_context=self.creds.ssl_context(issued) if https else None,
        )

    def _pool_for(self, issued: Issued | None) -> urllib3.PoolManager:
        """The pool whose TLS connections present `issued`'s client certificate: a
        new one when the plugin gave a new certificate (open connections keep the
        one they were made with)."""
        cert = exec_credential.client_pem(issued)
        if cert != self._pool_cert:
            with self._pool_lock:
                if cert != self._pool_cert:
                    old, self.pool = self.pool, self._new_pool(issued)
                    self._pool_cert = cert
                    old.clear()  # idle connections close now, busy ones when released
        return self.pool

    def __getattr__(self, method: str) -> Any:
        if method in ROUTES:
            return lambda *args, **kwargs: self.call(method, *args, **kwargs)
        raise AttributeError(method)

    def call(self, method: str, *args: Any, **kwargs: Any) -> urllib3.BaseHTTPResponse:
        """One request; the urllib3 response (read), or ApiError on non-2xx."""
        verb, path, positional = ROUTES[method]
        params = dict(zip(positional, args, strict=False))
        body = kwargs.pop("body", params.pop("body", None))
        content_type = kwargs.pop("_content_type", None)
        timeout = kwargs.pop("_request_timeout", None)
        kwargs.pop("_preload_content", None)  # always raw: callers read `.data`
        unknown = set(kwargs) - set(_QUERY)
        if unknown:
            raise TypeError(f"{method}: unsupported arguments {sorted(unknown)}")
        quoted = {k: quote(str(v), safe="") for k, v in params.items()}
        url = self.creds.server + path.format(**quoted)
        query = [(_QUERY[k], _query_value(v)) for k, v in kwargs.items() if v is not None]
        if query:
            url += "?" + urlencode(query)
        headers = {"Accept": "application/json"}
        if self.user_agent:
            headers["User-Agent"] = self.user_agent
        data = None
        if body is not None:
            headers["Content-Type"] = content_type or "application/json"
            data = json.dumps(body).encode()  # JSON is YAML too (apply-patch+yaml)
        issued = self.auth.issued()
        response = self._send(verb, url, data, headers, timeout, issued)
        if response.status == 401 and issued is not None:
            # Revoked or expired before its stated time: a 401 was not acted on,
            # so sending it again with a fresh credential is safe, once.
            self.auth.invalidate(issued)
            fresh = self.auth.issued()
            if fresh is not issued:
                response = self._send(verb, url, data, headers, timeout, fresh)
        if not 200 <= response.status <= 299:
            raise ApiError(
                response.status, response.reason, response.data.decode("utf-8", "replace")
            )
        return response

    def _send(
        self,
        verb: str,
        url: str,
        data: bytes | None,
        headers: dict[str, str],
        timeout: Any,
        issued: Issued | None,
    ) -> urllib3.BaseHTTPResponse:
        headers = dict(headers)
        authorization = self.auth.authorization(issued)
        if authorization:
            headers["Authorization"] = authorization
        return self._pool_for(issued).request(
            verb,
            url,
            body=data,
            headers=headers,
            timeout=_timeout(timeout),
            preload_content=True,
        )


def _query_value(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def _timeout(value: Any) -> urllib3.Timeout | None:
    """The generated methods' `_request_timeout`: seconds, or (connect, read)."""
    if value is None:
        return None
    if isinstance(value, tuple):
        return urllib3.Timeout(connect=value[0], read=value[1])
    return urllib3.Timeout(total=value)
