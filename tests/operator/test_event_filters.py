"""Which watch events reach a handler thread: `handlers.job_has_work` lets through
only the Job events `compression.job_changed` acts on."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import kopf

from edgeslim.operator.handlers import job_has_work


def _job(conditions: list[dict[str, str]] | None = None, suspend: bool = False) -> kopf.Body:
    raw: dict[str, Any] = {
        "metadata": {"name": "m-1234", "namespace": "ns"},
        "spec": {"suspend": suspend},
        "status": {"conditions": conditions or []},
    }
    return kopf.Body(raw)


def _memo(kueue: str = "") -> Any:
    return SimpleNamespace(runtime=SimpleNamespace(settings=SimpleNamespace(kueue_queue=kueue)))


def test_only_finished_or_deleted_jobs_reach_a_thread() -> None:
    complete = _job([{"type": "Complete", "status": "True"}])
    failed = _job([{"type": "Failed", "status": "True"}])
    running = _job([{"type": "SuccessCriteriaMet", "status": "True"}])
    assert job_has_work(type="MODIFIED", body=complete, memo=_memo())
    assert job_has_work(type="MODIFIED", body=failed, memo=_memo())
    assert job_has_work(type=None, body=complete, memo=_memo())  # the initial listing
    assert job_has_work(type="DELETED", body=running, memo=_memo())
    assert not job_has_work(type="ADDED", body=running, memo=_memo())
    assert not job_has_work(type="MODIFIED", body=_job(suspend=True), memo=_memo())


def test_with_kueue_an_admitted_job_reaches_a_thread() -> None:
    admitted = _job()
    assert job_has_work(type="MODIFIED", body=admitted, memo=_memo("team-queue"))
    assert not job_has_work(type="MODIFIED", body=_job(suspend=True), memo=_memo("team-queue"))
