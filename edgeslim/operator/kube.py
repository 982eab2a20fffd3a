"""The operator's own API calls: a thin layer over `rest` (urllib3, no kubernetes client).

Plain dicts in and out (`_preload_content=False` + json): the typed models
cost time and memory for nothing when the objects are read through pydantic
anyway. kopf has its own connection for watching; this one is for the writes
and the few reads handlers need.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable
from typing import Any

import urllib3

from edgeslim import __version__
from edgeslim.api.policy import POLICY_PLURAL
from edgeslim.operator import credentials
from edgeslim.operator.names import API_GROUP, API_VERSION, PLURAL
from edgeslim.operator.rest import ApiError, Rest

Obj = dict[str, Any]
USER_AGENT = f"edgeslim-operator/{__version__}"
FIELD_MANAGER = "edgeslim-operator"
TIMEOUT = (5, 30)  # connect, read seconds: a hung call must not block a handler forever


class Conflict(Exception):
    """The object changed since it was read (HTTP 409): read again and recompute."""


def is_transient(exc: BaseException) -> bool:
    """Errors worth retrying: throttling, server errors, timeouts and network trouble."""
    if isinstance(exc, ApiError):
        return exc.status in (0, 408, 409, 429) or (exc.status or 0) >= 500
    return isinstance(exc, urllib3.exceptions.HTTPError | OSError | TimeoutError | Conflict)


def api_message(exc: ApiError) -> str:
    """The API server's one-line reason (from its Status body)."""
    try:
        return str(json.loads(exc.body).get("message") or exc.reason)
    except (TypeError, ValueError):
        return str(exc.reason)


def _json(resp: Any) -> Obj:
    return json.loads(resp.data)


def _request(
    call: Callable[..., Any],
    *args: Any,
    missing_ok: bool = False,
    exists_ok: bool = False,
    **kwargs: Any,
) -> Obj | None:
    """One API call, JSON out; None where 404 (`missing_ok`) or 409 (`exists_ok`)
    is an expected answer rather than an error."""
    try:
        return _json(call(*args, _preload_content=False, _request_timeout=TIMEOUT, **kwargs))
    except ApiError as exc:
        if (missing_ok and exc.status == 404) or (exists_ok and exc.status == 409):
            return None
        raise


