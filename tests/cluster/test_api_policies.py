"""API-server behaviour the operator relies on: garbage collection, PodSecurity
admission and CEL validation of custom resources."""

from __future__ import annotations

import json
import uuid

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.cluster.fixtures import K8s
from tests.cluster.processes import wait_until

pytestmark = pytest.mark.cluster


def test_deleting_an_owner_deletes_its_children(k8s: K8s, namespace: str) -> None:
    owner = k8s.core.create_namespaced_config_map(
        namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="owner"))
    )
    child_meta = client.V1ObjectMeta(
        name="child",
        owner_references=[
            client.V1OwnerReference(
                api_version="v1", kind="ConfigMap", name="owner", uid=owner.metadata.uid
            )
        ],
    )
    k8s.core.create_namespaced_config_map(namespace, client.V1ConfigMap(metadata=child_meta))
    k8s.core.delete_namespaced_config_map("owner", namespace)

    def child_gone() -> bool:
        names = [cm.metadata.name for cm in k8s.core.list_namespaced_config_map(namespace).items]
        return "child" not in names

    wait_until(child_gone, 60, what="the garbage collector to delete the child")


def test_restricted_namespace_rejects_a_privileged_pod(k8s: K8s, namespace: str) -> None:
    k8s.core.patch_namespace(
        namespace,
        {"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "restricted"}}},
    )
    pod = client.V1Pod(
        metadata=client.V1ObjectMeta(name="root"),
        spec=client.V1PodSpec(
            containers=[
                client.V1Container(
                    name="main",
                    image="edgeslim:test",
                    command=["sleep", "1"],
                    security_context=client.V1SecurityContext(privileged=True),
                )
            ]
        ),
    )
    with pytest.raises(ApiException) as err:
        k8s.core.create_namespaced_pod(namespace, pod)
    assert err.value.status == 403
    message = json.loads(err.value.body)["message"]
    assert 'violates PodSecurity "restricted:latest"' in message
    assert 'privileged (container "main" must not set securityContext.privileged=true)' in message


def test_crd_cel_rule_rejects_an_object_that_breaks_it(k8s: K8s, namespace: str) -> None:
    group = f"t{uuid.uuid4().hex[:8]}.edgeslim.test"
    message = "minReplicas must not exceed maxReplicas"
    schema = {
        "type": "object",
        "properties": {
            "spec": {
                "type": "object",
                "properties": {
                    "minReplicas": {"type": "integer"},
                    "maxReplicas": {"type": "integer"},
                },
                "x-kubernetes-validations": [
                    {"rule": "self.minReplicas <= self.maxReplicas", "message": message}
                ],
            }
        },
    }
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"scalers.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": "scalers", "singular": "scaler", "kind": "Scaler"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": schema},
                }
            ],
        },
    }
    k8s.apiextensions.create_custom_resource_definition(crd)
    try:

        def established() -> bool:
            status = k8s.apiextensions.read_custom_resource_definition(f"scalers.{group}").status
            return any(
                c.type == "Established" and c.status == "True" for c in status.conditions or []
            )

        wait_until(established, 30, what="the CRD to be established")

        def scaler(name: str, low: int, high: int) -> dict[str, object]:
            return {
                "apiVersion": f"{group}/v1",
                "kind": "Scaler",
                "metadata": {"name": name},
                "spec": {"minReplicas": low, "maxReplicas": high},
            }

        create = k8s.custom.create_namespaced_custom_object
        create(group, "v1", namespace, "scalers", scaler("fine", 1, 3))
        with pytest.raises(ApiException) as err:
            create(group, "v1", namespace, "scalers", scaler("broken", 5, 2))
        assert err.value.status == 422
        assert message in json.loads(err.value.body)["message"]
    finally:
        k8s.apiextensions.delete_custom_resource_definition(f"scalers.{group}")
