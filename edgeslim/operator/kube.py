"""The operator's own API calls: a thin layer over the kubernetes client.

Plain dicts in and out (`_preload_content=False` + json): the typed models
cost time and memory for nothing when the objects are read through pydantic
anyway. kopf has its own connection for watching; this one is for the writes
and the few reads handlers need.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from edgeslim import __version__
from edgeslim.operator.names import API_GROUP, API_VERSION, PLURAL

Obj = dict[str, Any]
USER_AGENT = f"edgeslim-operator/{__version__}"
FIELD_MANAGER = "edgeslim-operator"
TIMEOUT = (5, 30)  # connect, read seconds: a hung call must not block a handler forever


class Conflict(Exception):
    """The object changed since it was read (HTTP 409): read again and recompute."""


def is_transient(exc: BaseException) -> bool:
    """Errors worth retrying: throttling, server errors, timeouts and network trouble."""
    if isinstance(exc, ApiException):
        return exc.status in (0, 408, 409, 429) or (exc.status or 0) >= 500
    return isinstance(exc, urllib3.exceptions.HTTPError | OSError | TimeoutError | Conflict)


def api_message(exc: ApiException) -> str:
    """The API server's one-line reason (from its Status body)."""
    try:
        return str(json.loads(exc.body).get("message") or exc.reason)
    except (TypeError, ValueError):
        return str(exc.reason)


def _json(resp: Any) -> Obj:
    return json.loads(resp.data)


class Kube:
    def __init__(self, api_client: client.ApiClient) -> None:
        self.api = api_client
        self.core = client.CoreV1Api(api_client)
        self.batch = client.BatchV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.apps = client.AppsV1Api(api_client)

    @classmethod
    def connect(cls, pool_size: int = 32) -> Kube:
        """In-cluster credentials, else KUBECONFIG / ~/.kube/config (as kopf does)."""
        configuration = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException:
            config.load_kube_config(client_configuration=configuration)
        # Handlers run on many threads at once; the default pool of 4 would queue them.
        configuration.connection_pool_maxsize = pool_size
        api = client.ApiClient(configuration)
        api.user_agent = USER_AGENT
        return cls(api)

    # -- CompressedModels ------------------------------------------------

    def get_model(self, namespace: str, name: str) -> Obj | None:
        try:
            return _json(
                self.custom.get_namespaced_custom_object(
                    API_GROUP,
                    API_VERSION,
                    namespace,
                    PLURAL,
                    name,
                    _preload_content=False,
                    _request_timeout=TIMEOUT,
                )
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def patch_model_status(
        self, namespace: str, name: str, status_patch: Obj, resource_version: str | None
    ) -> Obj:
        """Merge-patches status; with `resource_version` it applies only to that
        version of the object (optimistic locking), else raises Conflict."""
        body: Obj = {"status": status_patch}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        try:
            return _json(
                self.custom.patch_namespaced_custom_object_status(
                    API_GROUP,
                    API_VERSION,
                    namespace,
                    PLURAL,
                    name,
                    body,
                    _content_type="application/merge-patch+json",
                    _preload_content=False,
                    _request_timeout=TIMEOUT,
                )
            )
        except ApiException as exc:
            if exc.status == 409:
                raise Conflict(api_message(exc)) from exc
            raise

    # -- Jobs --------------------------------------------------------------

    def create_job(self, job: Obj) -> Obj | None:
        """Creates the Job; None when one of that name exists already (HTTP 409)."""
        try:
            return _json(
                self.batch.create_namespaced_job(
                    job["metadata"]["namespace"],
                    job,
                    _preload_content=False,
                    _request_timeout=TIMEOUT,
                )
            )
        except ApiException as exc:
            if exc.status == 409:
                return None
            raise

    def read_job(self, namespace: str, name: str) -> Obj | None:
        try:
            return _json(
                self.batch.read_namespaced_job(
                    name, namespace, _preload_content=False, _request_timeout=TIMEOUT
                )
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def delete_job(self, namespace: str, name: str) -> None:
        """Deletes a Job and, in the background, its pods; gone already is fine."""
        try:
            self.batch.delete_namespaced_job(
                name,
                namespace,
                propagation_policy="Background",
                _preload_content=False,
                _request_timeout=TIMEOUT,
            )
        except ApiException as exc:
            if exc.status != 404:
                raise

    def list_pods(self, namespace: str, selector: str) -> list[Obj]:
        resp = self.core.list_namespaced_pod(
            namespace, label_selector=selector, _preload_content=False, _request_timeout=TIMEOUT
        )
        return _json(resp).get("items") or []

    # -- serving: Deployments and Services -------------------------------------

    def read_deployment(self, namespace: str, name: str) -> Obj | None:
        try:
            return _json(
                self.apps.read_namespaced_deployment(
                    name, namespace, _preload_content=False, _request_timeout=TIMEOUT
                )
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def apply_deployment(self, manifest: Obj) -> Obj:
        """Server-side apply: creates or updates; fields the operator stops
        setting (a removed toleration) are removed, others' fields stay."""
        meta = manifest["metadata"]
        return _json(
            self.apps.patch_namespaced_deployment(
                meta["name"],
                meta["namespace"],
                manifest,
                field_manager=FIELD_MANAGER,
                force=True,
                _content_type="application/apply-patch+yaml",
                _preload_content=False,
                _request_timeout=TIMEOUT,
            )
        )

    def apply_service(self, manifest: Obj) -> Obj:
        meta = manifest["metadata"]
        return _json(
            self.core.patch_namespaced_service(
                meta["name"],
                meta["namespace"],
                manifest,
                field_manager=FIELD_MANAGER,
                force=True,
                _content_type="application/apply-patch+yaml",
                _preload_content=False,
                _request_timeout=TIMEOUT,
            )
        )

    def delete_serving(self, namespace: str, name: str) -> None:
        """Deletes the Deployment and Service `name`; gone already is fine."""
        for delete in (self.apps.delete_namespaced_deployment, self.core.delete_namespaced_service):
            try:
                delete(
                    name,
                    namespace,
                    propagation_policy="Background",
                    _preload_content=False,
                    _request_timeout=TIMEOUT,
                )
            except ApiException as exc:
                if exc.status != 404:
                    raise

    # -- Secrets and Events -------------------------------------------------

    def read_secret(self, namespace: str, name: str) -> dict[str, str] | None:
        try:
            obj = _json(
                self.core.read_namespaced_secret(
                    name, namespace, _preload_content=False, _request_timeout=TIMEOUT
                )
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}

    def post_event(self, event: Obj) -> None:
        self.core.create_namespaced_event(
            event["metadata"]["namespace"],
            event,
            _preload_content=False,
            _request_timeout=TIMEOUT,
        )