class Kube:
    def __init__(self, rest: Rest) -> None:
        self.rest = rest
        # The generated API classes' names and answers, without the client (see `rest`).
        self.core = self.batch = self.custom = self.apps = rest

    @classmethod
    def connect(cls, pool_size: int = 32, kubeconfig: str | os.PathLike[str] | None = None) -> Kube:
        """In-cluster credentials, else KUBECONFIG / ~/.kube/config (`credentials.load`;
        raises `credentials.NoCredentials`)."""
        return cls(Rest(credentials.load(kubeconfig), pool_size, USER_AGENT))

    # -- CompressedModels ------------------------------------------------

    def get_model(self, namespace: str, name: str) -> Obj | None:
        return _request(
            self.custom.get_namespaced_custom_object,
            API_GROUP,
            API_VERSION,
            namespace,
            PLURAL,
            name,
            missing_ok=True,
        )

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
        except ApiError as exc:
            if exc.status == 409:
                raise Conflict(api_message(exc)) from exc
            raise

    def create_model(self, body: Obj) -> Obj | None:
        """Creates a CompressedModel (a CompressionPolicy's discovery); None when one
        of that name exists already (HTTP 409): it is left as it is."""
        return _request(
            self.custom.create_namespaced_custom_object,
            API_GROUP,
            API_VERSION,
            body["metadata"]["namespace"],
            PLURAL,
            body,
            exists_ok=True,
        )

    # -- CompressionPolicies -------------------------------------------------

    def patch_policy_status(self, namespace: str, name: str, status: Obj) -> Obj | None:
        """Merge-patches a policy's status (the model counts); None when it is gone.
        No resourceVersion: the counts are recomputed whole from the indexes on
        every write, so the last write is the right one."""
        return _request(
            self.custom.patch_namespaced_custom_object_status,
            API_GROUP,
            API_VERSION,
            namespace,
            POLICY_PLURAL,
            name,
            {"status": status},
            missing_ok=True,
            _content_type="application/merge-patch+json",
        )

    # -- Jobs --------------------------------------------------------------

    def create_job(self, job: Obj) -> Obj | None:
        """Creates the Job; None when one of that name exists already (HTTP 409)."""
        return _request(
            self.batch.create_namespaced_job, job["metadata"]["namespace"], job, exists_ok=True
        )

    def read_job(self, namespace: str, name: str) -> Obj | None:
        return _request(self.batch.read_namespaced_job, name, namespace, missing_ok=True)

    def delete_job(self, namespace: str, name: str) -> None:
        """Deletes a Job and, in the background, its pods; gone already is fine."""
        _request(
            self.batch.delete_namespaced_job,
            name,
            namespace,
            propagation_policy="Background",
            missing_ok=True,
        )

    def list_pods(self, namespace: str, selector: str) -> list[Obj]:
        found = _request(self.core.list_namespaced_pod, namespace, label_selector=selector)
        return (found or {}).get("items") or []

    # -- serving: Deployments and Services -------------------------------------

    def read_deployment(self, namespace: str, name: str) -> Obj | None:
        return _request(self.apps.read_namespaced_deployment, name, namespace, missing_ok=True)

    def read_service(self, namespace: str, name: str) -> Obj | None:
        return _request(self.core.read_namespaced_service, name, namespace, missing_ok=True)

    def _apply(self, call: Callable[..., Any], manifest: Obj, uid: str | None) -> Obj:
        """Server-side apply, guarded by what `ownership.claim` saw.

        `uid` None (nothing of that name was there): create-only. An apply that
        carries a resourceVersion creates the object when none exists and is
        refused (409) when one does; "1" never matches, since an object in a
        namespace is written after its namespace, never at etcd's first revision.
        `uid` set (the object is this model's): the apply reaches only that very
        object; a replacement of the same name is refused (422, uid immutable).
        Either refusal raises Conflict: read again, and claim again.

        Apply, unlike create-then-apply, leaves the operator the only manager of
        what it sets, so a field it stops setting (a removed toleration) goes.
        `force` only settles field conflicts with other managers of our own object.
        """
        meta = manifest["metadata"]
        guard = {"uid": uid} if uid else {"resourceVersion": "1"}
        body = {**manifest, "metadata": {**meta, **guard}}
        try:
            applied = _request(
                call,
                meta["name"],
                meta["namespace"],
                body,
                field_manager=FIELD_MANAGER,
                force=True,
                _content_type="application/apply-patch+yaml",
            )
        except ApiError as exc:
            uid_refused = exc.status == 422 and "metadata.uid" in api_message(exc)
            if exc.status == 409 or uid_refused:
                raise Conflict(
                    f"{manifest['kind']} {meta['name']} changed since it was checked: "
                    f"{api_message(exc)}"
                ) from exc
            raise
        assert applied is not None
        return applied

    def apply_deployment(self, manifest: Obj, uid: str | None) -> Obj:
        return self._apply(self.apps.patch_namespaced_deployment, manifest, uid)

    def apply_service(self, manifest: Obj, uid: str | None) -> Obj:
        return self._apply(self.core.patch_namespaced_service, manifest, uid)

    def delete_deployment(self, namespace: str, name: str, uid: str) -> None:
        """Deletes exactly the Deployment object `uid` (a precondition): gone
        already, or replaced by another object of that name (409), is fine."""
        self._delete_exact(self.apps.delete_namespaced_deployment, namespace, name, uid)

    def delete_service(self, namespace: str, name: str, uid: str) -> None:
        self._delete_exact(self.core.delete_namespaced_service, namespace, name, uid)

    def _delete_exact(self, call: Callable[..., Any], namespace: str, name: str, uid: str) -> None:
        body = {"propagationPolicy": "Background", "preconditions": {"uid": uid}}
        _request(call, name, namespace, body=body, missing_ok=True, exists_ok=True)

    # -- Secrets and Events -------------------------------------------------

    def read_secret(self, namespace: str, name: str) -> dict[str, str] | None:
        obj = _request(self.core.read_namespaced_secret, name, namespace, missing_ok=True)
        if obj is None:
            return None
        return {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}

    def post_event(self, event: Obj) -> None:
        self.core.create_namespaced_event(
            event["metadata"]["namespace"],
            event,
            _preload_content=False,
            _request_timeout=TIMEOUT,
        )
