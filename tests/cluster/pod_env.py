"""What a container's process sees: its environment, arguments and volumes.

The node agent runs containers as local processes, so Kubernetes' file-system
contract is translated into environment variables:

* ``EDGESLIM_TERMINATION_LOG`` -- the file standing in for the container's
  ``terminationMessagePath`` (a process should write its termination message
  there, falling back to the path from the spec when the variable is unset).
* ``EDGESLIM_MOUNT_<PATH>`` -- for each ``volumeMount``, the local directory
  backing it; ``<PATH>`` is the mount path upper-cased with every run of
  non-alphanumerics turned into ``_`` (``/work/models`` ->
  ``EDGESLIM_MOUNT_WORK_MODELS``). emptyDir, configMap, secret, downwardAPI
  and projected volumes are materialised in the pod's directory; a hostPath is
  used as is; other kinds (PVCs, ...) are not backed and get no variable.
* ``EDGESLIM_POD_DIR`` -- the pod's scratch directory (also ``HOME``).
* ``KUBERNETES_SERVICE_HOST``/``KUBERNETES_SERVICE_PORT`` -- the API server
  itself (loopback). With the injected service-account volume materialised
  (bound token, ``ca.crt``, ``namespace``), a process can use in-cluster
  config as its ServiceAccount: the files are under the directory named by
  ``EDGESLIM_MOUNT_VAR_RUN_SECRETS_KUBERNETES_IO_SERVICEACCOUNT``.

The image is ignored: ``PATH`` starts with the test interpreter's bin directory,
so a container running ``edgeslim ...`` or ``python ...`` uses the project's venv.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from kubernetes.client import CoreV1Api
from kubernetes.client.exceptions import ApiException
from kubernetes.utils import parse_quantity

Obj = dict[str, Any]

TERMINATION_LOG_ENV = "EDGESLIM_TERMINATION_LOG"
MOUNT_ENV_PREFIX = "EDGESLIM_MOUNT_"
POD_DIR_ENV = "EDGESLIM_POD_DIR"


class MissingReference(Exception):
    """A non-optional Secret/ConfigMap (key) the container needs does not exist yet.

    The kubelet reports this as CreateContainerConfigError and keeps retrying;
    so does the agent.
    """


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: known names are substituted, unknown
    references stay verbatim, and ``$$`` escapes a ``$``."""
    out: list[str] = []
    i = 0
    while i < len(text):
        if text[i] == "$" and i + 1 < len(text):
            nxt = text[i + 1]
            if nxt == "$":
                out.append("$")
                i += 2
                continue
            if nxt == "(":
                end = text.find(")", i + 2)
                if end != -1:
                    name = text[i + 2 : end]
                    out.append(env[name] if name in env else text[i : end + 1])
                    i = end + 1
                    continue
        out.append(text[i])
        i += 1
    return "".join(out)


def mount_env_name(mount_path: str) -> str:
    """``/work/models`` -> ``EDGESLIM_MOUNT_WORK_MODELS``."""
    return MOUNT_ENV_PREFIX + re.sub(r"[^A-Za-z0-9]+", "_", mount_path).strip("_").upper()


def service_environment(api_host: str) -> dict[str, str]:
    """``KUBERNETES_SERVICE_HOST``/``_PORT`` as a kubelet sets them, except that
    they name the API server's loopback address: there is no kube-proxy to
    route the ``kubernetes`` Service's ClusterIP."""
    url = urlsplit(api_host)
    port = str(url.port or 443)
    return {
        "KUBERNETES_SERVICE_HOST": url.hostname or "127.0.0.1",
        "KUBERNETES_SERVICE_PORT": port,
        "KUBERNETES_SERVICE_PORT_HTTPS": port,
    }


def base_environment(pod_dir: Path) -> dict[str, str]:
    """The environment every container starts from (the image's, in a real node).

    The test process's own environment is deliberately *not* inherited, so a
    container only sees what its spec gives it -- credentials included.
    """
    venv_bin = os.path.dirname(sys.executable)
    env = {
        "PATH": f"{venv_bin}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(pod_dir),
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        "PYTHONUNBUFFERED": "1",
        POD_DIR_ENV: str(pod_dir),
    }
    if "VIRTUAL_ENV" in os.environ:
        env["VIRTUAL_ENV"] = os.environ["VIRTUAL_ENV"]
    return env


