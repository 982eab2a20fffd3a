"""Finished Jobs are handled on threads of their own (`handlers.job_event`), not on
kopf's shared handler pool, where they waited behind creation handlers."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import kopf

from edgeslim.operator import compression, handlers
from edgeslim.operator.names import MODEL_LABEL
from edgeslim.operator.queue import Slots, Waiting
from edgeslim.operator.runtime import Runtime
from edgeslim.operator.settings import Settings


def _job(name: str, model: str) -> kopf.Body:
    return kopf.Body(
        {"metadata": {"namespace": "ns", "name": name, "labels": {MODEL_LABEL: model}}}
    )


def test_a_deleted_job_frees_its_slot_while_the_handler_pool_is_busy(monkeypatch) -> None:
    rt = Runtime(settings=Settings.from_env(), kube=None, slots=Slots(1))  # type: ignore[arg-type]
    first = Waiting("2026-01-01T00:00:00Z", "ns", "a", "a-1")
    second = Waiting("2026-01-01T00:00:01Z", "ns", "b", "b-1")
    assert rt.slots.take([first], {}) == [first]
    assert rt.slots.take([second], {}) == []  # the one slot is held
    ran_on: list[str] = []
    real = compression.job_changed

    def recording(*args: object) -> None:
        ran_on.append(threading.current_thread().name)
        real(*args)

    monkeypatch.setattr(compression, "job_changed", recording)
    release = threading.Event()

    async def main() -> None:
        # kopf's handler pool with every thread taken (as by 1,000 creation handlers).
        pool = ThreadPoolExecutor(2)
        loop = asyncio.get_running_loop()
        busy = [loop.run_in_executor(pool, release.wait) for _ in range(2)]
        loop.set_default_executor(pool)
        memo = SimpleNamespace(runtime=rt)
        await asyncio.wait_for(
            handlers.job_event(type="DELETED", body=_job("a-1", "a"), memo=memo), 10
        )
        release.set()
        await asyncio.gather(*busy)

    asyncio.run(main())
    assert ran_on and ran_on[0].startswith("job-event")
    assert rt.slots.take([second], {}) == [second]  # the slot came free
