"""The few API calls the operator makes, without the generated API classes.

The kubernetes client's `CoreV1Api` and `BatchV1Api` modules import some 300
model classes and wrap every method in a pydantic `validate_call` the first
time they are used: about 29 MB of the operator's memory, for calls whose
bodies are plain dicts anyway (`kube.py` reads and writes JSON). `Rest` serves
the same method names, signatures and answers (`_preload_content=False`: the
raw response; non-2xx: `ApiException`) through the client's own `ApiClient`,
so credentials, TLS, token refresh and proxies stay the client's. A method
not in the table falls back to the generated class, loaded only then.
"""

from __future__ import annotations

from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

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
# By name: touching `client.CoreV1Api` is what loads its models.
_FALLBACK = ("CoreV1Api", "BatchV1Api", "AppsV1Api", "CustomObjectsApi")


class Rest:
    """Stands in for CoreV1Api, BatchV1Api, AppsV1Api and CustomObjectsApi at once
    (their method names do not collide)."""

    def __init__(self, api_client: client.ApiClient) -> None:
        self.api_client = api_client

    def __getattr__(self, method: str) -> Any:
        if method in ROUTES:
            return lambda *args, **kwargs: self.call(method, *args, **kwargs)
        for name in _FALLBACK:
            api = getattr(client, name)
            if hasattr(api, method):
                return getattr(api(self.api_client), method)
        raise AttributeError(method)

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """One request; the raw urllib3 response (read), or ApiException on non-2xx."""
        verb, path, positional = ROUTES[method]
        params = dict(zip(positional, args, strict=False))
        body = kwargs.pop("body", params.pop("body", None))
        content_type = kwargs.pop("_content_type", None)
        timeout = kwargs.pop("_request_timeout", None)
        kwargs.pop("_preload_content", None)  # always raw: callers read `.data`
        unknown = set(kwargs) - set(_QUERY)
        if unknown:
            raise TypeError(f"{method}: unsupported arguments {sorted(unknown)}")
        query = [(_QUERY[k], v) for k, v in kwargs.items() if v is not None]
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type or "application/json"
        request = self.api_client.param_serialize(
            method=verb,
            resource_path=path,
            path_params=params,
            query_params=query,
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self.api_client.call_api(*request, _request_timeout=timeout)
        response.read()
        if not 200 <= response.status <= 299:
            raise ApiException.from_response(http_resp=response, body=None, data=None)
        return response.response