class Materialiser:
    """Reads the API objects a pod refers to and turns them into env and files."""

    def __init__(self, core: CoreV1Api, node: Obj) -> None:
        self.core = core
        self.node = node

    def _read(self, kind: str, namespace: str, name: str) -> Obj | None:
        reader = (
            self.core.read_namespaced_secret
            if kind == "secret"
            else self.core.read_namespaced_config_map
        )
        try:
            resp = reader(name, namespace, _preload_content=False)
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        return json.loads(resp.data)

    def _data(self, kind: str, namespace: str, name: str, optional: bool) -> dict[str, bytes]:
        obj = self._read(kind, namespace, name)
        if obj is None:
            if optional:
                return {}
            raise MissingReference(f'{kind} "{name}" not found')
        if kind == "secret":
            return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
        data = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
        data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
        return data

    # -- environment ------------------------------------------------------

    def environment(self, pod: Obj, container: Obj, extra: Mapping[str, str]) -> dict[str, str]:
        """The kubelet's order: envFrom sources, then env entries, each value
        expanded against what is defined before it."""
        namespace = pod["metadata"]["namespace"]
        env: dict[str, str] = dict(extra)
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            for kind, key in (("configMap", "configMapRef"), ("secret", "secretRef")):
                ref = source.get(key)
                if ref:
                    data = self._data(
                        kind.lower(), namespace, ref["name"], bool(ref.get("optional"))
                    )
                    env.update({prefix + k: v.decode() for k, v in data.items()})
        for var in container.get("env") or []:
            name = var["name"]
            if "valueFrom" in var:
                value = self._value_from(pod, container, var["valueFrom"])
                if value is None:
                    continue
                env[name] = value
            else:
                env[name] = expand(var.get("value", ""), env)
        return env

    def _value_from(self, pod: Obj, container: Obj, source: Obj) -> str | None:
        namespace = pod["metadata"]["namespace"]
        if "fieldRef" in source:
            return field_value(pod, source["fieldRef"]["fieldPath"])
        if "resourceFieldRef" in source:
            return self._resource_value(pod, container, source["resourceFieldRef"])
        for kind, key in (("configmap", "configMapKeyRef"), ("secret", "secretKeyRef")):
            ref = source.get(key)
            if ref:
                optional = bool(ref.get("optional"))
                data = self._data(kind, namespace, ref["name"], optional)
                if ref["key"] not in data:
                    if optional:
                        return None
                    raise MissingReference(f'key "{ref["key"]}" not found in {kind} {ref["name"]}')
                return data[ref["key"]].decode()
        raise MissingReference(f"unsupported valueFrom {sorted(source)}")

    def _resource_value(self, pod: Obj, container: Obj, ref: Obj) -> str:
        if ref.get("containerName"):
            all_containers = pod["spec"]["containers"] + (pod["spec"].get("initContainers") or [])
            container = next(c for c in all_containers if c["name"] == ref["containerName"])
        kind, _, resource = ref["resource"].partition(".")
        resources = container.get("resources") or {}
        quantity = (resources.get(kind) or {}).get(resource)
        if quantity is None and kind == "limits":
            # An unset limit reads as the node's allocatable, as on a kubelet.
            quantity = self.node["status"]["allocatable"].get(resource, "0")
        value = parse_quantity(quantity or "0") / parse_quantity(ref.get("divisor") or "1")
        return str(math.ceil(value))

    # -- volumes ------------------------------------------------------------

    def volumes(self, pod: Obj, pod_dir: Path) -> dict[str, Path]:
        """Creates a directory per volume the agent can back; name -> path."""
        namespace = pod["metadata"]["namespace"]
        paths: dict[str, Path] = {}
        for volume in pod["spec"].get("volumes") or []:
            name = volume["name"]
            target = pod_dir / "volumes" / name
            if "emptyDir" in volume:
                target.mkdir(parents=True, exist_ok=True)
            elif "hostPath" in volume:
                target = Path(volume["hostPath"]["path"])
            elif "configMap" in volume or "secret" in volume:
                target.mkdir(parents=True, exist_ok=True)
                self._object_files(namespace, volume, target)
            elif "downwardAPI" in volume:
                target.mkdir(parents=True, exist_ok=True)
                self._downward_files(pod, volume["downwardAPI"], target)
            elif "projected" in volume:
                # What the ServiceAccount admission plugin injects for API
                # access: a bound token, kube-root-ca.crt and the namespace.
                target.mkdir(parents=True, exist_ok=True)
                for source in volume["projected"].get("sources") or []:
                    if "serviceAccountToken" in source:
                        token = source["serviceAccountToken"]
                        _write(target / token["path"], self._token(pod, token).encode())
                    elif "downwardAPI" in source:
                        self._downward_files(pod, source["downwardAPI"], target)
                    else:
                        self._object_files(namespace, source, target)
            else:
                continue
            paths[name] = target
        return paths

    def _object_files(self, namespace: str, volume: Obj, target: Path) -> None:
        """A configMap or secret volume (or projection): one file per key."""
        kind = "configmap" if "configMap" in volume else "secret"
        source = volume.get("configMap") or volume.get("secret")
        if source is None:
            return
        ref_name = source.get("name") or source.get("secretName")
        data = self._data(kind, namespace, ref_name, bool(source.get("optional")))
        for item in source.get("items") or [{"key": k, "path": k} for k in data]:
            if item["key"] in data:
                _write(target / item["path"], data[item["key"]])

    def _downward_files(self, pod: Obj, source: Obj, target: Path) -> None:
        for item in source.get("items") or []:
            if "fieldRef" in item:
                _write(
                    target / item["path"], field_value(pod, item["fieldRef"]["fieldPath"]).encode()
                )

    def _token(self, pod: Obj, projection: Obj) -> str:
        """A token bound to the pod, from the TokenRequest API as a kubelet gets it."""
        meta = pod["metadata"]
        spec: Obj = {
            "audiences": [projection["audience"]] if projection.get("audience") else [],
            "expirationSeconds": projection.get("expirationSeconds", 3600),
            "boundObjectRef": {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": meta["name"],
                "uid": meta["uid"],
            },
        }
        account = pod["spec"].get("serviceAccountName") or "default"
        resp = self.core.create_namespaced_service_account_token(
            account, meta["namespace"], {"spec": spec}, _preload_content=False
        )
        return str(json.loads(resp.data)["status"]["token"])


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def mount_environment(container: Obj, volumes: Mapping[str, Path]) -> dict[str, str]:
    """``EDGESLIM_MOUNT_<PATH>`` for each of the container's backed mounts."""
    env: dict[str, str] = {}
    for mount in container.get("volumeMounts") or []:
        base = volumes.get(mount["name"])
        if base is None:
            continue
        path = base / mount["subPath"] if mount.get("subPath") else base
        if mount.get("subPath"):
            path.mkdir(parents=True, exist_ok=True)
        env[mount_env_name(mount["mountPath"])] = str(path)
    return env


_LABEL_REF = re.compile(r"metadata\.(labels|annotations)\['(.+)'\]$")


def field_value(pod: Obj, path: str) -> str:
    """The downward API's ``fieldRef`` paths."""
    meta, spec, status = pod["metadata"], pod["spec"], pod.get("status") or {}
    match = _LABEL_REF.match(path)
    if match:
        return (meta.get(match.group(1)) or {}).get(match.group(2), "")
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.hostIP": status.get("hostIP", ""),
        "status.hostIPs": ",".join(i["ip"] for i in status.get("hostIPs") or []),
        "status.podIP": status.get("podIP", ""),
        "status.podIPs": ",".join(i["ip"] for i in status.get("podIPs") or []),
    }
    if path in simple:
        return simple[path]
    if path in ("metadata.labels", "metadata.annotations"):
        items = meta.get(path.split(".")[1]) or {}
        return "\n".join(f'{k}="{v}"' for k, v in sorted(items.items()))
    raise MissingReference(f"unsupported fieldRef {path!r}")
