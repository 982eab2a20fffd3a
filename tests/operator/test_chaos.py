"""Faults lose nothing: the scenarios of `bench/chaos.py`, small, on the real
control plane (see tests/operator/chaos.py for what each one drives and counts).

Every scenario must end with 0 duplicate Jobs, 0 lost results, 0 partial
artifacts and every object final.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.cluster.controlplane import ControlPlane
from tests.cluster.fixtures import K8s
from tests.cluster.node_agent import NodeAgent
from tests.operator import chaos
from tests.s3server import S3Server

pytestmark = pytest.mark.cluster


def _bed(k8s, namespace, node_agent, s3, run_operator, control_plane=None) -> chaos.Bed:
    bucket = f"chaos-{uuid.uuid4().hex[:12]}"
    return chaos.Bed(k8s, namespace, node_agent, s3, bucket, run_operator, control_plane).prepare()


def _check(row: chaos.Row) -> None:
    print(chaos.table([row]), *row.notes, sep="\n")
    assert (row.duplicates, row.lost, row.partial) == (0, 0, 0), row.notes
    assert row.final == row.checks, row.notes


@pytest.fixture
def faulty_s3() -> Iterator[S3Server]:
    with S3Server(faults=True) as server:
        yield server


def test_operator_sigkilled_at_random_points_loses_nothing(
    k8s: K8s, namespace: str, node_agent: NodeAgent, s3_server: S3Server, run_operator
) -> None:
    bed = _bed(k8s, namespace, node_agent, s3_server, run_operator)
    row = chaos.operator_kills(
        bed, objects=3, min_kills=4, min_reconciles=0, interval=(0.5, 2.0), deadline=120
    )
    assert row.faults >= 4 and row.objects >= 3
    _check(row)


def test_s3_down_during_the_model_upload_then_back_the_job_retries(
    k8s: K8s, namespace: str, node_agent: NodeAgent, faulty_s3: S3Server, run_operator, digits
) -> None:
    bed = _bed(k8s, namespace, node_agent, faulty_s3, run_operator)
    bed.upload([(digits.model_path, "digits/cnn.onnx"), (digits.val, "digits/val.npz")])
    row = chaos.s3_outage(bed, cuts=(1,), deadline=240)
    assert row.faults == 1
    _check(row)
    assert any("retried and completed" in n for n in row.notes), row.notes


def test_kube_apiserver_restarted_mid_run_the_operator_recovers_by_itself(
    k8s: K8s,
    namespace: str,
    node_agent: NodeAgent,
    s3_server: S3Server,
    run_operator,
    control_plane: ControlPlane,
) -> None:
    bed = _bed(k8s, namespace, node_agent, s3_server, run_operator, control_plane)
    row = chaos.apiserver_restarts(bed, objects=3, restarts=1, down_seconds=3, deadline=150)
    assert row.faults == 1
    assert any("ran throughout" in n for n in row.notes), row.notes
    _check(row)


def test_an_artifact_flipped_in_storage_is_never_rolled_out(
    k8s: K8s, namespace: str, node_agent: NodeAgent, s3_server: S3Server, run_operator
) -> None:
    bed = _bed(k8s, namespace, node_agent, s3_server, run_operator)
    row = chaos.corrupt_artifact(bed, objects=1, deadline=90)
    _check(row)
